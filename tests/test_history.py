"""Run history: stage records merged into a real MLflow SQLite store, `lmforge runs`, the comparison report."""

import contextlib
import csv
import io
import json
import os
import re
import struct
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from xml.etree import ElementTree

import pytest
from google.protobuf.message import DecodeError
from mlflow.tracking import MlflowClient

from lmforge import history, tracking
from lmforge import sweep as lmforge_sweep
from tests.tracked_stage import WRITER_STEPS, record_stage, run_config, writer_loss

REPO = Path(__file__).resolve().parents[1]
LEARNING_RATES = {"cfg_a": 0.001, "cfg_b": 0.003, "cfg_c": 0.01}
WRITERS = 16
MERGERS = 4
TOKENS_PER_STEP = 256
EXACT_MATCH = history.SUMMARY_METRICS["exact_match"][1]  # the evaluate stage's metric


def record_configuration(root: Path, run_key: str, lr: float, shared: dict[str, Path]) -> dict[str, Path]:
    """A configuration of a learning-rate sweep that reuses the `shared` curate and tokenizer stages."""
    run_cfg = run_config(root, run_key)
    pretrain = record_stage(
        root,
        "pretrain",
        f"pre_{run_key}",
        run_cfg,
        {"train": {"lr": lr, "steps": 3}},
        {"tokenizer": shared["tokenizer"]},
        curves={"train_loss": [5.0, 4.0 - lr * 100, 3.0 - lr * 100], "validation_loss": [5.5, 4.5, 3.5 - lr * 50]},
        summary={"parameters": 1000, "train_tokens_seen": 3 * TOKENS_PER_STEP},
    )
    evaluate = record_stage(
        root,
        "evaluate",
        f"eval_{run_key}",
        run_cfg,
        {"eval": {"few_shot": 1}},
        {"curate": shared["curate"], "pretrain": pretrain},
        summary={"pretrain.test_bits_per_byte": 2.0 - lr * 10, EXACT_MATCH: lr * 10},
    )
    return {**shared, "pretrain": pretrain, "evaluate": evaluate}


