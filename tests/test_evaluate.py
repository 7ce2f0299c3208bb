"""Evaluation's numbers against independent computations on small constructed cases."""

import math
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge import evaluate, heldout

CONTEXT = 8
VOCAB = 96
# Around the context length: shorter, exactly it, one more (a full window of targets), two and three windows.
DOC_LENGTHS = [2, 7, 8, 9, 17, 25]


def peaked_llama() -> LlamaForCausalLM:
    """A random Llama with large weights: its predictions are far from uniform, so a token scored twice, skipped
    or from the wrong context changes the total."""
    torch.manual_seed(0)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=CONTEXT, initializer_range=0.5, **shape)
    return LlamaForCausalLM(cfg).eval()


def documents() -> list[list[int]]:
    """Documents of distinct tokens (none is the padding id 0): a token tells where in which document it is."""
    tokens = random.Random(0).sample(range(1, VOCAB), sum(DOC_LENGTHS))
    starts = [sum(DOC_LENGTHS[:i]) for i in range(len(DOC_LENGTHS))]
    return [tokens[start : start + length] for start, length in zip(starts, DOC_LENGTHS)]


@torch.no_grad()
def nats_token_by_token(model, docs: list[list[int]]) -> list[float]:
    """-ln p of each token after the first, one forward pass per token, from the start of its context window
    (windows of CONTEXT predicted tokens: the ones at 1..CONTEXT, CONTEXT+1..2*CONTEXT, ...)."""
    nats = []
    for doc in docs:
        for t in range(1, len(doc)):
            start = (t - 1) // CONTEXT * CONTEXT
            logits = model(input_ids=torch.tensor([doc[start:t]])).logits[0, -1]
            nats.append(-torch.log_softmax(logits.double(), dim=-1)[doc[t]].item())
    return nats


def test_test_nats_and_bits_per_byte_match_a_token_by_token_computation():
    model, docs = peaked_llama(), documents()
    seen = []  # (input ids, attention mask) of every row test_nats runs the model on
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.extend(zip(kwargs["input_ids"].tolist(), kwargs["attention_mask"].tolist())),
        with_kwargs=True,
    )
    total = evaluate.test_nats(model, docs, CONTEXT, batch_size=4)  # 9 chunks: batches of 4, 4 and 1, padded
    hook.remove()

    # Every row is a run of consecutive tokens of one document, at most CONTEXT long, predicting the token after
    # each of them: together every token after a document's first, exactly once.
    where = {token: (d, i) for d, doc in enumerate(docs) for i, token in enumerate(doc)}
    predicted = []
    for ids, mask in seen:
        length = sum(mask)
        d, first = where[ids[0]]
        assert 1 <= length <= CONTEXT and ids[:length] == docs[d][first : first + length]
        predicted += [(d, first + i) for i in range(1, length + 1)]
    assert sorted(predicted) == [(d, i) for d, doc in enumerate(docs) for i in range(1, len(doc))]

    per_token = nats_token_by_token(model, docs)
    assert max(per_token) - min(per_token) > 2.0  # the premise: tokens differ a lot in cost
    assert total == pytest.approx(sum(per_token), rel=1e-5)

    n_tokens, n_bytes = len(per_token), 300
    metrics = heldout.language_model_metrics(total, n_tokens, n_bytes)
    assert metrics["test_bits_per_byte"] == pytest.approx(sum(per_token) / math.log(2) / n_bytes, rel=1e-5)
    assert metrics["test_perplexity"] == pytest.approx(math.exp(sum(per_token) / n_tokens), rel=1e-5)
    assert (metrics["test_tokens"], metrics["test_bytes"]) == (n_tokens, n_bytes)


def test_exact_match_scores_the_first_identifier_of_each_generation():
    generated = [" add(a, b)", "sub", "  mul_2 x", "(div)", "pow\n", "max"]
    pairs = [{"name": name} for name in ("add", "sub", "mul_2", "div", "power", "min")]
    names = [heldout.identifier(text) for text in generated]
    assert names == ["add", "sub", "mul_2", "", "pow", "max"]
    assert heldout.exact_match(names, pairs) == pytest.approx(3 / 6)
    assert heldout.standard_error(3 / 6, 6) == pytest.approx(math.sqrt(0.5 * 0.5 / 5))
