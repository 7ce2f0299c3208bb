"""The GPU recipe (conf/recipe/smollm2_lora.yaml) and its chat set (benchmarks/stdlib_chat_tasks.py)."""

import importlib.util
import json
from collections import Counter
from pathlib import Path

from lmforge import config, plan, tasks
from lmforge.schema import FinetuneTaskConfig

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("stdlib_chat_tasks", REPO / "benchmarks/stdlib_chat_tasks.py")
chat_tasks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(chat_tasks)

SOURCE = '''
def parse_header(line, strict=False):
    """Split one header line into its name and value.

    Longer description that is not part of the summary.
    """
    name, _, value = line.partition(":")
    return name.strip(), value.strip()


class Registry:
    """Keep named handlers and look them up by name."""

    def add(self, name, handler):
        """Register the handler under the given name."""
        self.handlers[name] = handler


def abstract_hook(event):
    """Called for every event that subclasses handle."""
    pass


def _private(x):
    """A private helper that is never a conversation."""
    return x
'''


def test_conversations_are_code_without_docstrings_to_the_first_sentence():
    rows = list(chat_tasks.conversations("mod.py", SOURCE, Counter()))
    by_summary = {row["messages"][1]["content"]: row for row in rows}
    # abstract_hook has nothing but its docstring and `pass`; _private is private
    assert set(by_summary) == {
        "Split one header line into its name and value.",
        "Keep named handlers and look them up by name.",
        "Register the handler under the given name.",
    }
    function = by_summary["Split one header line into its name and value."]
    user = function["messages"][0]["content"]
    assert user.startswith("Summarize in one sentence what this Python function does.")
    assert "def parse_header(line, strict=False):" in user and "partition" in user
    assert '"""' not in user and "Longer description" not in user
    cls = by_summary["Keep named handlers and look them up by name."]
    assert cls["kind"] == "class" and "def add(self, name, handler):" in cls["messages"][0]["content"]
    assert "Register the handler" not in cls["messages"][0]["content"]  # the methods' docstrings go too
    assert function["source"] == "mod.py:2"


def test_recipe_plans_lora_on_smollm2_with_the_builtin_task_and_the_chat_set(tmp_path):
    chat_dir = tmp_path / "stdlib_chat"
    chat_dir.mkdir()
    rows = list(chat_tasks.conversations("mod.py", SOURCE, Counter()))
    for split in ("train", "validation", "test"):
        (chat_dir / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = config.load(["+recipe=smollm2_lora", f"run.results_dir={tmp_path}"])
    assert cfg.finetune.method == "lora" and cfg.finetune.base == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert [task.name for task in cfg.finetune.data] == ["docstring_to_name", "stdlib_summaries"]
    assert cfg.finetune.train.precision == "bf16" and cfg.resources.finetune.gpus == 1
    assert list(cfg.eval.harness.tasks) == ["lmforge_docstring_to_name_choice", "lmforge_docstring_to_name_generate"]
    assert {"tasks", "finetune", "quantize", "evaluate", "card"} <= set(plan.stages(cfg))
    # the tasks stage reads the set as chat, with its own splits
    task = FinetuneTaskConfig(**{k: v for k, v in cfg.finetune.data[1].items()})
    splits, description = tasks.read_task(task, 1, None, cfg.seed)
    assert description["format"] == "chat" and description["broken_rows"] == 0
    assert {split: len(examples) for split, examples in splits.items()} == {
        "train": 3,
        "validation": 0,  # the same conversations: held-out copies of training examples are dropped
        "test": 0,
    }
