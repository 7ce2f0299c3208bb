"""Curation throughput, memory and near-duplicate removal on a generated corpus (lmforge.corpus_gen).

    python benchmarks/curate_throughput.py --bytes 200e6 --sizes 20e6,100e6,200e6 --work /tmp/curate_bench

1. Generates (or reuses) a corpus of --bytes with known injected defects.
2. Per step: MB per CPU second of each per-document step alone, in this process, on the first --sample bytes.
3. For each of --sizes: runs the real shard job (`python -m lmforge.curate_shard CONFIG OUT`, one shard of
   that much input) and then the merge (`python -m lmforge.curate`), and reports wall time, CPU time, MB per
   CPU second (a job is one process on one core) and peak RSS, from the job's rusage (as `/usr/bin/time -v`).
   CPU time, not wall time, so that figures from a shared machine are per core.
4. The near-duplicate removal rate and clean documents lost, against the corpus manifest, at the largest size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from lmforge import config, corpus_gen, dedup, filters, sources
from lmforge import plan as planning
from lmforge.schema import stage_config


def corpus(work: Path, n_bytes: int, seed: int) -> dict:
    manifest_path = work / "corpus" / "manifest.json"
    if manifest_path.exists() and json.loads(manifest_path.read_text())["bytes"] >= n_bytes:
        return json.loads(manifest_path.read_text())
    start = time.monotonic()
    manifest = corpus_gen.generate(work / "corpus", n_bytes, seed)
    print(f"generated {manifest['bytes'] / 1e6:.0f} MB in {time.monotonic() - start:.0f} s", flush=True)
    return manifest


def prefix(work: Path, n_bytes: float) -> Path:
    """A directory of the corpus's first part files, about n_bytes of text (symlinks)."""
    parts = sorted((work / "corpus" / "corpus").glob("part-*.jsonl"))
    directory = work / f"input-{n_bytes / 1e6:.0f}MB"
    directory.mkdir(exist_ok=True)
    total = 0
    for part in parts:
        if total >= n_bytes:
            break
        link = directory / part.name
        if not link.exists():
            link.symlink_to(part)
        total += part.stat().st_size
    return directory


def step_throughput(source: Path, sample_bytes: float) -> None:
    """Each per-document step alone, on the same documents (MB of input text per second)."""
    data = stage_config(stage_jobs(source.parent / "steps", source, [])["curate_shard_0"].config).data
    docs, total = [], 0
    for doc in sources.read_source(data, Counter()):
        docs.append(doc)
        total += len(doc["text"].encode())
        if total >= sample_bytes:
            break
    print(f"\nper step, on {len(docs)} documents ({total / 1e6:.1f} MB), MB per CPU second:")
    for name, step in filters.steps(data, Counter()):
        batch = [dict(d) for d in docs]
        start = time.process_time()
        kept = list(step(batch))
        seconds = time.process_time() - start
        print(f"  {name:<18} {total / 1e6 / seconds:8.2f}  ({len(docs) - len(kept)} dropped)")
    sign = dedup.Signer(data.dedup, filters.WORDS)
    start = time.process_time()
    for doc in docs:
        sign(doc["text"])
    print(f"  {'minhash signature':<18} {total / 1e6 / (time.process_time() - start):8.2f}")
    start = time.process_time()
    list(filters.apply([dict(d) for d in docs], data, Counter()))
    print(f"  {'all filters':<18} {total / 1e6 / (time.process_time() - start):8.2f}", flush=True)


def run_measured(command: list[str], log: Path) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS in MB) of a job: its rusage, as /usr/bin/time -v reports it."""
    start = time.monotonic()
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
    if status:
        raise SystemExit(f"{' '.join(command)} failed:\n{log.read_text()[-3000:]}")
    return time.monotonic() - start, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1e3  # KB on Linux


def stage_jobs(results: Path, source: Path, extra: list[str]) -> dict[str, planning.Stage]:
    overrides = [f"run.results_dir={results}", f"data.source={source}", "data.name=bench", "data.license=MIT"]
    overrides += ["finetune=none", f"data.decontaminate_against=[{results.parent / 'corpus' / 'eval.jsonl'}]"]
    return planning.stages(config.load([*overrides, *extra]))


def command(stage: planning.Stage) -> list[str]:
    path = Path(stage.dir + ".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(stage.config))
    return [sys.executable, "-m", f"lmforge.{stage.name}", str(path), stage.dir]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", type=float, default=2e9, help="generated corpus size")
    parser.add_argument("--sizes", default="0.2e9,1e9,2e9", help="input sizes of the shard job, comma-separated")
    parser.add_argument("--sample", type=float, default=20e6, help="bytes for the per-step figures")
    parser.add_argument("--work", type=Path, default=Path("/tmp/curate_bench"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    manifest = corpus(args.work, int(args.bytes), args.seed)
    sizes = [float(s) for s in args.sizes.split(",")]
    step_throughput(prefix(args.work, max(sizes)), args.sample)

    print("\nreal jobs (one process each):")
    print(f"{'input':>8} {'job':>13} {'wall':>8} {'CPU':>8} {'MB/CPU-s':>9} {'peak RSS':>10}")
    for size in sizes:
        source = prefix(args.work, size)
        in_bytes = sum(p.stat().st_size for p in source.iterdir())
        results = args.work / f"results-{size / 1e6:.0f}MB"
        jobs = stage_jobs(results, source, [])
        for stage in [s for s in jobs.values() if s.name == "curate_shard"] + [jobs["curate"]]:
            if Path(stage.dir).exists():
                continue
            wall, cpu, rss = run_measured(command(stage), Path(stage.dir + ".log"))
            rate = in_bytes / 1e6 / cpu
            print(
                f"{in_bytes / 1e6:>6.0f}MB {stage.name:>13} {wall:>7.0f}s {cpu:>7.0f}s {rate:>9.2f} {rss:>8.0f}MB",
                flush=True,
            )
        curated = Path(jobs["curate"].dir)
        kept = {r["id"] for s in ("train", "validation", "test") for r in pq.read_table(curated / "data" / f"{s}.parquet", columns=["id"]).to_pylist()}  # fmt: skip
        read = set(read_ids(source))
        near = [item["id"] for item in manifest["near_duplicate"] if item["id"] in read]
        # Clean prose and stdlib files apart: stdlib modules share 13-word passages with the test split's.
        prose, code = ([i for i in manifest[kind] if i in read] for kind in ("clean", "code"))
        stats = json.loads((curated / "stats.json").read_text())
        print(
            f"{'':>8} near-duplicates removed {sum(i not in kept for i in near)}/{len(near)}"
            f" ({sum(i not in kept for i in near) / max(len(near), 1):.1%}), clean prose lost"
            f" {sum(i not in kept for i in prose)}/{len(prose)}, stdlib files lost"
            f" {sum(i not in kept for i in code)}/{len(code)}, exact duplicates {stats['dropped_duplicate']},"
            f" contaminated {stats['dropped_contaminated']}",
            flush=True,
        )
    print(f"\ncores here: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")


def read_ids(source: Path):
    for part in sorted(source.iterdir()):
        with open(part) as f:
            for line in f:
                yield json.loads(line)["id"]


if __name__ == "__main__":
    main()
