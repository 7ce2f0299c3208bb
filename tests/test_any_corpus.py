"""A corpus without Python: with finetune=none the whole DAG runs on it; without, curation stops it first."""

import json
import subprocess
from pathlib import Path

import pytest

from lmforge import config
from lmforge.workflow import snakemake_command
from tests.stages import TINY, job_counts, prose_corpus

# The card's default model name is the built-in task's (lmforge-tiny-docstring2name): a prose model gets its own.
PROSE = ["data.name=village-prose", "data.license=CC-BY-4.0", "card.model_name=village-lm"]


def snakemake(workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    corpus = [f"data.source={prose_corpus(workdir / 'corpus')}", *PROSE, *TINY]
    command = snakemake_command(workdir / "results", [*corpus, *overrides], "--cores", "2")
    return subprocess.run(command, capture_output=True, text=True)


def only_dir(parent: Path) -> Path:
    [directory] = [p for p in parent.iterdir() if p.is_dir()]
    return directory


@pytest.mark.e2e
def test_finetune_none_runs_every_job_and_ships_the_pretrained_model(tmp_path):
    run = snakemake(tmp_path, "finetune=none")
    assert run.returncode == 0, run.stderr[-5000:]
    jobs = job_counts(run.stdout + run.stderr)
    stages = {"curate", "tokenizer", "baseline", "pretrain", "quantize", "evaluate", "card"}
    assert stages <= set(jobs) and "finetune" not in jobs
    results = tmp_path / "results"
    quantized = json.loads((only_dir(results / "quantize") / "manifest.json").read_text())
    assert set(quantized["config"]["inputs"]) == {"pretrain"}

    baseline = json.loads((only_dir(results / "baseline") / "manifest.json").read_text())["metrics"]
    assert baseline["task_examples"] == 0 and baseline["task_exact_match"] is None
    report = json.loads((only_dir(results / "evaluate") / "results.json").read_text())
    assert set(report["models"]) == {"baseline", "pretrain", "quantize"}
    for model in report["models"].values():
        assert model["test_bits_per_byte"] > 0
        assert model["tasks"] == {}  # no fine-tuning task: language-model metrics only
        assert all(scores is None for scores in model.get("harness", {}).values())

    card = only_dir(results / "card")
    readme, sheet = (card / "model" / "README.md").read_text(), (card / "datasheet.md").read_text()
    for text in (readme, sheet):
        assert "village-prose" in text and "CC-BY-4.0" in text
        assert "docstring" not in text.lower() and "stdlib" not in text.lower()
    assert "not fine-tuned" in readme
    assert (card / "model" / "model.safetensors").samefile(
        only_dir(results / "pretrain") / "model" / "model.safetensors"
    )


@pytest.mark.e2e
def test_the_built_in_task_on_a_corpus_without_python_stops_in_curation(tmp_path):
    run = snakemake(tmp_path)
    assert run.returncode != 0
    [log] = (tmp_path / "results" / "logs" / "curate").iterdir()
    assert "has no Python docstring pairs" in log.read_text() and "finetune=none" in log.read_text()
    assert not (tmp_path / "results" / "tokenizer").exists() and not (tmp_path / "results" / "pretrain").exists()


def test_another_source_must_name_its_own_corpus_and_licence(tmp_path):
    with pytest.raises(config.ConfigError, match=r"set data.name=\.\.\. data.license=\.\.\."):
        config.load([f"data.source={tmp_path}"])
    with pytest.raises(config.ConfigError, match=r"'data.license=PSF-2.0'.*set data.license=\.\.\."):
        config.load([f"data.source={tmp_path}", "data.name=mine"])
    assert config.load([f"data.source={tmp_path}", *PROSE]).data.license == "CC-BY-4.0"
