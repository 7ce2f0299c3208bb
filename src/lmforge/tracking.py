"""The run record of one stage, written into the stage's own output directory.

Where runs are logged, and why not straight into MLflow: many Slurm jobs run at
once, on nodes that may share only a network filesystem. SQLite over NFS is
unsafe (its locks are unreliable there) and MLflow's file store is deprecated.
So a stage never opens the central store: it writes its run (params, tags,
step metrics, artifact paths) as plain files under `<stage dir>/tracking/`,
with a single writer, inside the `.partial` directory that is renamed into
place only when the stage succeeds. A failed job leaves nothing in the central
store, and a compute node needs no route to an MLflow server. The local rule
`history` (lmforge.history, on the login node) then copies each record into
the central MLflow store, once per configuration that uses the stage.

A fresh MLflow SQLite store per stage was the other candidate; creating one
runs MLflow's schema migrations (about 5 s of CPU each), for every stage of
every configuration. Plain files cost nothing and are readable while the
stage runs: `tail -f results/pretrain/<key>.partial/tracking/metrics.jsonl`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path

RECORD_DIR = "tracking"  # inside each stage directory: run.json and metrics.jsonl


def tracking_uri(run_cfg: dict) -> str:
    """The central store: MLFLOW_TRACKING_URI, else the config's URI, else SQLite inside the results directory."""
    results = Path(run_cfg["results_dir"]).resolve()
    return os.environ.get("MLFLOW_TRACKING_URI") or run_cfg.get("mlflow_uri") or f"sqlite:///{results}/mlflow.db"


def experiment_name(run_cfg: dict) -> str:
    """One MLflow experiment per sweep, `<run.experiment>/<run.sweep>`; `run.experiment` outside a sweep."""
    return f"{run_cfg['experiment']}/{run_cfg['sweep']}" if run_cfg.get("sweep") else run_cfg["experiment"]


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """What a stage logs through: step metrics appended to metrics.jsonl, artifacts named by path.

    Without a directory (ranks other than 0) it logs nothing.
    """

    def __init__(self, directory: Path | None = None, stage_dir: Path | None = None, wandb_run=None):
        self.run_id = uuid.uuid4().hex if directory is not None else None
        self.directory, self.stage_dir, self.wandb_run = directory, stage_dir, wandb_run
        self.artifacts: list[str] = []  # relative to the stage directory, which is renamed when it succeeds
        self.logged: set[str] = set()  # metric names logged so far

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if self.directory is None or not metrics:
            return
        timestamp = now_ms()
        lines = [
            json.dumps({"key": k, "value": float(v), "step": step or 0, "timestamp": timestamp})
            for k, v in metrics.items()
        ]
        with open(self.directory / "metrics.jsonl", "a") as f:
            f.write("\n".join(lines) + "\n")
        self.logged.update(metrics)
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def log_artifacts(self, paths) -> None:
        if self.directory is None:
            return
        self.artifacts += [str(Path(path).relative_to(self.stage_dir)) for path in paths]


def upstream_tags(cfg: dict) -> dict:
    """Lineage: the key of every stage this one read (tokenizer, data, ...), filterable in the MLflow UI."""
    return {f"lmforge.upstream.{name}": Path(path).name for name, path in cfg["inputs"].items()}


@contextlib.contextmanager
def stage_run(cfg: dict, stage_dir: Path, enabled: bool = True):
    """Record one stage's run in `stage_dir/tracking/`; params are the stage's flattened config."""
    if not enabled:
        yield Tracker()
        return
    run_cfg = cfg["run"]
    directory = Path(stage_dir) / RECORD_DIR
    directory.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(directory, Path(stage_dir))
    params = flatten({k: v for k, v in cfg.items() if k not in ("run", "stage", "key", "inputs")})
    record = {
        "run_id": tracker.run_id,
        "name": cfg["stage"],
        "start_time": now_ms(),
        "params": {k: str(v) for k, v in params.items()},
        "tags": {
            "lmforge.stage": cfg["stage"],
            "lmforge.stage_key": cfg["key"],
            "lmforge.source_run_id": tracker.run_id,
            "lmforge.host": socket.gethostname(),
            "lmforge.slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            **upstream_tags(cfg),
        },
    }
    if run_cfg.get("wandb"):
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")  # compute nodes usually have no internet; synced by a local rule
        tracker.wandb_run = wandb.init(  # a wandb project name cannot hold the "/" of experiment_name: sweep as a tag
            project=run_cfg["experiment"],
            group=run_cfg["run_key"],
            name=cfg["stage"],
            tags=[run_cfg["sweep"]] if run_cfg.get("sweep") else None,
            config=params,
            dir=str(directory),
        )
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        # Written last: a record without run.json is incomplete (its stage directory is never renamed into place).
        record.update(status=status, end_time=now_ms(), artifacts=tracker.artifacts)
        (directory / "run.json").write_text(json.dumps(record, indent=2) + "\n")
        if tracker.wandb_run is not None:
            tracker.wandb_run.finish(exit_code=0 if status == "FINISHED" else 1)
