"""Stage 2, tokenizer: byte-level BPE trained with HF tokenizers on a seeded sample of the train split.

The BPE trains on at most `tokenizer.train_bytes` of training documents, drawn in an order set by the seed.
Then the train and validation splits are read as a stream, encoded batch by batch on the job's CPUs, and their
token ids appended to flat binary shards, which training memory-maps. No step holds a whole split in memory.

Outputs:
  tokenizer/                  a transformers fast tokenizer (save_pretrained) with a chat template
  tokens/{split}/NNNNN.bin    the split's documents' token ids, each document followed by <|endoftext|>, as raw
                              uint16 (a vocabulary of at most 2**16) or uint32, SHARD_TOKENS per file but the last
  tokens/index.json           the dtype, vocabulary size, and per split its shard files, tokens and documents
Read a split with `tokens(stage_dir, split)`.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lmforge import stage
from lmforge.schema import StageConfig

log = logging.getLogger(__name__)

EOS, PAD = "<|endoftext|>", "<|pad|>"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
SPLITS = ("train", "validation")
SHARD_TOKENS = 2**28  # tokens per shard file: 512 MiB as uint16, 1 GiB as uint32
BATCH_DOCUMENTS = 256  # documents read and encoded at a time: bounds the memory of encoding
LOG_EVERY_S = 30


def load(stage_dir: str) -> PreTrainedTokenizerFast:
    """The tokenizer this stage trained."""
    return AutoTokenizer.from_pretrained(f"{stage_dir}/tokenizer")


class Tokens:
    """A split's token ids, memory-mapped from its shards: len() and slices as if one array.

    Only the slices taken are read from disk; a slice within one shard is a view of the mapping.
    """

    def __init__(self, stage_dir: str, split: str):
        index = json.loads(Path(f"{stage_dir}/tokens/index.json").read_text())
        self.dtype = np.dtype(index["dtype"])
        entry = index["splits"][split]
        self.documents = entry["documents"]
        self.shards = [np.memmap(f"{stage_dir}/tokens/{s['file']}", self.dtype, mode="r") for s in entry["shards"]]
        self.starts = np.cumsum([0, *map(len, self.shards)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: int | slice) -> np.ndarray | np.integer:
        if not isinstance(key, slice):
            position = key + len(self) if key < 0 else key
            if not 0 <= position < len(self):
                raise IndexError(f"token {key} of {len(self)}")
            return self[position : position + 1][0]
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("token slices take no step")
        pieces = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while shard < len(self.shards) and self.starts[shard] < stop:
            offset = self.starts[shard]
            pieces.append(np.asarray(self.shards[shard][max(start - offset, 0) : stop - offset]))
            shard += 1
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty(0, self.dtype)


def tokens(stage_dir: str, split: str) -> Tokens:
    """A split's documents as one sequence of token ids, each document followed by <|endoftext|>."""
    return Tokens(stage_dir, split)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def job_cpus() -> int:
    """The CPUs this job may use: the fewest of those it may run on, Slurm's allocation, and the rule's threads
    (the workflow sets OMP_NUM_THREADS from resources.<stage>.cpus)."""
    limits = [len(os.sched_getaffinity(0))]
    limits += [int(os.environ[name]) for name in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS") if name in os.environ]
    return max(1, min(limits))


def use_cpus(cpus: int) -> None:
    """Size the tokenizers library's thread pool (Rust rayon), before its first use in this process."""
    os.environ["RAYON_NUM_THREADS"] = str(cpus)
    # Explicit, so that the library neither warns nor turns batch encoding serial in a forked process.
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if cpus > 1 else "false"


def documents(curated: str, split: str) -> Iterator[list[str]]:
    """A curated split's texts, read as a stream, a batch at a time."""
    parquet = pq.ParquetFile(f"{curated}/data/{split}.parquet")
    for batch in parquet.iter_batches(batch_size=BATCH_DOCUMENTS, columns=["text"]):
        yield batch.column("text").to_pylist()


def document_count(curated: str, split: str) -> int:
    return pq.ParquetFile(f"{curated}/data/{split}.parquet").metadata.num_rows


def sample_key(text: bytes, seed: int) -> int:
    """A document's place in the seeded order the tokenizer's training sample is drawn in."""
    return int.from_bytes(hashlib.blake2b(text, digest_size=8, key=str(seed).encode()).digest())


def sample_rows(curated: str, seed: int, train_bytes: int) -> tuple[set[int], int]:
    """The rows of the train split the BPE trains on, and their bytes.

    The documents are ordered by a hash of their text keyed with the seed (so the order does not depend on
    where a document sits in the file) and the sample is the longest run of that order within train_bytes.
    One pass keeps that run's rows in a heap, largest key on top, and the smallest key dropped so far:
    a later document ordered after it cannot join the run.
    """
    kept, kept_bytes, cutoff = [], 0, None  # kept: (-key, -row, bytes)
    row = 0
    for texts in documents(curated, "train"):
        for text in texts:
            data = text.encode()
            key = sample_key(data, seed)
            if cutoff is None or (key, row) < cutoff:
                heapq.heappush(kept, (-key, -row, len(data)))
                kept_bytes += len(data)
                while kept_bytes > train_bytes:
                    negated_key, negated_row, size = heapq.heappop(kept)
                    kept_bytes -= size
                    cutoff = (-negated_key, -negated_row)
            row += 1
    return {-negated_row for _, negated_row, _ in kept}, kept_bytes


def sample_texts(curated: str, rows: set[int]) -> Iterator[list[str]]:
    first = 0
    for texts in documents(curated, "train"):
        yield [text for row, text in enumerate(texts, first) if row in rows]
        first += len(texts)


def train_bpe(texts, vocab_size: int, min_frequency: int) -> Tokenizer:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS, PAD, *CHAT_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return bpe


class ShardWriter:
    """Appends token ids to numbered flat binary files under `directory`, `shard_tokens` per file."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int):
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.counts = []  # tokens in each file so far
        self.file = None
        directory.mkdir(parents=True)

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.file is None or self.counts[-1] == self.shard_tokens:
                self.close()
                self.file = open(self.directory / f"{len(self.counts):05d}.bin", "wb")
                self.counts.append(0)
            part = ids[: self.shard_tokens - self.counts[-1]]
            self.file.write(part.astype(self.dtype, copy=False).tobytes())
            self.counts[-1] += len(part)
            ids = ids[len(part) :]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def shards(self) -> list[dict]:
        """The files written, relative to the tokens directory (the split's name, then the number), and their tokens."""
        return [{"file": f"{self.directory.name}/{n:05d}.bin", "tokens": count} for n, count in enumerate(self.counts)]


def encode_split(
    tokenizer: PreTrainedTokenizerFast, curated: str, split: str, out: Path, shard_tokens: int = SHARD_TOKENS
) -> dict:
    """Encode a curated split into shards under out/split, a batch of documents at a time; its index entry."""
    dtype = token_dtype(len(tokenizer))
    eos = np.array([tokenizer.eos_token_id], dtype)
    writer = ShardWriter(out / split, dtype, shard_tokens)
    total = document_count(curated, split)
    n_documents = n_bytes = 0
    started = last_log = time.monotonic()
    for texts in documents(curated, split):
        # The Rust tokenizer's batch encoding spreads the documents over its threads (RAYON_NUM_THREADS).
        encodings = tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        if encodings:
            writer.write(np.concatenate([part for e in encodings for part in (np.array(e.ids, dtype), eos)]))
        n_documents += len(texts)
        n_bytes += sum(len(text.encode()) for text in texts)
        if time.monotonic() - last_log > LOG_EVERY_S:
            last_log, elapsed = time.monotonic(), time.monotonic() - started
            log.info(
                "%s: %d/%d documents, %.1f MB/s, %.0f s left",
                split, n_documents, total, n_bytes / elapsed / 1e6, elapsed * (total - n_documents) / n_documents,
            )  # fmt: skip
    writer.close()
    return {"shards": writer.shards(), "tokens": sum(writer.counts), "documents": n_documents, "bytes": n_bytes}


def write_tokens(
    tokenizer: PreTrainedTokenizerFast, curated: str, stage_dir: Path, shard_tokens: int = SHARD_TOKENS
) -> dict:
    """Encode the train and validation splits into stage_dir/tokens, with its index.json; the index."""
    index = {"dtype": token_dtype(len(tokenizer)).name, "vocab_size": len(tokenizer), "splits": {}}
    for split in SPLITS:
        index["splits"][split] = encode_split(tokenizer, curated, split, stage_dir / "tokens", shard_tokens)
    (stage_dir / "tokens" / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def main(cfg: StageConfig, out: Path, tracker) -> dict:
    tok_cfg, curated = cfg.tokenizer, cfg.inputs["curate"]
    cpus = job_cpus()
    use_cpus(cpus)
    rows, sample_bytes = sample_rows(curated, cfg.seed, tok_cfg.train_bytes)
    if not rows:
        raise stage.StageError(
            f"no training document fits in tokenizer.train_bytes={tok_cfg.train_bytes}: raise it"
            if document_count(curated, "train")
            else f"the train split of {curated} has no documents to train a tokenizer on"
        )
    log.info("training the BPE on %d documents, %d bytes, with %d CPUs", len(rows), sample_bytes, cpus)
    bpe = train_bpe(sample_texts(curated, rows), tok_cfg.vocab_size, tok_cfg.min_frequency)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=CHAT_TOKENS,
        chat_template=tok_cfg.chat_template,
        model_max_length=1_000_000,
    )
    tokenizer.save_pretrained(out / "tokenizer")

    metrics = {
        "vocab_size": len(tokenizer),
        "tokenizer_sample_documents": len(rows),
        "tokenizer_sample_bytes": sample_bytes,
    }
    for split, entry in write_tokens(tokenizer, curated, out)["splits"].items():
        metrics[f"{split}_tokens"] = entry["tokens"]
        metrics[f"{split}_bytes_per_token"] = entry["bytes"] / max(entry["tokens"] - entry["documents"], 1)
    return metrics


if __name__ == "__main__":
    stage.run(main)
