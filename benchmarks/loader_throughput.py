"""Training data loader throughput: tokens/s one process reads from the memory-mapped token shards.

Writes --tokens random token ids as the tokenizer stage does (lmforge.tokenizer.ShardWriter, --shard-tokens
per file, an index.json), then times what pretraining does for each micro-batch: the training loop's
sample_indices for rank 0 of --world, and pretrain.block_batch over pretrain.Blocks of the memory map.
Prints tokens/s with the shards in the page cache (warm) and after evicting them (cold, posix_fadvise
DONTNEED: only these files' pages). Goal: >= 1M tokens/s per process, never the training's bottleneck.

    nice .venv/bin/python benchmarks/loader_throughput.py [--tokens 500000000] [--seq-len 2048] [--micro-batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from lmforge import pretrain, tokenizer, train_loop
from lmforge.schema import TrainConfig


def write_shards(stage_dir: Path, n_tokens: int, shard_tokens: int, vocab: int) -> None:
    dtype = tokenizer.token_dtype(vocab)
    writer = tokenizer.ShardWriter(stage_dir / "tokens" / "train", dtype, shard_tokens)
    rng = np.random.default_rng(0)
    for start in range(0, n_tokens, 2**24):
        writer.write(rng.integers(0, vocab, min(2**24, n_tokens - start), dtype=dtype))
    writer.close()
    split = {"shards": writer.shards(), "tokens": n_tokens, "documents": 0}
    index = {"dtype": dtype.name, "vocab_size": vocab, "splits": {"train": split}}
    (stage_dir / "tokens" / "index.json").write_text(json.dumps(index))


def evict(stage_dir: Path) -> None:
    for path in (stage_dir / "tokens" / "train").glob("*.bin"):
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def tokens_per_second(stage_dir: Path, args, tcfg: TrainConfig) -> float:
    """Micro-batches of rank 0 for --steps steps, as pretrain's collate builds them (int64 tensors)."""
    blocks = pretrain.Blocks(tokenizer.tokens(str(stage_dir), "train"), args.seq_len)
    started, read = time.perf_counter(), 0
    for step in range(args.steps):
        for micro in range(tcfg.grad_accum):
            indices = train_loop.sample_indices(step, micro, 0, tcfg, args.world, len(blocks), seed=1234)
            read += pretrain.block_batch(blocks, indices)["input_ids"].numel()
    return read / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=500_000_000)
    parser.add_argument("--shard-tokens", type=int, default=tokenizer.SHARD_TOKENS)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--world", type=int, default=8, help="ranks; this process is rank 0")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    tcfg = TrainConfig(micro_batch_size=args.micro_batch, grad_accum=1)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        stage_dir = Path(tmp)
        write_shards(stage_dir, args.tokens, args.shard_tokens, args.vocab)
        shards = len(list((stage_dir / "tokens" / "train").glob("*.bin")))
        print(f"{args.tokens} tokens in {shards} shards; blocks of {args.seq_len}, micro-batches of {args.micro_batch}")
        tokens_per_second(stage_dir, args, tcfg)  # first pass: pages in the cache, the epoch's order computed
        print(f"warm: {tokens_per_second(stage_dir, args, tcfg) / 1e6:.2f} M tokens/s per process")
        evict(stage_dir)
        print(f"cold: {tokens_per_second(stage_dir, args, tcfg) / 1e6:.2f} M tokens/s per process")


if __name__ == "__main__":
    main()
