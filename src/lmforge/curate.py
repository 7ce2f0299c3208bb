"""Stage 1, curation: corpus -> normalized, filtered, deduplicated, split documents.

Also builds the default fine-tuning task from the same documents, docstring ->
function name, split by the documents' split so that no text of a test file is
ever in the training data, and checks the test pairs for leakage into training.

Outputs (Parquet, readable with `datasets.load_dataset("parquet", ...)`):
  data/{train,validation,test}.parquet   id, text, sha256, n_bytes, source_sha256
  task/{train,validation,test}.parquet   docstring, name, source_id
  stats.json                             counts and bytes per step and split
  datasheet.md                           a draft datasheet for the card stage
"""

from __future__ import annotations

import ast
import codecs
import hashlib
import json
import sys
import sysconfig
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import datasets
import pyarrow.parquet as pq

from lmforge import stage
from lmforge.schema import BUILTIN_TASK, DataConfig, FinetuneConfig, StageConfig, TaskConfig

SPLITS = ("train", "validation", "test")
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


# -- reading ---------------------------------------------------------------


def read_stdlib(stats: Counter) -> Iterator[dict]:
    """The running interpreter's standard library .py files, without test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if STDLIB_SKIP_DIRS & set(rel.parts[:-1]):
            continue
        yield from read_text_file(path, str(rel), stats)


def read_text_file(path: Path, doc_id: str, stats: Counter) -> Iterator[dict]:
    """A whole file is one document; a leading UTF-8 BOM is dropped, a file that is not UTF-8 is a broken row."""
    raw = path.read_bytes()
    stats["rows_read"] += 1
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        stats["broken_rows"] += 1
        print(f"skipping broken file {path}: {err}", file=sys.stderr)
        return
    yield {"id": doc_id, "text": text, "source_sha256": hashlib.sha256(raw).hexdigest()}


def read_jsonl(path: Path, text_field: str, stats: Counter) -> Iterator[dict]:
    """One document per line; a line that is not UTF-8, or not a JSON object with a string text field, is skipped.

    Lines are decoded one by one, so that undecodable bytes break only their own row; a UTF-8 BOM may start the file.
    """
    rows = kept = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            if not line.strip():
                continue
            rows += 1
            stats["rows_read"] += 1
            try:
                row = json.loads(line.decode("utf-8"))
                text = row[text_field]
                if not isinstance(text, str):
                    raise TypeError(f"{text_field} is {type(text).__name__}")
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
                stats["broken_rows"] += 1
                print(f"skipping broken row {path}:{number}: {err}", file=sys.stderr)
                continue
            kept += 1
            doc_id = str(row.get("id", f"{path.name}:{number}"))
            yield {"id": doc_id, "text": text, "source_sha256": hashlib.sha256(line).hexdigest()}
    if rows and not kept:
        print(
            f"warning: none of the {rows} rows of {path} has a string field {text_field!r}: check data.text_field",
            file=sys.stderr,
        )


def require_text_column(source: str, column_names: list[str], text_field: str) -> None:
    """A table without the text column is a config mistake, not a table of broken rows: stop and say so."""
    if text_field not in column_names:
        raise stage.StageError(
            f"{source} has no column {text_field!r} (data.text_field); its columns are {column_names}: "
            f"set data.text_field to one of them"
        )


def read_parquet(path: Path, text_field: str, stats: Counter) -> Iterator[dict]:
    """Rows of a Parquet file, read in record batches of the text (and id) column only."""
    parquet = pq.ParquetFile(path)
    column_names = parquet.schema_arrow.names
    require_text_column(str(path), column_names, text_field)
    wanted = [text_field] + (["id"] if "id" in column_names and text_field != "id" else [])
    rows = (row for batch in parquet.iter_batches(columns=wanted) for row in batch.to_pylist())
    yield from _from_rows(rows, str(path), path.name, text_field, stats)


def _from_rows(rows: Iterable[dict], source: str, id_prefix: str, text_field: str, stats: Counter) -> Iterator[dict]:
    """Rows of a table; a null or non-string text is a broken row, counted in one line per table."""
    broken = 0
    for index, row in enumerate(rows):
        stats["rows_read"] += 1
        text = row.get(text_field)
        if not isinstance(text, str):
            broken += 1
            continue
        doc_id = str(row.get("id", f"{id_prefix}:{index}"))
        yield {"id": doc_id, "text": text, "source_sha256": hashlib.sha256(text.encode()).hexdigest()}
    if broken:
        stats["broken_rows"] += broken
        print(f"skipping {broken} broken rows of {source}: {text_field!r} is null or not a string", file=sys.stderr)


def source_files(directory: Path, stats: Counter) -> list[Path]:
    """The files of a source directory that have a reader, in name order.

    Hidden files and directories (.git/, .DS_Store) are skipped and only counted; other files without a reader are
    counted and named in the log, since they may be data the researcher expected to be read.
    """
    files, unsupported = [], []
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in file.relative_to(directory).parts):
            stats["skipped_hidden_files"] += 1
        elif file.suffix.lower() in SUFFIXES:
            files.append(file)
        else:
            unsupported.append(str(file.relative_to(directory)))
    if unsupported:
        stats["skipped_files"] += len(unsupported)
        more = f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else ""
        print(
            f"skipping {len(unsupported)} files of {directory} with no reader (not {', '.join(SUFFIXES)}): "
            f"{', '.join(unsupported[:5])}{more}",
            file=sys.stderr,
        )
    return files


def read_source(data_cfg: DataConfig, stats: Counter) -> Iterator[dict]:
    """The embedded stdlib, local .jsonl/.parquet/.txt files (a file or a directory), or a Hub dataset."""
    source, field = data_cfg.source, data_cfg.text_field
    if source == "stdlib":
        yield from read_stdlib(stats)
        return
    path = Path(source)
    if path.is_file() and path.suffix.lower() not in SUFFIXES:
        raise stage.StageError(f"data.source={source!r}: curate reads {', '.join(SUFFIXES)} files, not {path.suffix!r}")
    if path.exists():
        for file in source_files(path, stats) if path.is_dir() else [path]:
            suffix = file.suffix.lower()
            if suffix in TEXT_SUFFIXES:
                yield from read_text_file(file, str(file.relative_to(path) if path.is_dir() else file.name), stats)
            else:
                yield from TABLE_READERS[suffix](file, field, stats)
        return
    # Anything else is a Hub dataset name; compute nodes need it in the local HF cache (HF_DATASETS_OFFLINE=1).
    dataset = datasets.load_dataset(source, split="train")
    require_text_column(source, dataset.column_names, field)
    yield from _from_rows(dataset, source, source, field, stats)


TABLE_READERS = {".jsonl": read_jsonl, ".json": read_jsonl, ".parquet": read_parquet}
TEXT_SUFFIXES = (".txt", ".py", ".md")  # a whole file is one document
SUFFIXES = (*TABLE_READERS, *TEXT_SUFFIXES)


# -- pipeline steps: each takes and yields documents, counting what it drops --


def normalize(docs: Iterable[dict], form: str) -> Iterator[dict]:
    for doc in docs:
        doc["text"] = unicodedata.normalize(form, doc["text"])
        yield doc


def filter_length(docs: Iterable[dict], min_chars: int, max_chars: int, stats: Counter) -> Iterator[dict]:
    for doc in docs:
        n = len(doc["text"].strip())
        reason = "empty" if n == 0 else "too_short" if n < min_chars else "too_long" if n > max_chars else None
        if reason:
            stats[f"dropped_{reason}"] += 1
            continue
        yield doc


def deduplicate(docs: Iterable[dict], stats: Counter) -> Iterator[dict]:
    """Exact deduplication on the normalized text; the first document (in id order) is kept."""
    seen = set()
    for doc in docs:
        doc["sha256"] = hashlib.sha256(doc["text"].encode()).hexdigest()
        if doc["sha256"] in seen:
            stats["dropped_duplicate"] += 1
            continue
        seen.add(doc["sha256"])
        yield doc


def assign_split(docs: Iterable[dict], validation_fraction: float, test_fraction: float) -> Iterator[dict]:
    """Split by a hash of the document id: stable when documents are added or removed."""
    for doc in docs:
        u = int(hashlib.sha256(doc["id"].encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        doc["split"] = (
            "test" if u < test_fraction else "validation" if u < test_fraction + validation_fraction else "train"
        )
        doc["n_bytes"] = len(doc["text"].encode())
        yield doc


# -- the fine-tuning task ------------------------------------------------------


def docstring_pairs(doc: dict, task_cfg: TaskConfig, stats: Counter) -> Iterator[dict]:
    """Public functions and methods with a docstring of enough words that does not give away the name."""
    try:
        tree = ast.parse(doc["text"])
    except (SyntaxError, ValueError):
        stats["task_unparsable_documents"] += 1
        return
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        docstring = ast.get_docstring(node)
        if not docstring:
            continue
        docstring = " ".join(docstring.split())[: task_cfg.max_docstring_chars]
        if len(docstring.split()) < task_cfg.min_docstring_words or node.name.lower() in docstring.lower():
            continue
        yield {"docstring": docstring, "name": node.name, "source_id": doc["id"], "split": doc["split"]}


def build_task(docs: list[dict], task_cfg: TaskConfig, stats: Counter) -> list[dict]:
    pairs = [pair for doc in docs for pair in docstring_pairs(doc, task_cfg, stats)]
    names = Counter(p["name"] for p in pairs)
    docstrings = Counter(p["docstring"] for p in pairs)
    # A repeated name or docstring is dropped everywhere, so it cannot sit in both train and test.
    unique = [p for p in pairs if names[p["name"]] == 1 and docstrings[p["docstring"]] == 1]
    stats["task_pairs_found"] = len(pairs)
    stats["task_dropped_not_unique"] = len(pairs) - len(unique)
    return unique


def drop_leaked(pairs: list[dict], train_text: str, stats: Counter) -> list[dict]:
    """Held-out pairs whose docstring or `def name(` occurs anywhere in the training documents leak: drop them."""
    kept = []
    for pair in pairs:
        if pair["split"] != "train" and (pair["docstring"] in train_text or f"def {pair['name']}(" in train_text):
            stats[f"task_dropped_leaked_{pair['split']}"] += 1
            continue
        kept.append(pair)
    return kept


def check_task(pairs: list[dict], finetune_cfg: FinetuneConfig, source: str) -> None:
    """Fine-tuning the built-in task on no pairs would fail only after pretraining: stop here. No test pairs is
    only said. A configuration without the built-in task (or without fine-tuning) needs no pairs."""
    counts = Counter(pair["split"] for pair in pairs)
    builtin = [i for i, task in enumerate(finetune_cfg.data) if task.source == BUILTIN_TASK]
    if finetune_cfg.method != "none" and builtin and not counts["train"]:
        raise stage.StageError(
            f"data.source={source!r} has no Python docstring pairs for the built-in fine-tuning task "
            f"'finetune.data.{builtin[0]}.source={BUILTIN_TASK}' (docstring -> function name; {counts['validation']} "
            f"validation, {counts['test']} test pairs): give finetune.data your own tasks instead "
            "(finetune.data=[{name:...,source:...,license:...}]), or set finetune=none to pretrain, quantize and "
            "evaluate without fine-tuning"
        )
    if builtin and pairs and not counts["test"]:
        print(
            f"warning: no test pairs among the {len(pairs)} task pairs: the task's exact match is n/a, "
            "only bits per byte are evaluated",
            file=sys.stderr,
        )


# -- the stage ------------------------------------------------------------

DOC_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "text": datasets.Value("string"),
        "sha256": datasets.Value("string"),
        "n_bytes": datasets.Value("int64"),
        "source_sha256": datasets.Value("string"),
    }
)
TASK_FEATURES = datasets.Features({k: datasets.Value("string") for k in ("docstring", "name", "source_id")})


def load_split(curated: str, kind: str, split: str) -> datasets.Dataset:
    """A split written by this stage: kind is "data" (documents) or "task" (pairs). Empty splits read fine."""
    return datasets.Dataset(pq.read_table(f"{curated}/{kind}/{split}.parquet"))


def columns(rows: list[dict], features: datasets.Features) -> datasets.Dataset:
    """A dataset with a fixed schema, also when a split is empty."""
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)


def task_description(task_cfg: TaskConfig, stats: dict) -> str:
    if not sum(stats["task"].values()):
        return "None: curation found no task pairs in this corpus (`finetune=none`: the model is not fine-tuned)."
    return f"""Docstring -> function name for public functions and methods whose docstring has at least
{task_cfg.min_docstring_words} words and does not contain the name; names and docstrings that occur more than
once are dropped everywhere. Pairs come from their document's split, and held-out pairs whose docstring or
definition appears in any training document are dropped (leakage check)."""


def datasheet(data_cfg: DataConfig, stats: dict) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(stats.items()) if not isinstance(v, dict))
    splits = "\n".join(
        f"| {s} | {stats['splits'][s]['documents']} | {stats['splits'][s]['bytes']} | {stats['task'][s]} |"
        for s in SPLITS
    )
    source = (
        f"Python {sys.version.split()[0]} standard library (`.py` files of the running interpreter, test suites excluded)"
        if data_cfg.source == "stdlib"
        else f"`{data_cfg.source}`"
    )
    return f"""# Datasheet: {data_cfg.name}

