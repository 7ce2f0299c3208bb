"""Answer choices of the multiple-choice form of the built-in task (lm-evaluation-harness `process_docs`)."""

import random

DISTRACTORS = 3


def with_choices(dataset):
    """Each pair with its name among the names of three other pairs of the split: the same choices and order
    on every run (seeded by the pair's position), the right one at `answer`."""
    names = sorted(set(dataset["name"]))

    def add(doc: dict, index: int) -> dict:
        rng = random.Random(index)
        others = rng.sample([name for name in names if name != doc["name"]], min(DISTRACTORS, len(names) - 1))
        answer = rng.randrange(len(others) + 1)
        return {"choices": [*others[:answer], doc["name"], *others[answer:]], "answer": answer}

    return dataset.map(add, with_indices=True)
