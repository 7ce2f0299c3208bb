"""Where curation reads from: shards of local files, Hub datasets from the offline cache, and planning's checks."""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge import config, corpus_gen, schema, sources, stage
from lmforge.workflow import snakemake_command
from tests.stages import PROSE_WORDS, TINY, curated, plan

GENERATED = ["data.name=generated", "data.license=MIT", "finetune=none"]


def prose(rng: random.Random, sentences: int = 8) -> str:
    """Random sentences of tests.stages.PROSE_WORDS, after one with the stop words Gopher's rules look for."""
    return "The village and the river. " + " ".join(
        " ".join(rng.choice(PROSE_WORDS) for _ in range(rng.randint(8, 14))).capitalize() + "."
        for _ in range(sentences)
    )


def mixed_corpus(root: Path) -> Path:
    """A generated corpus (one JSON-lines file) plus a Parquet file of small row groups and text files that
    repeat some of its documents, so that duplicates cross files and shards."""
    manifest = corpus_gen.generate(root, 400_000, seed=5)
    corpus = root / "corpus"
    clean = set(manifest["clean"] + manifest["code"])  # a copy of junk would go to a filter, not to dedup
    rows = [json.loads(line) for line in (corpus / "part-00000.jsonl").read_text().splitlines()]
    rng = random.Random(1)
    copies = rng.sample([row for row in rows if row["id"] in clean], 20)
    table = pa.Table.from_pylist([{"text": row["text"], "id": f"copy-{i}"} for i, row in enumerate(copies[:10])])
    pq.write_table(table, corpus / "copies.parquet", row_group_size=3)
    for i, row in enumerate(copies[10:]):
        (corpus / f"copy-{i}.txt").write_text(row["text"])
    return corpus


def read_all(data: schema.DataConfig, shards: int) -> list[list[dict]]:
    return [list(sources.read_source(data, Counter(), shard, shards)) for shard in range(shards)]


def test_shards_read_every_document_once_in_the_same_order(tmp_path):
    corpus = mixed_corpus(tmp_path)
    data = schema.DataConfig(source=str(corpus), text_field="text")
    [whole] = read_all(data, 1)
    for shards in (2, 3, 7):
        parts = read_all(data, shards)
        merged = sorted((doc for part in parts for doc in part), key=lambda doc: doc["order"])
        assert [(d["id"], d["order"], d["text"]) for d in merged] == [(d["id"], d["order"], d["text"]) for d in whole]
        assert all(parts), f"a shard of {shards} read nothing"


def curated_ids(results: Path) -> set[str]:
    [curated] = [p for p in (results / "curate").iterdir() if p.is_dir()]
    return {row["id"] for split in ("train", "validation", "test") for row in pq.read_table(curated / "data" / f"{split}.parquet").to_pylist()}  # fmt: skip


@pytest.mark.e2e
def test_three_shard_jobs_keep_exactly_the_documents_of_one(tmp_path):
    """Through real Snakemake: 3 curate_shard jobs and the merge keep the same documents as 1 shard."""
    corpus = mixed_corpus(tmp_path)
    kept = {}
    for shards in (1, 3):
        results = tmp_path / f"shards{shards}" / "results"
        overrides = [f"data.source={corpus}", *GENERATED, *TINY, f"data.shards={shards}"]
        command = snakemake_command(results, overrides, "--cores", "2", "--until", "curate")
        run = subprocess.run(command, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-4000:]
        assert len([p for p in (results / "curate_shard").iterdir() if p.is_dir()]) == shards
        kept[shards] = curated_ids(results)
        [curated] = [p for p in (results / "curate").iterdir() if p.is_dir()]
        stats = json.loads((curated / "stats.json").read_text())
        assert stats["dropped_duplicate"] >= 20  # the copies, across files and shards
    assert kept[1] == kept[3] and len(kept[1]) > 40


