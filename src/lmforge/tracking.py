"""The run record of one stage, written into the stage's own output directory.

Where runs are logged, and why not straight into MLflow: many Slurm jobs run at
once, on nodes that may share only a network filesystem. SQLite over NFS is
unsafe (its locks are unreliable there) and MLflow's file store is deprecated.
So a stage never opens the central store: it writes its run (params, tags,
step metrics, artifact paths) as plain files under `<stage dir>/tracking/`,
with a single writer, inside the `.partial` directory that is renamed into
place only when the stage succeeds. A compute node needs no route to an MLflow
server. While Snakemake runs, a watcher on the login node (lmforge.watch)
copies the records of running and failed stages into the central MLflow store
every minute; the local rule `history` (lmforge.history) copies each finished
record, once per configuration that uses the stage.

A fresh MLflow SQLite store per stage was the other candidate; creating one
runs MLflow's schema migrations (about 5 s of CPU each), for every stage of
every configuration. Plain files cost nothing and are readable while the
stage runs: `tail -f results/pretrain/<key>.partial/tracking/metrics.jsonl`.

A stage's job may die and be run again (`scancel`, preemption, walltime, out of
memory): the record in `.partial` survives, and the next attempt continues it
with the same run id, appending its points and its own entry to the record's
`attempts`. A resumed training re-logs the steps after its checkpoint, so one
step may have points from two attempts; lmforge.history keeps the last one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

from lmforge import stage

RECORD_DIR = "tracking"  # inside each stage directory: run.json and metrics.jsonl
SYSTEM_EVERY_S = 10  # seconds between samples of the stage's CPU, memory and GPUs
log = logging.getLogger(__name__)


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


def iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat()


def closed(attempt: dict, end: float, status: str, error: str | None) -> dict:
    """An attempt's entry ended at `end` (seconds since the epoch)."""
    started = dt.datetime.fromisoformat(attempt["started"]).timestamp()
    return {**attempt, "ended": iso(end), "duration_s": round(end - started, 3), "status": status, "error": error}


def read_points(directory: Path) -> list[dict]:
    """The metric points of a record, in the order they were logged."""
    metrics_file = directory / "metrics.jsonl"
    return [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []


class Tracker:
    """What a stage logs through: step metrics appended to metrics.jsonl, artifacts named by path.

    Without a directory (ranks other than 0) it logs nothing.
    """

    def __init__(
        self, directory: Path | None = None, stage_dir: Path | None = None, run_id: str | None = None, logged=()
    ):
        self.run_id, self.directory, self.stage_dir, self.wandb_run = run_id, directory, stage_dir, None
        self.artifacts: list[str] = []  # relative to the stage directory, which is renamed when it succeeds
        self.logged: set[str] = set(logged)  # metric names logged so far
        self.attempts: list[dict] = []  # every attempt of this run, the current one last
        self.lock = threading.Lock()  # the system-metrics thread logs too

    def log_metrics(self, metrics: dict, step: int | None = None, to_wandb: bool = True) -> None:
        """Points at `step`; `to_wandb=False` for the system samples, whose steps are seconds (wandb has its own)."""
        if self.directory is None or not metrics:
            return
        timestamp = now_ms()
        lines = [
            json.dumps({"key": k, "value": float(v), "step": step or 0, "timestamp": timestamp})
            for k, v in metrics.items()
        ]
        with self.lock:
            with open(self.directory / "metrics.jsonl", "a") as f:
                f.write("\n".join(lines) + "\n")
            self.logged.update(metrics)
            if self.wandb_run is not None and to_wandb:
                self.wandb_run.log(metrics, step=step)

    def log_artifacts(self, paths) -> None:
        if self.directory is None:
            return
        self.artifacts += [str(Path(path).relative_to(self.stage_dir)) for path in paths]

    def attempts_until_now(self) -> list[dict]:
        """Every attempt, the current one as if it finished now: what the stage's manifest records."""
        *earlier, current = self.attempts
        return [*earlier, closed(current, time.time(), "FINISHED", None)]


def continued_record(stage_dir: Path) -> dict | None:
    """The record an earlier attempt left unfinished in `stage_dir`, ready to continue; None (and no record
    left) when there is none to continue."""
    directory = stage_dir / RECORD_DIR
    path = directory / "run.json"
    record = json.loads(path.read_text()) if path.exists() else None
    # A finished run is complete: the stage runs anew. So does a record from before records had attempts.
    if record is None or record["status"] == "FINISHED" or "attempts" not in record:
        shutil.rmtree(directory, ignore_errors=True)
        return None
    last = record["attempts"][-1]
    if last["status"] == "RUNNING":  # killed before it could record its end: it ran at least until its last write
        last_write = max(file.stat().st_mtime for file in stage_dir.rglob("*") if file.is_file())
        record["attempts"][-1] = closed(last, last_write, "KILLED", "the job died without recording its exit")
    metrics_file = directory / "metrics.jsonl"
    if metrics_file.exists():  # a killed writer may have left half a line: append after the last whole one
        os.truncate(metrics_file, metrics_file.read_bytes().rfind(b"\n") + 1)
    return record


def gpu_handles() -> list:
    """NVML handles of the GPUs this job may use (CUDA_VISIBLE_DEVICES), none without nvidia-ml-py or a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # not installed, or no NVIDIA driver: no GPU figures
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    handles = []
    for device in (d.strip() for d in visible.split(",") if d.strip()):
        with contextlib.suppress(Exception):  # a device NVML does not know (a MIG instance): no figures for it
            # Slurm gives indices; some clusters give UUIDs (GPU-..., MIG-...).
            handles.append(
                pynvml.nvmlDeviceGetHandleByIndex(int(device))
                if device.isdigit()
                else pynvml.nvmlDeviceGetHandleByUUID(device)
            )
    return handles


def system_sample(process, known: dict, handles: list) -> dict:
    """The stage's processes (rank 0, or torchrun's ranks, and their children: data workers) and GPUs, now.

    `known` keeps each process's psutil object by pid: its CPU percent is over the time since its last sample."""
    tree = [process, *process.children(recursive=True)]
    cpu = rss = 0.0
    for found in tree:
        member = known.setdefault(found.pid, found)
        with contextlib.suppress(Exception):  # a child that has just exited
            cpu += member.cpu_percent()
            rss += member.memory_info().rss
    sample = {"system/cpu_percent": cpu, "system/rss_gb": rss / 2**30}
    if handles:
        import pynvml

        utilization = [pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles]
        used = [pynvml.nvmlDeviceGetMemoryInfo(h).used for h in handles]
        sample["system/gpu_util"] = sum(utilization) / len(utilization)  # percent, the mean over the GPUs
        sample["system/gpu_memory_gb"] = sum(used) / 2**30
    return sample


