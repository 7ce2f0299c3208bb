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
import dataclasses
import difflib
import hashlib
import json
import re
import string
import typing
from collections.abc import Callable, Sequence
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


# -- valid values: each setting that has a range or a set of choices says so where it is declared ------------


@dataclass(frozen=True)
class Check:
    """What a valid value is, in words for the error message, and as a test."""

    says: str
    holds: Callable[[Any], bool]


def setting(default: Any, check: Check) -> Any:
    """A schema field whose value must pass `check` (None passes: it means "not set")."""
    return field(default=default, metadata={"check": check})


def at_least(low: float) -> Check:
    return Check(f">= {low}", lambda v: v >= low)


def above(low: float) -> Check:
    return Check(f"> {low}", lambda v: v > low)


def fraction(upper_open: bool = True) -> Check:
    return Check("in [0, 1)", lambda v: 0 <= v < 1) if upper_open else Check("in [0, 1]", lambda v: 0 <= v <= 1)


def one_of(*choices: Any) -> Check:
    return Check(f"one of {', '.join(map(str, choices))}", lambda v: v in choices)


def matches(pattern: str, says: str) -> Check:
    compiled = re.compile(pattern)
    return Check(says, lambda v: compiled.fullmatch(v) is not None)


# Names that become directories, MLflow experiments and Slurm arguments: no shell or wildcard characters.
NAME = matches(r"(?!\.{1,2}$)[A-Za-z0-9._-]+", "letters, digits and . _ - only (a file name)")
PATH = matches(r"(?!-)[A-Za-z0-9._/+,@=:-]+", "a path of letters, digits and . _ / + , @ = : - only")
PARTITIONS = matches(r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*", "Slurm partition names, comma-separated")


@dataclass
class TaskConfig:
    min_docstring_words: int = setting(5, at_least(1))
    max_docstring_chars: int = setting(400, at_least(1))


@dataclass
class DataConfig:
    name: str = MISSING
    # "stdlib", a local .jsonl/.parquet/.txt file or directory, or a Hub dataset name.
    source: str = MISSING
    text_field: str = "text"
    license: str = MISSING
    normalization: str = setting("NFC", one_of("NFC", "NFD", "NFKC", "NFKD"))
    min_chars: int = setting(64, at_least(0))
    max_chars: int = setting(200_000, at_least(1))
    max_documents: int | None = setting(None, at_least(1))
    validation_fraction: float = setting(0.05, fraction())
    test_fraction: float = setting(0.1, fraction())
    task: TaskConfig = field(default_factory=TaskConfig)


# Byte-level BPE starts from the 256 byte tokens and 4 special tokens: a smaller vocabulary cannot exist.
MIN_VOCAB_SIZE = 256 + 4 + 1


@dataclass
class TokenizerConfig:
    vocab_size: int = setting(4096, at_least(MIN_VOCAB_SIZE))
    min_frequency: int = setting(2, at_least(1))
    chat_template: str = MISSING


@dataclass
class BaselineConfig:
    order: int = setting(2, at_least(1))
    discount: float = setting(0.75, Check("in (0, 1)", lambda v: 0 < v < 1))


@dataclass
class ModelConfig:
    name: str = MISSING
    architecture: str = setting("llama", one_of("llama", "gpt2"))
    hidden_size: int = setting(128, at_least(1))
    intermediate_size: int = setting(384, at_least(1))
    num_layers: int = setting(4, at_least(1))
    num_heads: int = setting(4, at_least(1))
    num_kv_heads: int = setting(4, at_least(1))
    max_seq_len: int = setting(256, at_least(2))


@dataclass
class TrainConfig:
    steps: int = setting(300, at_least(1))
    micro_batch_size: int = setting(16, at_least(1))
    grad_accum: int = setting(1, at_least(1))
    lr: float = setting(3e-3, above(0))
    min_lr_ratio: float = setting(0.1, fraction(upper_open=False))
    warmup_steps: int = setting(30, at_least(0))
    weight_decay: float = setting(0.1, at_least(0))
    grad_clip: float = setting(1.0, above(0))
    zero_stage: int = setting(0, one_of(0, 1, 2, 3))
    # fp32 | bf16 (DeepSpeed's: bf16 weights and gradients, fp32 master weights)
    precision: str = setting("fp32", one_of("fp32", "bf16"))
    eval_every: int = setting(100, at_least(1))
    eval_batches: int = setting(8, at_least(1))
    checkpoint_every: int = setting(100, at_least(1))
    processes: int = setting(1, at_least(1))
    # To CPU memory: the optimizer (ZeRO 1-3), or the optimizer and the parameters (ZeRO 3)
    offload: str = setting("none", one_of("none", "optimizer", "optimizer+parameters"))
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile the model; minutes of compilation at the start
    attention: str = setting("sdpa", one_of("sdpa", "eager", "flash_attention_2"))  # flash: the flash-attn package
    peak_tflops: float | None = setting(None, above(0))  # a device's bf16 peak, for MFU; None: from the GPU's name


@dataclass
class LoraConfig:
    r: int = setting(16, at_least(1))
    alpha: int = setting(32, at_least(1))
    dropout: float = setting(0.0, fraction())
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class FinetuneConfig:
    method: str = setting("full", one_of("full", "lora", "qlora"))
    base: str = "pretrain"  # `pretrain` (this pipeline's model) or a Hugging Face model name or local path
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class QuantizeConfig:
    method: str = setting("int8_weight_only", one_of("int8_weight_only", "none"))


@dataclass
class SamplingConfig:
    temperature: float = setting(0.8, above(0))
    top_k: int = setting(50, at_least(0))  # 0: no top-k cut
    top_p: float = setting(0.95, Check("in (0, 1]", lambda v: 0 < v <= 1))


@dataclass
class EvalConfig:
    max_new_tokens: int = setting(16, at_least(1))
    few_shot: int = setting(3, at_least(0))
    max_task_examples: int | None = setting(None, at_least(1))
    max_test_documents: int | None = setting(None, at_least(1))
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
    cpus: int = setting(1, at_least(1))
    mem_mb: int = setting(4000, at_least(1))
    runtime: int = setting(60, at_least(1))  # minutes, per attempt
    # Per node; training stages run one process per GPU (train.processes = gpus x nodes)
    gpus: int = setting(0, at_least(0))
    nodes: int = setting(1, at_least(1))
    partition: str | None = setting(None, PARTITIONS)
    # Training stages: Slurm sends SIGURG this many seconds before the walltime; the loop checkpoints and exits.
    signal_before_end_s: int | None = setting(None, at_least(1))


@dataclass
class RunConfig:
    """Where and under what name a run is recorded. Not part of any stage hash."""

    results_dir: str = setting("results", PATH)
    experiment: str = setting("lmforge", NAME)
    mlflow_uri: str | None = None  # default: sqlite in results_dir; MLFLOW_TRACKING_URI overrides
    wandb: bool = False
    sweep: str | None = setting(None, NAME)  # the id of this configuration's sweep; set by the sweep expansion


@dataclass
class Config:
    seed: int = setting(1234, at_least(0))
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


def unparsable(err: OverrideParseException, overrides: list[str], parser) -> str:
    """Hydra's parse error, with the override and its key named and how to quote a value."""

    def parses(override: str) -> bool:
        try:
            parser.parse_overrides([override])
        except OverrideParseException:
            return False
        return True

    bad = next((o for o in overrides if not parses(o)), None)
    if bad is None:
        return str(err)
    key = bad.split("=", 1)[0]
    return (
        f"Cannot parse the override {bad!r} (key '{key}'). A value with spaces or any of ;$()`'\"#[]{{}},= "
        f"goes in quotes: {key}='...' (a quote inside a quoted value is escaped with a backslash). "
        f"Hydra said: {str(err).splitlines()[0]}"
    )


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
    except OverrideParseException as err:
        raise ConfigError(unparsable(err, overrides, parser)) from None
    except (ConfigCompositionException, OmegaConfBaseException) as err:
        raise ConfigError(_explain(err.__cause__ or err, overrides)) from None
    for stage in cfg.resources:
        if stage not in STAGES:
            raise ConfigError(f"Unknown stage 'resources.{stage}'. Valid stages: {', '.join(STAGES)}.")
    check_values(cfg, Config)
    check_consistency(cfg)
    return cfg


def check_values(node: DictConfig, schema: type, prefix: str = "") -> None:
    """Every value against its field's Check, with the key's path in the message."""
    types = typing.get_type_hints(schema)
    for spec in dataclasses.fields(schema):
        key, value = f"{prefix}{spec.name}", node[spec.name]
        check = spec.metadata.get("check")
        if check is not None and value is not None and not check.holds(value):
            raise ConfigError(f"Invalid value {value!r} for '{key}': must be {check.says}.")
        if dataclasses.is_dataclass(types[spec.name]):
            check_values(value, types[spec.name], f"{key}.")
        elif spec.name == "resources":
            for stage, stage_resources in value.items():
                check_values(stage_resources, StageResources, f"{key}.{stage}.")


def template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def check_consistency(cfg: DictConfig) -> None:
    """Settings that are valid alone but not together."""
    model = cfg.model
    if model.hidden_size % model.num_heads:
        raise ConfigError(f"'model.num_heads={model.num_heads}' must divide 'model.hidden_size={model.hidden_size}'.")
    if model.num_heads % model.num_kv_heads:
        raise ConfigError(f"'model.num_kv_heads={model.num_kv_heads}' must divide 'model.num_heads={model.num_heads}'.")
    if model.architecture == "gpt2" and model.num_kv_heads != model.num_heads:
        raise ConfigError("'model.architecture=gpt2' has no grouped-query attention: set model.num_kv_heads=num_heads.")
    data = cfg.data
    if data.validation_fraction + data.test_fraction >= 1:
        raise ConfigError(
            f"'data.validation_fraction' + 'data.test_fraction' = {data.validation_fraction + data.test_fraction:g} "
            "leaves no training data: their sum must be < 1."
        )
    if data.min_chars > data.max_chars:
        raise ConfigError(f"'data.min_chars={data.min_chars}' is above 'data.max_chars={data.max_chars}'.")
    for key, allowed in (("eval.prompt_template", {"docstring"}), ("eval.shot_template", {"docstring", "name"})):
        try:
            unknown = template_fields(OmegaConf.select(cfg, key)) - allowed
        except ValueError as err:  # an unmatched brace
            raise ConfigError(
                f"'{key}' is not a valid format string ({err}); write a literal brace as {{{{ or }}}}."
            ) from None
        if unknown:
            raise ConfigError(
                f"'{key}' has unknown fields {sorted(unknown)}; it may use {sorted(allowed)} "
                "(write a literal brace as {{ or }})."
            )
    for name, spec in STAGES.items():
        if spec.train is None:
            continue
        tcfg = OmegaConf.select(cfg, spec.train)
        needs = {"optimizer": 1, "optimizer+parameters": 3}.get(tcfg.offload, 0)
        if tcfg.zero_stage < needs:
            raise ConfigError(f"'{spec.train}.offload={tcfg.offload}' needs '{spec.train}.zero_stage' >= {needs}.")
        stage_resources = resources(cfg, name)
        gpus = stage_resources.gpus * stage_resources.nodes
        if gpus and tcfg.processes != gpus:
            raise ConfigError(
                f"'{spec.train}.processes={tcfg.processes}' but the stage asks Slurm for {gpus} GPUs "
                f"({stage_resources.gpus} per node x {stage_resources.nodes} nodes): training runs one process per GPU."
            )
        if tcfg.compile and tcfg.zero_stage == 3:
            raise ConfigError(
                f"'{spec.train}.compile=true' is not supported with ZeRO-3 (its parameter gathering breaks the graph)."
            )
    if cfg.finetune.method == "qlora" and not resources(cfg, "finetune").gpus:
        # Checked here, not in the job: a QLoRA job without a GPU would fail only after it was scheduled.
        raise ConfigError(
            "finetune.method=qlora needs a GPU: set resources.finetune.gpus=1 (and a GPU partition), "
            "or use finetune=lora on CPU."
        )


@dataclass(frozen=True)
class StageSpec:
    """One stage of the pipeline: the module `lmforge.<name>` and what its key depends on."""

    sections: tuple[str, ...] = ()  # config sections the stage reads: hashed into its key, handed to it
    inputs: tuple[str, ...] = ()  # stages whose outputs it reads
    train: str | None = None  # its training section, for training stages: processes, GPUs, ZeRO
    per_sweep: bool = False  # one job for a whole sweep (lmforge.sweep plans it), not one per configuration


# The registry: the Snakemake rules, the stage keys, and the checks above are made from it.
STAGES: dict[str, StageSpec] = {
    "curate": StageSpec(sections=("data",)),
    "tokenizer": StageSpec(sections=("tokenizer", "seed"), inputs=("curate",)),
    "baseline": StageSpec(sections=("baseline",), inputs=("curate", "tokenizer")),
    "pretrain": StageSpec(sections=("model", "train", "seed"), inputs=("tokenizer",), train="train"),
    "finetune": StageSpec(
        sections=("finetune", "seed"), inputs=("curate", "tokenizer", "pretrain"), train="finetune.train"
    ),
    "quantize": StageSpec(sections=("quantize",), inputs=("finetune",)),
    "evaluate": StageSpec(
        sections=("eval", "seed"), inputs=("curate", "tokenizer", "baseline", "pretrain", "finetune", "quantize")
    ),
    "card": StageSpec(
        sections=("card",), inputs=("curate", "tokenizer", "pretrain", "finetune", "quantize", "evaluate")
    ),
    "scaling": StageSpec(inputs=("pretrain",), per_sweep=True),
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
        """The training processes of a training stage (one job of N tasks); 1 for the other stages."""
        train = STAGES[self.name].train
        if train is None:
            return 1
        section = self.config
        for part in train.split("."):
            section = section[part]
        return section["processes"]


def plan(cfg: DictConfig) -> dict[str, Stage]:
    """The stages of one configuration, each keyed by its config and its inputs' keys."""
    full = OmegaConf.to_container(cfg, resolve=True)
    run = dict(full["run"])
    stages: dict[str, Stage] = {}
    for name, spec in STAGES.items():
        if spec.per_sweep:
            continue
        own = {section: full[section] for section in spec.sections}
        upstream = {dep: stages[dep].key for dep in spec.inputs}
        key = digest({"stage": name, "config": own, "inputs": upstream})
        stage_cfg = {"stage": name, "key": key, **own, "inputs": {dep: stages[dep].dir for dep in spec.inputs}}
        stage_cfg["run"] = {**run, "run_key": None, "checkpoint_dir": f"{run['results_dir']}/checkpoints/{name}/{key}"}
        stages[name] = Stage(name, key, stage_cfg, resources(cfg, name))
    run_key = stages["card"].key  # the card depends on everything: one key per configuration
    for stage in stages.values():
        stage.config["run"]["run_key"] = run_key
    return stages


def resources(cfg: DictConfig, stage: str) -> StageResources:
    node = cfg.resources.get(stage)
    return StageResources(**OmegaConf.to_container(node)) if node is not None else StageResources()


# -- `lmforge config` ---------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="Hydra overrides, sweeps included")
    parser.add_argument("--stages", action="store_true", help="also list each stage's key and directory")
    parser.add_argument(
        "--write-stage-configs",
        action="store_true",
        help="write every stage's resolved config under <run.results_dir>/configs, as a run does when it starts",
    )


def main(args) -> int:
    import sys

    import yaml

    from lmforge import sweep, workflow

    try:
        _, grid = sweep.expand(args.overrides)
        cfgs = load_many(grid)
        planned = sweep.plan(args.overrides) if args.write_stage_configs else None
    except ConfigError as err:
        print(f"lmforge config: {err}", file=sys.stderr)
        return 2
    for number, (cfg, overrides) in enumerate(zip(cfgs, grid), 1):
        if number > 1:
            print("---")
        if len(cfgs) > 1:
            print(f"# configuration {number} of {len(cfgs)}: {' '.join(overrides)}")
        print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        if args.stages:
            stages = {name: stage.dir for name, stage in plan(cfg).items()}
            print(yaml.safe_dump({"stages": stages}, sort_keys=False), end="")
    if planned is not None:
        workflow.write_stage_configs(planned, planned.results_dir)
        print(f"# stage configs written under {planned.results_dir}/configs", file=sys.stderr)
    return 0
