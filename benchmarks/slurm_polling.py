"""What Snakemake's status polling costs per rule on Slurm: from a job's end to the next job's submission.

    .venv/bin/python benchmarks/slurm_polling.py [--init 2 40] [--until baseline]

Starts the single-node test cluster (env/slurm/start.sh; needs root and env/slurm/install.sh), runs the
first stages of the pipeline on a small corpus as a chain of Slurm jobs, once per polling setting
(`slurm-init-seconds-before-status-checks`: 2 is profiles/slurm-test, 40 the plugin's default, which the
shipped profiles/slurm keeps), and prints each job's run time and the gap before the next submission, read
from Slurm's own job records. The status command is squeue in both (the test cluster has no slurmdbd); sacct
is polled on the same schedule.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmforge import config, plan  # noqa: E402
from lmforge.workflow import snakemake_command  # noqa: E402
from tests.stages import TINY, small_corpus_data  # noqa: E402


def job_records(job_ids: list[str]) -> list[dict]:
    records = []
    for job in job_ids:
        text = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
        records.append(dict(re.findall(r"(\w+)=(\S*)", text)))
    return records


def seconds(a: str, b: str) -> float:
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def chain(workdir: Path, init: int, target_stage: str) -> list[dict]:
    overrides = [f"run.results_dir={workdir / 'results'}", *small_corpus_data(workdir / "corpus"), *TINY]
    target = plan.stages(config.load(overrides))[target_stage].dir
    command = snakemake_command(
        workdir / "results",
        overrides,
        target,
        "--slurm-init-seconds-before-status-checks",
        str(init),
        profile=REPO / "profiles" / "slurm-test",
    )
    run = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(run.stderr[-4000:])
    job_ids = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+)", run.stdout + run.stderr)
    return job_records(job_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", type=int, nargs="+", default=[2, 40])
    parser.add_argument("--until", default="baseline", help="the last stage of the chain")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="lmforge-slurm-", dir="/tmp"))
    subprocess.run(["bash", str(REPO / "env" / "slurm" / "start.sh"), str(state)], check=True, capture_output=True)
    try:
        for init in args.init:
            workdir = Path(tempfile.mkdtemp(prefix=f"polling-{init}-"))
            records = chain(workdir, init, args.until)
            total = seconds(records[0]["SubmitTime"], records[-1]["EndTime"])
            ran = sum(seconds(r["StartTime"], r["EndTime"]) for r in records)
            print(f"\nslurm-init-seconds-before-status-checks={init}: {len(records)} jobs, {total:.0f} s from the "
                  f"first submission to the last end, {ran:.0f} s of it running")  # fmt: skip
            for record, following in zip(records, records[1:] + [None]):
                gap = f"{seconds(record['EndTime'], following['SubmitTime']):5.0f} s" if following else "    -"
                name = record["Comment"].removeprefix("rule_").split("_wildcards_")[0]
                print(f"  {name:<13} ran {seconds(record['StartTime'], record['EndTime']):4.0f} s, "
                      f"next submitted {gap} after its end")  # fmt: skip
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        subprocess.run(["bash", str(REPO / "env" / "slurm" / "stop.sh"), str(state)], capture_output=True)


if __name__ == "__main__":
    main()
