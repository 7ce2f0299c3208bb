"""Run history that survives: a damaged MLflow store, a stage killed and rerun, and a central MLflow server."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from lmforge import history, stage, tracking
from tests.stages import curated_and_tokenized, plan, run_stage, stage_command
from tests.tracked_stage import record_stage, run_config

REPO = Path(__file__).resolve().parents[1]


def record_two_stages(root: Path, run_key: str) -> dict[str, Path]:
    """A configuration's curate stage and a pretrain stage that read it, with curves, a summary and artifacts."""
    run_cfg = run_config(root, run_key)
    curate = record_stage(root, "curate", "data0", run_cfg, {"data": {"source": "stdlib"}}, summary={"documents": 9})
    pretrain = record_stage(
        root,
        "pretrain",
        f"pre_{run_key}",
        run_cfg,
        {"train": {"lr": 0.001}},
        {"curate": curate},
        curves={"train_loss": [5.0, 4.0, 3.0]},
        summary={"parameters": 1000},
    )
    return {"curate": curate, "pretrain": pretrain}


def run_history_merge(root: Path, run_key: str, last_stage: Path, out: Path) -> subprocess.CompletedProcess:
    """The `history` rule's command."""
    card_config = root / f"{run_key}.yaml"
    card_config.write_text(yaml.safe_dump({"run": run_config(root, run_key)}))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "lmforge.history", "merge", str(card_config), str(last_stage), str(out)]
    return subprocess.run(command, capture_output=True, text=True, env=env)


