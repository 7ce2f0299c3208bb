"""The config schema, Hydra composition, and the stage plan.

The YAML files under conf/ hold the values; the dataclasses here hold the types.
Hydra merges every group file into the typed schema, so a misspelt key or a
value of the wrong type fails at composition time, which is when Snakemake
builds the DAG, before any job is submitted.

`plan()` turns one composed config into the pipeline's stages. Each stage's
key is a hash of the config sections it reads plus its upstream stages' keys,
so changing `train.lr` gives pretraining a new directory while curation and the
tokenizer keep theirs.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@dataclass
class TaskConfig:
    min_docstring_words: int = 5
    max_docstring_chars: int = 400


@dataclass
class DataConfig:
    name: str = MISSING
    # "stdlib", a local .jsonl/.parquet/.txt file or directory, or a Hub dataset name.
    source: str = MISSING
    text_field: str = "text"
    license: str = MISSING
    normalization: str = "NFC"
    min_chars: int = 64
    max_chars: int = 200_000
    max_documents: int | None = None
    validation_fraction: float = 0.05
    test_fraction: float = 0.1
    task: TaskConfig = field(default_factory=TaskConfig)


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    min_frequency: int = 2
    chat_template: str = MISSING


@dataclass
class BaselineConfig:
    order: int = 2
    discount: float = 0.75


@dataclass
class ModelConfig:
    name: str = MISSING
    architecture: str = "llama"
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    max_seq_len: int = 256


@dataclass
class TrainConfig:
    steps: int = 300
    micro_batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16 (DeepSpeed's: bf16 weights and gradients, fp32 master weights)
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    processes: int = 1
    offload: str = "none"  # none | optimizer (ZeRO 1-3) | optimizer+parameters (ZeRO 3): to CPU memory
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile the model; minutes of compilation at the start
    attention: str = "sdpa"  # sdpa | eager | flash_attention_2 (needs the flash-attn package)
    peak_tflops: float | None = None  # a device's bf16 peak, for MFU; None: looked up from the GPU's name


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class FinetuneConfig:
    method: str = "full"  # full | lora | qlora
    base: str = "pretrain"  # `pretrain` (this pipeline's model) or a Hugging Face model name or local path
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class QuantizeConfig:
    method: str = "int8_weight_only"


@dataclass
class SamplingConfig:
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95


@dataclass
class EvalConfig:
    max_new_tokens: int = 16
    few_shot: int = 3
    max_task_examples: int | None = None
    max_test_documents: int | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    prompt_template: str = "# {docstring}\ndef "
    shot_template: str = "# {docstring}\ndef {name}(...):\n    ...\n\n"


@dataclass
class CardConfig:
    model_name: str = "lmforge-tiny-docstring2name"
    license: str = "apache-2.0"
    language: str = "code"


@dataclass
class StageResources:
    cpus: int = 1
    mem_mb: int = 4000
    runtime: int = 60  # minutes, per attempt
    gpus: int = 0  # per node; training stages run one process per GPU (train.processes = gpus x nodes)
    nodes: int = 1
    partition: str | None = None
    # Training stages: Slurm sends SIGURG this many seconds before the walltime; the loop checkpoints and exits.
    signal_before_end_s: int | None = None


@dataclass
class RunConfig:
    """Where and under what name a run is recorded. Not part of any stage hash."""

    results_dir: str = "results"
    experiment: str = "lmforge"
    mlflow_uri: str | None = None  # default: sqlite in results_dir; MLFLOW_TRACKING_URI overrides
    wandb: bool = False
    sweep: str | None = None  # the id of the sweep this configuration belongs to; set by the sweep expansion


@dataclass
class Config:
    seed: int = 1234
    data: DataConfig = MISSING
    tokenizer: TokenizerConfig = MISSING
    baseline: BaselineConfig = MISSING
    model: ModelConfig = MISSING
    train: TrainConfig = MISSING
    finetune: FinetuneConfig = MISSING
    quantize: QuantizeConfig = MISSING
    eval: EvalConfig = MISSING
    card: CardConfig = field(default_factory=CardConfig)
    resources: dict[str, StageResources] = field(default_factory=dict)
    run: RunConfig = field(default_factory=RunConfig)


ConfigStore.instance().store(name="schema", node=Config)


class ConfigError(ValueError):
    """A config a user wrote that cannot run; the message says what to change."""


def _keys_at(node: Any, path: list[str]) -> list[str] | None:
    for part in path:
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node[part]
    return sorted(node.keys()) if isinstance(node, DictConfig) else None


def _explain(err: Exception, overrides: list[str]) -> str:
    """Turn Hydra's error into one that names the key and the valid choices."""
    text = str(err)
    if isinstance(err, MissingConfigException) or "Could not find" in text:
        return text  # Hydra already lists the available options of the group
    base = compose("config")
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        path = key.split(".")
        for depth in range(len(path)):  # the first component of the key that does not exist
            parent = _keys_at(base, path[:depth])
            if parent is None or path[depth] in parent:
                continue
            close = difflib.get_close_matches(path[depth], parent, n=1)
            hint = f" Did you mean '{'.'.join(path[:depth] + close)}'?" if close else ""
            where = ".".join(path[:depth]) or "the top level"
            return f"Unknown config key '{key}'. Valid keys under {where}: {', '.join(parent)}.{hint}"
    return text


