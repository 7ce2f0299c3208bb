"""Stage 1b, curation: the shards' filtered documents -> deduplicated, decontaminated, split documents.

Merges the curate_shard jobs' outputs (lmforge.curate_shard), reading them in batches, never all texts at once:
exact and MinHash near-duplicates across all shards are dropped (lmforge.dedup; the earliest document of the
source is kept, so any shard count keeps the same documents), documents are split by a hash of their id, and
training documents sharing a word n-gram with an evaluation text (the test split, the built-in task's held-out
pairs, data.decontaminate_against) are dropped.

Also builds the default fine-tuning task from the same documents, docstring -> function name, split by the
documents' split so that no text of a test file is ever in the training data, and checks the held-out pairs
for leakage into training.

Outputs (Parquet, readable with `datasets.load_dataset("parquet", ...)`):
  data/{train,validation,test}.parquet   id, text, sha256, n_bytes, source_sha256, license
  task/{train,validation,test}.parquet   docstring, name, source_id
  stats.json                             counts and bytes per step and split, the shards' counts summed
  datasheet.md                           a draft datasheet for the card stage
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmforge import dedup, stage
from lmforge.schema import BUILTIN_TASK, DataConfig, FinetuneConfig, StageConfig, TaskConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


# -- the shards ------------------------------------------------------------------------------------------


def shard_dirs(cfg: StageConfig) -> list[Path]:
    """The curate_shard jobs' directories, in shard order."""
    jobs = [job for job in cfg.inputs if job.startswith("curate_shard_")]
    return [Path(cfg.inputs[job]) for job in sorted(jobs, key=lambda job: int(job.rsplit("_", 1)[1]))]