def record_shared_stages(root: Path, run_key: str) -> dict[str, Path]:
    run_cfg = run_config(root, run_key)
    curate = record_stage(
        root, "curate", "data0", run_cfg, {"data": {"source": "stdlib"}}, summary={"train_documents": 9}
    )
    tokenizer = record_stage(root, "tokenizer", "tok0", run_cfg, {"tokenizer": {"vocab_size": 512}}, {"curate": curate})
    return {"curate": curate, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Three configurations merged into one store, with the history files the `history` rule writes."""
    root = tmp_path_factory.mktemp("sweep")
    shared = record_shared_stages(root, "cfg_a")
    for run_key, lr in LEARNING_RATES.items():
        merged = history.merge(record_configuration(root, run_key, lr, shared), run_config(root, run_key))
        (root / "history").mkdir(exist_ok=True)
        (root / "history" / f"{run_key}.json").write_text(json.dumps(merged))
    return root


def client_of(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")


def runs_of(client: MlflowClient, experiment: str) -> list:
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)


def test_each_configuration_is_a_parent_with_every_stage_and_its_lineage(sweep):
    client = client_of(sweep)
    all_runs = runs_of(client, "lmforge/demo")
    parents = {
        r.data.tags["lmforge.run_key"]: r for r in all_runs if r.data.tags.get("lmforge.role") == "configuration"
    }
    assert set(parents) == set(LEARNING_RATES)
    for run_key, parent in parents.items():
        children = {
            r.data.tags["lmforge.stage"]: r
            for r in all_runs
            if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        }
        assert set(children) == {"curate", "tokenizer", "pretrain", "evaluate"}  # shared stages under every parent
        assert all(c.info.status == "FINISHED" for c in children.values()) and parent.info.status == "FINISHED"
        evaluate = children["evaluate"].data.tags
        assert (
            evaluate["lmforge.upstream.pretrain"] == f"pre_{run_key}" and evaluate["lmforge.upstream.curate"] == "data0"
        )
        assert evaluate["lmforge.upstream_run.pretrain"] == children["pretrain"].info.run_id
        assert parent.data.params["train.lr"] == str(LEARNING_RATES[run_key])
        assert parent.data.params["tokenizer.vocab_size"] == "512"  # the parent carries the whole configuration
        assert parent.data.metrics["pretrain_test_bpb"] == pytest.approx(2.0 - LEARNING_RATES[run_key] * 10)
        pretrain = children["pretrain"]
        history_points = client.get_metric_history(pretrain.info.run_id, "train_loss")
        assert [p.step for p in sorted(history_points, key=lambda p: p.step)] == [1, 2, 3]
        assert pretrain.data.metrics["parameters"] == 1000
        artifacts = {a.path for a in client.list_artifacts(pretrain.info.run_id)}
        assert artifacts == {"config.yaml", "manifest.json"}


def test_merging_again_adds_nothing(sweep):
    client = client_of(sweep)
    before = sorted(r.info.run_id for r in runs_of(client, "lmforge/demo"))
    stages = history.configuration_stages(sweep / "evaluate" / "eval_cfg_b")
    assert list(stages) == ["curate", "tokenizer", "pretrain", "evaluate"]
    merged = history.merge(stages, run_config(sweep, "cfg_b"))
    assert sorted(r.info.run_id for r in runs_of(client, "lmforge/demo")) == before
    assert set(merged["runs"].values()) <= set(before)
    points = client.get_metric_history(merged["runs"]["pretrain"], "train_loss")
    assert len(points) == 3
    assert len(client.get_metric_history(merged["parent_run_id"], "exact_match")) == 1


def test_a_copy_that_died_halfway_or_a_rerun_stage_is_replaced(tmp_path):
    stages = record_configuration(tmp_path, "cfg_x", 0.001, record_shared_stages(tmp_path, "cfg_x"))
    run_cfg = run_config(tmp_path, "cfg_x")
    merged = history.merge(stages, run_cfg)
    client = client_of(tmp_path)
    client.delete_run(merged["runs"]["pretrain"])
    half = client.create_run(  # what a merge that died after creating the run leaves: RUNNING, no metrics
        merged["experiment_id"],
        tags={"mlflow.parentRunId": merged["parent_run_id"], "lmforge.run_key": "cfg_x", "lmforge.stage": "pretrain"},
    )
    again = history.merge(stages, run_cfg)
    assert client.get_run(half.info.run_id).info.lifecycle_stage == "deleted"
    assert len(client.get_metric_history(again["runs"]["pretrain"], "validation_loss")) == 3

    record_stage(
        tmp_path, "tokenizer", "tok0", run_cfg, {"tokenizer": {"vocab_size": 512}}, {"curate": stages["curate"]}
    )
    rerun = history.merge(stages, run_cfg)
    assert rerun["runs"]["tokenizer"] != again["runs"]["tokenizer"]
    assert client.get_run(again["runs"]["tokenizer"]).info.lifecycle_stage == "deleted"
    assert {k: v for k, v in rerun["runs"].items() if k != "tokenizer"} == {
        k: v for k, v in again["runs"].items() if k != "tokenizer"
    }


def start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.tracked_stage", *args], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )


def test_16_concurrent_jobs_lose_no_run_and_no_metric(tmp_path):
    """16 jobs record their stage at once, then 4 `history` merges (local jobs, run in parallel) fill one SQLite
    store at once; every run and every step of every metric must arrive."""
    started = time.time()
    for phase in (
        [start("record", str(tmp_path), str(i)) for i in range(WRITERS)],
        [start("merge", str(tmp_path), *map(str, range(first, WRITERS, MERGERS))) for first in range(MERGERS)],
    ):
        for job in phase:
            assert job.wait(timeout=300) == 0, job.stderr.read()[-3000:]
    print(f"{WRITERS} writers, {MERGERS} merges: {time.time() - started:.1f} s")
    client = client_of(tmp_path)
    all_runs = runs_of(client, "lmforge/writers")
    parents = {r.info.run_id: r.data.tags["lmforge.run_key"] for r in all_runs if "lmforge.role" in r.data.tags}
    children = [r for r in all_runs if "lmforge.role" not in r.data.tags]
    assert sorted(parents.values()) == [f"config{i:02d}" for i in range(WRITERS)]
    assert len(children) == WRITERS
    for child in children:
        index = int(parents[child.data.tags["mlflow.parentRunId"]].removeprefix("config"))
        assert child.data.params["train.lr"] == str(index / 1000)
        points = sorted(client.get_metric_history(child.info.run_id, "train_loss"), key=lambda p: p.step)
        assert [(p.step, p.value) for p in points] == [
            (step, writer_loss(index, step)) for step in range(1, WRITER_STEPS + 1)
        ]


def lmforge_runs(root: Path, *args: str, sweep_name: str | None = "demo") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("MLFLOW_TRACKING_URI", None)
    named = [f"run.sweep={sweep_name}"] if sweep_name else []
    command = [sys.executable, "-m", "lmforge.cli", "runs", f"run.results_dir={root}", *named, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env)


def test_lmforge_runs_prints_the_swept_params_and_metrics_sorted(sweep):
    text = lmforge_runs(sweep, "--sort", "exact_match", "--descending")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == "lmforge/demo: 3 configurations"
    assert lines[1].split() == [
        "run_key",
        "status",
        "train.lr",
        "pretrain_train_loss",
        "pretrain_validation_loss",
        "pretrain_test_bpb",
        "exact_match",
    ]
    assert [line.split()[:2] for line in lines[3:]] == [
        ["cfg_c", "FINISHED"],
        ["cfg_b", "FINISHED"],
        ["cfg_a", "FINISHED"],
    ]

    table = lmforge_runs(sweep, "--csv", "--sort", "train.lr")
    rows = list(csv.DictReader(io.StringIO(table.stdout)))
    assert [row["run_key"] for row in rows] == ["cfg_a", "cfg_b", "cfg_c"]
    assert float(rows[2]["pretrain_validation_loss"]) == pytest.approx(3.5 - 0.01 * 50)
    assert float(rows[0]["exact_match"]) == pytest.approx(0.01)

    wrong = lmforge_runs(sweep, "--sort", "loss")
    assert wrong.returncode == 2 and "Columns: run_key, status, train.lr" in wrong.stderr


def test_lmforge_runs_takes_the_sweep_overrides_the_pipeline_ran_with(sweep):
    named = lmforge_runs(sweep, "train.lr=0.001,0.003,0.01")  # with run.sweep=demo, as the fixture's sweep
    assert named.returncode == 0 and named.stdout.startswith("lmforge/demo: 3 configurations"), named.stderr
    unnamed = lmforge_runs(sweep, "train.lr=0.001,0.003", sweep_name=None)
    sweep_id, _ = lmforge_sweep.expand(["train.lr=0.001,0.003"])
    assert unnamed.returncode == 1 and f"no experiment 'lmforge/{sweep_id}'" in unnamed.stderr


SVG = "{http://www.w3.org/2000/svg}"


def plotted_lines(svg: Path) -> list[list[tuple[str, int]]]:
    """Per panel, each data line's style and number of points (markers), from matplotlib's SVG.

    A data line is a `line2d_N` group directly inside an `axes_N` group; the ticks, grid lines and legend
    handles are line2d groups too, but nested deeper (an empty panel already has dozens of paths)."""
    panels = []
    for group in ElementTree.parse(svg).getroot().iter(f"{SVG}g"):
        if group.get("id", "").startswith("axes_"):
            lines = [line for line in group if line.get("id", "").startswith("line2d_")]
            panels.append([(line.find(f"{SVG}path").get("style"), len(line.findall(f".//{SVG}use"))) for line in lines])
    return panels


def test_report_plots_the_configurations(sweep, tmp_path):
    out = tmp_path / "report"
    histories = sorted(str(p) for p in (sweep / "history").iterdir())
    run = subprocess.run(
        [sys.executable, "-m", "lmforge.report", str(out), *histories],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "3 configurations of lmforge/demo, swept: train.lr" in run.stdout

    # Loss curves: per configuration a solid training and a dashed validation line of 3 steps, in its own colour,
    # on the pretraining panels (against steps, against tokens); the fine-tuning panel is empty (the sweep fixture
    # records no fine-tuning).
    curves = out / "loss_curves.svg"
    per_step, per_token, finetuning = plotted_lines(curves)
    assert len(per_step) == len(per_token) == 2 * len(LEARNING_RATES) and finetuning == []
    for pretraining in (per_step, per_token):
        assert all(points == 3 for _, points in pretraining)
        colours = [re.search(r"stroke: (#\w+)", style).group(1) for style, _ in pretraining]
        assert len(set(colours)) == len(LEARNING_RATES) and colours[::2] == colours[1::2]
        assert ["stroke-dasharray" in style for style, _ in pretraining] == [False, True] * len(LEARNING_RATES)
    text = curves.read_text()
    for lr in LEARNING_RATES.values():  # matplotlib writes each text as a comment beside its glyphs
        assert f"<!-- train.lr={lr} -->" in text  # what differs, not the configuration's hash
    assert "<!-- loss (nats per token) -->" in text and "<!-- tokens trained on -->" in text
    assert (out / "loss_curves.png").read_bytes().startswith(b"\x89PNG")

    # Metrics against the swept learning rate: one line through the 3 configurations per metric the sweep has.
    metrics = out / "metrics_vs_params.svg"
    titles = ["pretrain_train_loss", "pretrain_validation_loss", "pretrain_test_bpb", "exact_match"]
    assert [[points for _, points in panel] for panel in plotted_lines(metrics)] == [[3]] * len(titles)
    assert all(f"<!-- {title} -->" in metrics.read_text() for title in titles)
    assert "<!-- bits per byte -->" in metrics.read_text() and "<!-- nats per token -->" in metrics.read_text()
    client = client_of(sweep)  # attached to every configuration's run
    for merged in (json.loads(Path(history_file).read_text()) for history_file in histories):
        attached = {a.path for a in client.list_artifacts(merged["parent_run_id"], "comparison")}
        assert {"comparison/loss_curves.png", "comparison/metrics_vs_params.svg", "comparison/runs.csv"} <= attached

    caption = (out / "configurations.rst").read_text()
    assert "cfg_a" in caption and "0.003" in caption and "tokenizer.vocab_size: 512" in caption
    assert (out / "runs.csv").read_text().splitlines()[0].startswith("run_key,status,train.lr,")


def test_metrics_against_one_of_two_swept_params_draw_one_line_per_value_of_the_other(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from lmforge import report, runs

    grid = [(lr, width) for lr in (0.001, 0.01) for width in (32, 64)]
    for index, (lr, width) in enumerate(grid):
        run_key = f"cfg{index}"
        run_cfg = run_config(tmp_path, run_key, sweep="grid")
        sections = {"train": {"lr": lr}, "model": {"hidden_size": width}}
        pretrain = record_stage(tmp_path, "pretrain", f"pre{index}", run_cfg, sections, curves={"train_loss": [3, 2]})
        evaluate = record_stage(
            tmp_path,
            "evaluate",
            f"eval{index}",
            run_cfg,
            {},
            {"pretrain": pretrain},
            summary={"pretrain.test_bits_per_byte": 2.0 - lr * 10 - width / 100},
        )
        history.merge({"pretrain": pretrain, "evaluate": evaluate}, run_cfg)
    configurations = runs.load_configurations(f"sqlite:///{tmp_path}/mlflow.db", "lmforge/grid")
    swept = runs.swept_params(configurations)
    assert swept == ["model.hidden_size", "train.lr"]
    path = tmp_path / "metrics_vs_params.svg"
    report.plot_metrics_vs_params(configurations, swept, path)
    # Panels: (hidden_size, train loss), (hidden_size, bpb), (lr, train loss), (lr, bpb); each a line of 2 points
    # per value of the other param, never one line through all 4 configurations.
    assert [[points for _, points in panel] for panel in plotted_lines(path)] == [[2, 2]] * 4
    text = path.read_text()
    assert all(f"<!-- {legend} -->" in text for legend in ("train.lr=0.001", "train.lr=0.01", "model.hidden_size=64"))


def wandb_records(path: Path) -> list:
    """The protobuf records of a `.wandb` file, what `wandb sync` uploads: after a 7-byte file header, LevelDB-log
    blocks of 32 KiB holding chunks, each with a 7-byte header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00", "not a version-0 .wandb file"
    records, record, position = [], b"", 7
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a chunk header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        record += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            records.append(Record.FromString(record))
            record = b""
    return records


def test_wandb_logs_offline_where_wandb_sync_finds_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_cfg = {**run_config(tmp_path, "cfg_w"), "wandb": True}
    stage_dir = record_stage(
        tmp_path, "pretrain", "pre_w", run_cfg, {"train": {"lr": 0.1}}, curves={"train_loss": [2, 1]}
    )
    [offline] = (stage_dir / tracking.RECORD_DIR / "wandb").glob("offline-run-*")
    [synced] = offline.glob("*.wandb")  # what `wandb sync` (the wandb_sync rule) uploads
    # wandb's service process may still be writing the file when finish() returns (seen once under CI's load):
    # the rule syncs it minutes later; the test waits for its last record, the exit.
    deadline = time.monotonic() + 60
    while True:
        records = defaultdict(list)
        with contextlib.suppress(DecodeError):  # a record half written
            for record in wandb_records(synced):
                records[record.WhichOneof("record_type")].append(record)
        if records["exit"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    [run] = [record.run for record in records["run"]]
    assert (run.project, run.run_group, run.display_name, list(run.tags)) == ("lmforge", "cfg_w", "pretrain", ["demo"])
    assert {item.key: json.loads(item.value_json) for item in run.config.update}["train.lr"] == 0.1
    logged = {}  # step -> the train_loss logged at it
    for record in records["history"]:
        items = {".".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
        logged[record.history.step.num] = items["train_loss"]
    assert logged == {1: 2, 2: 1}
    assert [record.exit.exit_code for record in records["exit"]] == [0]
