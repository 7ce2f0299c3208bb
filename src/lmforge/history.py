"""Copy the run records of a configuration's stages into the central MLflow store.

    python -m lmforge.history merge CARD_CONFIG.yaml CARD_DIR OUT.json
    python -m lmforge.history wandb-sync CARD_DIR     # when run.wandb: upload the offline wandb runs

The Snakemake rules `history` and `wandb_sync` run these on the login node
(local rules: compute nodes may have no internet) once a configuration's card exists; the stages themselves only wrote records into
their own directories (see lmforge.tracking for why). Before that, while
Snakemake runs, lmforge.watch merges the records of running and failed stages
(`merge(..., final=False)`): a running stage is a RUNNING child whose curves
grow at each merge, a failed one a FAILED child with its log. In the central store:

- one experiment per sweep (tracking.experiment_name),
- one parent run per configuration, tagged `lmforge.run_key`, carrying the whole
  configuration as params and its headline numbers (SUMMARY_METRICS),
- one child run per stage, tagged with its stage key, the record it came from
  (`lmforge.source_run_id`) and its upstream stages' keys and child run ids,
  with the curated splits it read as dataset inputs and its code's git commit;
- a logged model (MLflow's Models tab) for the model the card ships, its
  weights left in the card's directory; the card and datasheet on the parent.

A stage shared by several configurations of a sweep (curate, tokenizer) becomes
a child of each of them, so every configuration shows all eight stages.
Merging is idempotent: a stage whose record is already a child of the parent,
in the same state (status and number of attempts), is skipped, or, running,
gets the points logged since; a child copied from an older record of the stage
(rerun under the same key), or whose copy died halfway, is replaced, but for
FAILED and KILLED children: an attempt that did not finish stays in the history. A SQLite store is written under a file lock, so concurrent
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
import logging
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from lmforge import plan, stage, tracking

log = logging.getLogger(__name__)

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
    "exact_match": ("evaluate", "finetune.tasks.docstring_to_name.chat.exact_match_greedy"),
}
BATCH = 1000  # MLflow's limit of metrics in one log_batch call (params: 100)
RECORD_STATE_TAG = "lmforge.record_state"  # "<status>:<attempts>" of the record a child was copied from
OFFSET_TAG = "lmforge.metrics_offset"  # bytes of the record's metrics.jsonl that a running child holds
KEPT = ("FAILED", "KILLED")  # children kept when their stage runs again: the attempts that did not finish
DATA_READERS = ("curate", "tokenizer", "baseline", "pretrain", "finetune", "evaluate")  # dataset inputs: the splits
# The UI opens an experiment of this kind on its runs and models, not on traces (GenAI); mlflow's own values.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


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


def record_home(stage_dir: Path) -> Path | None:
    """The directory holding a stage's record: the stage's own when it finished, else its `.partial` sibling
    (running, failed, or killed); None before the stage started."""
    for directory in (Path(stage_dir), Path(f"{stage_dir}.partial")):
        if (directory / tracking.RECORD_DIR / "run.json").exists():
            return directory
    return None


def points_from(directory: Path, offset: int = 0) -> tuple[list[dict], int]:
    """The metric points of a record from byte `offset` of its metrics.jsonl, and where they end: at the last
    whole line, as a running stage may be writing the next one."""
    path = directory / "metrics.jsonl"
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    whole = data[: data.rfind(b"\n") + 1]
    return [json.loads(line) for line in whole.splitlines()], offset + len(whole)


def read_record(stage_dir: Path) -> dict:
    """A stage's run record with its metric points (lmforge.tracking writes them), one per metric and step.

    A training resumed from its checkpoint logs again the steps that the killed attempt logged after that
    checkpoint; the last attempt's point is kept, as it belongs to the run that produced the stage's output.
    """
    directory = stage_dir / tracking.RECORD_DIR
    record = json.loads((directory / "run.json").read_text())
    points, record["metrics_end"] = points_from(directory)
    record["metrics"] = list({(point["key"], point["step"]): point for point in points}.values())
    return record


def record_state(record: dict) -> str:
    return f"{record['status']}:{len(record['attempts'])}"


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
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except MlflowException:  # another merge created it first (server)
        return client.get_experiment_by_name(name).experiment_id


def find_runs(client, experiment: str, tags: dict) -> list:
    condition = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    return client.search_runs([experiment], filter_string=condition)


def parent_run_id(client, experiment: str, run_cfg: dict, records: dict) -> str:
    """The configuration's run; a new one starts with its earliest stage, so that its duration spans its children,
    and shows the code (git commit) of its latest stage."""
    tags = {RUN_KEY_TAG: run_cfg["run_key"], **CONFIGURATION_ROLE}
    found = find_runs(client, experiment, tags)
    if found:
        return found[0].info.run_id
    latest = max(records.values(), key=lambda record: record["start_time"])
    source = {k: v for k, v in latest["tags"].items() if k.startswith("mlflow.source.")}
    tags.update({"lmforge.sweep": run_cfg.get("sweep") or "", **source})
    start = min(record["start_time"] for record in records.values())
    return client.create_run(experiment, start_time=start, run_name=f"run-{run_cfg['run_key']}", tags=tags).info.run_id


def log_batches(client, run_id: str, params=(), metrics=()) -> None:
    params, metrics = list(params), list(metrics)
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start : start + 100])
    for start in range(0, len(metrics), BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + BATCH])


def current_child(client, experiment: str, parent: dict, record: dict):
    """The parent's child copied from this very record in its present state, if any. Other children of the same
    stage are deleted: copies that died halfway (RUNNING, no state tag), copies of the record in an earlier state
    (running, now finished) and copies of an older record (the stage rerun under the same key); but a FAILED or
    KILLED child stays, the record of an attempt that did not finish."""
    current = None
    for run in find_runs(client, experiment, {**parent, "lmforge.stage": record["name"]}):
        tags = run.data.tags
        if tags.get("lmforge.source_run_id") == record["run_id"] and tags.get(RECORD_STATE_TAG) == record_state(record):
            current = run
        elif run.info.status not in KEPT:
            client.delete_run(run.info.run_id)
    return current


_digests: dict[tuple, str] = {}  # (path, size, mtime) -> digest: a merge every minute hashes each split once


def file_digest(path: Path) -> str:
    status = path.stat()
    key = (str(path), status.st_size, status.st_mtime_ns)
    if key not in _digests:
        _digests[key] = stage.sha256_file(path)[:16]  # MLflow keeps at most 36 characters
    return _digests[key]


def curated_inputs(curate_dir: Path) -> list:
    """The curated splits (data/*.parquet, task/*.parquet) as MLflow dataset inputs: a local source with the
    file's path, a digest of its content, its number of rows; the split is the input's context."""
    import pyarrow.parquet as pq
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for path in sorted(Path(curate_dir).glob("*/*.parquet")):
        dataset = Dataset(
            name=f"{path.parent.name}/{path.stem}",
            digest=file_digest(path),
            source_type="local",
            source=json.dumps({"uri": path.resolve().as_uri()}),
            profile=json.dumps({"num_rows": pq.ParquetFile(path).metadata.num_rows}),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", path.stem)]))
    return inputs


def stage_log(run_cfg: dict, record: dict) -> Path:
    """The job's log, where the stage rules write it (workflow/rules/common.smk, stage_log)."""
    return Path(run_cfg["results_dir"]) / "logs" / record["name"] / f"{record['tags']['lmforge.stage_key']}.log"


def import_stage(client, experiment: str, parent: dict, home: Path, record: dict, upstream: dict, context: dict) -> str:
    """A new child run copied from a stage record found in `home` (the stage's directory or its `.partial`);
    `parent` holds the tags that link a child to its parent, `upstream` maps stage names to their child runs in
    this configuration; `context` holds the run config (`run`) and the curated data's directory (`curate`).
    A running record's child stays RUNNING; `append_points` adds what the stage logs next."""
    from mlflow.entities import Metric, Param, RunTag

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
    if record["name"] in DATA_READERS and context.get("curate"):
        client.log_inputs(run_id, datasets=curated_inputs(context["curate"]))
    for relative in record.get("artifacts", []):  # listed when an attempt ends
        path = home / relative
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=path.name)
        else:
            client.log_artifact(run_id, str(path))
    job_log = stage_log(context["run"], record)
    if record["status"] != "RUNNING" and job_log.exists():
        client.log_artifact(run_id, str(job_log), artifact_path="log")
    # Last: a child with its state is a complete copy (one without is a copy that died halfway).
    state = [RunTag(RECORD_STATE_TAG, record_state(record)), RunTag(OFFSET_TAG, str(record["metrics_end"]))]
    client.log_batch(run_id, tags=state)
    if record["status"] != "RUNNING":
        client.set_terminated(run_id, record["status"], end_time=record["end_time"])
    return run_id


def append_points(client, run, home: Path) -> None:
    """The points a running stage logged since its child was last merged. A resumed training's repeated steps
    appear twice while it runs; its finished record replaces the child with one point per step."""
    from mlflow.entities import Metric

    offset = int(run.data.tags[OFFSET_TAG])
    points, end = points_from(home / tracking.RECORD_DIR, offset)
    if points:
        metrics = [Metric(p["key"], p["value"], p["timestamp"], p["step"]) for p in points]
        log_batches(client, run.info.run_id, metrics=metrics)
        client.set_tag(run.info.run_id, OFFSET_TAG, str(end))


def unrecorded_failure(name: str, stage_dir: Path, run_cfg: dict) -> dict:
    """A record for a job that failed before its stage could start one (an import error, a bad config, killed
    while loading): FAILED, with the job's log, the attempt identified by the log's time."""
    record = {"name": name, "tags": {"lmforge.stage": name, "lmforge.stage_key": Path(stage_dir).name}}
    ended = int(stage_log(run_cfg, record).stat().st_mtime * 1000)
    record["tags"]["lmforge.source_run_id"] = f"unrecorded-{Path(stage_dir).name}-{ended}"
    return {
        **record,
        "run_id": record["tags"]["lmforge.source_run_id"],
        "start_time": ended,
        "end_time": ended,
        "params": {},
        "status": "FAILED",
        "attempts": [{"status": "FAILED", "error": "the job failed before the stage started: see its log"}],
        "metrics": [],
        "metrics_end": 0,
    }


def merge(stages: dict[str, Path], run_cfg: dict, final: bool = True, failed_unrecorded=()) -> dict:
    """Copy the records of one configuration's stages (name -> directory, upstream first) into the central store.

    `final`: every stage finished (the card exists): the parent gets its summary, the card and the model, and
    is FINISHED. Otherwise (lmforge.watch, while Snakemake runs) the stages that started are merged as they are,
    and the parent is RUNNING while one runs, FAILED when one failed and none runs. `failed_unrecorded` names
    stages whose jobs failed before writing a record: each becomes a FAILED run with its log."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = tracking.tracking_uri(run_cfg)
    with store_lock(uri):
        # The records are read holding the lock: a watcher's merge that waited on the `history` rule's must not
        # then write a stage's RUNNING state from before the final merge over its FINISHED run.
        homes = {name: home for name, directory in stages.items() if (home := record_home(directory)) is not None}
        records = {name: read_record(home) for name, home in homes.items()}
        records.update({name: unrecorded_failure(name, stages[name], run_cfg) for name in failed_unrecorded})
        homes.update({name: Path(stages[name]) for name in failed_unrecorded})
        if not records:
            return {}
        curate = Path(stages["curate"]) if "curate" in stages and Path(stages["curate"]).is_dir() else None
        context = {"run": run_cfg, "curate": curate}
        check_store(uri)
        client = MlflowClient(tracking_uri=uri)
        experiment = experiment_id(client, run_cfg)
        parent_id = parent_run_id(client, experiment, run_cfg, records)
        parent = {"mlflow.parentRunId": parent_id, RUN_KEY_TAG: run_cfg["run_key"]}
        children: dict[str, str] = {}
        parent_status = client.get_run(parent_id).info.status
        changed = parent_status != "FINISHED"  # new, or a merge that died halfway
        for name, record in records.items():
            current = current_child(client, experiment, parent, record)
            if current is None:
                children[name] = import_stage(client, experiment, parent, homes[name], record, children, context)
                changed = True
            else:
                children[name] = current.info.run_id
                if record["status"] == "RUNNING":
                    append_points(client, current, homes[name])
        end = max(record.get("end_time", 0) for record in records.values())
        statuses = {record["status"] for record in records.values()}
        if not final:
            if "RUNNING" in statuses and parent_status != "RUNNING":
                client.update_run(parent_id, status="RUNNING")
            elif "RUNNING" not in statuses and "FAILED" in statuses and parent_status != "FAILED":
                client.set_terminated(parent_id, "FAILED", end_time=end)
        elif changed:  # the parent's summary, once per set of children (metrics logged twice would be two points)
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
            if "card" in records:
                log_card(client, experiment, parent_id, children["card"], Path(stages["card"]), run_cfg)
            client.set_terminated(parent_id, "FINISHED", end_time=end)
    return {
        "tracking_uri": uri,
        "experiment": tracking.experiment_name(run_cfg),
        "experiment_id": experiment,
        "parent_run_id": parent_id,
        "runs": children,
    }


def log_card(client, experiment: str, parent_id: str, card_run: str, card_dir: Path, run_cfg: dict) -> None:
    """The card and datasheet on the parent, and the shipped model as a logged model of the card's run and the
    parent: MLflow holds its card and configuration files, the weights stay in the card's directory (its path is
    the model's `lmforge.path` tag), as an external model (mlflow.create_external_model does the same)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.models.utils import get_external_mlflow_model_spec
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

    model_dir = card_dir / "model"
    for document in (model_dir / "README.md", card_dir / "datasheet.md"):
        if document.exists():
            client.log_artifact(parent_id, str(document), artifact_path="card")
    if not model_dir.is_dir():
        return
    model = client.create_logged_model(
        experiment,
        name=f"model-{run_cfg['run_key']}",
        source_run_id=card_run,
        tags={
            MLFLOW_MODEL_IS_EXTERNAL: "true",
            RUN_KEY_TAG: run_cfg["run_key"],
            "lmforge.path": str(model_dir.resolve()),
        },
        model_type="causal-lm",
    )
    with tempfile.TemporaryDirectory() as tmp:
        get_external_mlflow_model_spec(model).save(str(Path(tmp) / MLMODEL_FILE_NAME))
        for small in ("README.md", "config.json", "generation_config.json"):
            if (model_dir / small).exists():
                (Path(tmp) / small).write_bytes((model_dir / small).read_bytes())
        client.log_model_artifacts(model.model_id, tmp)
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    for run_id in (card_run, parent_id):
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    if run_cfg.get("register_model"):
        register(client, run_cfg["register_model"], model, card_run, run_cfg["run_key"])


def register(client, name: str, model, card_run: str, run_key: str) -> None:
    """The shipped model as a new version of the registered model `name` (run.register_model)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Models shipped by lmforge's card stage")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name, source=model.artifact_location, run_id=card_run, model_id=model.model_id, tags={RUN_KEY_TAG: run_key}
    )
    log.info("registered %s version %s (configuration %s)", name, version.version, run_key)


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
