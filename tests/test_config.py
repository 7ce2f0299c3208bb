import subprocess
import sys
from pathlib import Path

import pytest

from lmforge import config

REPO = Path(__file__).resolve().parents[1]


def keys(overrides=()):
    return {name: stage.key for name, stage in config.plan(config.load(overrides)).items()}


def test_unknown_key_names_the_key_and_the_valid_keys():
    with pytest.raises(config.ConfigError) as err:
        config.load(["train.lrr=0.1"])
    message = str(err.value)
    assert "train.lrr" in message and "lr, micro_batch_size" in message and "Did you mean 'train.lr'" in message


def test_wrong_type_and_wrong_choice_are_rejected():
    with pytest.raises(config.ConfigError, match="train.lr"):
        config.load(["train.lr=fast"])
    with pytest.raises(config.ConfigError, match="Valid choices: full, lora, qlora"):
        config.load(["finetune.method=dora"])
    with pytest.raises(config.ConfigError, match="Available options in 'model'"):
        config.load(["model=nonexistent"])


def test_qlora_without_a_gpu_fails_before_anything_runs():
    with pytest.raises(config.ConfigError, match="qlora needs a GPU.*finetune=lora"):
        config.load(["finetune=qlora"])
    assert config.load(["finetune=qlora", "resources.finetune.gpus=1"]).finetune.method == "qlora"


def test_changing_lr_rekeys_pretraining_and_descendants_only():
    before, after = keys(), keys(["train.lr=0.01"])
    same = {name for name in before if before[name] == after[name]}
    assert same == {"curate", "tokenizer", "baseline"}


def test_changing_run_settings_rekeys_nothing():
    assert keys() == keys(["run.experiment=other", "run.results_dir=/tmp/elsewhere"])


def test_stage_inputs_point_at_upstream_directories():
    stages = config.plan(config.load())
    assert stages["pretrain"].config["inputs"] == {"tokenizer": stages["tokenizer"].dir}
    assert stages["card"].config["run"]["run_key"] == stages["card"].key


def test_snakemake_dry_run_fails_on_a_bad_key_before_any_job(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "--directory",
            str(REPO),
            "--config",
            f"overrides=train.lrr=1 run.results_dir={tmp_path}/results",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert run.returncode != 0
    assert "Unknown config key 'train.lrr'" in run.stdout + run.stderr
    assert not (tmp_path / "results").exists()
