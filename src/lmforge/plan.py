"""The stage registry and the plan: which stages a configuration runs, and the key that names each one's directory.

Each stage's key is a hash of the config sections it reads plus its upstream stages' keys (a Merkle chain,
known before anything runs), so changing `train.lr` gives pretraining a new directory while curation and the
tokenizer keep theirs, and configurations of a sweep that agree on a stage share its job.

A stage the configuration does not run (finetune with `finetune=none`) is left out of the plan; its consumers
plan without it, or with the stage their spec names in its place, so the default configuration's keys are the
same as they were before stages could be left out.

Adding a stage: a registry entry here, a module `lmforge.<name>` with `main(cfg, out, tracker)`, and its
config group; the Snakemake rule is made from the registry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmforge.schema import StageResources


@dataclass(frozen=True)
class StageSpec:
    """One stage of the pipeline: the module `lmforge.<name>` and what its key depends on."""

    # Config sections the stage reads ("data", or a dotted path to part of one: "finetune.data"): hashed into its
    # key, handed to it.
    sections: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()  # stages whose outputs it reads
    # Config sections handed to it but not in its key: they change what it refuses to run on, not what it writes.
    checks: tuple[str, ...] = ()
    train: str | None = None  # its training section, for training stages: processes, GPUs, ZeRO
    per_sweep: bool = False  # one job for a whole sweep (lmforge.sweep plans it), not one per configuration
    # Whether a configuration runs the stage; one it does not run has no job, and its consumers go without it.
    runs: Callable[[DictConfig], bool] = lambda cfg: True
    # An input the configuration does not run -> the stage read in its place (quantize: the pretrained model).
    instead: dict[str, str] = field(default_factory=dict)
    # A stage run as one job per shard of its input (its config's `shard`, each with its own key), or None.
    # Its jobs are `<name>_<shard>` in the plan and in its consumers' inputs: Snakemake fans them out as rules.
    shards: Callable[[DictConfig], int] | None = None


def finetunes(cfg: DictConfig) -> bool:
    """A method and at least one task: `finetune=none` or `finetune.data=[]` plans no fine-tuning."""
    return cfg.finetune.method != "none" and len(cfg.finetune.data) > 0


def data_shards(cfg: DictConfig) -> int:
    return cfg.data.shards


# The registry: the Snakemake rules, the stage keys, and the checks above are made from it.
STAGES: dict[str, StageSpec] = {
    # Each shard of the input read and filtered by its own job; curate merges them (dedup, splits, the task).
    "curate_shard": StageSpec(sections=("data",), shards=data_shards),
    "curate": StageSpec(sections=("data",), inputs=("curate_shard",), checks=("finetune",)),  # the task needs pairs
    # The fine-tuning tasks read, checked and split; keyed by finetune.data alone, so a fine-tuning sweep reuses it.
    "tasks": StageSpec(sections=("finetune.data", "seed"), inputs=("curate",), runs=finetunes),
    "tokenizer": StageSpec(sections=("tokenizer", "seed"), inputs=("curate",)),
    "baseline": StageSpec(sections=("baseline",), inputs=("curate", "tokenizer")),
    "pretrain": StageSpec(sections=("model", "train", "seed"), inputs=("tokenizer",), train="train"),
    "finetune": StageSpec(
        sections=("finetune", "seed"),
        inputs=("tasks", "tokenizer", "pretrain"),
        train="finetune.train",
        runs=finetunes,
    ),
    "quantize": StageSpec(sections=("quantize",), inputs=("finetune",), instead={"finetune": "pretrain"}),
    "evaluate": StageSpec(
        sections=("eval", "seed"),
        inputs=("curate", "tokenizer", "tasks", "baseline", "pretrain", "finetune", "quantize"),
    ),
    "card": StageSpec(
        sections=("card",), inputs=("curate", "tokenizer", "tasks", "pretrain", "finetune", "quantize", "evaluate")
    ),
    "scaling": StageSpec(inputs=("pretrain",), per_sweep=True),
}


def sections(full: dict, paths: tuple[str, ...]) -> dict:
    """The parts of a resolved config at `paths` (a section, or a dotted path into one), nested as in the config."""
    picked: dict = {}
    for path in paths:
        *parents, last = path.split(".")
        source, target = full, picked
        for part in parents:
            source, target = source[part], target.setdefault(part, {})
        target[last] = source[last]
    return picked


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class Stage:
    name: str
    key: str
    config: dict  # the resolved stage config handed to `python -m lmforge.<name>`
    resources: StageResources = field(default_factory=StageResources)

    @property
    def dir(self) -> str:
        return f"{self.config['run']['results_dir']}/{self.name}/{self.key}"

    @property
    def processes(self) -> int:
        """The training processes of a training stage (one job of N tasks); 1 for the other stages."""
        train = STAGES[self.name].train
        if train is None:
            return 1
        section = self.config
        for part in train.split("."):
            section = section[part]
        return section["processes"]


def stages(cfg: DictConfig) -> dict[str, Stage]:
    """The jobs one configuration runs, each keyed by its config and its inputs' keys.

    A job is named by its stage, or `<stage>_<shard>` for each shard of a sharded stage.
    """
    full = OmegaConf.to_container(cfg, resolve=True)
    run = dict(full["run"])
    stages: dict[str, Stage] = {}
    jobs_of: dict[str, list[str]] = {}  # stage -> its jobs' names
    for name, spec in STAGES.items():
        if spec.per_sweep or not spec.runs(cfg):
            continue
        own = sections(full, spec.sections)
        wanted = [dep if dep in jobs_of else spec.instead.get(dep) for dep in spec.inputs]
        present = [job for dep in wanted if dep in jobs_of for job in jobs_of[dep]]
        checked = sections(full, spec.checks)
        for shard in range(spec.shards(cfg)) if spec.shards else [None]:
            job = name if shard is None else f"{name}_{shard}"
            sharding = {} if shard is None else {"shard": shard}
            input_keys = {dep: stages[dep].key for dep in present}
            key = digest({"stage": name, "config": own, "inputs": input_keys, **sharding})
            stage_cfg = {"stage": name, "key": key, **own, **checked, **sharding}
            stage_cfg["inputs"] = {dep: stages[dep].dir for dep in present}
            checkpoints = f"{run['results_dir']}/checkpoints/{name}/{key}"
            stage_cfg["run"] = {**run, "run_key": None, "checkpoint_dir": checkpoints}
            stages[job] = Stage(name, key, stage_cfg, resources(cfg, name))
            jobs_of.setdefault(name, []).append(job)
    run_key = stages["card"].key  # the card depends on everything: one key per configuration
    for stage in stages.values():
        stage.config["run"]["run_key"] = run_key
    return stages


def resources(cfg: DictConfig, stage: str) -> StageResources:
    node = cfg.resources.get(stage)
    return StageResources(**OmegaConf.to_container(node)) if node is not None else StageResources()
