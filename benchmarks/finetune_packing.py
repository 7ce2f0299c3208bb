"""Packing in fine-tuning: what `finetune.packing` changes in the rows a step trains on, and in its speed.

    python benchmarks/finetune_packing.py TASKS_DIR TOKENIZER_DIR [--steps 20] [--micro-batch 16] [overrides...]

TASKS_DIR is a tasks stage's output (results/tasks/<key>), TOKENIZER_DIR a tokenizer stage's tokenizer/ (or a
model directory); the overrides are Hydra's and choose the model (default conf/model/tiny.yaml, random
weights) and finetune.data. For packing off and on, the same rows as the finetune stage builds (the seeded
mixture, lmforge.finetune.training_rows): examples per row, the share of padding among the tokens through
the model, tokens through the model per step, and the wall time of --steps forward and backward passes
(AdamW) on this machine's CPU or GPU.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from transformers import AutoTokenizer

from lmforge import config, finetune, pretrain, tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tasks_dir")
    parser.add_argument("tokenizer_dir")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    cfg = config.load(args.overrides)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_dir)
    conversations = tasks.examples(args.tasks_dir, "train")
    context = cfg.model.max_seq_len
    examples = [
        finetune.sft_examples(tokenizer, conversations[t.name], finetune.task_limit(t, context), t.overlong, Counter())
        for t in cfg.finetune.data
    ]
    lengths = sorted(len(e["input_ids"]) for task in examples for e in task)
    print(
        f"{len(lengths)} training examples, tokens: median {lengths[len(lengths) // 2]}, "
        f"longest {lengths[-1]}; {args.steps} steps of {args.micro_batch} rows"
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for packing in (False, True):
        rows, row_tokens = finetune.training_rows(
            examples, [t.weight for t in cfg.finetune.data], args.steps * args.micro_batch, packing, cfg.seed
        )
        batches = [
            finetune.collate([[examples[t][i] for t, i in row] for row in rows[s : s + args.micro_batch]], 0)
            for s in range(0, len(rows), args.micro_batch)
        ]
        real = sum(len(examples[t][i]["input_ids"]) for row in rows for t, i in row)
        through = sum(b["input_ids"].numel() for b in batches)
        torch.manual_seed(cfg.seed)
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        model = pretrain.build_model(cfg.model, len(tokenizer), {**special, "pad_token_id": tokenizer.pad_token_id})
        model.config.use_cache = False
        model.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        start = time.perf_counter()
        for batch in batches:
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        drawn = sum(len(row) for row in rows)
        print(
            f"packing={str(packing).lower():5}  {drawn / len(rows):.2f} examples/row (rows of up to {row_tokens}), "
            f"padding {1 - real / through:.0%}, {through / len(batches):.0f} tokens/step, {seconds:.1f} s, "
            f"{drawn / seconds:.0f} examples/s"
        )


if __name__ == "__main__":
    main()
