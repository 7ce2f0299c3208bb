import codecs
import hashlib
import json
from collections import Counter

import datasets
import numpy as np
import pytest

from lmforge import curate, dedup, filters, schema, sources, stage

TASK = schema.TaskConfig(min_docstring_words=5, max_docstring_chars=400)


def read(source, text_field="text"):
    stats = Counter()
    docs = list(sources.read_source(schema.DataConfig(source=str(source), text_field=text_field), stats))
    return docs, stats


def test_broken_jsonl_rows_are_skipped_and_counted(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [
        json.dumps({"text": "a fine document " * 10}),
        "{not json",
        json.dumps({"text": 42}),
        json.dumps({"other": "x"}),
    ]
    path.write_text("\n".join(rows) + "\n")
    docs, stats = read(path)
    assert len(docs) == 1
    assert stats["rows_read"] == 4 and stats["broken_rows"] == 3


def test_undecodable_jsonl_row_is_broken_not_kept(tmp_path, caplog):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9 latin-1"}\n{"text": "also fine"}\n')
    docs, stats = read(path)
    assert [d["text"] for d in docs] == ["fine", "also fine"]
    assert stats["rows_read"] == 3 and stats["broken_rows"] == 1
    assert f"{path}:2" in caplog.text


def test_utf8_bom_does_not_break_the_first_row(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(codecs.BOM_UTF8 + b'{"text": "first row"}\n{"text": "second row"}\n')
    (tmp_path / "b.txt").write_bytes(codecs.BOM_UTF8 + b"a text file")
    docs, stats = read(tmp_path)
    assert [d["text"] for d in docs] == ["first row", "second row", "a text file"]
    assert stats["broken_rows"] == 0


def test_files_without_a_reader_are_counted_and_named_hidden_ones_only_counted(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("a text file")
    (tmp_path / "table.csv").write_text("text\nnot read\n")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "notes.txt").write_text("not data")
    docs, stats = read(tmp_path)
    assert [d["text"] for d in docs] == ["a text file"]
    assert stats["skipped_files"] == 1 and stats["skipped_hidden_files"] == 2
    assert "table.csv" in caplog.text and ".DS_Store" not in caplog.text
    with pytest.raises(stage.StageError, match="data.source"):
        read(tmp_path / "table.csv")


def test_parquet_without_the_text_column_stops_naming_file_and_config_key(tmp_path):
    path = tmp_path / "corpus.parquet"
    datasets.Dataset.from_list([{"content": "row one"}]).to_parquet(path)
    with pytest.raises(stage.StageError) as stop:
        read(path)
    message = str(stop.value)
    assert str(path) in message and "'text'" in message and "data.text_field" in message and "content" in message


def test_parquet_null_texts_are_broken_rows_named_in_the_log(tmp_path, caplog):
    path = tmp_path / "corpus.parquet"
    datasets.Dataset.from_list([{"text": "row one"}, {"text": None}, {"text": "row three"}]).to_parquet(path)
    docs, stats = read(path)
    assert [d["text"] for d in docs] == ["row one", "row three"]
    assert stats["rows_read"] == 3 and stats["broken_rows"] == 1
    assert f"1 broken rows of {path}" in caplog.text


def test_jsonl_without_the_text_field_in_any_row_warns_about_the_config_key(tmp_path, caplog):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"content": "one"}) + "\n" + json.dumps({"content": "two"}) + "\n")
    docs, stats = read(path)
    assert docs == [] and stats["broken_rows"] == 2
    assert f"none of the 2 rows of {path}" in caplog.text and "data.text_field" in caplog.text


def test_local_txt_and_parquet_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first text document")
    datasets.Dataset.from_list([{"text": "row one"}, {"text": "row two"}]).to_parquet(tmp_path / "b.parquet")
    docs, _ = read(tmp_path)
    assert sorted(d["text"] for d in docs) == ["first text document", "row one", "row two"]


def test_steps_normalize_filter_and_deduplicate():
    stats = Counter()
    docs = [
        {"id": str(i), "text": t} for i, t in enumerate(["caf\u0065\u0301 " * 20, "café " * 20, "", "short", "x" * 500])
    ]
    kept = list(filters.filter_length(filters.normalize(docs, "NFC"), 10, 400, stats))
    assert stats == Counter(dropped_empty=1, dropped_too_short=1, dropped_too_long=1)
    # The NFD and NFC spellings are one document after normalization: the later one is the duplicate.
    sha = dedup.sha_prefix(hashlib.sha256(d["text"].encode()).hexdigest() for d in kept)
    assert dedup.exact_duplicates(sha, np.array([5, 2])).tolist() == [True, False]


def test_split_depends_only_on_the_document_id():
    docs = [{"id": f"doc{i}", "text": "t"} for i in range(2000)]
    first = {d["id"]: d["split"] for d in curate.assign_split([dict(d) for d in docs], 0.05, 0.1)}
    again = {d["id"]: d["split"] for d in curate.assign_split([dict(d) for d in reversed(docs[:500])], 0.05, 0.1)}
    assert all(first[k] == v for k, v in again.items())
    share = Counter(first.values())
    assert 150 < share["test"] < 250 and 60 < share["validation"] < 140


def test_task_pairs_are_unique_and_never_leak_from_test_into_train():
    code = '''
def add_numbers(a, b):
    """Return the total of both arguments given here."""

def _private(x):
    """Hidden helpers are not public functions at all."""

def parse(x):
    """Turn the parse input into a structure."""

def close(x):
    """Release every resource this object holds now."""
'''
    other = '''
def close(y):
    """Shut the handle and free all of its memory."""

def shout(s):
    """Make the given text loud and clear please."""
'''
    stats = Counter()
    docs = [
        {"id": "a.py", "text": code, "split": "test"},
        {"id": "b.py", "text": other + "\nadd_numbers = 1\n", "split": "train"},
    ]
    pairs = curate.build_task(docs, TASK, stats)
    # parse's docstring names it; close occurs twice; _private is private.
    assert sorted(p["name"] for p in pairs) == ["add_numbers", "shout"]
    train_names = set(curate.DEFINITION.findall(docs[1]["text"] + "\ndef add_numbers(a, b): pass\n"))
    kept = curate.drop_leaked(pairs, train_names, stats)
    assert [p["name"] for p in kept] == ["shout"]
    assert stats["task_dropped_leaked_test"] == 1
