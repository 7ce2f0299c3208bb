"""DAG-build time of a sweep: `snakemake -n` on 10, 100 and 1000 configurations.

    .venv/bin/python benchmarks/dag_build.py [--results /tmp/lmforge-dag/results] [--sizes 10 100 1000]

A sweep of N configurations is `finetune=full,lora train.steps=range(1, N/2 + 1)`: two config-group
choices (two Hydra composes) and N/2 pretraining branches that share curate, tokenizer and baseline. Each
dry run plans every job into an empty results directory. Prints the wall time of the dry run, and of
lmforge's part of it (expanding, composing, validating and planning the sweep, in this process).
Goal: <= 15 s at 100 configurations.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import time
from pathlib import Path

from lmforge import sweep
from lmforge.workflow import snakemake_command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("/tmp/lmforge-dag/results"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    args = parser.parse_args()
    print(f"{'configurations':>14} {'jobs':>6} {'snakemake -n':>13} {'lmforge plan':>13}")
    for size in args.sizes:
        overrides = ["finetune=full,lora", f"train.steps=range(1,{size // 2 + 1})"]
        shutil.rmtree(args.results.parent, ignore_errors=True)
        args.results.mkdir(parents=True)

        started = time.perf_counter()
        plan = sweep.plan([f"run.results_dir={args.results}", *overrides])
        planned = time.perf_counter() - started

        started = time.perf_counter()
        dry_run = subprocess.run(
            snakemake_command(args.results, overrides, "-n", "--cores", "2"),
            capture_output=True,
            text=True,
            check=True,
        )
        wall = time.perf_counter() - started
        jobs = re.search(r"^total\s+(\d+)", dry_run.stdout + dry_run.stderr, re.MULTILINE).group(1)
        print(f"{len(plan.runs):>14} {jobs:>6} {wall:>11.1f} s {planned:>11.1f} s", flush=True)


if __name__ == "__main__":
    main()
