import subprocess
import sys
from pathlib import Path

import pytest

from lmforge import config, plan
from tests.stages import settings

REPO = Path(__file__).resolve().parents[1]


def keys(overrides=()):
    return {name: stage.key for name, stage in plan.stages(config.load(overrides)).items()}


def test_unknown_key_names_the_key_and_the_valid_keys():
    with pytest.raises(config.ConfigError) as err:
        config.load(["train.lrr=0.1"])
    message = str(err.value)
    assert "train.lrr" in message and "lr, micro_batch_size" in message and "Did you mean 'train.lr'" in message


def test_wrong_type_and_wrong_choice_are_rejected():
    with pytest.raises(config.ConfigError, match="train.lr"):
        config.load(["train.lr=fast"])
    with pytest.raises(config.ConfigError, match="must be one of full, lora, qlora"):
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
    assert same == {"curate_shard_0", "curate", "tokenizer", "baseline", "tasks"}


def test_changing_run_settings_rekeys_nothing():
    assert keys() == keys(["run.experiment=other", "run.results_dir=/tmp/elsewhere"])


def test_stage_inputs_point_at_upstream_directories():
    stages = plan.stages(config.load())
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


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.steps=0", "'train.steps': must be >= 1"),
        ("train.micro_batch_size=0", "'train.micro_batch_size': must be >= 1"),
        ("train.grad_accum=0", "'train.grad_accum': must be >= 1"),
        ("train.lr=-1", "'train.lr': must be > 0"),
        ("finetune.train.lr=0", "'finetune.train.lr': must be > 0"),
        ("model.num_layers=-1", "'model.num_layers': must be >= 1"),
        ("model.num_heads=3", "'model.num_heads=3' must divide 'model.hidden_size=128'"),
        ("data.validation_fraction=1.5", "'data.validation_fraction': must be in [0, 1)"),
        ("data.test_fraction=0.96", "their sum must be < 1"),
        ("data.normalization=NFX", "'data.normalization': must be one of NFC, NFD, NFKC, NFKD"),
        ("tokenizer.vocab_size=3", "'tokenizer.vocab_size': must be >= 261"),
        ("resources.evaluate.gpus=-1", "'resources.evaluate.gpus': must be >= 0"),
        ("eval.prompt_template='{doc}'", "'eval.prompt_template' has unknown fields ['doc']"),
    ],
)
def test_out_of_range_values_fail_at_planning_naming_the_key(override, message):
    with pytest.raises(config.ConfigError) as err:
        config.load([override])
    assert message in str(err.value)


def test_every_numeric_setting_has_a_valid_range():
    numeric = [key for key, spec, kind in settings() if kind in (int, float, int | None, float | None)]
    unchecked = [key for key, spec, kind in settings() if key in numeric and "check" not in spec.metadata]
    assert len(numeric) > 40 and not unchecked


def test_overrides_reach_snakemake_whole_through_lmforge_run():
    """Each override is one word; spaces, quotes and ` #` inside a value survive Snakemake's --config parsing."""
    from snakemake.cli import parse_config

    from lmforge import workflow

    overrides, flags, snakemake_args = workflow.split_words(
        ["data.name='my corpus #2, v\\'1'", "-n", "train.lr=1e-3", "--", "--until", "pretrain"]
    )
    assert flags == {"-n"} and snakemake_args == ["--until", "pretrain"]
    assert parse_config([workflow.overrides_config(overrides)])["overrides"] == overrides
    assert config.load(overrides).data.name == "my corpus #2, v'1"


def test_lmforge_run_dry_run_plans_and_a_bad_value_names_its_key(tmp_path):
    lmforge = [sys.executable, "-m", "lmforge.cli", "run"]
    ok = subprocess.run([*lmforge, "data.name='a #b'", "-n"], capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0 and "This was a dry-run" in ok.stdout + ok.stderr, ok.stderr[-2000:]
    bad = subprocess.run([*lmforge, "-n", "train.steps=0"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode != 0 and "'train.steps': must be >= 1" in bad.stdout + bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".snakemake"]  # no results, no configs


def test_lmforge_config_prints_the_composed_configuration():
    shown = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "config", "train.lr=0.01", "--stages"], capture_output=True, text=True
    )
    assert shown.returncode == 0 and "lr: 0.01" in shown.stdout and "pretrain: results/pretrain/" in shown.stdout


GROUP_OPTIONS = [
    (group.name, option.stem)
    for group in sorted(config.CONF_DIR.iterdir())
    # a sweep expands (below); a recipe is added with +recipe= and reads its data (tests/test_recipe.py)
    if group.is_dir() and group.name not in ("sweep", "recipe")
    for option in sorted(group.glob("*.yaml"))
]


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_option_of_every_config_group_composes_and_validates(group, option):
    # QLoRA and the GPU presets are planned as they run: with a GPU for the stage that needs it.
    needs_gpu = ["resources.finetune.gpus=1"] if (group, option) == ("finetune", "qlora") else []
    cfg = config.load([f"{group}={option}", *needs_gpu])
    assert plan.stages(cfg)["card"].key


def test_every_sweep_file_expands_and_validates():
    from lmforge import sweep

    for path in sorted((config.CONF_DIR / "sweep").glob("*.yaml")):
        assert len(sweep.plan([f"sweep={path.stem}"]).runs) > 1
