"""Stage 5, tasks: every fine-tuning task of `finetune.data` read, checked and split into conversations.

A task is the built-in `docstring_to_name` (curate's docstring -> function name pairs, in curate's
leakage-checked document splits) or a dataset: a local .jsonl/.parquet file, a directory of
<split>.jsonl/.parquet files, or a Hub dataset (from the HF cache: compute nodes are offline). A row is a
conversation (`messages_field`: {role, content} messages, roles system/user/assistant, ending with the
assistant's answer) or a prompt/response pair, with the field names the task configures. A row that is
neither is broken: skipped, counted, and named (file:line) in the log and in tasks.json. Exact duplicate
conversations are dropped (a held-out copy of a training example would leak). A split the dataset does not
have is drawn from its train split by its fraction, seeded by `seed` and the task's name. A validation or
test example of a dataset task that shares a word n-gram with a pretraining document (curate's train split,
its decontamination settings) is dropped and counted: it was seen in pretraining.

The key hashes `finetune.data` and the seed only (and curate's key), so a sweep over fine-tuning settings
reads the tasks once.

Outputs:
  <task>/{train,validation,test}.parquet   id, messages (list of {role, content})
  tasks.json                               per task: name, source, description, licence, format, weight,
                                           length limit, each split's examples, bytes and origin, rows read,
                                           broken rows (the first named), duplicates and held-out
                                           examples dropped as seen in pretraining (leaked)

Readers for the stages after it: `examples(stage_dir, split)` and `describe(stage_dir)`.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
import zlib
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmforge import chat, curate, dedup, stage
from lmforge.schema import BUILTIN_TASK, FinetuneTaskConfig, StageConfig, stage_config

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SUFFIXES = (".jsonl", ".json", ".parquet")  # .json is JSON lines, as in curate
NAMED_BROKEN_ROWS = 10  # broken rows named in tasks.json; all are counted
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


# -- readers for the stages after this one ---------------------------------------------------------------


def examples(stage_dir: str, split: str, limit: int | None = None) -> dict[str, list[list[dict]]]:
    """Each task's conversations of one split, in `finetune.data`'s order: lists of {"role", "content"} whose
    last message is the assistant's answer. `limit`: at most that many per task."""
    return {
        task["name"]: pq.read_table(Path(stage_dir, task["name"], f"{split}.parquet"))
        .column("messages")
        .to_pylist()[:limit]
        for task in describe(stage_dir)
    }


def describe(stage_dir: str) -> list[dict]:
    """What each task is: name, builtin (the docstring_to_name task), source, description, license, format,
    weight, max_tokens, overlong, and per split (`splits`) its examples, bytes and origin; rows_read,
    broken_rows, broken_examples (the first, file:line and why), duplicates."""
    return json.loads(Path(stage_dir, "tasks.json").read_text())


def dataset_files(source: Path) -> dict[str, Path]:
    """The split files of a local dataset: a file is the train split; in a directory, each file's stem is a split."""
    if source.is_file():
        return {"train": source}
    return {path.stem: path for path in sorted(source.iterdir()) if path.suffix.lower() in SUFFIXES}


def is_local(source: str) -> bool:
    """A path (it exists, or looks like one), not a Hub name like `owner/name`."""
    return Path(source).exists() or source.startswith(("/", ".", "~")) or source.lower().endswith(SUFFIXES)


