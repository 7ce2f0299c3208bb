"""Wall time of the default pipeline: a cold run into an empty results directory, then the no-op rerun.

    .venv/bin/python benchmarks/pipeline_walltime.py [--results /tmp/lmforge-bench] [--cores 2] [overrides...]

Prints seconds for each, and each stage's own duration from its manifest. Goal on 2 cores:
cold <= 5 minutes, no-op <= 10 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

from lmforge.workflow import snakemake_command


def snakemake(results: Path, cores: int, overrides: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(snakemake_command(results, overrides, "--cores", str(cores), "--quiet", "all"), check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("/tmp/lmforge-bench/results"))
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    shutil.rmtree(args.results.parent, ignore_errors=True)
    args.results.mkdir(parents=True)

    cold = snakemake(args.results, args.cores, args.overrides)
    noop = snakemake(args.results, args.cores, args.overrides)
    print(f"cold run: {cold:.1f} s")
    print(f"no-op rerun: {noop:.1f} s")
    for manifest in sorted(args.results.glob("*/*/manifest.json"), key=lambda p: p.stat().st_mtime):
        m = json.loads(manifest.read_text())
        print(f"  {m['stage']:<10} {m['duration_s']:7.1f} s")


if __name__ == "__main__":
    main()
