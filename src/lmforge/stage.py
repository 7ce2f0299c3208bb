"""The contract every stage keeps: `python -m lmforge.<stage> CONFIG OUT_DIR`.

A stage reads its resolved config (written when a run starts), as the schema's
dataclasses (lmforge.schema.StageConfig), reads the directories named in
`cfg.inputs` through their stages' readers (`tokenizer.load`, `pretrain.model_dir`,
`stage.metrics`, ...), and writes its outputs
into a temporary sibling of OUT_DIR that is renamed into place only when the
stage succeeded, together with the config snapshot, a manifest (config,
input hashes, code version, environment, metrics, every attempt's job and
time) and the stage's run record (lmforge.tracking), which the local rule
`history` copies into MLflow. An attempt after one that died (cancelled,
preempted, out of memory) starts from an empty sibling but for the run
record, which it continues. A stage's metrics are in its manifest only.

Helpers raise StageError with a message that says what to change; `run` turns it
into the job's exit message.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from lmforge.schema import StageConfig, stage_config

PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "deepspeed", "peft", "torchao", "mlflow", "hydra-core")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(root: Path) -> str:
    """One hash for a directory: its files' relative paths and contents."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root)}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def code_version() -> dict:
    repo = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "lmforge": package_version("lmforge"),  # None when run from the source tree (PYTHONPATH=src)
        "git_commit": commit.strip() if commit else None,
        "git_dirty": bool(status.strip()) if status is not None else None,
        "files": code_files(),
    }


def code_files() -> dict[str, str]:
    """The lmforge modules this process has imported, by file name under the package, and their hashes: the
    code a stage ran, which `lmforge status` compares with the code of today (keys hash config, not code)."""
    package = Path(__file__).resolve().parent
    files = {}
    for module in list(sys.modules.values()):  # the stage itself among them, as __main__
        path = getattr(module, "__file__", None)
        if path and Path(path).resolve().is_relative_to(package):
            files[Path(path).resolve().relative_to(package).as_posix()] = sha256_file(Path(path))[:16]
    return dict(sorted(files.items()))


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name() -> str:
    """The GPU the stage ran on, else the CPU's model name: the hardware a model card reports."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def environment() -> dict:
    versions = {name: package_version(name) for name in PACKAGES}
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device_name(),
        "hostname": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "packages": versions,
    }


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_json(path: Path, obj) -> None:
    """Whole or not at all: a writer killed halfway leaves the previous file, or none."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    partial.replace(path)


def manifest(stage_dir: str | Path) -> dict:
    """A finished stage's manifest: its config, inputs, code, environment, attempts and metrics."""
    return json.loads((Path(stage_dir) / "manifest.json").read_text())


def metrics(stage_dir: str | Path) -> dict:
    """A finished stage's metrics: the one place they are written."""
    return manifest(stage_dir)["metrics"]


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def empty_except(directory: Path, kept: str) -> None:
    """Delete everything in `directory` but its entry named `kept`."""
    for path in directory.iterdir():
        if path.name == kept:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


class Progress:
    """Logs `done/total`, the rate and an ETA at this job's pace every `every_s` seconds, so that a long
    curation or evaluation shows where it is. `total` None (a streamed Hub dataset): no ETA."""

    def __init__(self, log: logging.Logger, what: str, total: float | None, unit: str = "", every_s: float = 30):
        self.log, self.what, self.total, self.unit, self.every_s = log, what, total, unit, every_s
        self.start = self.last = time.monotonic()

    def __call__(self, done: float, detail: str = "") -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        of = f"/{self.total:.6g}" if self.total is not None else ""
        eta = f" eta={max(self.total - done, 0) / rate / 60:.1f}min" if self.total is not None and rate > 0 else ""
        self.log.info(f"{self.what} {done:.6g}{of}{self.unit} {rate:.3g}{self.unit}/s{eta} {detail}".rstrip())


class StageError(Exception):
    """Input a stage cannot work with; the message says what to change. The stage exits with it."""


def run(main: Callable[[StageConfig, Path, object], dict]) -> None:
    """Run one stage: `main(config, work_dir, tracker)` returns the stage's metrics."""
    if len(sys.argv) != 3:
        sys.exit(f"usage: python -m {main.__module__} CONFIG.yaml OUT_DIR")
    # The stages' progress (logging.getLogger(__name__)) goes to the job's log with its time.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        _run(main, Path(sys.argv[1]), Path(sys.argv[2]))
    except StageError as err:
        sys.exit(f"{main.__module__}: {err}")


def _run(main: Callable[[StageConfig, Path, object], dict], config_file: Path, out: Path) -> None:
    import datasets

    from lmforge import tracking

    datasets.disable_progress_bars()  # job logs are files, not terminals
    cfg = yaml.safe_load(config_file.read_text())
    work = out.with_name(out.name + ".partial")
    if "seed" in cfg:
        seed_everything(cfg["seed"])
    rank_zero = is_rank_zero()
    with tracking.stage_run(cfg, work, enabled=rank_zero) as tracker:
        if rank_zero:  # what a dead attempt wrote, but its run record, which this attempt continues
            empty_except(work, tracking.RECORD_DIR)
        metrics = main(stage_config(cfg), work, tracker)
        if not rank_zero:
            return
        attempts = tracker.attempts_until_now()
        manifest = {
            "stage": cfg["stage"],
            "key": cfg["key"],
            "config": cfg,
            "inputs": {name: {"path": path, "sha256": sha256_tree(Path(path))} for name, path in cfg["inputs"].items()},
            "code": code_version(),
            "environment": environment(),
            "seed": cfg.get("seed"),
            "metrics": metrics,
            "started": attempts[0]["started"],
            "duration_s": round(sum(attempt["duration_s"] for attempt in attempts), 3),  # every job's time counts
            "attempts": attempts,  # a job that was cancelled, preempted or failed, and the one that finished
            "tracking_run_id": tracker.run_id,  # tag lmforge.source_run_id of its MLflow runs
        }
        (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        write_json(work / "manifest.json", manifest)
        # The stage's summary, except what is already a curve (train_loss): a lone point at step 0 would join it.
        summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k not in tracker.logged}
        tracker.log_metrics(summary)
        tracker.log_artifacts([work / "config.yaml", work / "manifest.json"])
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
