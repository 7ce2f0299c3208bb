"""Deployment paths: what the README offers works, and what cannot work says so before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_per_rule_environments_are_refused_with_what_to_do_instead(tmp_path):
    for method in ("conda", "apptainer"):
        run = subprocess.run(
            [sys.executable, "-m", "snakemake", "-n", "--sdm", method, "--snakefile", str(REPO / "Snakefile"),
             "--directory", str(tmp_path), "--config", f"overrides=[\"run.results_dir={tmp_path}/results\"]"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode != 0
        assert "jobs run in the environment that runs Snakemake" in run.stderr + run.stdout, run.stderr[-2000:]
        assert not (tmp_path / "results").exists()


def test_setup_refuses_a_python_older_than_3_11_naming_the_setting(tmp_path):
    old = tmp_path / "python3.9"
    old.write_text("#!/bin/sh\nexec false\n")  # what `sys.version_info < (3, 11)` answers for an old interpreter
    old.chmod(0o755)
    env = {**os.environ, "PYTHON": str(old), "LMFORGE_VENV": str(tmp_path / "venv")}
    run = subprocess.run(["bash", str(REPO / "env" / "setup.sh")], capture_output=True, text=True, env=env)
    assert run.returncode == 1 and "needs Python 3.11 or newer" in run.stderr and "PYTHON=" in run.stderr
    assert not (tmp_path / "venv").exists()


def test_a_stage_names_a_build_lock_it_would_wait_on(tmp_path):
    lock = tmp_path / "extensions" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    (tmp_path / "in.json").write_text(json.dumps({"a": 1}))
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    # Any module: lmforge.launch warns before it starts the stage, as in every rule's command.
    run = subprocess.run(
        [sys.executable, "-m", "lmforge.launch", "1", "json.tool", str(tmp_path / "in.json")],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0 and json.loads(run.stdout) == {"a": 1}
    assert f"{lock} exists" in run.stderr and "delete it" in run.stderr
