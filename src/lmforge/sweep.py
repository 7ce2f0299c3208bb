"""Sweeps: Hydra's sweep syntax, expanded into the configurations of one Snakemake DAG.

    snakemake --config overrides="train.lr=1e-4,3e-4 finetune=full,lora"   # 2 x 2 configurations
    snakemake --config overrides="sweep=scaling"                            # conf/sweep/scaling.yaml

Overrides expand as Hydra's BasicSweeper expands a multirun: choices `a,b`, `range(...)`, `glob(...)`,
a later override of a key replaces an earlier one, and the configurations are the cartesian product of
the swept keys. A sweep file `conf/sweep/<name>.yaml` is a mapping `key: "v1,v2"`, the shape of Hydra's
`hydra.sweeper.params`; the command line's overrides come after it. Every configuration is composed and
validated before anything runs, then planned with `lmforge.plan.stages`; stages with equal keys are one job.

The sweep id, `run.sweep` of every configuration, is the sweep file's name, else `sweep-` and a digest
of the swept keys: not of their values, so adding a value to the grid keeps the id. `run.sweep=...` on
the command line names it. One configuration and no sweep file is no sweep: `run.sweep` stays null.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import yaml
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from lmforge import config, hydra_api
from lmforge import plan as planning
from lmforge.config import ConfigError
from lmforge.plan import Stage, digest, resources
from lmforge.schema import StageResources

SWEEP_DIR = config.CONF_DIR / "sweep"


@dataclass
class Sweep:
    id: str | None
    runs: list[dict[str, Stage]]  # each configuration's stages, as lmforge.plan.stages gives them
    stages: dict[str, dict[str, Stage]]  # the DAG's jobs: stage name -> key -> stage; shared stages once
    scaling: Stage | None  # the scaling-law fit, for a sweep over model sizes and training lengths

    @property
    def results_dir(self) -> str:
        return self.runs[0]["card"].config["run"]["results_dir"]

    @property
    def targets(self) -> list[str]:
        """What `rule all` asks for: every configuration's card and evaluation, and the fit if there is one."""
        dirs = [run[name].dir for run in self.runs for name in ("card", "evaluate")]
        return list(dict.fromkeys(dirs + ([self.scaling.dir] if self.scaling else [])))


def sweep_file(name: str) -> list[str]:
    path = SWEEP_DIR / f"{name}.yaml"
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in SWEEP_DIR.glob("*.yaml")))
        raise ConfigError(f"No sweep file {path}. Available sweeps: {available}.")
    return [f"{key}={value}" for key, value in (yaml.safe_load(path.read_text()) or {}).items()]


def expand(overrides: Sequence[str]) -> tuple[str | None, list[list[str]]]:
    """The sweep id and one list of plain overrides per configuration."""
    with initialize_config_dir(config_dir=str(config.CONF_DIR), version_base="1.3"):
        # With the config loader, glob(...) finds the options of a config group.
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        try:
            command_line = parser.parse_overrides(list(overrides))
            names = [o.value() for o in command_line if o.key_or_group == "sweep"]
            if names and not isinstance(names[-1], str):
                raise ConfigError(f"sweep= names one file of {SWEEP_DIR}, not {names[-1]}.")
            from_file = parser.parse_overrides(sweep_file(names[-1])) if names else []
            parsed = from_file + [o for o in command_line if o.key_or_group != "sweep"]
            grid = hydra_api.sweep_grid(parsed)
        except HydraException as err:
            raise ConfigError(str(err)) from None
    named = [str(o.value()) for o in parsed if o.key_or_group == "run.sweep"]
    last = {o.get_key_element(): o for o in parsed}  # as in the grid: the last override of a key counts
    swept = sorted(key for key, o in last.items() if o.is_sweep_override())
    if named or not (names or swept):
        return (named[-1] if named else None), grid
    sweep_id = names[-1] if names else f"sweep-{digest(swept)[:8]}"
    return sweep_id, [[*configuration, f"run.sweep={sweep_id}"] for configuration in grid]


def scaling_stage(runs: list[dict[str, Stage]], resources: StageResources) -> Stage | None:
    """The fit of L(N, D) over the sweep's pretraining runs, when they differ in both model and train.steps."""
    pretrains = list({run["pretrain"].key: run["pretrain"] for run in runs}.values())
    models = {digest(stage.config["model"]) for stage in pretrains}
    steps = {stage.config["train"]["steps"] for stage in pretrains}
    if len(models) < 2 or len(steps) < 2:
        return None
    key = digest({"stage": "scaling", "config": {}, "inputs": sorted(stage.key for stage in pretrains)})
    # Its own MLflow parent run (run_key): the fit belongs to the sweep, not to one configuration.
    run = {name: value for name, value in pretrains[0].config["run"].items() if name != "checkpoint_dir"}
    stage_cfg = {
        "stage": "scaling",
        "key": key,
        "inputs": {f"pretrain_{stage.key}": stage.dir for stage in pretrains},
        "run": {**run, "run_key": key},
    }
    return Stage("scaling", key, stage_cfg, resources)


def plan(overrides: Sequence[str]) -> Sweep:
    """Expand, compose, validate and plan every configuration of a sweep (or the one configuration)."""
    sweep_id, grid = expand(overrides)
    cfgs = config.load_many(grid)
    runs = [planning.stages(cfg) for cfg in cfgs]
    results_dirs = {run["card"].config["run"]["results_dir"] for run in runs}
    if len(results_dirs) > 1:
        raise ConfigError(f"A sweep writes into one run.results_dir, not {len(results_dirs)}: {sorted(results_dirs)}.")
    stages: dict[str, dict[str, Stage]] = {}
    for run in runs:
        for stage in run.values():  # a sharded stage's jobs are one rule's: by stage name
            stages.setdefault(stage.name, {}).setdefault(stage.key, stage)
    scaling = scaling_stage(runs, resources(cfgs[0], "scaling"))
    if scaling:
        stages["scaling"] = {scaling.key: scaling}
    return Sweep(sweep_id, runs, stages, scaling)