def test_a_damaged_store_stops_the_merge_naming_the_file_and_the_records_rebuild_it(tmp_path):
    stages = record_two_stages(tmp_path, "cfg_a")
    out = tmp_path / "history" / "cfg_a.json"
    # In subprocesses, as the rule runs: this process keeps no connection to the store that is moved away below.
    assert run_history_merge(tmp_path, "cfg_a", stages["pretrain"], out).returncode == 0
    store = tmp_path / "mlflow.db"
    os.truncate(store, store.stat().st_size // 2)  # a disk that filled up, a copy that was cut short
    records = {name: stage.sha256_tree(path / tracking.RECORD_DIR) for name, path in stages.items()}

    out.unlink()  # what Snakemake does before `--forcerun history` reruns the job
    failed = run_history_merge(tmp_path, "cfg_a", stages["pretrain"], out)
    assert failed.returncode == 1
    message = failed.stderr.strip().splitlines()[-1]
    assert f"the MLflow store {store} is damaged" in message and "--forcerun history" in message, failed.stderr
    assert not out.exists() and not list(tmp_path.glob("history/*"))  # nor a half-written one
    assert {name: stage.sha256_tree(path / tracking.RECORD_DIR) for name, path in stages.items()} == records

    store.rename(tmp_path / "mlflow.db.damaged")  # what the message says to do
    merged = run_history_merge(tmp_path, "cfg_a", stages["pretrain"], out)
    assert merged.returncode == 0, merged.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    assert set(runs) == {"curate", "pretrain"}
    assert [p.step for p in client.get_metric_history(runs["pretrain"], "train_loss")] == [1, 2, 3]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Curated data and a tokenizer for a tiny pretraining, made by the real stages."""
    root = tmp_path_factory.mktemp("resumed")
    return root, curated_and_tokenized(root)


def step_points(metrics_file: Path, key: str) -> list[dict]:
    return [p for p in map(json.loads, metrics_file.read_text().splitlines()) if p["key"] == key]


@pytest.mark.parametrize("stop", [signal.SIGUSR1, signal.SIGKILL], ids=["slurm_warning", "killed"])
def test_a_stage_stopped_and_rerun_keeps_its_first_steps_and_counts_both_jobs(prepared, stop, monkeypatch):
    """SIGUSR1: what Slurm sends before the walltime (the training checkpoints and exits). SIGKILL: out of memory,
    a node lost; the job dies after logging steps past its checkpoint, which the rerun logs again."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root, base = prepared
    overrides = ["train.steps=60", "train.checkpoint_every=30", "train.eval_every=30", "train.micro_batch_size=16"]
    pretrain = plan(root / "results", [*base, *overrides])["pretrain"]
    shutil.rmtree(pretrain.dir, ignore_errors=True)  # the other signal's run, and its checkpoint
    shutil.rmtree(pretrain.config["run"]["checkpoint_dir"], ignore_errors=True)
    partial = Path(pretrain.dir + ".partial")
    metrics_file = partial / tracking.RECORD_DIR / "metrics.jsonl"

    with open(root / f"first_attempt_{stop.name}.log", "w") as log:
        started = time.time()
        job = subprocess.Popen(stage_command(pretrain), stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 120
        # Step 40: after the checkpoint at step 30, before the next one at step 60.
        while not (metrics_file.exists() and 40 in {p["step"] for p in step_points(metrics_file, "train_loss")}):
            assert job.poll() is None and time.time() < deadline, "the first attempt ended before step 40"
            time.sleep(0.005)
        job.send_signal(stop)
        job.wait(timeout=120)
        lifetime = time.time() - started
    assert job.returncode != 0, "the first attempt finished before it was stopped"
    first_run_id = json.loads((partial / tracking.RECORD_DIR / "run.json").read_text())["run_id"]
    (partial / "model").mkdir(exist_ok=True)
    (partial / "model" / "stale.bin").write_bytes(b"from the first attempt")

    rerun = run_stage(pretrain)
    assert "resumed from" in rerun.stderr
    assert not Path(pretrain.dir, "model", "stale.bin").exists()  # a rerun starts from clean outputs
    manifest = json.loads(Path(pretrain.dir, "manifest.json").read_text())
    first, last = manifest["attempts"]
    assert (first["status"], last["status"]) == ("KILLED" if stop == signal.SIGKILL else "FAILED", "FINISHED")
    if stop == signal.SIGUSR1:
        assert "SIGUSR1 received: checkpoint saved" in first["error"]
    assert 0 < first["duration_s"] <= lifetime and first["ended"] <= last["started"]
    assert manifest["duration_s"] == pytest.approx(first["duration_s"] + last["duration_s"], abs=0.01)
    assert manifest["started"] == first["started"] and manifest["tracking_run_id"] == first_run_id

    record_points = step_points(Path(pretrain.dir, tracking.RECORD_DIR, "metrics.jsonl"), "train_loss")
    if stop == signal.SIGKILL:  # the rerun resumed from step 30 and logged step 40 again
        assert [p["step"] for p in record_points].count(40) == 2
    merged = history.merge({"pretrain": Path(pretrain.dir)}, pretrain.config["run"])
    client = MlflowClient(tracking_uri=merged["tracking_uri"])
    curve = sorted(client.get_metric_history(merged["runs"]["pretrain"], "train_loss"), key=lambda p: p.step)
    assert [p.step for p in curve] == [10, 20, 30, 40, 50, 60]
    last_logged = {p["step"]: p["value"] for p in record_points}  # the rerun's value where both logged a step
    assert [p.value for p in curve] == pytest.approx([last_logged[p.step] for p in curve])
    validation = client.get_metric_history(merged["runs"]["pretrain"], "validation_loss")
    assert sorted(p.step for p in validation) == [30, 60]  # step 30's only from the first attempt


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def stop_server(server: subprocess.Popen) -> None:
    """The server and the workers it started: its own session, whose id is the server's pid."""
    with contextlib.suppress(ProcessLookupError):  # all gone already
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    server.wait()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server with its own SQLite store, serving artifacts from a directory."""
    root = tmp_path_factory.mktemp("mlflow_server")
    url, artifacts = f"http://127.0.0.1:{free_port()}", root / "artifacts"
    command = [
        *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1]),
        *("--workers", "1", "--backend-store-uri", f"sqlite:///{root}/server.db"),
        *("--artifacts-destination", str(artifacts)),
    ]
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    deadline = time.time() + 90
    while not healthy(url):
        if server.poll() is not None or time.time() > deadline:
            reason = f"exited with {server.returncode}" if server.poll() is not None else "not healthy after 90 s"
            stop_server(server)
            pytest.skip(f"mlflow server {reason}: {log_path.read_text()[-1500:]}")
        time.sleep(0.2)
    yield url, artifacts
    stop_server(server)


def test_merging_into_an_mlflow_server_puts_runs_metrics_and_artifacts_on_it(mlflow_server, tmp_path, monkeypatch):
    url, artifacts = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    stages = record_two_stages(tmp_path, "cfg_s")
    merged = history.merge(stages, run_config(tmp_path, "cfg_s"))
    assert merged["tracking_uri"] == url and not (tmp_path / "mlflow.db").exists()

    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("lmforge/demo")
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    parent = runs[merged["parent_run_id"]]
    assert parent.data.tags["lmforge.role"] == "configuration" and parent.info.status == "FINISHED"
    assert parent.data.params["train.lr"] == "0.001" and parent.data.params["data.source"] == "stdlib"
    children = {r.data.tags["lmforge.stage"]: r for r in runs.values() if r.info.run_id != parent.info.run_id}
    assert {name: r.info.run_id for name, r in children.items()} == merged["runs"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())
    pretrain = children["pretrain"]
    assert pretrain.data.tags["lmforge.upstream_run.curate"] == children["curate"].info.run_id
    curve = sorted(client.get_metric_history(pretrain.info.run_id, "train_loss"), key=lambda p: p.step)
    assert [(p.step, p.value) for p in curve] == [(1, 5.0), (2, 4.0), (3, 3.0)]
    assert pretrain.data.metrics["parameters"] == 1000 and children["curate"].data.metrics["documents"] == 9

    assert {a.path for a in client.list_artifacts(pretrain.info.run_id)} == {"config.yaml", "manifest.json"}
    downloaded = client.download_artifacts(pretrain.info.run_id, "manifest.json", str(tmp_path))
    assert Path(downloaded).read_text() == (stages["pretrain"] / "manifest.json").read_text()
    stored = {p.name for p in artifacts.rglob("*") if p.is_file()}  # uploaded through the server, kept where it says
    assert {"config.yaml", "manifest.json"} <= stored

    again = history.merge(stages, run_config(tmp_path, "cfg_s"))
    assert again == merged and len(client.search_runs([experiment.experiment_id])) == len(runs)
