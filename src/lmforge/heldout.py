"""The held-out data every model is scored on, read the same way by baseline and evaluate."""

from __future__ import annotations

import math
import re

from lmforge.curate import load_split


def test_documents(curated: str, limit: int | None = None) -> list[str]:
    texts = list(load_split(curated, "data", "test")["text"])
    return texts[:limit]


def task_pairs(curated: str, split: str, limit: int | None = None) -> list[dict]:
    return load_split(curated, "task", split).to_list()[:limit]


def answer_of(generated: str, builtin: bool) -> str:
    """What a generation answers: for the built-in task its first identifier (the name), else its text."""
    return identifier(generated) if builtin else generated.strip()


def document_token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each document as <|endoftext|> + its tokens: every model predicts the same tokens from the same start."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[tokenizer.eos_token_id, *doc] for doc in ids]


def language_model_metrics(total_nats: float, n_tokens: int, n_bytes: int) -> dict:
    """Perplexity per token, and bits per UTF-8 byte, which compares models with different tokenizers."""
    return {
        "test_perplexity": math.exp(total_nats / n_tokens),
        "test_bits_per_byte": bits_per_byte(total_nats, n_bytes),
        "test_tokens": n_tokens,
        "test_bytes": n_bytes,
    }


def identifier(text: str) -> str:
    """The first Python identifier in generated text: what the model named the function."""
    match = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)", text)
    return match.group(1) if match else ""


def exact_match(answers: list[str], targets: list[str]) -> float | None:
    """The fraction of answers equal to their targets; None over none (a rate of nothing is not 0: JSON null,
    not logged)."""
    if not targets:
        return None
    return sum(answer == target for answer, target in zip(answers, targets)) / len(targets)


def bits_per_byte(total_nats: float, n_bytes: int) -> float | None:
    """Of text whose summed negative log-likelihood is total_nats; None over no bytes."""
    return total_nats / math.log(2) / n_bytes if n_bytes else None


def standard_error(rate: float | None, n: int) -> float | None:
    """Of an exact-match rate over n examples: the hits' sample standard deviation over √n, as
    lm-evaluation-harness reports it. With 131 test pairs one hit is 0.76%, so compare within the errors."""
    if rate is None:
        return None
    return math.sqrt(rate * (1 - rate) / (n - 1)) if n > 1 else math.nan