def hub_snapshot(name: str) -> Path:
    """A Hub dataset's files in the HF cache (`hf download --repo-type dataset NAME`), never downloaded here:
    compute nodes are offline. datasets reads its splits from the files' names, and subsets from its README."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, repo_type="dataset", local_files_only=True))


def source_problem(task: FinetuneTaskConfig) -> tuple[str, str] | None:
    """(the setting, why) when a dataset task cannot be read, as planning can tell; None when it can."""
    if not is_local(task.source):
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            path = hub_snapshot(task.source)
        except (LocalEntryNotFoundError, ValueError):  # ValueError: not a valid repository name
            return "source", (
                "not a local file or directory, and no Hub dataset of this name is in the HF cache: download it "
                f"where there is internet (hf download --repo-type dataset {task.source}), or give a path"
            )
        return None
    path = Path(task.source).expanduser()
    if not path.exists():
        return "source", "no such file or directory"
    if path.is_file() and path.suffix.lower() not in SUFFIXES:
        return "source", f"a {path.suffix or 'suffixless'} file; a dataset file is {', '.join(SUFFIXES)}"
    files = dataset_files(path)
    for setting in ("train_split", "validation_split", "test_split"):
        split = getattr(task, setting)
        if split is not None and split not in files:
            where = f"the file {path} is the train split only" if path.is_file() else f"{path} has {sorted(files)}"
            return setting, f"no such split ({where}; a directory's splits are its {'/'.join(SUFFIXES)} files' names)"
    return first_rows_problem(task, files[task.train_split])


def first_rows_problem(task: FinetuneTaskConfig, train_file: Path, rows: int = 20) -> tuple[str, str] | None:
    """A train split with no rows, or whose first rows are none of them a conversation of the task's format
    (wrong field names, say), would fail only in the tasks job, beside pretraining: planning reads a few."""
    read = read_parquet if train_file.suffix == ".parquet" else read_jsonl
    problems = []
    for _, row in islice(read(train_file), rows):
        try:
            if isinstance(row, Broken):
                raise row
            to_conversation(row, task)
            return None
        except Broken as err:
            problems.append(str(err))
    if not problems:
        return "source", f"the train split {train_file} has no rows"
    setting = {"chat": "messages_field", "prompt_response": "prompt_field"}.get(task.format, "format")
    kind = {"chat": "chat", "prompt_response": "prompt/response"}.get(task.format, "chat or prompt/response")
    return setting, f"none of the first {len(problems)} rows of {train_file} is a {kind} example: {problems[0]}"


# -- reading rows ----------------------------------------------------------------------------------------


class Broken(ValueError):
    """A row that is not a conversation of this task's format; the message says why."""


def read_jsonl(path: Path) -> Iterator[tuple[str, dict | Broken]]:
    """(file:line, row) per non-blank line; a line that is not UTF-8 JSON of an object is a Broken row."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                yield where, Broken(f"not UTF-8 JSON ({err})")
                continue
            yield where, row if isinstance(row, dict) else Broken(f"a JSON {type(row).__name__}, not an object")


def read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    parquet = pq.ParquetFile(path)
    number = 0
    for batch in parquet.iter_batches():
        for row in batch.to_pylist():
            yield f"{path}:row {number}", row
            number += 1


def read_split_rows(task: FinetuneTaskConfig, curated: str) -> dict[str, Iterator[tuple[str, dict | Broken]]]:
    """The rows of each split the source has, by split name."""
    if task.source == BUILTIN_TASK:
        return {split: read_parquet(Path(curated, "task", f"{split}.parquet")) for split in SPLITS}
    if is_local(task.source):
        files = dataset_files(Path(task.source).expanduser())
        return {
            split: (read_parquet if path.suffix == ".parquet" else read_jsonl)(path) for split, path in files.items()
        }
    import datasets

    loaded = datasets.load_dataset(str(hub_snapshot(task.source)), task.hub_config)
    return {
        split: ((f"{task.source}[{split}]:{i}", row) for i, row in enumerate(rows)) for split, rows in loaded.items()
    }


def text(row: dict, field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise Broken(f"{field!r} is {'missing' if field not in row else type(value).__name__}, not a string")
    return value


def row_format(row: dict, task: FinetuneTaskConfig) -> str:
    if task.format != "auto":
        return task.format
    return "chat" if task.messages_field in row else "prompt_response"


def to_conversation(row: dict, task: FinetuneTaskConfig) -> list[dict]:
    """A row as a checked conversation; Broken when it is not one of the task's format."""
    if row_format(row, task) == "prompt_response":
        prompt, response = text(row, task.prompt_field), text(row, task.response_field)
        if not response.strip():
            raise Broken(f"{task.response_field!r} is empty")
        return chat.conversation(prompt, response, task.system_prompt)
    messages = row.get(task.messages_field)
    if not isinstance(messages, list) or not messages:
        raise Broken(f"{task.messages_field!r} is not a list of messages")
    conversation = []
    for message in messages:
        if not isinstance(message, dict):
            raise Broken(f"a message is a {type(message).__name__}, not an object")
        role, content = text(message, task.role_field), text(message, task.content_field)
        if role not in chat.ROLES:
            raise Broken(f"role {role!r} is not one of {', '.join(chat.ROLES)}")
        conversation.append({"role": role, "content": content})
    roles = [m["role"] for m in conversation]
    if roles[-1] != "assistant" or not conversation[-1]["content"].strip():
        raise Broken("the last message is not a non-empty assistant message")
    if "user" not in roles[: roles.index("assistant")]:
        raise Broken("no user message before the first assistant message")
    return conversation


def size(conversations: list[list[dict]]) -> int:
    return sum(len(m["content"].encode()) for c in conversations for m in c)


