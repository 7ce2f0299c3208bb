"""Hydra composition and validation: conf/ plus overrides, checked against lmforge.schema.

Hydra merges every group file into the typed schema, so a misspelt key or a value of the wrong type fails at
composition time; then every value is checked against its declared range or choices, and settings that do not
fit together are refused. This happens when Snakemake plans the DAG, before any job is submitted, and every
message names the key to change.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import string
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmforge import hydra_api, plan
from lmforge.plan import STAGES, resources
from lmforge.schema import BUILTIN_TASK, Config, StageResources

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# The default corpus's name and licence (conf/data/stdlib.yaml), which another data.source must not keep.
STDLIB_DATA = {"name": "python-stdlib", "license": "PSF-2.0"}


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
        hydra_api.apply_overrides(values, cfg)
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
        elif typing.get_origin(types[spec.name]) is list:
            [item_type] = typing.get_args(types[spec.name])
            for index, item in enumerate(value if dataclasses.is_dataclass(item_type) else ()):  # finetune.data
                check_values(item, item_type, f"{key}.{index}.")
        elif spec.name == "resources":
            for stage, stage_resources in value.items():
                check_values(stage_resources, StageResources, f"{key}.{stage}.")


def template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def check_source(data: DictConfig) -> None:
    """What a curation job would fail to read fails here: a missing path, an uncached Hub dataset, a missing file."""
    from lmforge import sources  # pyarrow: only when a config is checked

    if data.source != "stdlib" and not Path(data.source).expanduser().exists():
        where = Path(data.source).expanduser().absolute()
        if sources.is_local(data.source):
            raise ConfigError(f"'data.source={data.source}': no such file or directory ({where}).")
        if sources.cached_hub_dataset(data.source) is None:
            raise ConfigError(
                f"'data.source={data.source}' is neither a local path ({where} does not exist) nor a Hub dataset "
                f"in the HF datasets cache {sources.hub_cache_dir()}: jobs read the Hub offline, so load it once "
                "where there is internet (datasets.load_dataset(name), same HF_HOME), or give the path of its files."
            )
    if data.filters.language.enabled and not (
        data.filters.language.model_path and Path(data.filters.language.model_path).is_file()
    ):
        raise ConfigError(
            f"'data.filters.language.enabled=true' needs a fastText language-ID model file: "
            f"'data.filters.language.model_path={data.filters.language.model_path}' is not one (lmforge does not "
            "download lid.176.bin)."
        )
    for path in data.decontaminate_against:
        if not Path(path).is_file():
            raise ConfigError(f"'data.decontaminate_against' names {path}, which is not a file.")


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
    if data.source != "stdlib":
        # Else the datasheet and card would credit another corpus to the standard library, under its licence.
        kept = [key for key, value in STDLIB_DATA.items() if data[key] == value]
        if kept:
            stdlib_values = " and ".join(f"'data.{key}={STDLIB_DATA[key]}'" for key in kept)
            raise ConfigError(
                f"'data.source={data.source}' is not the standard library, but {stdlib_values} {'are' if len(kept) > 1 else 'is'} "
                f"still the standard library's: set {' '.join(f'data.{key}=...' for key in kept)} to this corpus's."
            )
    check_source(data)
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
        warning_s = stage_resources.signal_before_end_s
        if warning_s and warning_s >= stage_resources.runtime * 60 / 2:
            # The warning would come before the job had trained: it would checkpoint, requeue, and train nothing.
            raise ConfigError(
                f"'resources.{name}.signal_before_end_s={warning_s}' leaves less than half of "
                f"'resources.{name}.runtime={stage_resources.runtime}' minutes to train before the walltime warning: "
                "lower it or raise the runtime."
            )
        if tcfg.compile and tcfg.zero_stage == 3:
            raise ConfigError(
                f"'{spec.train}.compile=true' is not supported with ZeRO-3 (its parameter gathering breaks the graph)."
            )
    check_finetune_data(cfg)
    if cfg.finetune.method == "qlora" and not resources(cfg, "finetune").gpus:
        # Checked here, not in the job: a QLoRA job without a GPU would fail only after it was scheduled.
        raise ConfigError(
            "finetune.method=qlora needs a GPU: set resources.finetune.gpus=1 (and a GPU partition), "
            "or use finetune=lora on CPU."
        )


def check_finetune_data(cfg: DictConfig) -> None:
    """Each fine-tuning task: its own name, a licence, a source and splits there to read, training data left."""
    names = set()
    for index, task in enumerate(cfg.finetune.data):
        key = f"finetune.data.{index}"
        if task.name in names:
            raise ConfigError(f"'{key}.name={task.name}': an earlier task has this name; each task needs its own.")
        names.add(task.name)
        if task.max_tokens is not None and cfg.finetune.base == "pretrain" and task.max_tokens > cfg.model.max_seq_len:
            raise ConfigError(
                f"'{key}.max_tokens={task.max_tokens}' is above the model's context, "
                f"'model.max_seq_len={cfg.model.max_seq_len}'."
            )
        if task.source == BUILTIN_TASK:
            continue
        if task.license is None:
            raise ConfigError(
                f"'{key}.license' is not set for the dataset {task.source}: its licence goes on the card and the "
                f"datasheet (e.g. {key}.license=cc-by-4.0)."
            )
        drawn = [f"{key}.{split}_fraction" for split in ("validation", "test") if task[f"{split}_split"] is None]
        if sum(task[k.rsplit(".", 1)[1]] for k in drawn) >= 1:
            raise ConfigError(
                f"{' + '.join(repr(k) for k in drawn)} leave no training examples: their sum must be < 1."
            )
        from lmforge import tasks  # the stage's own reading of a source, imported only for a dataset task

        problem = tasks.source_problem(OmegaConf.to_object(task))
        if problem is not None:
            setting, message = problem
            raise ConfigError(f"'{key}.{setting}={task[setting]}': {message}.")


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
            stages = {name: stage.dir for name, stage in plan.stages(cfg).items()}
            print(yaml.safe_dump({"stages": stages}, sort_keys=False), end="")
    if planned is not None:
        workflow.write_stage_configs(planned, planned.results_dir)
        print(f"# stage configs written under {planned.results_dir}/configs", file=sys.stderr)
    return 0
