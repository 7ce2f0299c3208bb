"""Stage 3, baseline: the simplest models that could work, scored before anything is trained.

- A smoothed n-gram language model on the tokenizer's tokens (interpolated absolute discounting down to an
  add-one unigram), scored in bits per byte on the test documents.
- For the task, a heuristic: the function name is the docstring's first word, lowercased.

Outputs: ngram.npz (the counts); the metrics are in the manifest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge import heldout, stage, tokenizer
from lmforge.schema import StageConfig


def ngram_keys(tokens: np.ndarray, order: int, bits: int) -> np.ndarray:
    """Each window of `order` tokens packed into one int64 (the last token in the lowest bits)."""
    keys = np.zeros(len(tokens) - order + 1, dtype=np.int64)
    for offset in range(order):
        keys = (keys << bits) | tokens[offset : len(tokens) - order + 1 + offset].astype(np.int64)
    return keys


class NGramModel:
    def __init__(self, tokens: np.ndarray, order: int, discount: float, vocab_size: int):
        self.order, self.discount, self.vocab_size = order, discount, vocab_size
        self.bits = max(vocab_size - 1, 1).bit_length()
        if order * self.bits > 62:
            raise stage.StageError(f"baseline.order={order} is too large for a vocabulary of {vocab_size}")
        self.counts = {}  # order -> (sorted keys, counts)
        for k in range(1, order + 1):
            keys, counts = np.unique(ngram_keys(tokens, k, self.bits), return_counts=True)
            self.counts[k] = (keys, counts)
        # Per context of length k-1: its total count and the number of distinct continuations.
        self.contexts = {}
        for k in range(2, order + 1):
            keys, counts = self.counts[k]
            ctx, first = np.unique(keys >> self.bits, return_index=True)
            totals = np.add.reduceat(counts, first)
            self.contexts[k] = (ctx, totals, np.diff(np.append(first, len(keys))))

    @staticmethod
    def _lookup(sorted_keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
        idx = np.clip(np.searchsorted(sorted_keys, queries), 0, len(sorted_keys) - 1)
        return np.where(sorted_keys[idx] == queries, values[idx], 0)

    def log_probs(self, doc: np.ndarray) -> np.ndarray:
        """Natural-log probability of doc[1:], each token given up to order-1 previous tokens of the doc."""
        targets = doc[1:].astype(np.int64)
        keys, counts = self.counts[1]
        total = counts.sum()
        prob = (self._lookup(keys, counts, targets) + 1) / (total + self.vocab_size)
        for k in range(2, self.order + 1):
            positions = np.arange(1, len(doc))
            has_context = positions >= k - 1
            query = np.zeros(len(targets), dtype=np.int64)
            for offset in range(k - 1, 0, -1):  # context tokens, oldest first
                query = (query << self.bits) | doc[np.maximum(positions - offset, 0)].astype(np.int64)
            ctx_keys, ctx_totals, ctx_types = self.contexts[k]
            c_ctx = self._lookup(ctx_keys, ctx_totals, query)
            n_types = self._lookup(ctx_keys, ctx_types, query)
            c_full = self._lookup(*self.counts[k], (query << self.bits) | targets)
            seen = has_context & (c_ctx > 0)
            denom = np.maximum(c_ctx, 1)
            higher = np.maximum(c_full - self.discount, 0) / denom + self.discount * n_types / denom * prob
            prob = np.where(seen, higher, prob)
        return np.log(prob)


def first_word_guess(docstring: str) -> str:
    return heldout.identifier(docstring.lower())


def main(cfg: StageConfig, out: Path, tracker) -> dict:
    base_cfg, curated = cfg.baseline, cfg.inputs["curate"]
    bpe = tokenizer.load(cfg.inputs["tokenizer"])
    model = NGramModel(tokenizer.tokens(cfg.inputs["tokenizer"], "train"), base_cfg.order, base_cfg.discount, len(bpe))
    np.savez_compressed(
        out / "ngram.npz",
        **{f"order{k}_{name}": arr for k, pair in model.counts.items() for name, arr in zip(("keys", "counts"), pair)},
    )

    texts = heldout.test_documents(curated)
    docs = heldout.document_token_ids(bpe, texts)
    nats = -sum(float(model.log_probs(np.asarray(doc)).sum()) for doc in docs)
    metrics = heldout.language_model_metrics(nats, sum(len(d) - 1 for d in docs), sum(len(t.encode()) for t in texts))

    pairs = heldout.task_pairs(curated, "test")
    metrics["task_exact_match"] = heldout.exact_match(
        [first_word_guess(p["docstring"]) for p in pairs], [p["name"] for p in pairs]
    )
    metrics["task_examples"] = len(pairs)
    metrics["ngram_order"] = base_cfg.order
    return metrics


if __name__ == "__main__":
    stage.run(main)
