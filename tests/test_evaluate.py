"""Evaluation's numbers against independent computations on small constructed cases."""

import math
import random

import datasets
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge import evaluate, harness, heldout
from lmforge import tokenizer as tokenizer_stage
from lmforge.chat import conversation
from lmforge.harness_tasks import choices
from lmforge.schema import EvalConfig, HarnessConfig
from lmforge.stage import StageError
from tests.stages import curated_and_tokenized, plan

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
    assert heldout.exact_match(names, [p["name"] for p in pairs]) == pytest.approx(3 / 6)
    assert heldout.standard_error(3 / 6, 6) == pytest.approx(math.sqrt(0.5 * 0.5 / 5))


@torch.no_grad()
def answer_nats_token_by_token(model, prompt: list[int], answer: list[int]) -> float:
    """-ln p of each answer token given at most the CONTEXT tokens before it, one forward pass per token."""
    tokens = prompt + answer
    nats = 0.0
    for t in range(len(prompt), len(tokens)):
        logits = model(input_ids=torch.tensor([tokens[max(0, t - CONTEXT) : t]])).logits[0, -1]
        nats -= torch.log_softmax(logits.double(), dim=-1)[tokens[t]].item()
    return nats


def test_answer_bits_per_byte_scores_the_answer_tokens_after_their_prompt():
    model = peaked_llama()
    rng = random.Random(1)
    # Prompts shorter than the context, and one that with its answer fills more than it (its oldest tokens go).
    shapes = [(3, 2), (1, 1), (5, 3), (CONTEXT - 2, 3)]
    examples = [
        evaluate.Example(rng.sample(range(1, VOCAB), p), rng.sample(range(1, VOCAB), a), "x" * (a + 1))
        for p, a in shapes
    ]
    expected = sum(answer_nats_token_by_token(model, e.prompt, e.answer) for e in examples)
    n_bytes = sum(a + 1 for _, a in shapes)
    assert evaluate.answer_bits_per_byte(model, examples) == pytest.approx(expected / math.log(2) / n_bytes, rel=1e-5)
    # A prompt changes what the answer costs: the same answers after other prompts score differently.
    moved = [evaluate.Example(e.prompt[::-1], e.answer, e.target) for e in examples]
    assert evaluate.answer_bits_per_byte(model, moved) != pytest.approx(evaluate.answer_bits_per_byte(model, examples))


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """The small corpus's curate and tokenizer stages, and an untrained tiny Llama on that tokenizer."""
    root = tmp_path_factory.mktemp("evaluate")
    stages = plan(root / "results", curated_and_tokenized(root))
    trained = tokenizer_stage.load(stages["tokenizer"].dir)
    torch.manual_seed(0)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = LlamaConfig(vocab_size=len(trained), max_position_embeddings=64, initializer_range=0.2, **shape)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    trained.save_pretrained(root / "model")
    model, tokenizer = evaluate.load(str(root / "model"))  # as the stage loads a model
    return stages["curate"].dir, tokenizer, model


def test_code_prompts_score_the_prompts_trailing_space_with_the_answer_and_chat_prompts_do_not(curated):
    curate_dir, tokenizer, _ = curated
    conversations = [conversation(p["docstring"], p["name"]) for p in heldout.task_pairs(curate_dir, "test", 1)]
    shots = [conversation(p["docstring"], p["name"]) for p in heldout.task_pairs(curate_dir, "train", 1)]
    eval_cfg = EvalConfig()
    [code] = evaluate.prompted(tokenizer, conversations, shots, eval_cfg, code=True)
    docstring, name = conversations[0][0]["content"], conversations[0][1]["content"]
    shot = eval_cfg.shot_template.format(docstring=shots[0][0]["content"], name=shots[0][1]["content"])
    assert tokenizer.decode(code.prompt) == shot + f"# {docstring}\ndef"
    assert tokenizer.decode(code.answer) == f" {name}" and code.target == name
    [chat] = evaluate.prompted(tokenizer, conversations, [], eval_cfg, code=False)
    text = tokenizer.apply_chat_template(conversations[0], tokenize=False)
    assert tokenizer.decode(chat.prompt) + tokenizer.decode(chat.answer) + "<|im_end|>\n" == text
    assert tokenizer.decode(chat.answer) == name


def test_task_metrics_over_no_examples_are_null(curated):
    _, tokenizer, model = curated
    metrics, predictions = evaluate.task_metrics(model, tokenizer, [], EvalConfig(), seed=0, builtin=True)
    assert metrics.pop("examples") == 0 and predictions == []
    assert set(metrics.values()) == {None} and "answer_bits_per_byte" in metrics


def test_the_shipped_harness_tasks_run_offline_on_the_curated_split(curated):
    """Multiple choice through lm-evaluation-harness agrees with ranking the same choices by our own
    log-likelihood; generation is scored over the same examples, each with its standard error."""
    curate_dir, tokenizer, model = curated
    limit = 6
    harness_cfg = HarnessConfig(limit=limit)
    splits = {split: f"{curate_dir}/task/{split}.parquet" for split in ("train", "test")}
    specs = harness.task_specs(harness_cfg, splits)
    results = harness.evaluate(model, tokenizer, harness_cfg, harness.task_manager(harness_cfg), specs, False, 0)
    choice, generate = results["lmforge_docstring_to_name_choice"], results["lmforge_docstring_to_name_generate"]
    assert choice["examples"] == generate["examples"] == limit

    docs = choices.with_choices(datasets.Dataset.from_parquet(splits["test"])).select(range(limit))
    assert all(doc["choices"][doc["answer"]] == doc["name"] and len(set(doc["choices"])) == 4 for doc in docs)
    hits = []
    for doc in docs:  # lm-eval's pairs: the context without its trailing space, " " + the choice after it
        context = f"# {doc['docstring']}\ndef"
        context_ids = tokenizer(context)["input_ids"]
        rows = []
        for name in doc["choices"]:
            answer = tokenizer(f"{context} {name}")["input_ids"][len(context_ids) :]
            rows.append(((context_ids + answer)[-65:], len(answer)))
        nats = evaluate.sequence_nats(model, rows)
        hits.append(float(nats.index(min(nats)) == doc["answer"]))
    assert choice["acc"] == pytest.approx(sum(hits) / limit)
    assert choice["acc_stderr"] == pytest.approx(heldout.standard_error(choice["acc"], limit))
    assert 0 <= generate["exact_match_first_identifier"] <= 1 and "exact_match_first_identifier_stderr" in generate


def test_without_test_pairs_the_shipped_harness_tasks_are_null_and_unknown_tasks_stop_the_stage(curated):
    _, tokenizer, model = curated
    harness_cfg = HarnessConfig(tasks=["lmforge_docstring_to_name_choice"])
    specs = harness.task_specs(harness_cfg, None)
    assert harness.evaluate(model, tokenizer, harness_cfg, None, specs, False, 0) == {
        "lmforge_docstring_to_name_choice": None
    }
    # A task the harness does not know stops the stage naming it (the shipped tasks' index alone: indexing the
    # harness's 14,000 own configs takes a minute on a busy machine).
    unknown = {"no_such_task_anywhere": "no_such_task_anywhere"}
    with pytest.raises(StageError, match="no_such_task_anywhere"):
        harness.evaluate(model, tokenizer, harness_cfg, harness.task_manager(harness_cfg), unknown, False, 0)