def shard_batches(shards: list[Path], columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
    for shard in shards:
        yield from pq.ParquetFile(shard / "docs.parquet").iter_batches(batch_size=batch_size, columns=columns)


def duplicates(shards: list[Path], data_cfg: DataConfig, stats: Counter) -> np.ndarray:
    """Which documents of the shards, in reading order, are kept: not a duplicate, within data.max_documents."""
    sha, order, signatures = [], [], []
    columns = ["sha256", "order"] + (["minhash"] if data_cfg.dedup.near else [])
    for batch in shard_batches(shards, columns, data_cfg.batch_size):
        sha.append(dedup.sha_prefix(batch.column("sha256").to_pylist()))
        order.append(batch.column("order").to_numpy())
        if data_cfg.dedup.near:
            size = batch.schema.field("minhash").type.list_size
            signatures.append(batch.column("minhash").flatten().to_numpy().reshape(-1, size))
    sha, order = np.concatenate(sha), np.concatenate(order)
    dropped = np.zeros(len(sha), dtype=bool)
    if data_cfg.dedup.exact:
        dropped |= dedup.exact_duplicates(sha, order)
    stats["dropped_duplicate"] = int(dropped.sum())
    if data_cfg.dedup.near:
        start = time.monotonic()
        rest = np.flatnonzero(~dropped)
        near = dedup.near_duplicates(np.concatenate(signatures)[rest], order[rest], data_cfg.dedup)
        dropped[rest[near]] = True
        stats["dropped_near_duplicate"] = int(near.sum())
        log.info("near-duplicates: %d of %d documents, in %.1f s", near.sum(), len(rest), time.monotonic() - start)
    kept = ~dropped
    if data_cfg.max_documents is not None and kept.sum() > data_cfg.max_documents:
        earliest = np.flatnonzero(kept)[np.argsort(order[kept], kind="stable")[: data_cfg.max_documents]]
        kept[:] = False
        kept[earliest] = True
    return kept


def kept_documents(shards: list[Path], kept: np.ndarray, columns: list[str], batch_size: int) -> Iterator[dict]:
    index = 0
    for batch in shard_batches(shards, columns, batch_size):
        mask = kept[index : index + batch.num_rows]
        index += batch.num_rows
        yield from batch.filter(pa.array(mask)).to_pylist()


def assign_split(docs: Iterable[dict], validation_fraction: float, test_fraction: float) -> Iterator[dict]:
    """Split by a hash of the document id: stable when documents are added or removed."""
    for doc in docs:
        u = int(hashlib.sha256(doc["id"].encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        doc["split"] = (
            "test" if u < test_fraction else "validation" if u < test_fraction + validation_fraction else "train"
        )
        yield doc


# -- decontamination -------------------------------------------------------------------------------------


def evaluation_texts(path: Path, batch_size: int) -> Iterator[str]:
    """The texts of a data.decontaminate_against file: .jsonl lines' "text", a .parquet "text" column, a .txt."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    text = json.loads(line).get("text")
                    if isinstance(text, str):
                        yield text
    elif suffix == ".parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=["text"]):
            yield from (text for text in batch.column("text").to_pylist() if isinstance(text, str))
    else:
        yield path.read_text(encoding="utf-8")


DEFINITION = re.compile(r"def\s+(\w+)\s*\(")


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


def build_task(docs: Iterable[dict], task_cfg: TaskConfig, stats: Counter) -> list[dict]:
    pairs = [pair for doc in docs for pair in docstring_pairs(doc, task_cfg, stats)]
    names = Counter(p["name"] for p in pairs)
    docstrings = Counter(p["docstring"] for p in pairs)
    # A repeated name or docstring is dropped everywhere, so it cannot sit in both train and test.
    unique = [p for p in pairs if names[p["name"]] == 1 and docstrings[p["docstring"]] == 1]
    stats["task_pairs_found"] = len(pairs)
    stats["task_dropped_not_unique"] = len(pairs) - len(unique)
    return unique


def drop_leaked(pairs: list[dict], train_names: set[str], stats: Counter) -> list[dict]:
    """Held-out pairs whose function a training document defines (`def name(`) leak their answer: drop them.

    A held-out docstring in a training document is decontamination's: that training document is dropped.
    """
    kept = []
    for pair in pairs:
        if pair["split"] != "train" and pair["name"] in train_names:
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
        log.warning(
            "no test pairs among the %d task pairs: the task's exact match is n/a, only bits per byte are evaluated",
            len(pairs),
        )


# -- the stage ------------------------------------------------------------

DOC_COLUMNS = ("id", "text", "sha256", "n_bytes", "source_sha256", "license")

DOC_SCHEMA = pa.schema([(name, pa.int64() if name == "n_bytes" else pa.string()) for name in DOC_COLUMNS])
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
once are dropped everywhere. Pairs come from their document's split; held-out pairs whose function a training
document defines are dropped (leakage check), and training documents sharing an n-gram with a held-out
docstring are dropped (decontamination)."""


def filters_description(data_cfg: DataConfig) -> str:
    f, d = data_cfg.filters, data_cfg.dedup
    prose = [name for name in ("gopher_repetition", "gopher_quality", "c4_lines") if getattr(f, name).enabled]
    applies = {"code": "no document (data.profile=code)", "prose": "every document", "auto": "non-code documents"}
    lines = [
        f"- Unicode {data_cfg.normalization} normalization; documents shorter than {data_cfg.min_chars} or longer "
        f"than {data_cfg.max_chars} characters dropped.",
        f"- Prose rules ({', '.join(prose) or 'none'}; datatrove's Gopher and C4 filters) on "
        f"{applies[data_cfg.profile]}.",
        f"- Language ID: {'kept ' + ', '.join(f.language.languages) if f.language.enabled else 'off'}.",
        f"- Licence allow-list: {', '.join(f.license.allow) if f.license.enabled else 'off'}.",
        f"- PII: {'emails and public IP addresses replaced' if f.pii.enabled else 'off'}.",
        f"- Exact duplicates (sha256 of the final text): {'dropped' if d.exact else 'kept'}; near-duplicates "
        f"(MinHash LSH, {d.ngram}-word shingles, {d.bands} bands x {d.rows} rows, estimated Jaccard >= "
        f"{d.threshold}): {'dropped' if d.near else 'kept'}; the earliest document of the source is kept.",
        f"- Decontamination: training documents sharing a {data_cfg.decontamination.ngram}-word n-gram with the "
        "test split, the held-out pairs of the built-in task where it runs"
        + (f" or {', '.join(data_cfg.decontaminate_against)}" if data_cfg.decontaminate_against else "")
        + (" dropped" if data_cfg.decontamination.enabled else ": off")
        + (
            f" (n-grams held by more than {data_cfg.decontamination.max_documents} training documents are "
            "boilerplate and do not count)."
            if data_cfg.decontamination.enabled and data_cfg.decontamination.max_documents is not None
            else "."
        ),
        f"- Split by a hash of the document id ({data_cfg.validation_fraction:.0%} validation, "
        f"{data_cfg.test_fraction:.0%} test); {data_cfg.shards} shard job(s), then one merge job.",
    ]
    return "\n".join(lines)


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
- Licence: {data_cfg.license} (a row's own `{data_cfg.license_field}` field, where the source has one: the
  `license` column of `data/*.parquet`)
- Per-document source hashes: `source_sha256` column of `data/*.parquet`.

## Curation
{filters_description(data_cfg)}

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


def shard_stats(shards: list[Path]) -> Counter:
    """The shards' counts, summed."""
    stats = Counter()
    for shard in shards:
        shard_summary = json.loads((shard / "stats.json").read_text())
        stats.update({k: v for k, v in shard_summary.items() if k not in ("shard", "shards", "documents", "bytes")})
    return stats


def main(cfg: StageConfig, out: Path, tracker) -> dict:
    data_cfg, batch_size = cfg.data, cfg.data.batch_size
    shards = shard_dirs(cfg)
    stats = shard_stats(shards)
    stats["documents_filtered"] = sum(pq.ParquetFile(s / "docs.parquet").metadata.num_rows for s in shards)
    if not stats["documents_filtered"]:
        raise stage.StageError(f"no documents left after filtering {data_cfg.source!r}: {dict(stats)}")
    kept = duplicates(shards, data_cfg, stats)

    # Evaluation texts: the test split, the held-out task pairs (found in the same pass), the configured files.
    evaluation = dedup.NgramIndex(data_cfg.decontamination.ngram)
    read, fractions = ["id", "text"], (data_cfg.validation_fraction, data_cfg.test_fraction)

    def split_documents() -> Iterator[dict]:
        for doc in assign_split(kept_documents(shards, kept, read, batch_size), *fractions):
            if doc["split"] == "test":
                evaluation.add(doc["text"])
            yield doc

    pairs = build_task(split_documents(), data_cfg.task, stats)
    for pair in pairs:
        if pair["split"] != "train":
            evaluation.add(pair["docstring"])
    for path in data_cfg.decontaminate_against:
        for text in evaluation_texts(Path(path), batch_size):
            evaluation.add(text)
    evaluation.freeze()
    stats.update(decontamination_texts=evaluation.texts, decontamination_ngrams=len(evaluation.grams))
    if data_cfg.decontamination.enabled and data_cfg.decontamination.max_documents is not None:
        training = assign_split(kept_documents(shards, kept, read, batch_size), *fractions)
        stats["decontamination_ngrams_boilerplate"] = evaluation.exempt_common(
            (doc["text"] for doc in training if doc["split"] == "train"), data_cfg.decontamination.max_documents
        )
    stats["decontamination_texts_too_short"] = evaluation.short_texts

    summary_splits = {split: {"documents": 0, "bytes": 0} for split in SPLITS}
    contaminated, train_names = set(), set()
    stats["dropped_contaminated"] = 0
    (out / "data").mkdir()
    writers = {split: pq.ParquetWriter(out / "data" / f"{split}.parquet", DOC_SCHEMA) for split in SPLITS}
    progress, done = stage.Progress(log, "merge: written", int(kept.sum()), " documents"), 0
    with writers["train"], writers["validation"], writers["test"]:
        columns_read = list(DOC_COLUMNS)
        docs = assign_split(kept_documents(shards, kept, columns_read, batch_size), *fractions)
        buffers: dict[str, list[dict]] = {split: [] for split in SPLITS}
        for doc in docs:
            split = doc.pop("split")
            if split == "train" and data_cfg.decontamination.enabled and evaluation.contaminated(doc["text"]):
                stats["dropped_contaminated"] += 1
                contaminated.add(doc["id"])
                continue
            if split == "train":
                train_names.update(DEFINITION.findall(doc["text"]))
            buffers[split].append(doc)
            summary_splits[split]["documents"] += 1
            summary_splits[split]["bytes"] += doc["n_bytes"]
            if len(buffers[split]) >= batch_size:
                writers[split].write_table(pa.Table.from_pylist(buffers[split], schema=DOC_SCHEMA))
                buffers[split] = []
            done += 1
            progress(done)
        for split in SPLITS:
            writers[split].write_table(pa.Table.from_pylist(buffers[split], schema=DOC_SCHEMA))
    documents = sum(s["documents"] for s in summary_splits.values())
    if not documents:
        raise stage.StageError(f"no documents left after curation of {data_cfg.source!r}: {dict(stats)}")

    pairs = [p for p in pairs if not (p["split"] == "train" and p["source_id"] in contaminated)]
    pairs = drop_leaked(pairs, train_names, stats)
    check_task(pairs, cfg.finetune, data_cfg.source)

    summary = {k: int(v) for k, v in sorted(stats.items())}
    summary["documents"] = documents
    summary["splits"], summary["task"] = summary_splits, {}
    (out / "task").mkdir()
    for split in SPLITS:
        split_pairs = [p for p in pairs if p["split"] == split]
        columns(split_pairs, TASK_FEATURES).to_parquet(out / "task" / f"{split}.parquet")
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