# -- one task --------------------------------------------------------------------------------------------


def read_task(task: FinetuneTaskConfig, index: int, curated: str, seed: int) -> tuple[dict, dict]:
    """(split -> [(id, conversation)], the task's description and counts)."""
    key = f"finetune.data.{index}"
    rows_by_split = read_split_rows(task, curated)
    wanted = {"train": task.train_split, "validation": task.validation_split, "test": task.test_split}
    if task.source == BUILTIN_TASK:  # curate's pairs, in curate's splits
        task = dataclasses.replace(task, format="prompt_response", prompt_field="docstring", response_field="name")
        wanted = {split: split for split in SPLITS}
    for split, name in wanted.items():
        if name is not None and name not in rows_by_split:
            raise stage.StageError(
                f"'{key}.{split}_split={name}': {task.source} has no split {name!r}; its splits are {sorted(rows_by_split)}"
            )
        if name is None and split in rows_by_split:
            log.warning("%s has a %r split, but %s is drawn from train: set %s.%s_split=%s to use it",
                        task.source, split, split, key, split, split)  # fmt: skip

    counts = {"rows_read": 0, "broken_rows": 0, "duplicates": 0}
    named_broken, seen, formats = [], set(), Counter()
    splits: dict[str, list[tuple[str, list[dict]]]] = {}
    for split, name in wanted.items():
        splits[split] = []
        if name is None:
            continue
        for number, (where, row) in enumerate(rows_by_split[name]):
            if task.max_examples is not None and number >= task.max_examples:
                break
            counts["rows_read"] += 1
            try:
                if isinstance(row, Broken):
                    raise row
                conversation = to_conversation(row, task)
                formats[row_format(row, task)] += 1
            except Broken as err:
                counts["broken_rows"] += 1
                log.warning("skipping broken row %s: %s", where, err)
                if len(named_broken) < NAMED_BROKEN_ROWS:
                    named_broken.append(f"{where}: {err}")
                continue
            fingerprint = json.dumps(conversation, sort_keys=True)
            if fingerprint in seen:  # in reading order train, validation, test: a held-out copy goes
                counts["duplicates"] += 1
                continue
            seen.add(fingerprint)
            splits[split].append((where, conversation))

    origins = draw_missing_splits(task, splits, seed)
    if not splits["train"]:
        raise stage.StageError(
            f"'{key}' ({task.name}, {task.source}) has no training examples: {counts['rows_read']} rows read, "
            f"{counts['broken_rows']} broken{': ' + named_broken[0] if named_broken else ''}. Check its format and "
            f"field names ({key}.format, .messages_field, .prompt_field, .response_field), or remove it from finetune.data"
        )
    for split in ("validation", "test"):
        if not splits[split]:
            log.warning("task %s has no %s examples", task.name, split)
    description = {
        "name": task.name,
        "builtin": task.source == BUILTIN_TASK,
        "source": task.source,
        "description": task.description,
        "license": task.license,
        "format": ", ".join(sorted(formats)),  # as the rows were read
        "weight": task.weight,
        "max_tokens": task.max_tokens,
        "overlong": task.overlong,
        "splits": {
            split: {"examples": len(rows), "bytes": size([c for _, c in rows]), "origin": origins[split]}
            for split, rows in splits.items()
        },
        **counts,
        "broken_examples": named_broken,
    }
    return splits, description


def draw_missing_splits(task: FinetuneTaskConfig, splits: dict, seed: int) -> dict[str, str]:
    """Validation and test examples drawn from train where the dataset has no such split; where each came from."""
    if task.source == BUILTIN_TASK:
        return {split: "curate's document split (held-out pairs leakage-checked)" for split in SPLITS}
    origins = {"train": f"the dataset's {task.train_split!r} split"}
    drawn = {}
    for split, name, share in (
        ("test", task.test_split, task.test_fraction),
        ("validation", task.validation_split, task.validation_fraction),
    ):
        if name is not None:
            origins[split] = f"the dataset's {name!r} split"
        else:
            drawn[split] = share
            origins[split] = f"{share:.0%} of the train split, drawn with seed {seed}"
    if drawn:
        train = splits["train"]
        rng = np.random.default_rng([seed, zlib.crc32(task.name.encode())])
        order = rng.permutation(len(train))
        start = 0
        for split, share in drawn.items():
            count = int(round(share * len(train)))
            splits[split] = [train[i] for i in sorted(order[start : start + count])]
            start += count
        splits["train"] = [train[i] for i in sorted(order[start:])]
        origins["train"] += " less the drawn examples" if start else ""
    return origins