## Source and licence
- Source: {source}
- Licence: {data_cfg.license}
- Per-document source hashes: `source_sha256` column of `data/*.parquet`.

## Curation
Unicode {data_cfg.normalization} normalization; documents shorter than {data_cfg.min_chars} or longer than
{data_cfg.max_chars} characters dropped; exact duplicates (sha256 of normalized text) dropped; split by a hash of
the document id ({data_cfg.validation_fraction:.0%} validation, {data_cfg.test_fraction:.0%} test).

| count | value |
|---|---|
{rows}

## Splits
| split | documents | bytes | task pairs |
|---|---|---|---|
{splits}

## Fine-tuning task
{task_description(data_cfg.task, stats)}
"""


def main(cfg: StageConfig, out: Path, tracker) -> dict:
    data_cfg = cfg.data
    stats = Counter(rows_read=0, broken_rows=0, skipped_files=0, skipped_hidden_files=0)  # listed also when 0
    docs = read_source(data_cfg, stats)
    docs = normalize(docs, data_cfg.normalization)
    docs = filter_length(docs, data_cfg.min_chars, data_cfg.max_chars, stats)
    docs = deduplicate(docs, stats)
    docs = assign_split(docs, data_cfg.validation_fraction, data_cfg.test_fraction)
    docs = list(docs)[: data_cfg.max_documents]
    if stats["broken_rows"]:
        print(f"skipped {stats['broken_rows']} broken rows of {stats['rows_read']}", file=sys.stderr)
    if not docs:
        raise stage.StageError(f"no documents left after curation of {data_cfg.source!r}: {dict(stats)}")

    train_text = "\n".join(d["text"] for d in docs if d["split"] == "train")
    pairs = drop_leaked(build_task(docs, data_cfg.task, stats), train_text, stats)
    check_task(pairs, cfg.finetune, data_cfg.source)

    summary = {k: int(v) for k, v in stats.items()}
    summary["documents"] = len(docs)
    summary["splits"], summary["task"] = {}, {}
    (out / "data").mkdir()
    (out / "task").mkdir()
    for split in SPLITS:
        split_docs = [d for d in docs if d["split"] == split]
        split_pairs = [p for p in pairs if p["split"] == split]
        columns(split_docs, DOC_FEATURES).to_parquet(out / "data" / f"{split}.parquet")
        columns(split_pairs, TASK_FEATURES).to_parquet(out / "task" / f"{split}.parquet")
        summary["splits"][split] = {"documents": len(split_docs), "bytes": sum(d["n_bytes"] for d in split_docs)}
        summary["task"][split] = len(split_pairs)
    summary["python_version"] = sys.version.split()[0] if data_cfg.source == "stdlib" else None
    stage.write_json(out / "stats.json", summary)
    (out / "datasheet.md").write_text(datasheet(data_cfg, summary))
    tracker.log_artifacts([out / "stats.json", out / "datasheet.md"])
    metrics = {k: v for k, v in summary.items() if isinstance(v, int)}
    for split in SPLITS:
        metrics[f"{split}_documents"] = summary["splits"][split]["documents"]
        metrics[f"{split}_bytes"] = summary["splits"][split]["bytes"]
        metrics[f"{split}_task_pairs"] = summary["task"][split]
    return metrics


if __name__ == "__main__":
    stage.run(main)
