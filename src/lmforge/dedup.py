"""Deduplication across shards and n-gram decontamination.

Shard jobs compute each document's MinHash signature with datatrove's MinhashDedupSignature (its shingling and
hash permutations, called in-process); the merge job finds duplicates among all shards' documents with numpy:

- exact: equal sha256 of the final text;
- near: LSH over the signatures (`bands` x `rows` hashes), a candidate pair kept only when its estimated
  Jaccard similarity (the fraction of equal signature hashes) reaches `threshold`.

Of duplicates, the document earliest in the source (`order`) is kept, whatever the sharding. datatrove's own
bucket and cluster steps (MinhashDedupBuckets/Cluster/Filter) are not used: they number documents by their
shard and keep a cluster's first by shard, so the documents kept would depend on the shard count, and they
exchange files per bucket and rank, which a single merge job does not need.

Memory of the merge: the signatures, `bands x rows x 4` bytes per document (448 with the defaults), and 16
bytes per document for exact deduplication; not the texts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import numpy as np
import xxhash
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.utils.hashing import HashConfig

from lmforge.schema import DedupConfig

log = logging.getLogger(__name__)


class Signer:
    """MinHash signatures of texts: datatrove's shingles (word n-grams of simplified text) and permutations."""

    def __init__(self, cfg: DedupConfig, words):
        config = MinhashConfig(
            n_grams=cfg.ngram,
            num_buckets=cfg.bands,
            hashes_per_bucket=cfg.rows,
            seed=cfg.seed,
            hash_config=HashConfig(precision=32),
        )
        self.block = MinhashDedupSignature(output_folder="/nonexistent", config=config, language=words)
        self.size = cfg.bands * cfg.rows

    def __call__(self, text: str) -> np.ndarray:
        shingles = self.block.get_shingles(text)
        if not len(shingles):  # fewer words than one shingle: the text itself is its one shingle
            shingles = np.array([[xxhash.xxh64_intdigest(text) & 0xFFFFFFFF]], dtype=np.uint64)
        return np.concatenate(self.block.get_signature(shingles)).astype(np.uint32)


def sha_prefix(hex_digests: Iterable[str]) -> np.ndarray:
    """The first 8 bytes of sha256 hex digests, as uint64 (a collision among 1e9 texts has odds ~3e-2)."""
    return np.array([int(h[:16], 16) for h in hex_digests], dtype=np.uint64)


def exact_duplicates(sha: np.ndarray, order: np.ndarray) -> np.ndarray:
    """A mask of documents with the same text as an earlier one (by order)."""
    by = np.lexsort((order, sha))
    repeated = np.zeros(len(sha), dtype=bool)
    repeated[by[1:]] = sha[by[1:]] == sha[by[:-1]]
    return repeated


def near_duplicates(signatures: np.ndarray, order: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """A mask of documents near an earlier one: LSH candidates verified by estimated Jaccard, then clustered.

    In each band, documents with equal band hashes are compared with the group's earliest; pairs that pass are
    joined (union-find, the earliest document the root), and every document but each cluster's root is dropped.
    """
    n = len(order)
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rank = np.argsort(order, kind="stable")  # position of a document in source order
    position = np.empty(n, dtype=np.int64)
    position[rank] = np.arange(n)
    mix = np.random.default_rng(cfg.seed).integers(1, 2**63, size=cfg.rows, dtype=np.uint64) | np.uint64(1)
    for band in range(cfg.bands):
        rows = signatures[:, band * cfg.rows : (band + 1) * cfg.rows].astype(np.uint64)
        with np.errstate(over="ignore"):
            keys = (rows * mix).sum(axis=1, dtype=np.uint64)
        by = np.lexsort((position, keys))
        same = keys[by[1:]] == keys[by[:-1]]
        if not same.any():
            continue
        starts = np.flatnonzero(np.concatenate(([True], ~same)))
        sizes = np.diff(np.append(starts, n))
        for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
            first, others = by[start], by[start + 1 : start + size]
            similar = (signatures[others] == signatures[first]).mean(axis=1) >= cfg.threshold
            for other in others[similar]:
                a, b = root(first), root(other)
                if a != b:
                    earlier, later = (a, b) if position[a] < position[b] else (b, a)
                    parent[later] = earlier
    return np.array([root(i) != i for i in range(n)], dtype=bool)


# -- decontamination -----------------------------------------------------------------------------------------

WORD = re.compile(r"\w+")


def window_hashes(values: np.ndarray, n: int) -> np.ndarray:
    """A hash of each window of n consecutive uint64 values (a polynomial in uint64 arithmetic)."""
    if len(values) < n:
        return np.empty(0, dtype=np.uint64)
    grams = np.zeros(len(values) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            grams = grams * np.uint64(0x100000001B3) + values[k : len(values) - n + 1 + k]
    return grams


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """Hashes of the lower-cased word n-grams of a text (none when it has fewer than n words)."""
    words = WORD.findall(text.lower())
    word_hashes = np.fromiter((xxhash.xxh64_intdigest(w) for w in words), dtype=np.uint64, count=len(words))
    return window_hashes(word_hashes, n)


class NgramIndex:
    """The n-grams of evaluation texts; a training text that shares one with them is contaminated.

    An n-gram that many training documents share (a licence header, a common idiom of code) is boilerplate,
    not a leak: after `exempt_common`, n-grams found in more than that many training documents do not count.
    """

    def __init__(self, n: int):
        self.n = n
        self.parts: list[np.ndarray] = []
        self.grams = np.empty(0, dtype=np.uint64)
        self.counted = np.empty(0, dtype=bool)  # per n-gram: whether it counts (not boilerplate)
        self.texts = self.short_texts = 0

    def add(self, text: str) -> None:
        grams = ngram_hashes(text, self.n)
        self.texts += 1
        if not len(grams):
            self.short_texts += 1
        self.parts.append(grams)
        if len(self.parts) > 4096:
            self.freeze()

    def freeze(self) -> NgramIndex:
        self.grams = np.unique(np.concatenate([self.grams, *self.parts]))
        self.counted = np.ones(len(self.grams), dtype=bool)
        self.parts = []
        return self

    def found(self, text: str) -> np.ndarray:
        """Indices of the evaluation n-grams the text holds, each once."""
        grams = ngram_hashes(text, self.n)
        if not len(grams) or not len(self.grams):
            return np.empty(0, dtype=np.int64)
        at = np.searchsorted(self.grams, grams).clip(max=len(self.grams) - 1)
        return np.unique(at[self.grams[at] == grams])

    def documents_holding(self, texts: Iterable[str]) -> np.ndarray:
        """Per evaluation n-gram, how many of the texts hold it."""
        documents = np.zeros(len(self.grams), dtype=np.int64)
        for text in texts:
            documents[self.found(text)] += 1
        return documents

    def exempt_common(self, training_texts: Iterable[str], max_documents: int) -> int:
        """Stop counting the n-grams more than `max_documents` training texts hold; returns how many."""
        self.counted = self.documents_holding(training_texts) <= max_documents
        return int((~self.counted).sum())

    def contaminated(self, text: str) -> bool:
        return bool(self.counted[self.found(text)].any())