def write_split(path: Path, rows: list[tuple[str, list[dict]]]) -> None:
    table = pa.table(
        {
            "id": pa.array([where for where, _ in rows], pa.string()),
            "messages": pa.array([c for _, c in rows], MESSAGES),
        }
    )
    pq.write_table(table, path)


def builtin_description(curated: str) -> tuple[str, str, str]:
    """(source, description, licence) of the built-in task: the curated corpus's."""
    manifest = stage.manifest(curated)
    data = stage_config(manifest["config"]).data
    stats = json.loads(Path(curated, "stats.json").read_text())
    source = f"built-in: docstring -> function name from the corpus {data.name}"
    return source, " ".join(curate.task_description(data.task, stats).split()), data.license


def drop_leaked(read: list[tuple[FinetuneTaskConfig, dict, dict]], curated: str) -> None:
    """Drop the dataset tasks' validation and test examples that share a word n-gram with a pretraining document.

    The other direction from curate's decontamination, which drops training documents: dropping them here
    would make the pretraining corpus, and every stage after it, depend on the fine-tuning data, so a sweep
    over tasks would pretrain again. Either way no held-out example was seen in training. An n-gram that more
    than `data.decontamination.max_documents` pretraining documents hold is boilerplate, as in curate. The
    built-in task's held-out pairs are curate's own decontamination's."""
    settings = stage_config(stage.manifest(curated)["config"]).data.decontamination
    held_out = [  # the turns, not the system prompt that every example of a task may share
        (description, split, position, " ".join(m["content"] for m in conversation if m["role"] != "system"))
        for task, splits, description in read
        if task.source != BUILTIN_TASK
        for split in ("validation", "test")
        for position, (_, conversation) in enumerate(splits[split])
    ]
    for *_, description in read:
        description["leaked"] = {"validation": 0, "test": 0}
    if not settings.enabled or not held_out:
        return
    index = dedup.NgramIndex(settings.ngram)
    for *_, text in held_out:
        index.add(text)
    index.freeze()
    batches = pq.ParquetFile(Path(curated, "data", "train.parquet")).iter_batches(columns=["text"])
    documents = index.documents_holding(text for batch in batches for text in batch.column("text").to_pylist())
    limit = settings.max_documents if settings.max_documents is not None else np.inf
    counts = (documents > 0) & (documents <= limit)
    leaked = [(d, split, position) for d, split, position, text in held_out if counts[index.found(text)].any()]
    for task, splits, description in read:
        for split in ("validation", "test"):
            gone = {position for d, s, position in leaked if d is description and s == split}
            description["leaked"][split] = len(gone)
            if gone:
                log.warning("task %s: %d %s examples share a %d-word n-gram with a pretraining document: dropped",
                            task.name, len(gone), split, settings.ngram)  # fmt: skip
                splits[split] = [row for i, row in enumerate(splits[split]) if i not in gone]
                description["splits"][split]["examples"] = len(splits[split])
                description["splits"][split]["bytes"] = size([c for _, c in splits[split]])


def main(cfg: StageConfig, out: Path, tracker) -> dict:
    described, metrics, read = [], {}, []
    for index, task in enumerate(cfg.finetune.data):
        splits, description = read_task(task, index, cfg.inputs.get("curate"), cfg.seed)
        if task.source == BUILTIN_TASK:
            description["source"], builtin_text, description["license"] = builtin_description(cfg.inputs["curate"])
            description["description"] = task.description or builtin_text
        read.append((task, splits, description))
    drop_leaked(read, cfg.inputs["curate"])
    for task, splits, description in read:
        (out / task.name).mkdir()
        for split in SPLITS:
            write_split(out / task.name / f"{split}.parquet", splits[split])
            metrics[f"{task.name}.{split}_examples"] = len(splits[split])
        metrics[f"{task.name}.broken_rows"] = description["broken_rows"]
        metrics[f"{task.name}.duplicates"] = description["duplicates"]
        metrics[f"{task.name}.leaked"] = sum(description["leaked"].values())
        described.append(description)
        log.info(
            "task %s (%s): %s examples, %d broken rows, %d duplicates",
            task.name,
            description["source"],
            "/".join(str(description["splits"][s]["examples"]) for s in SPLITS),
            description["broken_rows"],
            description["duplicates"],
        )
    stage.write_json(out / "tasks.json", described)
    tracker.log_artifacts([out / "tasks.json"])
    return metrics


if __name__ == "__main__":
    stage.run(main)
