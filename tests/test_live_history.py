"""Run history while it runs: running and failed stages merged into a real MLflow SQLite store (lmforge.watch)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from lmforge import history, stage, tracking, watch
from tests.tracked_stage import record_stage, run_config

REPO = Path(__file__).resolve().parents[1]


def curated(root: Path, run_cfg: dict) -> Path:
    """A finished curate stage with its splits, as curate writes them (data/*.parquet, task/*.parquet)."""
    directory = record_stage(root, "curate", "data0", run_cfg, {"data": {"source": "stdlib"}})
    for kind in ("data", "task"):
        (directory / kind).mkdir()
        for split, rows in (("train", 5), ("validation", 2), ("test", 2)):
            pq.write_table(
                pa.table({"text": [f"{split} {i}" for i in range(rows)]}), directory / kind / f"{split}.parquet"
            )
    return directory


def pretrain_cfg(run_cfg: dict, curate: Path) -> dict:
    return {
        "stage": "pretrain",
        "key": "pre0",
        "train": {"lr": 0.001},
        "inputs": {"curate": str(curate)},
        "run": run_cfg,
    }


def children_of(client: MlflowClient, merged: dict, stage_name: str) -> list:
    condition = f"tags.`mlflow.parentRunId` = '{merged['parent_run_id']}' and tags.`lmforge.stage` = '{stage_name}'"
    return client.search_runs([merged["experiment_id"]], filter_string=condition)


def curve(client: MlflowClient, run_id: str, key: str = "train_loss") -> list[tuple[int, float]]:
    return sorted((p.step, p.value) for p in client.get_metric_history(run_id, key))


def test_a_running_stage_is_a_running_run_whose_curve_grows(tmp_path):
    run_cfg = run_config(tmp_path, "cfg_live")
    curate = curated(tmp_path, run_cfg)
    final = tmp_path / "pretrain" / "pre0"
    stages = {"curate": curate, "pretrain": final}  # what the watcher merges: the plan's directories
    client = MlflowClient(tracking_uri=tracking.tracking_uri(run_cfg))

    with tracking.stage_run(pretrain_cfg(run_cfg, curate), Path(f"{final}.partial")) as tracker:
        tracker.log_metrics({"train_loss": 5.0}, step=1)
        tracker.log_metrics({"train_loss": 4.0}, step=2)
        live = history.merge(stages, run_cfg, final=False)
        [running] = children_of(client, live, "pretrain")
        assert running.info.status == "RUNNING" and client.get_run(live["parent_run_id"]).info.status == "RUNNING"
        assert curve(client, running.info.run_id) == [(1, 5.0), (2, 4.0)]

        tracker.log_metrics({"train_loss": 3.0}, step=3)
        again = history.merge(stages, run_cfg, final=False)
        assert [r.info.run_id for r in children_of(client, again, "pretrain")] == [running.info.run_id]
        assert curve(client, running.info.run_id) == [(1, 5.0), (2, 4.0), (3, 3.0)]  # the new point, once
    Path(f"{final}.partial").rename(final)  # what stage.run does when the stage succeeds

    merged = history.merge(stages, run_cfg)
    [finished] = children_of(client, merged, "pretrain")
    assert finished.info.status == "FINISHED" and curve(client, finished.info.run_id)[-1] == (3, 3.0)
    parent = client.get_run(merged["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = [client.get_run(run_id) for run_id in merged["runs"].values()]
    assert parent.info.start_time <= min(c.info.start_time for c in children)  # a duration that is not negative
    assert parent.info.end_time >= max(c.info.end_time for c in children)

    commit = stage.code_version()["git_commit"]
    for run in [parent, *children]:
        assert run.data.tags["mlflow.source.git.commit"] == commit
    assert finished.data.tags["mlflow.source.name"] == "lmforge.pretrain"
    inputs = {(d.dataset.name, d.tags[0].value): d.dataset for d in finished.inputs.dataset_inputs}
    assert set(inputs) == {
        (f"{kind}/{split}", split) for kind in ("data", "task") for split in ("train", "validation", "test")
    }
    train = inputs[("data/train", "train")]
    assert json.loads(train.source)["uri"] == (curate / "data" / "train.parquet").resolve().as_uri()
    assert train.digest == stage.sha256_file(curate / "data" / "train.parquet")[:16]
    assert json.loads(train.profile) == {"num_rows": 5}

    # System metrics, sampled while the stage ran: its processes' CPU and memory (no GPU on this machine).
    rss = client.get_metric_history(finished.info.run_id, "system/rss_gb")
    assert len(rss) >= 2 and all(0.01 < p.value < 64 for p in rss)
    assert client.get_metric_history(finished.info.run_id, "system/cpu_percent")

    experiment = client.get_experiment(merged["experiment_id"])
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_failed_stage_is_failed_with_its_log_and_stays_when_retried(tmp_path):
    run_cfg = run_config(tmp_path, "cfg_fail")
    curate = curated(tmp_path, run_cfg)
    final = tmp_path / "pretrain" / "pre0"
    stages = {"curate": curate, "pretrain": final}
    job_log = tmp_path / "logs" / "pretrain" / "pre0.log"  # where the stage rule writes the job's output
    job_log.parent.mkdir(parents=True)
    job_log.write_text("step 1 train_loss=5\nStageError: out of memory\n")
    client = MlflowClient(tracking_uri=tracking.tracking_uri(run_cfg))

    with pytest.raises(stage.StageError):
        with tracking.stage_run(pretrain_cfg(run_cfg, curate), Path(f"{final}.partial")) as tracker:
            tracker.log_metrics({"train_loss": 5.0}, step=1)
            raise stage.StageError("out of memory")
    live = history.merge(stages, run_cfg, final=False)
    [failed] = children_of(client, live, "pretrain")
    assert failed.info.status == "FAILED" and client.get_run(live["parent_run_id"]).info.status == "FAILED"
    [logged] = client.list_artifacts(failed.info.run_id, "log")
    assert (
        Path(client.download_artifacts(failed.info.run_id, logged.path, str(tmp_path)))
        .read_text()
        .endswith("StageError: out of memory\n")
    )

    with tracking.stage_run(pretrain_cfg(run_cfg, curate), Path(f"{final}.partial")) as tracker:  # the retry
        tracker.log_metrics({"train_loss": 4.0}, step=2)
        history.merge(stages, run_cfg, final=False)
        assert client.get_run(live["parent_run_id"]).info.status == "RUNNING"
    Path(f"{final}.partial").rename(final)
    merged = history.merge(stages, run_cfg)
    runs = {r.info.run_id: r for r in children_of(client, merged, "pretrain")}
    assert set(runs) == {failed.info.run_id, merged["runs"]["pretrain"]}  # the failed attempt is kept
    assert client.get_run(failed.info.run_id).info.status == "FAILED"
    retried = runs[merged["runs"]["pretrain"]]
    assert retried.info.status == "FINISHED" and curve(client, retried.info.run_id) == [(1, 5.0), (2, 4.0)]
    assert retried.data.tags["lmforge.source_run_id"] == failed.data.tags["lmforge.source_run_id"]  # one record


def watcher_parent(plan: Path) -> subprocess.Popen:
    """A stand-in for Snakemake: it starts the watcher as its child, prints its pid, and waits."""
    script = (
        "import os, time\n"
        "from lmforge import watch\n"
        f"print(watch.spawn({str(plan)!r}, os.getpid(), every_s=0.5).pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie that its new parent has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_watcher_merges_a_running_stage_and_stops_when_snakemake_is_gone(tmp_path):
    run_cfg = run_config(tmp_path, "cfg_watch")
    final = tmp_path / "pretrain" / "pre0"
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"configurations": [{"run": run_cfg, "stages": {"pretrain": str(final)}}]}))
    client = MlflowClient(tracking_uri=tracking.tracking_uri(run_cfg))
    parent = watcher_parent(plan)
    watcher_pid = int(parent.stdout.readline())
    try:
        with tracking.stage_run(pretrain_cfg(run_cfg, tmp_path), Path(f"{final}.partial")) as tracker:
            tracker.log_metrics({"train_loss": 5.0}, step=1)
            deadline = time.time() + 25
            while True:  # the watcher's merges, every 0.5 s, show the running stage
                runs = client.search_runs(
                    [e.experiment_id for e in client.search_experiments()],
                    filter_string="tags.`lmforge.stage` = 'pretrain'",
                )
                if runs and curve(client, runs[0].info.run_id):
                    break
                assert time.time() < deadline and not gone(watcher_pid), "the watcher did not merge the stage"
                time.sleep(0.2)
            assert runs[0].info.status == "RUNNING"
            parent.send_signal(signal.SIGKILL)  # Snakemake killed, or its login session closed
            parent.wait()
            deadline = time.time() + 10
            while not gone(watcher_pid):
                assert time.time() < deadline, "the watcher outlived its Snakemake"
                time.sleep(0.1)
            # Its jobs may still run on the cluster: their runs stay RUNNING for the next Snakemake's watcher.
            assert client.get_run(runs[0].info.run_id).info.status == "RUNNING"
    finally:
        parent.kill()
        if not gone(watcher_pid):
            os.kill(watcher_pid, signal.SIGKILL)


def test_a_watcher_stopped_by_snakemake_merges_last_and_marks_unfinished_stages_killed(tmp_path):
    run_cfg = run_config(tmp_path, "cfg_stop")
    final = tmp_path / "pretrain" / "pre0"
    stages = {"pretrain": str(final), "card": str(tmp_path / "card" / "card0")}
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"configurations": [{"run": run_cfg, "stages": stages}]}))
    # A job that died without recording its end (SIGKILL): its record still says RUNNING.
    with pytest.raises(KeyboardInterrupt):
        with tracking.stage_run(pretrain_cfg(run_cfg, tmp_path), Path(f"{final}.partial")) as tracker:
            tracker.log_metrics({"train_loss": 5.0}, step=1)
            record = json.loads((Path(f"{final}.partial") / tracking.RECORD_DIR / "run.json").read_text())
            raise KeyboardInterrupt
    stage.write_json(Path(f"{final}.partial") / tracking.RECORD_DIR / "run.json", record)  # as it was when killed
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("MLFLOW_TRACKING_URI", None)
    watcher = watch.spawn(plan, os.getpid(), every_s=3600, env=env)  # its parent, this process, stays
    time.sleep(0.5)  # SIGTERM may come before the watcher has started: it waits, blocked, for its handler
    # A job that failed before its stage could record anything: only its log says so.
    card_log = tmp_path / "logs" / "card" / "card0.log"
    card_log.parent.mkdir(parents=True)
    card_log.write_text("ImportError: cannot import name 'BUILT_IN' from 'lmforge.heldout'\n")
    watcher.send_signal(signal.SIGTERM)  # what lmforge.watch.stop (onsuccess, onerror) sends
    assert watcher.wait(timeout=60) == 0
    client = MlflowClient(tracking_uri=tracking.tracking_uri(run_cfg))
    experiment = client.get_experiment_by_name("lmforge/demo").experiment_id
    [run] = client.search_runs([experiment], filter_string="tags.`lmforge.stage` = 'pretrain'")
    assert run.info.status == "KILLED" and curve(client, run.info.run_id) == [(1, 5.0)]
    [card] = client.search_runs([experiment], filter_string="tags.`lmforge.stage` = 'card'")
    assert card.info.status == "FAILED" and card.data.tags["lmforge.stage_key"] == "card0"
    [logged] = client.list_artifacts(card.info.run_id, "log")
    assert "ImportError" in Path(client.download_artifacts(card.info.run_id, logged.path, str(tmp_path))).read_text()
    assert client.get_run(card.data.tags["mlflow.parentRunId"]).info.status == "FAILED"


def test_the_card_and_the_shipped_model_are_on_the_configuration_s_run(tmp_path):
    run_cfg = {**run_config(tmp_path, "cfg_card"), "register_model": "tiny-lm"}
    card = record_stage(tmp_path, "card", "card0", run_cfg, {"card": {"model_name": "tiny"}})
    (card / "model").mkdir()
    (card / "model" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    (card / "model" / "config.json").write_text('{"model_type": "llama"}\n')
    (card / "model" / "model.safetensors").write_bytes(b"\0" * 1024)  # stays in the card's directory
    (card / "datasheet.md").write_text("# Datasheet\n")
    merged = history.merge({"card": card}, run_cfg)
    client = MlflowClient(tracking_uri=merged["tracking_uri"])

    card_docs = {a.path for a in client.list_artifacts(merged["parent_run_id"], "card")}
    assert card_docs == {"card/README.md", "card/datasheet.md"}
    [model] = client.search_logged_models([merged["experiment_id"]])
    assert model.source_run_id == merged["runs"]["card"] and str(model.status) == "READY"
    assert model.tags["lmforge.path"] == str((card / "model").resolve())
    stored = {Path(a.path).name for a in client.list_logged_model_artifacts(model.model_id)}
    assert stored == {"MLmodel", "README.md", "config.json"}  # not the weights
    for run_id in (merged["parent_run_id"], merged["runs"]["card"]):  # the Models column of both runs
        assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [model.model_id]
    [version] = client.search_model_versions("name = 'tiny-lm'")  # run.register_model
    assert version.source == model.artifact_location and version.run_id == merged["runs"]["card"]
    assert version.tags["lmforge.run_key"] == "cfg_card"
    history.merge({"card": card}, run_cfg)  # merging again logs no second model, and registers no second version
    assert len(client.search_logged_models([merged["experiment_id"]])) == 1
    assert len(client.search_model_versions("name = 'tiny-lm'")) == 1
