"""Sweeps: Hydra sweep syntax expanded into one DAG, shared stages run once, a failed branch resumed alone,
and the scaling sweep's fit. The end-to-end tests share one results directory, so the scaling sweep reuses
the 2 x 2 sweep's curate and tokenizer."""

import json
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lmforge import config, scaling, sweep
from lmforge import plan as planning
from lmforge.workflow import snakemake_command
from tests.stages import TINY, job_counts

# One CPU a job, so that 2 cores run two jobs at once: most of a tiny job is Python starting up.
ONE_CPU = [f"resources.{stage}.cpus=1" for stage in ("pretrain", "finetune", "evaluate")]
BASE = ["data.max_documents=120", *TINY, *ONE_CPU]
GRID = ["train.lr=1e-3,3e-3", "eval.num_shots=0,1"]
# The scaling sweep's own model ladder and train.steps stay; the rest of TINY keeps it small.
SCALING = [
    *(o for o in BASE if not o.startswith(("model.", "train.steps="))),
    "sweep=scaling",
    "model=ladder_xs,ladder_s",
    "train.steps=4,8,12",
]


def test_a_sweep_is_the_cartesian_product_and_shares_upstream_stages():
    plan = sweep.plan(["train.lr=1e-4,3e-4", "finetune=full,lora"])
    assert len(plan.runs) == 4
    assert {name: len(stages) for name, stages in plan.stages.items()} == {
        "curate_shard": 1,
        "curate": 1,
        "tasks": 1,  # keyed by finetune.data alone: shared by the whole sweep
        "tokenizer": 1,
        "baseline": 1,
        "pretrain": 2,
        "finetune": 4,
        "quantize": 4,
        "evaluate": 4,
        "card": 4,
    }
    assert plan.id.startswith("sweep-") and plan.scaling is None
    assert {run["pretrain"].config["run"]["sweep"] for run in plan.runs} == {plan.id}
    # A configuration of the sweep is the configuration itself: same keys as planning it alone.
    alone = planning.stages(config.load(["train.lr=3e-4", "finetune=lora"]))
    assert {name: stage.key for name, stage in plan.runs[3].items()} == {n: s.key for n, s in alone.items()}


def test_a_sweep_over_evaluation_settings_trains_once_and_evaluates_each_setting():
    plan = sweep.plan(["eval.num_shots=0,1,5", "eval.sampling.temperature=0.5,1.0"])
    jobs = {name: len(stages) for name, stages in plan.stages.items()}
    assert jobs.pop("evaluate") == jobs.pop("card") == 6  # the card shows its configuration's evaluation
    assert jobs["pretrain"] == 1 and set(jobs.values()) == {1}  # every model is trained once, for all six
    settings = {
        (run["evaluate"].config["eval"]["num_shots"], run["evaluate"].config["eval"]["sampling"]["temperature"])
        for run in plan.runs
    }
    assert settings == {(shots, t) for shots in (0, 1, 5) for t in (0.5, 1.0)}
    assert {run["evaluate"].config["seed"] for run in plan.runs} == {1234}  # the seed is in every evaluation's config


def test_no_sweep_is_one_configuration_without_a_sweep_id():
    plan = sweep.plan(["train.lr=1e-3"])
    assert plan.id is None and len(plan.runs) == 1
    assert plan.runs[0]["card"].config["run"]["sweep"] is None


def test_sweep_id_ignores_the_values_so_a_grown_grid_keeps_it():
    assert sweep.expand(["train.lr=1,2"])[0] == sweep.expand(["train.lr=1,2,3"])[0] != sweep.expand(["seed=1,2"])[0]
    assert sweep.expand(["train.lr=1,2", "run.sweep=mine"])[0] == "mine"


def test_range_and_glob_sweeps_expand():
    _, grid = sweep.expand(["train.steps=range(10,40,10)", "model=glob(ladder_*)"])
    assert len(grid) == 9 and ["model=ladder_m", "train.steps=10"] in [sorted(c[:2]) for c in grid]


def test_an_invalid_value_in_one_configuration_fails_the_plan_naming_the_key():
    with pytest.raises(config.ConfigError, match=r"(?s)configuration 2 of 2 \(train.lr=fast.*full_key: train.lr"):
        sweep.plan(["train.lr=1e-3,fast"])
    with pytest.raises(config.ConfigError, match="must be one of full, lora, qlora"):
        sweep.plan(["finetune.method=full,dora"])


def test_sweep_file_and_command_line_combine():
    plan = sweep.plan(["sweep=scaling", "train.steps=10,20", "train.lr=1e-3"])
    assert plan.id == "scaling" and len(plan.runs) == 3 * 2
    pretrains = [run["pretrain"].config for run in plan.runs]
    assert {p["train"]["steps"] for p in pretrains} == {10, 20}  # the command line replaces the file's grid
    assert {p["train"]["micro_batch_size"] for p in pretrains} == {8}  # the file's plain value stays
    assert {p["model"]["name"] for p in pretrains} == {"ladder_xs", "ladder_s", "ladder_m"}
    assert len(plan.scaling.config["inputs"]) == 6
    with pytest.raises(config.ConfigError, match="Available sweeps: scaling"):
        sweep.plan(["sweep=nonexistent"])


def test_composing_once_per_group_choice_equals_hydra_compose():
    overrides = ["finetune=lora", "model.hidden_size=64", "train.lr=1e-4", "+extra=1", "data.max_documents=null"]
    [fast] = config.load_many([overrides])
    with initialize_config_dir(config_dir=str(config.CONF_DIR), version_base="1.3"):
        composed = compose("config", overrides=overrides)
    assert OmegaConf.to_container(fast) == OmegaConf.to_container(composed)


