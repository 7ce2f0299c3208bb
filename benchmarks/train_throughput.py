"""Pretraining throughput and MFU of lmforge's own training loop (train_loop.train) on GPUs.

    python benchmarks/train_throughput.py [--steps 40] [--vocab 32000] [overrides...]
    python -m torch.distributed.run --standalone --nproc-per-node=2 benchmarks/train_throughput.py [overrides...]

The model comes from pretrain.build_model with a preset (default `model=llama_125m train=gpu`, Hydra overrides
as in the pipeline); the data are random token ids in packed blocks of model.max_seq_len, batched by
pretrain.block_batch, so no tokenizer or corpus is needed and MLflow is not: the loop logs into a recorder.
Tokens/s and MFU are the loop's own logged metrics (every 10 steps); the summary is the median of the
intervals after the first, which holds compilation. MFU = 6·N·tokens/s + 12·L·d·seq per token (N: weights
outside the input embedding), over the GPU's dense bf16 peak (train_loop.PEAK_BF16_TFLOPS: 989 TFLOP/s
for H100 SXM and H200). Scaling efficiency on 2 GPUs = tokens/s on 2 / (2 × tokens/s on 1), same
micro-batch per GPU.

Measured (every command and its output verbatim: benchmarks/results/gpu-h200.txt; discussion: benchmarks/README.md). llama_125m, seq 1024, bf16, SDPA, torch.compile, fused AdamW:

    nvidia-h200, 1 process:
      python3 benchmarks/train_throughput.py --steps 30                # train=gpu: ZeRO-1, micro 32, accum 8
        tokens/s=471,596 mfu=0.367 peak_mem_gib=19.2
    nvidia-h200-x2 (2 H200, NV18), same settings, before DeepSpeed's bf16 overflow check was turned off:
      python3 benchmarks/train_throughput.py --steps 30
        tokens/s=469,229 mfu=0.366
      python3 -m torch.distributed.run --standalone --nproc-per-node=2 benchmarks/train_throughput.py --steps 30
        tokens/s=941,185 tokens/s/gpu=470,592 mfu=0.367      scaling efficiency 941,185 / (2 x 469,229) = 1.003
    nvidia-h200, the wider presets:
      python3 benchmarks/train_throughput.py --steps 20 model=llama_350m
        tokens/s=172,137 mfu=0.409 peak_mem_gib=40.1
      python3 benchmarks/train_throughput.py --steps 20 model=llama_1b train.micro_batch_size=8
        tokens/s=61,014 mfu=0.451 peak_mem_gib=43.2             (seq 2048)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from lmforge import config, pretrain, stage, train_loop


class Recorder:
    """Stands in for the MLflow tracker: keeps what the loop logs."""

    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.logged.append((step, metrics))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.micro_batch_size=64")
    args = parser.parse_args()

    chosen = {override.split("=")[0] for override in args.overrides}
    presets = [preset for preset in ("model=llama_125m", "train=gpu") if preset.split("=")[0] not in chosen]
    cfg = config.load([*presets, *args.overrides])
    model_cfg = OmegaConf.to_object(cfg.model)
    tcfg = dataclasses.replace(
        OmegaConf.to_object(cfg.train),
        steps=args.steps,
        warmup_steps=5,
        eval_every=args.steps,
        checkpoint_every=args.steps,
        eval_batches=1,
    )
    stage.seed_everything(cfg.seed)
    model = pretrain.build_model(model_cfg, args.vocab, dict(bos_token_id=1, eos_token_id=2, pad_token_id=0))
    seq = model_cfg.max_seq_len
    tokens = np.random.default_rng(0).integers(0, args.vocab, size=4096 * seq, dtype=np.int32)
    blocks = pretrain.Blocks(tokens, seq)
    validation = [pretrain.block_batch(blocks, list(range(tcfg.micro_batch_size)))]

    recorder = Recorder()
    with tempfile.TemporaryDirectory() as checkpoints:
        train_loop.train(
            model,
            lambda idx: pretrain.block_batch(blocks, idx),
            len(blocks),
            validation,
            tcfg,
            cfg.seed,
            Path(checkpoints),
            recorder,
        )
    if not stage.is_rank_zero():
        return
    intervals = [m for _, m in recorder.logged if "mfu" in m or "tokens_per_second" in m][1:]
    tokens_per_s = statistics.median(m["tokens_per_second"] for m in intervals)
    mfu = statistics.median(m.get("mfu", float("nan")) for m in intervals)
    world = int(os.environ["WORLD_SIZE"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    overrides = " ".join(args.overrides) or "-"
    print(
        f"RESULT device={device} gpus={world} model={model_cfg.name} seq={seq} "
        f"micro_batch={tcfg.micro_batch_size} precision={tcfg.precision} zero={tcfg.zero_stage} "
        f"compile={tcfg.compile} overrides={overrides} tokens/s={tokens_per_s:,.0f} "
        f"tokens/s/gpu={tokens_per_s / world:,.0f} mfu={mfu:.3f} "
        f"peak_mem_gib={torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0:.1f}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
