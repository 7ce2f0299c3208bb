"""Tokenization throughput: the tokenizer stage's encode path (lmforge.tokenizer.encode_split) on N cores.

Generates a curated train split of --mb megabytes of Python source (documents of 20 to 400 consecutive lines
of random standard-library modules), trains the stage's BPE on a --train-mb sample of it (sample_rows,
train_bpe), then encodes the whole split into token shards and prints MB/s, tokens/s and the peak RSS of
each step. Goal: >= 10 MB/s on 2 cores, and a peak RSS that does not grow with --mb.

    nice .venv/bin/python benchmarks/tokenize_throughput.py [--mb 300] [--cpus 2] [--vocab 4096]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import resource
import sysconfig
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def generate_split(path: Path, megabytes: int, seed: int = 0) -> None:
    """Write a Parquet file (column text) of about `megabytes` MB of documents."""
    rng = random.Random(seed)
    modules = [p.read_text(errors="replace").splitlines(keepends=True) for p in sorted(STDLIB.rglob("*.py"))]
    modules = [lines for lines in modules if len(lines) > 20]
    written = 0
    with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as writer:
        while written < megabytes * 1e6:
            batch = []
            for _ in range(1000):
                lines = rng.choice(modules)
                start = rng.randrange(len(lines))
                batch.append("".join(lines[start : start + rng.randint(20, 400)]))
            writer.write_table(pa.table({"text": batch}))
            written += sum(len(text.encode()) for text in batch)


def cpu_seconds() -> float:
    """User and system time of this process's threads so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=300, help="size of the generated train split")
    parser.add_argument("--train-mb", type=int, default=20, help="tokenizer.train_bytes, in MB")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()

    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cpus])
    from lmforge import tokenizer  # after pinning: the tokenizer stage sizes its threads from the CPUs it has

    tokenizer.use_cpus(tokenizer.job_cpus())
    with tempfile.TemporaryDirectory() as tmp:
        curated = Path(tmp, "curated")
        (curated / "data").mkdir(parents=True)
        started = time.perf_counter()
        # In a child process: the benchmark's peak RSS is then the tokenizer's, not the generator's.
        generator = multiprocessing.get_context("fork").Process(
            target=generate_split, args=(curated / "data" / "train.parquet", args.mb)
        )
        generator.start()
        generator.join()
        metadata = pq.ParquetFile(curated / "data" / "train.parquet").metadata
        documents = metadata.num_rows
        size = sum(metadata.row_group(i).column(0).total_uncompressed_size for i in range(metadata.num_row_groups))
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), curated / "data" / "validation.parquet")
        print(f"corpus: {documents} documents, {size / 1e6:.0f} MB, generated in {time.perf_counter() - started:.0f} s")

        started = time.perf_counter()
        rows, sample_bytes = tokenizer.sample_rows(str(curated), seed=1234, train_bytes=args.train_mb * 10**6)
        sampled = time.perf_counter() - started
        bpe = tokenizer.train_bpe(tokenizer.sample_texts(str(curated), rows), args.vocab, 2)
        trained = time.perf_counter() - started - sampled
        print(f"sample: {len(rows)} documents, {sample_bytes / 1e6:.1f} MB, drawn in {sampled:.1f} s "
              f"({size / 1e6 / sampled:.0f} MB/s over the split); BPE trained in {trained:.1f} s; "
              f"peak RSS so far {peak_rss_mb():.0f} MB")  # fmt: skip

        from transformers import PreTrainedTokenizerFast

        fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=tokenizer.EOS, pad_token=tokenizer.PAD)
        started, cpu_started, serial_started = time.perf_counter(), cpu_seconds(), time.thread_time()
        entry = tokenizer.encode_split(fast, str(curated), "train", Path(tmp, "tokens"))
        elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
        serial = time.thread_time() - serial_started  # this thread: the Python around encode_batch_fast
        megabytes = entry["bytes"] / 1e6
        print(f"encode on {tokenizer.job_cpus()} CPUs: {megabytes / elapsed:.1f} MB/s, "
              f"{entry['tokens'] / elapsed / 1e6:.2f} M tokens/s ({entry['tokens']} tokens in {len(entry['shards'])} "
              f"shards, {elapsed:.1f} s); peak RSS {peak_rss_mb():.0f} MB")  # fmt: skip
        # On a machine shared with other work the wall-clock rate understates the CPUs' own; CPU time does not.
        # Idle CPUs would take the serial part (this thread) plus the tokenizer threads' part spread over them.
        idle_wall = serial + (cpu - serial) / tokenizer.job_cpus()
        print(f"encode CPU time: {cpu:.1f} s, {serial:.1f} s of it serial; on {tokenizer.job_cpus()} idle CPUs "
              f"{megabytes / idle_wall:.1f} MB/s; load average {os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
