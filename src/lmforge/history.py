"""Copy the run records of a configuration's stages into the central MLflow store.

    python -m lmforge.history merge CARD_CONFIG.yaml CARD_DIR OUT.json
    python -m lmforge.history wandb-sync CARD_DIR     # when run.wandb: upload the offline wandb runs

The Snakemake rules `history` and `wandb_sync` run these on the login node
(local rules: compute nodes may have no internet) once a configuration's card exists; the stages themselves only wrote records into
their own directories (see lmforge.tracking for why). In the central store:

- one experiment per sweep (tracking.experiment_name),
- one parent run per configuration, tagged `lmforge.run_key`, carrying the whole
  configuration as params and its headline numbers (SUMMARY_METRICS),
- one child run per stage, tagged with its stage key, the record it came from
  (`lmforge.source_run_id`) and its upstream stages' keys and child run ids.

A stage shared by several configurations of a sweep (curate, tokenizer) becomes
a child of each of them, so every configuration shows all eight stages.
Merging is idempotent: a stage whose record is already a finished child of the
parent is skipped; a child copied from an older record of the stage (rerun under
the same key), or whose copy died halfway, is replaced. A SQLite store is written under a file lock, so concurrent
merges (Snakemake runs local jobs in parallel) take turns; keep it on a local
disk. An http(s) URI sends the runs to an MLflow server.

Nothing here is the only copy: the records stay in the stage directories, and
the history file (OUT.json, written whole or not at all) is derived from them
and the store. A damaged SQLite store stops the merge with the file's name;
moved away, `snakemake --forcerun history` merges every record again.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml

from lmforge import plan, stage, tracking

RUN_KEY_TAG = "lmforge.run_key"  # the configuration's key (its card stage's key), on the parent and its children
CONFIGURATION_ROLE = {"lmforge.role": "configuration"}
# A configuration's headline numbers, copied onto its parent run: name -> (stage, that stage's metric).
SUMMARY_METRICS = {
    "pretrain_train_loss": ("pretrain", "train_loss"),
    "pretrain_validation_loss": ("pretrain", "validation_loss"),
    "finetune_train_loss": ("finetune", "train_loss"),
    "finetune_validation_loss": ("finetune", "validation_loss"),
    "baseline_test_bpb": ("evaluate", "baseline.test_bits_per_byte"),
    "pretrain_test_bpb": ("evaluate", "pretrain.test_bits_per_byte"),
    "finetune_test_bpb": ("evaluate", "finetune.test_bits_per_byte"),
    "exact_match": ("evaluate", "finetune.task_exact_match_chat_greedy"),
}
BATCH = 1000  # MLflow's limit of metrics in one log_batch call (params: 100)


def configuration_stages(last_dir: Path) -> dict[str, Path]:
    """The directory of every stage a stage (the card) was built from, and its own, upstream first."""
    found: dict[str, Path] = {}
    pending = [Path(last_dir)]
    while pending:
        directory = pending.pop()
        manifest = json.loads((directory / "manifest.json").read_text())
        found[manifest["stage"]] = directory
        pending += [Path(path) for dep, path in manifest["config"]["inputs"].items() if dep not in found]
    return {name: found[name] for name in plan.STAGES if name in found}


def read_record(stage_dir: Path) -> dict:
    """A stage's run record with its metric points (lmforge.tracking writes them), one per metric and step.

    A training resumed from its checkpoint logs again the steps that the killed attempt logged after that
    checkpoint; the last attempt's point is kept, as it belongs to the run that produced the stage's output.
    """
    directory = stage_dir / tracking.RECORD_DIR
    record = json.loads((directory / "run.json").read_text())
    points = {(point["key"], point["step"]): point for point in tracking.read_points(directory)}
    record["metrics"] = list(points.values())
    return record


def last_values(points: list[dict]) -> dict[str, float]:
    """Each metric's value at its last step, as MLflow reports a run's metric."""
    last = {}
    for point in sorted(points, key=lambda p: (p["step"], p["timestamp"])):
        last[point["key"]] = point["value"]
    return last


@contextlib.contextmanager
def store_lock(uri: str):
    """Concurrent merges into one SQLite file take turns (flock: the file is on the login node's disk)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri.removeprefix("sqlite:///").split("?")[0] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


class StoreError(RuntimeError):
    """The central store cannot be merged into."""


def check_store(uri: str) -> None:
    """A SQLite store must be a new file or a sound database: MLflow's errors on a damaged one do not say which file
    or what to do about it."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///").split("?")[0])
    if not path.exists():
        return
    try:
        with contextlib.closing(sqlite3.connect(path)) as db:
            problems = [row[0] for row in db.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as error:
        problems = [str(error)]
    if problems != ["ok"]:
        raise StoreError(
            f"the MLflow store {path} is damaged ({'; '.join(problems[:3])}). Move it away (mv {path} {path}.damaged)"
            " and rerun `snakemake --forcerun history` with the same configuration (for each sweep that was merged"
            " into it): the run records live in the stage directories (<stage dir>/tracking/), so merging them again"
            " rebuilds the store's runs."
        )


def experiment_id(client, run_cfg: dict) -> str:
    from mlflow.exceptions import MlflowException

    name = tracking.experiment_name(run_cfg)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # Artifacts beside a local store; a server keeps them where it is configured to.
    local = not client.tracking_uri.startswith(("http://", "https://"))
    location = (Path(run_cfg["results_dir"]).resolve() / "mlartifacts").as_uri() if local else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another merge created it first (server)
        return client.get_experiment_by_name(name).experiment_id


def find_runs(client, experiment: str, tags: dict) -> list:
    condition = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    return client.search_runs([experiment], filter_string=condition)


def parent_run_id(client, experiment: str, run_cfg: dict) -> str:
    tags = {RUN_KEY_TAG: run_cfg["run_key"], **CONFIGURATION_ROLE}
    found = find_runs(client, experiment, tags)
    if found:
        return found[0].info.run_id
    tags["lmforge.sweep"] = run_cfg.get("sweep") or ""
    return client.create_run(experiment, run_name=f"run-{run_cfg['run_key']}", tags=tags).info.run_id


def log_batches(client, run_id: str, params=(), metrics=()) -> None:
    params, metrics = list(params), list(metrics)
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start : start + 100])
    for start in range(0, len(metrics), BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + BATCH])


def current_child(client, experiment: str, parent: dict, record: dict) -> str | None:
    """The parent's child copied from this very record, if any. Other children of the same stage are deleted:
    copies that died halfway (still RUNNING) and copies of an older record (the stage rerun under the same key)."""
    current = None
    for run in find_runs(client, experiment, {**parent, "lmforge.stage": record["name"]}):
        if run.data.tags.get("lmforge.source_run_id") == record["run_id"] and run.info.status == record["status"]:
            current = run.info.run_id
        else:
            client.delete_run(run.info.run_id)
    return current


def import_stage(client, experiment: str, parent: dict, stage_dir: Path, record: dict, upstream: dict) -> str:
    """A new child run copied from a stage record; `parent` holds the tags that link a child to its parent,
    `upstream` maps stage names to their child runs in this configuration."""
    from mlflow.entities import Metric, Param

    read = [name for name in upstream if f"lmforge.upstream.{name}" in record["tags"]]
    tags = {**record["tags"], **parent, **{f"lmforge.upstream_run.{name}": upstream[name] for name in read}}
    run_id = client.create_run(
        experiment, start_time=record["start_time"], tags=tags, run_name=record["name"]
    ).info.run_id
    log_batches(
        client,
        run_id,
        params=[Param(k, v[:6000]) for k, v in record["params"].items()],
        metrics=[Metric(p["key"], p["value"], p["timestamp"], p["step"]) for p in record["metrics"]],
    )
    for relative in record["artifacts"]:
        path = stage_dir / relative
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=path.name)
        else:
            client.log_artifact(run_id, str(path))
    # Last: a finished child is a complete one.
    client.set_terminated(run_id, record["status"], end_time=record["end_time"])
    return run_id


def merge(stages: dict[str, Path], run_cfg: dict) -> dict:
    """Copy the records of one configuration's stages (name -> directory, upstream first) into the central store."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = tracking.tracking_uri(run_cfg)
    records = {name: read_record(Path(directory)) for name, directory in stages.items()}
    with store_lock(uri):
        check_store(uri)
        client = MlflowClient(tracking_uri=uri)
        experiment = experiment_id(client, run_cfg)
        parent_id = parent_run_id(client, experiment, run_cfg)
        parent = {"mlflow.parentRunId": parent_id, RUN_KEY_TAG: run_cfg["run_key"]}
        children: dict[str, str] = {}
        changed = client.get_run(parent_id).info.status != "FINISHED"  # new, or a merge that died halfway
        for name, record in records.items():
            children[name] = current_child(client, experiment, parent, record)
            if children[name] is None:
                children[name] = import_stage(client, experiment, parent, Path(stages[name]), record, children)
                changed = True
        if changed:  # the parent's summary, once per set of children (metrics logged twice would be two points)
            configuration = {k: v for record in records.values() for k, v in record["params"].items()}
            finals = {name: last_values(record["metrics"]) for name, record in records.items()}
            summary = {
                metric: finals[stage][key]
                for metric, (stage, key) in SUMMARY_METRICS.items()
                if key in finals.get(stage, {})
            }
            now = tracking.now_ms()
            log_batches(
                client,
                parent_id,
                params=[Param(k, v[:6000]) for k, v in configuration.items()],
                metrics=[Metric(k, v, now, 0) for k, v in summary.items()],
            )
            end = max(record["end_time"] for record in records.values())
            client.set_terminated(parent_id, "FINISHED", end_time=end)
    return {
        "tracking_uri": uri,
        "experiment": tracking.experiment_name(run_cfg),
        "experiment_id": experiment,
        "parent_run_id": parent_id,
        "runs": children,
    }


def wandb_sync(stages: dict[str, Path]) -> None:
    """Upload the offline wandb runs the stages wrote (tracking.stage_run) from a node with internet."""
    runs = [
        str(run) for d in stages.values() for run in sorted((d / tracking.RECORD_DIR / "wandb").glob("offline-run-*"))
    ]
    if runs:
        subprocess.run([sys.executable, "-m", "wandb", "sync", *runs], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m lmforge.history")
    commands = parser.add_subparsers(dest="command", required=True)
    merge_args = commands.add_parser("merge", help="copy a configuration's stage records into the central store")
    merge_args.add_argument("card_config", type=Path, help="the card stage's resolved config (its run section)")
    merge_args.add_argument("card_dir", type=Path)
    merge_args.add_argument("out", type=Path, help="JSON: the experiment, parent run and child runs")
    commands.add_parser("wandb-sync", help="wandb sync the stages' offline runs").add_argument("card_dir", type=Path)
    args = parser.parse_args()
    stages = configuration_stages(args.card_dir)
    if args.command == "wandb-sync":
        wandb_sync(stages)
        return
    try:
        merged = merge(stages, yaml.safe_load(args.card_config.read_text())["run"])
    except StoreError as error:
        sys.exit(f"error: {error}")
    print(f"{len(merged['runs'])} stage runs under {merged['parent_run_id']} in {merged['experiment']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    stage.write_json(args.out, merged)


if __name__ == "__main__":
    main()
