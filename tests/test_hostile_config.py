"""No config value reaches a shell: every string setting, set to shell syntax, fails at planning naming its key,
or is planned into commands that hold none of it (it travels only inside the stage's YAML config)."""

from pathlib import Path

import pytest

from lmforge import config
from lmforge.workflow import snakemake_command
from tests.stages import TINY, settings

# What a hostile (or careless) value holds; {marker} is a file that must never appear.
HOSTILE = [
    "x; touch {marker}",
    "$(touch {marker})",
    "`touch {marker}`",
    'it\'s "quoted" {marker}',
    "with space {marker}",
    "hash #{marker}",
    "new\nline {marker}",
]


def string_settings() -> list[str]:
    """The key of every string-valued setting in the schema."""
    return [key for key, _, kind in settings() if kind in (str, str | None)]


def quoted(key: str, value: str) -> str:
    """A Hydra override setting `key` to exactly `value` (a single-quoted string, quotes escaped)."""
    return f"{key}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def test_the_schema_has_string_settings_to_attack():
    keys = string_settings()
    assert {"run.results_dir", "run.experiment", "resources.pretrain.partition", "data.source"} <= set(keys)
    assert len(keys) > 20


@pytest.fixture(scope="module")
def accepted(tmp_path_factory):
    """For each hostile value: the settings that took it as it is. The others failed naming their key."""
    marker = tmp_path_factory.mktemp("outside") / "PWNED"
    by_value = {}
    for template in HOSTILE:
        value = template.format(marker=marker)
        by_value[value] = []
        for key in string_settings():
            try:
                cfg = config.load([quoted(key, value)])
            except config.ConfigError as err:
                assert f"'{key}" in str(err), (key, value, str(err))
                continue
            assert config.OmegaConf.select(cfg, key) == value, (key, value)  # taken exactly, or refused
            by_value[value].append(key)
    return marker, by_value


def test_paths_names_and_partitions_refuse_shell_syntax(accepted):
    _, by_value = accepted
    for keys in by_value.values():
        assert not {"run.results_dir", "run.experiment", "run.sweep", "resources.pretrain.partition"} & set(keys)
    assert all(by_value.values())  # free-text settings (data.name, card.model_name, ...) take any text


def test_accepted_values_never_reach_a_shell_command(accepted, tmp_path):
    """Snakemake prints every job's shell command (-n -p): none holds any part of a hostile value."""
    import subprocess

    marker, by_value = accepted
    for value, keys in by_value.items():
        # Values that still plan a DAG: a data source or base model that does not exist fails in its job, not here.
        overrides = [quoted(key, value) for key in keys if key not in ("data.source", "finetune.base")]
        command = snakemake_command(tmp_path / "results", [*TINY, *overrides], "-n", "-p", "--cores", "1")
        run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        # Every job's command (the stage jobs, curate_shard to card, and the local rules), not the header, which
        # echoes Snakemake's own command line.
        printed = (run.stdout + run.stderr).split("Building DAG of jobs...", 1)[1]
        assert printed.count("Shell command:") == 13 and "lmforge.history merge" in printed
        assert str(marker) not in printed, value
        assert not Path(marker).exists() and not (tmp_path / "results").exists()  # a dry run writes nothing
