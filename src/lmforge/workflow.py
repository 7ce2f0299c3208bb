"""How lmforge drives Snakemake: the command line that runs the DAG, and the Slurm resources of a job."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from lmforge.config import Stage

REPO = Path(__file__).resolve().parents[2]


def snakemake_command(results: Path, overrides: Sequence[str], *args: str, profile: Path | None = None) -> list[str]:
    """`python -m snakemake` on the repository's Snakefile, writing into `results` (run from its parent).

    `args` (targets, `--cores 2`, `-n`, ...) go before `--config`, which takes every word after it;
    the Hydra overrides travel as one string, since `--config` rejects dotted keys.
    """
    results = Path(results)
    return [
        sys.executable,
        "-m",
        "snakemake",
        *(["--profile", str(profile)] if profile else []),
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(results.parent),
        *args,
        "--config",
        "overrides=" + " ".join([f"run.results_dir={results}", *overrides]),
    ]


def slurm_resources(stage: Stage) -> dict:
    """The Snakemake resources of one stage's job, by the Slurm executor's names; runtime per attempt."""
    res = stage.resources
    resources = {"mem_mb": res.mem_mb, "runtime": res.runtime, "cpus_per_task": res.cpus, "nodes": res.nodes}
    if res.gpus:
        resources["gpu"] = res.gpus * res.nodes  # `gpus` is per node; Slurm's --gpus counts the whole job
    if res.partition:
        resources["slurm_partition"] = res.partition
    if stage.processes > 1:
        # N Slurm tasks, and the plugin's MPI path: the command runs once and lmforge.launch starts the tasks.
        resources.update(tasks=stage.processes, mpi="srun")
        if res.gpus:  # one task per GPU; without it the plugin asks for --ntasks-per-gpu=<all tasks>
            resources["tasks_per_gpu"] = 1
    if res.signal_before_end_s:
        # To every process of the job's steps (no "B:"), so the training process itself gets it; requeue after
        # preemption. No quotes: the plugin pastes slurm_extra into a shell command line. URG, not USR1: the
        # Snakemake (and torchrun) processes around the trainer get it too; USR1 kills them, URG they ignore.
        resources["slurm_extra"] = f"--signal=URG@{res.signal_before_end_s} --requeue"
    return resources