@contextlib.contextmanager
def system_metrics(tracker: Tracker, start_ms: int):
    """Samples the stage's CPU, memory and GPU use every SYSTEM_EVERY_S in a background thread, as metrics
    `system/...` whose step is the seconds since the run started (its first attempt), or one more than the
    last sample's. psutil's CPU percent is
    over the time since the previous sample, so a process's first sample reads 0."""
    import psutil

    process = psutil.Process()
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # started by torch.distributed.run: its tree holds every rank
        process = process.parent()
    known, handles, stopped = {}, gpu_handles(), threading.Event()
    last_step = -1  # each sample its own step: a short stage's last one may come within a second

    def sample() -> None:
        nonlocal last_step
        try:
            last_step = max((now_ms() - start_ms) // 1000, last_step + 1)
            tracker.log_metrics(system_sample(process, known, handles), step=last_step, to_wandb=False)
        except Exception as error:  # a figure the driver cannot give must not stop the stage
            log.warning("system metrics: %s", error)

    def sample_until_stopped() -> None:
        while not stopped.wait(SYSTEM_EVERY_S):
            sample()

    sample()
    thread = threading.Thread(target=sample_until_stopped, name="system-metrics", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopped.set()
        thread.join()
        sample()  # the last figures, also of a stage shorter than one interval


def source_tags(stage_name: str) -> dict:
    """What MLflow's UI shows as a run's Source: the stage's module and the commit of the code that ran it."""
    code = stage.code_version()
    tags = {"mlflow.source.name": f"lmforge.{stage_name}", "mlflow.source.type": "LOCAL"}
    if code["git_commit"]:
        tags["mlflow.source.git.commit"] = code["git_commit"]
    return tags


def upstream_tags(cfg: dict) -> dict:
    """Lineage: the key of every stage this one read (tokenizer, data, ...), filterable in the MLflow UI."""
    return {f"lmforge.upstream.{name}": Path(path).name for name, path in cfg["inputs"].items()}


@contextlib.contextmanager
def stage_run(cfg: dict, stage_dir: Path, enabled: bool = True):
    """Record one attempt of a stage in `stage_dir/tracking/`; params are the stage's flattened config.

    It continues the record of an earlier attempt that did not finish (see the module's docstring).
    """
    if not enabled:
        yield Tracker()
        return
    run_cfg = cfg["run"]
    stage_dir = Path(stage_dir)
    earlier = continued_record(stage_dir)
    directory = stage_dir / RECORD_DIR
    directory.mkdir(parents=True, exist_ok=True)
    # The summary a stage logs (step 0) when it finishes is not a curve: a finishing attempt logs its own.
    curves = {point["key"] for point in read_points(directory) if point["step"]}
    tracker = Tracker(directory, stage_dir, earlier["run_id"] if earlier else uuid.uuid4().hex, logged=curves)
    attempt = {
        "started": iso(time.time()),
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "status": "RUNNING",
    }
    tracker.attempts = [*(earlier["attempts"] if earlier else []), attempt]
    params = flatten({k: v for k, v in cfg.items() if k not in ("run", "stage", "key", "inputs")})
    record = {
        "run_id": tracker.run_id,
        "name": cfg["stage"],
        "start_time": earlier["start_time"] if earlier else now_ms(),
        "params": {k: str(v) for k, v in params.items()},
        "tags": {
            "lmforge.stage": cfg["stage"],
            "lmforge.stage_key": cfg["key"],
            "lmforge.source_run_id": tracker.run_id,
            "lmforge.host": socket.gethostname(),
            "lmforge.slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            **source_tags(cfg["stage"]),
            **upstream_tags(cfg),
        },
        "status": "RUNNING",
        "attempts": tracker.attempts,
    }
    stage.write_json(directory / "run.json", record)  # now: the run id survives an attempt that gets killed
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
    status, error = "FAILED", None
    try:
        with system_metrics(tracker, record["start_time"]):
            yield tracker
        status = "FINISHED"
    except BaseException as exc:  # SystemExit too: a training stopped by a signal says so
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        end = time.time()
        tracker.attempts[-1] = closed(attempt, end, status, error)
        record.update(status=status, end_time=int(end * 1000), artifacts=tracker.artifacts, attempts=tracker.attempts)
        stage.write_json(directory / "run.json", record)
        if tracker.wandb_run is not None:
            tracker.wandb_run.finish(exit_code=0 if status == "FINISHED" else 1)