def load(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose conf/config.yaml with Hydra overrides and validate it against the schema."""
    [cfg] = load_many([overrides])
    return cfg


def load_many(override_lists: Sequence[Sequence[str]]) -> list[DictConfig]:
    """`load` for each list of overrides (the configurations of a sweep).

    A Hydra compose takes ~0.2 s, too slow for a sweep of 1000 configurations, so Hydra composes once
    per distinct set of config-group choices (`model=...`, `finetune=lora`) and the value overrides
    (`train.lr=1e-3`) go onto a copy with the code Hydra's compose applies them with (~10 ms).
    """
    configs = []
    composed: dict[tuple[str, ...], DictConfig] = {}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        parser = OverridesParser.create(config_loader=loader)
        for number, overrides in enumerate(override_lists, 1):
            try:
                configs.append(_load_one(list(overrides), parser, loader, composed))
            except ConfigError as err:
                if len(override_lists) == 1:
                    raise
                where = f"configuration {number} of {len(override_lists)} ({' '.join(overrides)})"
                raise ConfigError(f"In {where}: {err}") from None
    return configs


def _load_one(overrides: list[str], parser, loader, composed: dict) -> DictConfig:
    try:
        parsed = parser.parse_overrides(overrides)
        for override in parsed:
            if override.is_sweep_override():
                raise ConfigError(f"'{override.input_line}' is a sweep; lmforge.sweep expands sweeps.")
        # How Hydra tells a group choice from a value (hydra/_internal/defaults_list.py, Overrides).
        is_group = [loader.repository.group_exists(o.key_or_group) and not isinstance(o.value(), dict) for o in parsed]
        groups = tuple(o.input_line for o, group in zip(parsed, is_group) if group)
        values = [o for o, group in zip(parsed, is_group) if not group]
        if groups not in composed:
            composed[groups] = compose("config", overrides=list(groups))
        cfg = copy.deepcopy(composed[groups])
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        OmegaConf.to_container(cfg, throw_on_missing=True)
    except (ConfigCompositionException, OverrideParseException, OmegaConfBaseException) as err:
        raise ConfigError(_explain(err.__cause__ or err, overrides)) from None
    for stage in cfg.resources:
        if stage not in STAGES:
            raise ConfigError(f"Unknown stage 'resources.{stage}'. Valid stages: {', '.join(STAGES)}.")
    _check_choices(cfg)
    return cfg


def _check_choices(cfg: DictConfig) -> None:
    choices = {
        "model.architecture": ("llama", "gpt2"),
        "finetune.method": ("full", "lora", "qlora"),
        "quantize.method": ("int8_weight_only", "none"),
    }
    for train in ("train", "finetune.train"):
        choices[f"{train}.precision"] = ("fp32", "bf16")
        choices[f"{train}.zero_stage"] = (0, 1, 2, 3)
        choices[f"{train}.offload"] = ("none", "optimizer", "optimizer+parameters")
        choices[f"{train}.attention"] = ("sdpa", "eager", "flash_attention_2")
    for key, valid in choices.items():
        value = OmegaConf.select(cfg, key)
        if value not in valid:
            raise ConfigError(f"Invalid value {value!r} for '{key}'. Valid choices: {', '.join(map(str, valid))}.")
    for train in ("train", "finetune.train"):
        tcfg = OmegaConf.select(cfg, train)
        needs = {"optimizer": 1, "optimizer+parameters": 3}.get(tcfg.offload, 0)
        if tcfg.zero_stage < needs:
            raise ConfigError(f"'{train}.offload={tcfg.offload}' needs '{train}.zero_stage' >= {needs}.")
        stage_resources = resources(cfg, "pretrain" if train == "train" else "finetune")
        gpus = stage_resources.gpus * stage_resources.nodes
        if gpus and tcfg.processes != gpus:
            raise ConfigError(
                f"'{train}.processes={tcfg.processes}' but the stage asks Slurm for {gpus} GPUs "
                f"({stage_resources.gpus} per node x {stage_resources.nodes} nodes): training runs one process per GPU."
            )
        if tcfg.compile and tcfg.zero_stage == 3:
            raise ConfigError(
                f"'{train}.compile=true' is not supported with ZeRO-3 (its parameter gathering breaks the graph)."
            )
    if cfg.finetune.method == "qlora" and not resources(cfg, "finetune").gpus:
        # Checked here, not in the job: a QLoRA job without a GPU would fail only after it was scheduled.
        raise ConfigError(
            "finetune.method=qlora needs a GPU: set resources.finetune.gpus=1 (and a GPU partition), "
            "or use finetune=lora on CPU."
        )


# Which config sections each stage reads, and which stages' outputs it reads.
STAGES: dict[str, dict[str, list[str]]] = {
    "curate": {"sections": ["data"], "inputs": []},
    "tokenizer": {"sections": ["tokenizer", "seed"], "inputs": ["curate"]},
    "baseline": {"sections": ["baseline"], "inputs": ["curate", "tokenizer"]},
    "pretrain": {"sections": ["model", "train", "seed"], "inputs": ["tokenizer"]},
    "finetune": {"sections": ["finetune", "seed"], "inputs": ["curate", "tokenizer", "pretrain"]},
    "quantize": {"sections": ["quantize"], "inputs": ["finetune"]},
    "evaluate": {
        "sections": ["eval", "seed"],
        "inputs": ["curate", "tokenizer", "baseline", "pretrain", "finetune", "quantize"],
    },
    "card": {"sections": ["card"], "inputs": ["curate", "tokenizer", "pretrain", "finetune", "quantize", "evaluate"]},
}


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
        """The training processes of pretrain and finetune (one job of N tasks); 1 for the other stages."""
        if self.name == "pretrain":
            return self.config["train"]["processes"]
        if self.name == "finetune":
            return self.config["finetune"]["train"]["processes"]
        return 1


def plan(cfg: DictConfig) -> dict[str, Stage]:
    """The stages of one configuration, each keyed by its config and its inputs' keys."""
    full = OmegaConf.to_container(cfg, resolve=True)
    run = dict(full["run"])
    stages: dict[str, Stage] = {}
    for name, spec in STAGES.items():
        own = {section: full[section] for section in spec["sections"]}
        upstream = {dep: stages[dep].key for dep in spec["inputs"]}
        key = digest({"stage": name, "config": own, "inputs": upstream})
        stage_cfg = {"stage": name, "key": key, **own, "inputs": {dep: stages[dep].dir for dep in spec["inputs"]}}
        stage_cfg["run"] = {**run, "run_key": None, "checkpoint_dir": f"{run['results_dir']}/checkpoints/{name}/{key}"}
        stages[name] = Stage(name, key, stage_cfg, resources(cfg, name))
    run_key = stages["card"].key  # the card depends on everything: one key per configuration
    for stage in stages.values():
        stage.config["run"]["run_key"] = run_key
    return stages


def resources(cfg: DictConfig, stage: str) -> StageResources:
    node = cfg.resources.get(stage)
    return StageResources(**OmegaConf.to_container(node)) if node is not None else StageResources()
