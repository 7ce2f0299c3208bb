"""lm-evaluation-harness as a library: the evaluate stage's models on the harness's tasks (`eval.harness`).

A task is one the package ships (src/lmforge/harness_tasks/: the built-in task as multiple choice and as
generation, on the curate stage's task split, so they run offline), one of the harness's own by name (their
data from the Hugging Face cache), or the path of a task YAML file. Every model is scored through `HFLM`
wrapping the already loaded model and tokenizer; models after fine-tuning are prompted in their chat template,
as they were trained.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from lmforge.schema import HarnessConfig
from lmforge.stage import StageError

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).parent / "harness_tasks"
SHIPPED = {path.stem: path for path in sorted(SHIPPED_DIR.glob("*.yaml"))}


def is_task_file(task: str) -> bool:
    return task.endswith((".yaml", ".yml"))


def task_specs(harness_cfg: HarnessConfig, task_splits: dict[str, str] | None) -> dict:
    """What TaskManager.load takes for each configured task: a shipped task's config with the curated split
    files filled in (None without test pairs: nothing to score), a user's file path or a harness task name."""
    specs = {}
    for task in harness_cfg.tasks:
        if task in SHIPPED:
            spec = load_yaml(SHIPPED[task], resolve_func=True) if task_splits else None  # resolves process_docs
            if spec:
                spec["dataset_kwargs"] = {"data_files": task_splits}
            specs[task] = spec
        else:
            specs[task] = str(Path(task).resolve()) if is_task_file(task) else task
    return specs


def task_manager(harness_cfg: HarnessConfig) -> TaskManager:
    """Indexing the harness's own 14,000 task configs takes seconds: only when a configured task needs them."""
    needs_harness_tasks = any(task not in SHIPPED and not is_task_file(task) for task in harness_cfg.tasks)
    return TaskManager(include_path=str(SHIPPED_DIR), include_defaults=needs_harness_tasks)


def scores(task_results: dict) -> dict:
    """{"acc,none": 0.25, "acc_stderr,none": 0.04, ...} -> {"acc": 0.25, "acc_stderr": 0.04}; a filter other
    than "none" stays in the name (exact_match_stderr,first_identifier -> exact_match_first_identifier_stderr);
    a standard error the harness could not compute ("N/A") is None."""
    found = {}
    for key, value in task_results.items():
        if "," not in key:  # alias, sample counts
            continue
        metric, filter_name = key.split(",", 1)
        base = metric.removesuffix("_stderr")
        name = (base if filter_name == "none" else f"{base}_{filter_name}") + metric[len(base) :]
        found[name] = value if isinstance(value, (int, float)) and math.isfinite(value) else None
    return found


def evaluate(model, tokenizer, harness_cfg: HarnessConfig, manager: TaskManager, specs: dict, chat: bool, seed: int):
    """Each task's metrics with their standard errors, and its number of examples: {task: {metric: value}};
    None for a shipped task without test pairs (a score over no examples is not 0)."""
    results = {task: None for task, spec in specs.items() if spec is None}
    if len(results) == len(specs):
        return results
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=harness_cfg.batch_size,
        max_length=model.config.max_position_embeddings,
    )
    try:
        output = simple_evaluate(
            model=lm,
            tasks=[spec for spec in specs.values() if spec is not None],
            task_manager=manager,
            num_fewshot=harness_cfg.num_fewshot,
            limit=harness_cfg.limit,
            apply_chat_template=chat,
            fewshot_as_multiturn=chat,
            bootstrap_iters=1000,  # for metrics without a closed-form standard error
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except KeyError as err:  # an unknown task name
        raise StageError(f"eval.harness.tasks: {err.args[0]}") from None
    for task, task_results in output["results"].items():
        results[task] = {**scores(task_results), "examples": output["n-samples"][task]["effective"]}
        log.info("harness %s: %s", task, results[task])
    return results
