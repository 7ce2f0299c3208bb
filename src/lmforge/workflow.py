"""`lmforge run [overrides...] [--slurm] [-n] [-- snakemake args]`: the pipeline, through Snakemake.

    lmforge run                                     # the default DAG on this machine (profiles/local)
    lmforge run train.lr=1e-3 finetune=lora -n      # what would run, with Hydra overrides as separate words
    lmforge run "data.name='my corpus #2'" --slurm  # on Slurm (profiles/slurm), a value with spaces quoted
    lmforge run train.lr=1e-4,3e-4 -- --until pretrain

Overrides are Hydra's, one per word, as `python train.py a=1 b=2` takes them; they reach Snakemake as one
JSON list in `--config overrides=[...]`, so no value is split at spaces or cut at a `#` on the way. Results
go under the current directory unless `run.results_dir` says otherwise.

This module also holds what the Snakefile needs from lmforge besides the plan: where each stage's resolved
config is written, and the Slurm resources of a job.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from lmforge.plan import Stage

REPO = Path(__file__).resolve().parents[2]
PROFILES = REPO / "profiles"


def overrides_config(overrides: Sequence[str]) -> str:
    """Snakemake's `--config` entry for Hydra overrides: JSON is YAML, so quotes, spaces and `#` survive."""
    return "overrides=" + json.dumps(list(overrides))


def snakemake_command(
    results: Path | None, overrides: Sequence[str], *args: str, profile: Path | None = None
) -> list[str]:
    """`python -m snakemake` on the repository's Snakefile; with `results`, writing into it (run from its parent).

    `args` (targets, `--cores 2`, `-n`, ...) go before `--config`, which takes every word after it.
    """
    directory = ["--directory", str(Path(results).parent)] if results else []
    results_override = [f"run.results_dir={results}"] if results else []
    return [
        sys.executable,
        "-m",
        "snakemake",
        *(["--profile", str(profile)] if profile else []),
        "--snakefile",
        str(REPO / "Snakefile"),
        *directory,
        *args,
        "--config",
        overrides_config([*results_override, *overrides]),
    ]


def stage_config_path(results: str, stage: str, key: str) -> str:
    return f"{results}/configs/{stage}/{key}.yaml"


def write_stage_configs(sweep, results: str) -> None:
    """Each stage's resolved config, where its job reads it; files whose text is unchanged are left alone."""
    for stages in sweep.stages.values():
        for stage in stages.values():
            path = Path(stage_config_path(results, stage.name, stage.key))
            text = yaml.safe_dump(stage.config, sort_keys=False)
            if path.exists() and path.read_text() == text:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
                tmp.write(text)
            os.replace(tmp.name, path)


def slurm_resources(stage: Stage) -> dict:
    """The Snakemake resources of one stage's job, by the Slurm executor's names; runtime per attempt."""
    res = stage.resources
    resources = {"mem_mb": res.mem_mb, "runtime": res.runtime, "cpus_per_task": res.cpus, "nodes": res.nodes}
    if res.gpus:
        resources["gpu"] = res.gpus * res.nodes  # `gpus` is per node; Slurm's --gpus counts the whole job
    # By the plugin's names; it quotes each value on the sbatch line.
    for setting, resource in (
        ("partition", "slurm_partition"),
        ("account", "slurm_account"),
        ("qos", "qos"),
        ("constraint", "constraint"),
        ("gpu_model", "gpu_model"),
    ):
        if getattr(res, setting) and (setting != "gpu_model" or res.gpus):
            resources[resource] = getattr(res, setting)
    if stage.processes > 1:
        # N Slurm tasks, and the plugin's MPI path: the command runs once and lmforge.launch starts the tasks.
        resources.update(tasks=stage.processes, mpi="srun")
        if res.gpus:  # one task per GPU; without it the plugin asks for --ntasks-per-gpu=<all tasks>
            resources["tasks_per_gpu"] = 1
    if res.signal_before_end_s:
        # The walltime warning, on which training checkpoints and requeues its job (lmforge.train_loop); the
        # plugin has no setting for it (`--requeue` is the profile's slurm-requeue). To every process of the
        # job's steps (no "B:"), so the training process itself gets it. No quotes: the plugin pastes
        # slurm_extra into a shell command line. URG, not USR1: the Snakemake (and torchrun) processes around
        # the trainer get it too; USR1 kills them, URG they ignore.
        resources["slurm_extra"] = f"--signal=URG@{res.signal_before_end_s}"
    return resources


# -- `lmforge run` --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "words",
        nargs=argparse.REMAINDER,
        metavar="OVERRIDE ... [-- SNAKEMAKE_ARG ...]",
        help="Hydra overrides (train.lr=1e-3 finetune=lora), then after -- arguments for Snakemake",
    )
    parser.add_argument("--slurm", action="store_true", help="submit every rule as a Slurm job (profiles/slurm)")
    parser.add_argument("-n", "--dry-run", action="store_true", help="print what would run; change nothing")


def split_words(words: list[str]) -> tuple[list[str], set[str], list[str]]:
    """(Hydra overrides, lmforge run's own flags, Snakemake's arguments): flags may come between overrides."""
    ours, theirs = (words[: words.index("--")], words[words.index("--") + 1 :]) if "--" in words else (words, [])
    flags = {word for word in ours if word in ("--slurm", "-n", "--dry-run")}
    return [word for word in ours if word not in flags], flags, theirs


def main(args: argparse.Namespace) -> int:
    overrides, flags, snakemake_args = split_words(args.words)
    unknown = [word for word in overrides if word.startswith("-")]
    if unknown:
        print(f"lmforge run: unknown option {unknown[0]}; Snakemake's options go after --", file=sys.stderr)
        return 2
    profile = PROFILES / ("slurm" if args.slurm or "--slurm" in flags else "local")
    dry_run = ["-n"] if args.dry_run or flags & {"-n", "--dry-run"} else []
    return subprocess.call(snakemake_command(None, overrides, *dry_run, *snakemake_args, profile=profile))
