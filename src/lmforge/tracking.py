"""MLflow (and optionally wandb) records of a pipeline run.

One MLflow experiment holds one parent run per configuration (tagged with the
configuration's key) and one child run per stage. Stages are separate
processes, possibly separate Slurm jobs, so the parent is found by its tag or
created under a file lock by whichever stage comes first.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

PARENT_TAG = "lmforge.run_key"


def tracking_uri(run_cfg: dict) -> str:
    """MLFLOW_TRACKING_URI, else the config's URI, else SQLite inside the results directory."""
    results = Path(run_cfg["results_dir"]).resolve()
    return os.environ.get("MLFLOW_TRACKING_URI") or run_cfg.get("mlflow_uri") or f"sqlite:///{results}/mlflow.db"


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Tracker:
    def __init__(self, client=None, run_id: str | None = None, wandb_run=None):
        self.client, self.run_id, self.wandb_run = client, run_id, wandb_run

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if self.client is None or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def log_artifacts(self, paths) -> None:
        if self.client is None:
            return
        for path in paths:
            path = Path(path)
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            else:
                self.client.log_artifact(self.run_id, str(path))


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def experiment_and_parent(client, run_cfg: dict) -> tuple[str, str]:
    """The experiment id and the parent run id of this configuration, created if missing."""
    results = Path(run_cfg["results_dir"]).resolve()
    with _lock(results / ".mlflow.lock"):
        experiment = client.get_experiment_by_name(run_cfg["experiment"])
        if experiment is None:
            experiment_id = client.create_experiment(
                run_cfg["experiment"], artifact_location=(results / "mlartifacts").as_uri()
            )
        else:
            experiment_id = experiment.experiment_id
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{run_cfg['run_key']}' and tags.`lmforge.role` = 'configuration'",
            max_results=1,
        )
        if found:
            return experiment_id, found[0].info.run_id
        parent = client.create_run(
            experiment_id,
            run_name=f"run-{run_cfg['run_key']}",
            tags={PARENT_TAG: run_cfg["run_key"], "lmforge.role": "configuration"},
        )
        return experiment_id, parent.info.run_id


@contextlib.contextmanager
def stage_run(cfg: dict, enabled: bool = True):
    """A child MLflow run for one stage; params are the stage's flattened config."""
    if not enabled:
        yield Tracker()
        return
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    run_cfg = cfg["run"]
    client = MlflowClient(tracking_uri=tracking_uri(run_cfg))
    experiment_id, parent_id = experiment_and_parent(client, run_cfg)
    run = client.create_run(
        experiment_id,
        run_name=cfg["stage"],
        tags={
            "mlflow.parentRunId": parent_id,
            PARENT_TAG: run_cfg["run_key"],
            "lmforge.stage": cfg["stage"],
            "lmforge.stage_key": cfg["key"],
            "lmforge.slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        },
    )
    params = flatten({k: v for k, v in cfg.items() if k not in ("run", "stage", "key")})
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    wandb_run = None
    if run_cfg.get("wandb"):
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")  # compute nodes usually have no internet
        wandb_run = wandb.init(
            project=run_cfg["experiment"],
            group=run_cfg["run_key"],
            name=cfg["stage"],
            config=params,
            dir=str(Path(run_cfg["results_dir"]).resolve()),
        )
    status = "FAILED"
    try:
        yield Tracker(client, run.info.run_id, wandb_run)
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status)
        if wandb_run is not None:
            wandb_run.finish(exit_code=0 if status == "FINISHED" else 1)


def finish_parent(cfg: dict) -> str:
    """Mark the configuration's parent run finished (called by the last stage)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(cfg["run"]))
    _, parent_id = experiment_and_parent(client, cfg["run"])
    client.set_terminated(parent_id, "FINISHED")
    return parent_id
