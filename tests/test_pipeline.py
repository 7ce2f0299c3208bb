"""The whole DAG, run by Snakemake as a user runs it, on a small slice of the embedded default corpus."""

import json
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lmforge.workflow import snakemake_command
from tests.stages import TINY, job_counts
from tests.test_hostile_config import quoted

# Free text that would run commands if it reached a shell: the whole DAG must take it as text.
MARKER = Path(tempfile.gettempdir()) / "lmforge-pipeline-PWNED"
MODEL_NAME = f"tiny; touch {MARKER} $(touch {MARKER}) `touch {MARKER}` #1 'q'"
OVERRIDES = [
    "data.max_documents=120",
    "finetune=lora",
    quoted("data.name", f"stdlib slice\n$(touch {MARKER})"),
    quoted("card.model_name", MODEL_NAME),
    *TINY,
]


def snakemake(workdir: Path, *args: str, overrides=()) -> subprocess.CompletedProcess:
    command = snakemake_command(workdir / "results", [*OVERRIDES, *overrides], "--cores", "2", *args)
    return subprocess.run(command, capture_output=True, text=True)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    MARKER.unlink(missing_ok=True)
    run = snakemake(workdir)
    assert run.returncode == 0, run.stderr[-5000:]
    return workdir


@pytest.mark.e2e
def test_every_stage_writes_its_outputs_and_manifest(pipeline):
    results = pipeline / "results"
    for stage in ("curate", "tasks", "tokenizer", "baseline", "pretrain", "finetune", "quantize", "evaluate", "card"):
        [stage_dir] = [p for p in (results / stage).iterdir() if p.is_dir()]
        manifest = json.loads((stage_dir / "manifest.json").read_text())
        assert (
            manifest["stage"] == stage and manifest["code"]["lmforge"] and manifest["environment"]["packages"]["torch"]
        )
        assert manifest["environment"]["device"]
        assert all(len(i["sha256"]) == 64 for i in manifest["inputs"].values())
    [curated] = (results / "curate").iterdir()
    assert (curated / "datasheet.md").exists() and (curated / "data" / "test.parquet").exists()
    [card] = (results / "card").iterdir()
    readme = (card / "model" / "README.md").read_text()
    assert readme.startswith("---") and "model-index" in readme and "exact_match" in readme
    [pretrained] = [p for p in (results / "pretrain").iterdir() if p.is_dir()]
    trained = json.loads((pretrained / "manifest.json").read_text())["metrics"]
    compute = 6 * trained["non_embedding_parameters"] * trained["train_tokens_seen"]  # C = 6·N·D
    assert "## Compute" in readme and f"{compute:.2e} FLOPs" in readme
    assert "## Limitations" in (card / "datasheet.md").read_text()
    [evaluation] = (results / "evaluate").iterdir()
    report = json.loads((evaluation / "results.json").read_text())
    assert set(report["models"]) == {"baseline", "pretrain", "finetune", "quantize"}
    assert report["sampling"] == {"temperature": 0.8, "top_k": 50, "top_p": 0.95} and report["seed"] == 1234


@pytest.mark.e2e
def test_shell_syntax_in_free_text_settings_is_only_text(pipeline):
    assert not MARKER.exists()
    [card] = (pipeline / "results" / "card").iterdir()
    assert f"# {MODEL_NAME}" in (card / "model" / "README.md").read_text()


@pytest.mark.e2e
def test_a_dry_run_changes_no_stage_config(pipeline):
    """Stage configs are written when a run starts (onstart: after Snakemake took its lock, never on -n)."""
    configs = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in (pipeline / "results").rglob("*.yaml")}
    assert len(configs) > 8
    dry = snakemake(pipeline, "-n", "--forceall", overrides=["run.experiment=other"])
    assert dry.returncode == 0, dry.stderr[-3000:]
    after = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in (pipeline / "results").rglob("*.yaml")}
    assert after == configs