def test_scaling_fit_recovers_a_known_law():
    n, d = (grid.ravel() for grid in np.meshgrid([3e4, 1.6e5, 8.5e5], [5e4, 1e5, 2e5]))
    law = scaling.fit(n, d, 1.7 + 400 / n**0.34 + 410 / d**0.28)
    assert law["alpha"] == pytest.approx(0.34) and law["beta"] == pytest.approx(0.28)
    assert law["E"] == pytest.approx(1.7) and law["rmse"] < 1e-9


def snakemake(results: Path, overrides: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_command(results, overrides, "--cores", "2", *args), capture_output=True, text=True)


def output(run: subprocess.CompletedProcess) -> str:
    return run.stdout + run.stderr


def test_each_job_runs_with_its_own_stage_processes_and_resources(tmp_path):
    dry = snakemake(tmp_path / "results", ["train.processes=1,2"], "-n", "-p")
    assert dry.returncode == 0, output(dry)[-3000:]
    jobs = re.findall(r"rule pretrain:\n.*?resources: (.*?)\nShell command: (.*?)\n", output(dry), re.DOTALL)
    launched = {re.search(r"lmforge.launch (\d) lmforge.pretrain", command).group(1): res for res, command in jobs}
    assert sorted(launched) == ["1", "2"]
    assert "tasks=2" in launched["2"] and "mpi=srun" in launched["2"] and "mpi=srun" not in launched["1"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return tmp_path_factory.mktemp("sweep") / "results"


@pytest.fixture(scope="module")
def two_by_two(results):
    """The 2 x 2 sweep with one configuration's evaluation failing, then the rerun, then a grown grid."""
    plan = sweep.plan([f"run.results_dir={results}", *BASE, *GRID])
    failing = plan.runs[-1]["evaluate"]
    # A file where the stage makes its work directory: that one job fails, as on a broken node.
    blocker = Path(failing.dir + ".partial")
    blocker.parent.mkdir(parents=True)
    blocker.write_text("")
    first = snakemake(results, [*BASE, *GRID], "--keep-going")
    blocker.unlink()
    return SimpleNamespace(
        plan=plan,
        failing=failing,
        first=first,
        missing_after_first=[run["card"].key for run in plan.runs if not Path(run["card"].dir).exists()],
        dry=snakemake(results, [*BASE, *GRID], "-n"),
        rerun=snakemake(results, [*BASE, *GRID]),
        grown=snakemake(results, [*BASE, "train.lr=1e-3,3e-3,1e-2", "eval.num_shots=0,1"], "-n"),
    )


@pytest.mark.e2e
def test_sweep_runs_shared_stages_once_and_every_branch(two_by_two, results):
    first = output(two_by_two.first)
    assert two_by_two.first.returncode != 0 and "Error in rule evaluate" in first and two_by_two.failing.key in first
    assert job_counts(first) == {
        "curate_shard": 1,
        "curate": 1,
        "tasks": 1,
        "tokenizer": 1,
        "baseline": 1,
        "pretrain": 2,
        "finetune": 2,
        "quantize": 2,
        "evaluate": 4,
        "card": 4,
        "history": 4,
        "compare": 1,
        "all": 1,
    }
    assert two_by_two.rerun.returncode == 0, output(two_by_two.rerun)[-5000:]
    for stage in ("curate", "tokenizer"):
        assert len([d for d in (results / stage).iterdir() if d.is_dir()]) == 1
    cards = [json.loads(Path(run["card"].dir, "manifest.json").read_text()) for run in two_by_two.plan.runs]
    assert len(cards) == 4 and {card["config"]["run"]["sweep"] for card in cards} == {two_by_two.plan.id}
    # The comparison plot draws each training run once: two pretrainings, each shared by two configurations
    # that differ in eval.num_shots only, labelled with the learning rate alone.
    [curves] = (results / "report").rglob(f"*{two_by_two.plan.id}/loss_curves.svg")
    text = curves.read_text()
    assert "<!-- train.lr=0.001 (2 configurations) -->" in text and "<!-- train.lr=0.003 (2 configurations) -->" in text
    assert "eval.num_shots" not in text


@pytest.mark.e2e
def test_rerun_after_a_failed_branch_runs_only_that_branch(two_by_two):
    assert two_by_two.missing_after_first == [two_by_two.plan.runs[-1]["card"].key]
    expected = {"evaluate": 1, "card": 1, "history": 1, "compare": 1, "all": 1}
    assert job_counts(output(two_by_two.dry)) == expected
    assert job_counts(output(two_by_two.rerun)) == expected


@pytest.mark.e2e
def test_adding_a_grid_value_plans_only_the_new_branches(two_by_two):
    assert two_by_two.grown.returncode == 0, output(two_by_two.grown)[-3000:]
    assert job_counts(output(two_by_two.grown)) == {
        "pretrain": 1,
        "finetune": 1,
        "quantize": 1,
        "evaluate": 2,
        "card": 2,
        "history": 2,
        "compare": 1,
        "all": 1,
    }


@pytest.mark.e2e
def test_scaling_sweep_fits_the_law_and_plots_it(results):
    run = snakemake(results, SCALING, "--until", "scaling")
    assert run.returncode == 0, output(run)[-5000:]
    counts = job_counts(output(run))
    assert counts["pretrain"] == 6 and counts["scaling"] == 1 and "finetune" not in counts
    fit_dir = Path(sweep.plan([f"run.results_dir={results}", *SCALING]).scaling.dir)
    fit = json.loads((fit_dir / "fit.json").read_text())
    assert fit["runs"] == 6 and len({(p["N"], p["D"]) for p in fit["points"]}) == 6
    assert all(np.isfinite(fit[k]) for k in ("E", "A", "alpha", "B", "beta", "rmse"))
    assert (fit_dir / "loss_vs_compute.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
