import math
import statistics

import numpy as np

from lmforge import heldout
from lmforge.baseline import NGramModel


def test_ngram_probabilities_sum_to_one_in_every_context():
    rng = np.random.default_rng(0)
    vocab = 12
    tokens = rng.integers(0, vocab, 5000).astype(np.uint16)
    tokens[::7] = 3  # some structure, so higher orders matter
    model = NGramModel(tokens, order=3, discount=0.75, vocab_size=vocab)
    for history in ([3, 5], [1, 2], [11, 11]):
        docs = [np.array([*history, w]) for w in range(vocab)]
        total = sum(np.exp(model.log_probs(d)[-1]) for d in docs)
        assert abs(total - 1) < 1e-9


def test_higher_order_fits_structured_text_better():
    pattern = np.tile(np.array([1, 2, 3, 4, 1, 2, 5, 6], dtype=np.uint16), 500)
    nll = {order: -NGramModel(pattern, order, 0.75, 8).log_probs(pattern[:64]).sum() for order in (1, 2, 3)}
    assert nll[3] < nll[2] < nll[1]


def test_exact_match_and_the_standard_error_of_the_hit_rate():
    names = [f"name_{i}" for i in range(131)]
    rate = heldout.exact_match(["name_0", "name_1", *["wrong"] * 129], names)
    hits = [1.0, 1.0, *[0.0] * 129]
    assert rate == 2 / 131
    assert math.isclose(heldout.standard_error(rate, 131), statistics.stdev(hits) / math.sqrt(131))  # lm-eval's
    assert heldout.exact_match(["a"], ["b"]) == 0.0 and math.isnan(heldout.standard_error(0.0, 1))
