"""The tokenizer stage's token shards and training sample, with the real tokenizer on real files."""

import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge import config, pretrain, tokenizer, train_loop
from lmforge.schema import TrainConfig
from tests.stages import curated_and_tokenized, plan


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """The curate and tokenizer stages run on the small corpus."""
    root = tmp_path_factory.mktemp("tokens")
    found = plan(root / "results", curated_and_tokenized(root))
    return found["curate"].dir, found["tokenizer"].dir


def write_curated(directory: Path, texts: list[str]) -> str:
    """A curated stage's train split as the curate stage writes it (data/train.parquet, column text)."""
    (directory / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": texts}), directory / "data" / "train.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), directory / "data" / "validation.parquet")
    return str(directory)


def stdlib_documents(count: int) -> list[str]:
    """`count` modules of the standard library, smallest first above 1 KB: many documents of varied size."""
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"), key=lambda p: (p.stat().st_size, p.name))
    return [p.read_text() for p in paths if p.stat().st_size > 1000][:count]


def test_each_document_is_stored_as_its_ids_then_end_of_text(stages):
    curated, stage_dir = stages
    bpe = tokenizer.load(stage_dir)
    index = json.loads(Path(stage_dir, "tokens", "index.json").read_text())
    assert index["dtype"] == "uint16" and index["vocab_size"] == len(bpe) == 512
    for split in tokenizer.SPLITS:
        texts = pq.read_table(f"{curated}/data/{split}.parquet")["text"].to_pylist()
        expected = [t for text in texts for t in (*bpe(text, add_special_tokens=False)["input_ids"], bpe.eos_token_id)]
        stored = tokenizer.tokens(stage_dir, split)
        assert np.array_equal(stored[:], expected) and stored.documents == len(texts)
        files = [Path(stage_dir, "tokens", shard["file"]) for shard in index["splits"][split]["shards"]]
        assert sum(f.stat().st_size for f in files) == 2 * len(expected) == 2 * index["splits"][split]["tokens"]


def test_a_split_spread_over_many_shards_reads_as_one(stages, tmp_path):
    curated, stage_dir = stages
    bpe = tokenizer.load(stage_dir)
    tokenizer.write_tokens(bpe, curated, tmp_path, shard_tokens=1000)
    whole, sharded = tokenizer.tokens(stage_dir, "train"), tokenizer.tokens(str(tmp_path), "train")
    assert len(sharded.shards) == -(-len(whole) // 1000) > 100 and len(sharded) == len(whole)
    assert np.array_equal(sharded[:], whole[:])
    for start, stop in [(0, 1000), (999, 1001), (500, 3500), (len(whole) - 10, len(whole) + 5), (7, 7)]:
        assert np.array_equal(sharded[start:stop], whole[start:stop])
    assert sharded[1000] == whole[1000] and sharded[-1] == whole[-1] == bpe.eos_token_id
    blocks = pretrain.Blocks(sharded, 64)  # blocks that straddle shard files
    assert np.array_equal(blocks[[15, 0, 31]], whole[: len(blocks) * 64].reshape(-1, 64)[[15, 0, 31]])
    with pytest.raises(IndexError):
        blocks[[len(blocks)]]


def test_a_vocabulary_over_65536_tokens_is_stored_as_uint32(stages, tmp_path):
    _, stage_dir = stages
    bpe = tokenizer.load(stage_dir)
    bpe.add_tokens([f"word{i}" for i in range(2**16)])
    text = "x = word65535 + word3"  # an added token past id 2**16
    curated = write_curated(tmp_path / "curated", [text])
    index = tokenizer.write_tokens(bpe, curated, tmp_path / "big")
    ids = tokenizer.tokens(str(tmp_path / "big"), "train")[:]
    assert index["dtype"] == "uint32" and ids.dtype == np.uint32
    assert ids.tolist() == [*bpe(text, add_special_tokens=False)["input_ids"], bpe.eos_token_id]
    assert max(ids) > 2**16


def test_each_rank_reads_only_its_slice_of_the_blocks(stages):
    _, stage_dir = stages
    stored = tokenizer.tokens(stage_dir, "train")
    assert all(isinstance(shard, np.memmap) for shard in stored.shards)
    assert np.shares_memory(stored[100:200], stored.shards[0])  # a slice is the mapping, not a copy
    blocks = pretrain.Blocks(stored, 64)
    every_block = stored[: len(blocks) * 64].reshape(-1, 64)
    tcfg = TrainConfig(micro_batch_size=4, grad_accum=2)
    for world in (1, 2, 3):
        steps = len(blocks) // (4 * 2 * world)
        read = {}
        for rank in range(world):
            read[rank] = [
                i
                for step in range(steps)
                for micro in range(2)
                for i in train_loop.sample_indices(step, micro, rank, tcfg, world, len(blocks), seed=7)
            ]
            batch = pretrain.block_batch(blocks, read[rank][:4])["input_ids"]
            assert np.array_equal(batch.numpy(), every_block[read[rank][:4]])
        union = [i for rank in range(world) for i in read[rank]]
        assert len(set(union)) == len(union)  # no block read by two ranks in an epoch
        # The steps' share of the epoch's order: all blocks but those short of a whole step.
        assert set(union) == set(train_loop.epoch_order(7, 0, len(blocks))[: steps * 8 * world])
        assert len(blocks) - 8 * world < len(union) <= len(blocks)


def test_the_training_sample_is_the_seeded_order_cut_at_train_bytes(tmp_path):
    texts = stdlib_documents(120)
    curated = write_curated(tmp_path / "curated", texts)
    budget = 200_000
    rows, size = tokenizer.sample_rows(curated, seed=5, train_bytes=budget)
    order = sorted(range(len(texts)), key=lambda r: (tokenizer.sample_key(texts[r].encode(), 5), r))
    sizes = np.cumsum([len(texts[r].encode()) for r in order])
    kept = int(np.searchsorted(sizes, budget, side="right"))  # the longest run of the order within the budget
    assert rows == set(order[:kept]) and size == sizes[kept - 1] <= budget < sizes[kept]
    assert 0 < len(rows) < len(texts)
    assert tokenizer.sample_rows(curated, seed=5, train_bytes=budget) == (rows, size)
    assert tokenizer.sample_rows(curated, seed=6, train_bytes=budget)[0] != rows
    assert tokenizer.sample_rows(curated, seed=5, train_bytes=10**9) == (set(range(len(texts))), sizes[-1])

    def vocabulary(seed: int) -> dict:
        sample, _ = tokenizer.sample_rows(curated, seed, budget)
        return tokenizer.train_bpe(tokenizer.sample_texts(curated, sample), 400, 2).get_vocab()

    assert vocabulary(5) == vocabulary(5) != vocabulary(6)


def test_a_bad_train_bytes_fails_at_planning():
    with pytest.raises(config.ConfigError, match="'tokenizer.train_bytes': must be >= 65536"):
        config.load(["tokenizer.train_bytes=1000"])


def test_the_tokenizer_uses_the_cpus_its_job_has(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert tokenizer.job_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workflow's rule: resources.tokenizer.cpus
    assert tokenizer.job_cpus() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "64")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert tokenizer.job_cpus() == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "64")
    assert tokenizer.job_cpus() == len(os.sched_getaffinity(0))  # never more than it may run on
    for name in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM"):
        monkeypatch.setenv(name, "")  # restored after the test
    tokenizer.use_cpus(1)
    assert os.environ["RAYON_NUM_THREADS"] == "1" and os.environ["TOKENIZERS_PARALLELISM"] == "false"