def hub_cache(home: Path, name: str, rows: list[dict]) -> None:
    """A Hub dataset as an online `load_dataset(name)` leaves it: prepared Arrow under HF_HOME/datasets."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    owner, dataset = name.split("/")
    files = home / "files"
    files.mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(files / "train.parquet")
    data_files = {"train": str(files / "train.parquet")}
    Parquet(data_files=data_files, dataset_name=dataset, cache_dir=str(home / "build")).download_and_prepare()
    [prepared] = (home / "build" / dataset).glob("*/0.0.0")  # its files are named <dataset>-<split>.arrow
    shutil.copytree(prepared, home / "datasets" / f"{owner}___{dataset}" / "default" / "0.0.0" / "0123abcd")


def test_a_hub_dataset_streams_from_the_offline_cache_in_shards(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    rng = random.Random(0)
    rows = [{"body": prose(rng), "id": f"row-{i}", "license": "CC0-1.0"} for i in range(30)]
    hub_cache(home, "villagers/letters", rows)
    for key, value in {"HF_HOME": str(home), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    overrides = ["data.source=villagers/letters", "data.text_field=body", "data.shards=2", *GENERATED, *TINY]
    curate_dir = curated(plan(tmp_path / "results", overrides))
    docs = [row for split in ("train", "validation", "test") for row in pq.read_table(curate_dir / "data" / f"{split}.parquet").to_pylist()]  # fmt: skip
    assert sorted(d["id"] for d in docs) == sorted(r["id"] for r in rows)
    assert {d["license"] for d in docs} == {"CC0-1.0"}  # the rows' own licence column


def test_a_source_a_job_could_not_read_fails_at_planning(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    missing = tmp_path / "corpus.jsonl"
    with pytest.raises(config.ConfigError, match=f"no such file or directory.*{missing}"):
        config.load([f"data.source={missing}", *GENERATED])
    with pytest.raises(config.ConfigError, match=r"neither a local path .* HF datasets cache .*empty-hf/datasets"):
        config.load(["data.source=villagers/no-such-letters", *GENERATED])
    with pytest.raises(config.ConfigError, match="data.filters.language.model_path"):
        config.load(["data.filters.language.enabled=true"])
    with pytest.raises(config.ConfigError, match="data.decontaminate_against"):
        config.load([f"data.decontaminate_against=[{tmp_path / 'eval.jsonl'}]"])


def test_doctor_says_where_each_configuration_reads_its_data(tmp_path, monkeypatch):
    from lmforge import doctor

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    hub_cache(tmp_path / "hf", "villagers/letters", [{"text": "a letter"}])
    cfgs = [config.load([f"data.source={source}", *GENERATED]) for source in ("villagers/letters", tmp_path)]
    status, seen, _ = doctor.check_data(doctor.Context(cfgs))
    assert status == "OK" and "villagers___letters" in seen and f"local directory {tmp_path}" in seen


def test_a_shard_job_logs_how_far_it_has_read_and_when_it_will_end(tmp_path, caplog):
    """A shard of a large corpus runs for hours: its log says MB read of its share, the rate and an ETA."""
    corpus = mixed_corpus(tmp_path)
    data = schema.DataConfig(source=str(corpus), text_field="text")
    total = sources.shard_megabytes(data, 2)
    stats = Counter()
    for shard in range(2):
        list(sources.read_source(data, stats, shard, 2))
    assert abs(stats["bytes_read"] / 1e6 - 2 * total) < 0.1 * 2 * total  # the shares add up to what is read
    caplog.set_level(logging.INFO)
    progress = stage.Progress(logging.getLogger("test"), "shard 1/2: read", total, " MB", every_s=0)
    progress(total / 4, "(10 documents kept of 12 read)")
    [line] = caplog.messages
    assert re.fullmatch(
        rf"shard 1/2: read {total / 4:.6g}/{total:.6g} MB \S+ MB/s eta=\d+\.\dmin \(10 documents kept of 12 read\)",
        line,
    ), line