@pytest.mark.e2e
def test_models_load_with_plain_transformers(pipeline):
    dirs = [
        str(d / "model")
        for stage in ("pretrain", "finetune", "quantize", "card")
        for d in (pipeline / "results" / stage).iterdir()
    ]
    code = (
        "import sys\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "for d in sys.argv[1:]:\n"
        "    tok = AutoTokenizer.from_pretrained(d); model = AutoModelForCausalLM.from_pretrained(d)\n"
        "    out = model.generate(**tok('def ', return_tensors='pt'), max_new_tokens=3, do_sample=False)\n"
        "    assert out.shape[1] > 1\n"
        "assert 'lmforge' not in sys.modules\nprint('loaded', len(sys.argv) - 1)\n"
    )
    run = subprocess.run([sys.executable, "-c", code, *dirs], capture_output=True, text=True, cwd="/")
    assert run.returncode == 0 and "loaded 4" in run.stdout, run.stderr[-3000:]


@pytest.mark.e2e
def test_rerun_does_nothing_and_lr_change_reruns_only_training_and_after(pipeline):
    again = snakemake(pipeline, "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    changed = snakemake(pipeline, "-n", overrides=["train.lr=0.01"])
    assert changed.returncode == 0, changed.stderr
    assert set(job_counts(changed.stdout + changed.stderr)) == {
        "pretrain",
        "finetune",
        "quantize",
        "evaluate",
        "card",
        "history",
        "compare",
        "all",
    }


@pytest.mark.e2e
def test_mlflow_has_a_parent_run_and_one_child_per_stage(pipeline):
    db = sqlite3.connect(pipeline / "results" / "mlflow.db")
    # A stage the watcher merged while it ran was a RUNNING copy, deleted when its finished record was merged:
    # the active runs are what the UI shows.
    active = "select run_uuid from runs where lifecycle_stage = 'active'"
    runs = dict(db.execute(f"select run_uuid, name from runs where status = 'FINISHED' and run_uuid in ({active})"))
    parents = [r for r, name in runs.items() if name.startswith("run-")]
    assert len(parents) == 1
    children = dict(
        db.execute(f"select run_uuid, value from tags where key = 'mlflow.parentRunId' and run_uuid in ({active})")
    )
    stages = sorted(runs[r] for r, parent in children.items() if parent == parents[0])
    names = ["curate_shard", "curate", "tasks", "tokenizer", "baseline", "pretrain", "finetune", "quantize", "evaluate"]
    assert stages == sorted([*names, "card"])
    pretrain = next(r for r in children if runs[r] == "pretrain")
    params = dict(db.execute("select key, value from params where run_uuid = ?", (pretrain,)).fetchall())
    assert params["train.lr"] == "0.003"
    tags = dict(db.execute("select key, value from tags where run_uuid = ?", (pretrain,)).fetchall())
    [tokenizer] = (pipeline / "results" / "tokenizer").iterdir()
    assert tags["lmforge.upstream.tokenizer"] == tokenizer.name  # which tokenizer (and so which data) it used
    summary = dict(db.execute("select key, value from latest_metrics where run_uuid = ?", (parents[0],)).fetchall())
    assert {"pretrain_test_bpb", "finetune_test_bpb", "exact_match", "pretrain_validation_loss"} <= set(summary)
    steps = db.execute(
        "select count(distinct step) from metrics where run_uuid = ? and key = 'train_loss'", (pretrain,)
    )
    assert steps.fetchone()[0] >= 1
    artifacts = list((pipeline / "results" / "mlartifacts").rglob("manifest.json"))
    assert len(artifacts) == 10
    plots = {p.name for p in (pipeline / "results" / "report" / "lmforge").iterdir()}
    assert {"loss_curves.svg", "metrics_vs_params.svg", "configurations.rst"} <= plots


@pytest.mark.e2e
def test_evaluation_shows_learning_forgetting_and_harness_scores(pipeline):
    results = pipeline / "results"
    [evaluation] = (results / "evaluate").iterdir()
    report = json.loads((evaluation / "results.json").read_text())
    models = report["models"]
    # What fine-tuning taught, where exact match cannot show it: the answer costs fewer bits than in context.
    tuned = models["finetune"]["tasks"]["docstring_to_name"]["chat"]["answer_bits_per_byte"]
    before = models["pretrain"]["tasks"]["docstring_to_name"]
    assert tuned < before["zero_shot"]["answer_bits_per_byte"] and tuned < before["few_shot"]["answer_bits_per_byte"]
    assert report["num_shots"] == 1 and len(report["shots"]["docstring_to_name"]) == 1

    forgetting = report["forgetting"]
    rows = {row["model"]: row for row in forgetting["rows"]}
    assert list(rows) == ["baseline", "pretrain", "finetune", "quantize"]
    assert [row["fine_tuned"] for row in rows.values()] == [False, False, True, True]
    assert [rows[m]["docstring_to_name.prompting"] for m in rows] == ["first_word", "few_shot", "chat", "chat"]
    choice = "harness.lmforge_docstring_to_name_choice.acc"
    generate = "harness.lmforge_docstring_to_name_generate.exact_match_first_identifier"
    columns = ["test_bits_per_byte", "docstring_to_name.answer_bits_per_byte", "docstring_to_name.exact_match_greedy"]
    assert set(columns) | {choice, generate} <= set(forgetting["columns"])
    for name, row in rows.items():
        assert row["test_bits_per_byte"] == models[name]["test_bits_per_byte"]
        if name != "baseline":
            assert row[choice] == models[name]["harness"]["lmforge_docstring_to_name_choice"]["acc"]
    assert rows["baseline"]["docstring_to_name.answer_bits_per_byte"] is None and rows["baseline"][choice] is None
    harness_scores = models["finetune"]["harness"]["lmforge_docstring_to_name_choice"]
    [curated] = [p for p in (results / "curate").iterdir() if p.is_dir()]
    test_pairs = json.loads((curated / "manifest.json").read_text())["metrics"]["test_task_pairs"]
    assert harness_scores["examples"] == test_pairs > 0  # every curated test pair (no eval.harness.limit)
    assert 0 <= harness_scores["acc"] <= 1 and harness_scores["acc_stderr"] > 0
    assert "| model | fine_tuned | test_bits_per_byte |" in (evaluation / "forgetting.md").read_text()

    db = sqlite3.connect(results / "mlflow.db")
    [run] = [r for (r,) in db.execute("select run_uuid from runs where name = 'evaluate' and status = 'FINISHED'")]
    params = dict(db.execute("select key, value from params where run_uuid = ?", (run,)).fetchall())
    assert (params["seed"], params["eval.num_shots"], params["eval.sampling.temperature"]) == ("1234", "1", "0.8")
    logged = dict(db.execute("select key, value from latest_metrics where run_uuid = ?", (run,)).fetchall())
    assert logged["finetune.harness.lmforge_docstring_to_name_choice.acc_stderr"] == harness_scores["acc_stderr"]
    assert logged["finetune.tasks.docstring_to_name.chat.answer_bits_per_byte"] == pytest.approx(tuned)
    assert "forgetting.test_bits_per_byte" in logged

    [card] = (results / "card").iterdir()
    readme = (card / "model" / "README.md").read_text()
    assert "answer_bits_per_byte" in readme and "acc_stderr" in readme  # the model-index
    assert "| fine-tuned | docstring_to_name | chat template |" in readme and "1-shot" in readme


@pytest.mark.e2e
def test_snakemake_report_holds_the_comparison_plots_and_their_configurations(pipeline):
    report = pipeline / "report.html"
    run = snakemake(pipeline, "--report", str(report))
    assert run.returncode == 0, run.stderr[-3000:]
    html = report.read_text()
    assert "loss_curves.svg" in html and "metrics_vs_params.svg" in html and "Shared by all" in html


def test_wandb_sync_is_planned_only_when_wandb_is_on(tmp_path):
    assert "wandb_sync" not in job_counts(snakemake(tmp_path, "-n").stdout)
    assert "wandb_sync" in job_counts(snakemake(tmp_path, "-n", overrides=["run.wandb=true"]).stdout)
