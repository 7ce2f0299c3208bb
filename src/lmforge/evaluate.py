"""Stage 7, evaluation: every model on the same held-out data.

The models: pretrained, fine-tuned and quantized (the n-gram baseline's figures come from its own stage), and
the fine-tuning's base model when that is not the pipeline's own pretrained model; with `finetune=none`, the
pretrained model and its quantized copy. Each one is scored on
  - the pretraining corpus's test documents: perplexity and bits per byte (chunks of the model's context);
  - each task's test split: the answer's bits per byte (its negative log-likelihood after the prompt, over its
    UTF-8 bytes: it falls as a model learns long before exact match leaves 0), and exact match with greedy
    decoding and with seeded sampling (eval.sampling), with standard errors. Models before fine-tuning are
    prompted zero-shot and few-shot (eval.num_shots examples of the task's train split, drawn with the seed;
    the built-in task in code style, eval.prompt_template); fine-tuned models in their chat template, as they
    were trained. A metric over no examples is None (null in results.json, not logged);
  - lm-evaluation-harness tasks (eval.harness, lmforge.harness), with their standard errors.
The forgetting table puts them side by side: every model's test bits/byte and each task's metrics, before
(the base) and after fine-tuning.

Outputs: results.json (metrics per model, the forgetting table, sampling settings, shots, seed),
forgetting.md (the table), predictions.jsonl (every generation).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge import finetune, harness, heldout, pretrain, quantize, stage, tasks
from lmforge.chat import end_of_turn_ids
from lmforge.schema import EvalConfig, StageConfig

log = logging.getLogger(__name__)

BEFORE_FINETUNING = ("zero_shot", "few_shot")  # promptings of a model before fine-tuning; after it: "chat"


def results(stage_dir: str) -> dict:
    """This stage's report: metrics per model, the forgetting table, sampling settings, shots, seed."""
    return json.loads(Path(stage_dir, "results.json").read_text())


def load(model_dir: str):
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer


@torch.no_grad()
def sequence_nats(model, rows: list[tuple[list[int], int]], batch_size: int = 16) -> list[float]:
    """For each (tokens, n): the summed negative log-likelihood of its last n tokens, each given every token
    before it in the row (one forward pass per batch of rows, padded on the right)."""
    totals = []
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        width = max(len(tokens) for tokens, _ in batch) - 1
        pad = [width - len(tokens) + 1 for tokens, _ in batch]
        ids = torch.tensor([tokens[:-1] + [0] * p for (tokens, _), p in zip(batch, pad)])
        mask = torch.tensor([[1] * (len(tokens) - 1) + [0] * p for (tokens, _), p in zip(batch, pad)])
        targets = torch.tensor(
            [
                [-100] * (len(tokens) - 1 - n) + tokens[len(tokens) - n :] + [-100] * p
                for (tokens, n), p in zip(batch, pad)
            ]
        )
        ids, mask, targets = ids.to(model.device), mask.to(model.device), targets.to(model.device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        flat_logits = logits.float().reshape(-1, logits.shape[-1])  # (tokens, vocab): 3.5x faster than (B, V, T) on CPU
        nats = F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=-100, reduction="none")
        totals += nats.view(len(batch), -1).sum(dim=1).tolist()
    return totals


def test_nats(model, docs: list[list[int]], context: int, batch_size: int = 16) -> float:
    """Summed negative log-likelihood of every document token after the first, in chunks of `context` tokens."""
    chunks = [doc[start : start + context + 1] for doc in docs for start in range(0, len(doc) - 1, context)]
    return sum(sequence_nats(model, [(chunk, len(chunk) - 1) for chunk in chunks], batch_size))


@dataclasses.dataclass
class Example:
    prompt: list[int]  # what the model sees before it answers
    answer: list[int]  # the answer's tokens, scored after the prompt
    target: str  # the answer's text: exact match compares with it, its UTF-8 bytes are answer bits/byte's


def prompted(tokenizer, conversations: list, shots: list, eval_cfg: EvalConfig, code: bool) -> list:
    """Each conversation as prompt and answer, after the shots. In the chat template (a fine-tuned model; a task
    but the built-in for any model): the shots as earlier turns, the answer after the assistant's header. In
    code style (`code`: the built-in task for a model before fine-tuning; eval.prompt_template and
    eval.shot_template), the prompt's trailing whitespace scored with the answer as lm-evaluation-harness does,
    since the corpus tokenizes `def name` as "def", " name" and not as "def ", "name"."""
    examples = []
    for conversation in conversations:
        target = conversation[-1]["content"]
        if not code:
            turns = [*(message for shot in shots for message in shot), *conversation[:-1]]
            text, answer = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False), target
        else:
            # The user's turn before the answer: a system message, if any, has no place in a code prompt.
            fields = [{"docstring": c[-2]["content"], "name": c[-1]["content"]} for c in (*shots, conversation)]
            code = "".join(eval_cfg.shot_template.format(**f) for f in fields[:-1])
            code += eval_cfg.prompt_template.format(**fields[-1])
            text = code.rstrip()
            answer = code[len(text) :] + target
        ids = tokenizer([text, answer], add_special_tokens=False)["input_ids"]
        examples.append(Example(ids[0], ids[1], target))
    return examples


def answer_bits_per_byte(model, examples: list[Example]) -> float | None:
    """The answers' summed negative log-likelihood in bits over their bytes; a prompt longer than the model's
    context loses its oldest tokens. None without examples."""
    context = model.config.max_position_embeddings
    rows = [((e.prompt + e.answer)[-(context + 1) :], len(e.answer)) for e in examples]
    return heldout.bits_per_byte(sum(sequence_nats(model, rows)), sum(len(e.target.encode()) for e in examples))


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], eval_cfg: EvalConfig, sample: bool, seed: int) -> list[str]:
    stop = end_of_turn_ids(tokenizer) if tokenizer.chat_template else [tokenizer.eos_token_id]
    settings = dict(
        max_new_tokens=eval_cfg.max_new_tokens,
        do_sample=sample,
        eos_token_id=stop,
        pad_token_id=tokenizer.pad_token_id,
    )
    if sample:
        s = eval_cfg.sampling
        settings.update(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    else:
        settings.update(temperature=None, top_k=None, top_p=None)
    room = max(1, model.config.max_position_embeddings - eval_cfg.max_new_tokens)  # the oldest prompt tokens go
    torch.manual_seed(seed)
    texts = []
    for i in range(0, len(prompts), 32):
        batch = tokenizer.pad({"input_ids": [p[-room:] for p in prompts[i : i + 32]]}, return_tensors="pt")
        output = model.generate(**batch.to(model.device), **settings)
        texts += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return texts


def task_metrics(model, tokenizer, examples: list[Example], eval_cfg: EvalConfig, seed: int, builtin: bool):
    """Answer bits/byte and exact match per decoding, with standard errors, and the predictions."""
    metrics = {"examples": len(examples), "answer_bits_per_byte": answer_bits_per_byte(model, examples)}
    predictions = []
    targets = [e.target for e in examples]
    for decoding in ("greedy", "sampled"):
        generated = generate(model, tokenizer, [e.prompt for e in examples], eval_cfg, decoding == "sampled", seed)
        answers = [heldout.answer_of(text, builtin) for text in generated]
        rate = heldout.exact_match(answers, targets)
        metrics[f"exact_match_{decoding}"] = rate
        metrics[f"exact_match_{decoding}_stderr"] = heldout.standard_error(rate, len(examples))
        predictions += [
            {"decoding": decoding, "target": target, "answer": answer, "generated": text}
            for target, answer, text in zip(targets, answers, generated)
        ]
    return metrics, predictions


def models_to_score(inputs: dict) -> dict[str, tuple[str, bool]]:
    """name -> (model directory, whether it is fine-tuned)."""
    finetuned = "finetune" in inputs  # not with finetune=none
    models = {"pretrain": (pretrain.model_dir(inputs["pretrain"]), False)}
    if finetuned:
        base = stage.manifest(inputs["finetune"])["config"]["finetune"]["base"]
        if base != "pretrain":
            models = {"base": (base, False), **models}
        models["finetune"] = (finetune.model_dir(inputs["finetune"]), True)
    models["quantize"] = (quantize.model_dir(inputs["quantize"]), finetuned)
    return models


def baseline_results(baseline_dir: str, builtin: str | None) -> dict:
    """The n-gram baseline's own figures; on the built-in task (`builtin`: its name, when it is evaluated), the
    first-word heuristic's exact match."""
    baseline = stage.metrics(baseline_dir)
    lm_metrics = {"test_perplexity": baseline["test_perplexity"], "test_bits_per_byte": baseline["test_bits_per_byte"]}
    if builtin is None:
        return {**lm_metrics, "tasks": {}}
    rate, n = baseline["task_exact_match"], baseline["task_examples"]
    heuristic = {
        "examples": n,
        "exact_match_greedy": rate,
        "exact_match_greedy_stderr": heldout.standard_error(rate, n),
    }
    return {**lm_metrics, "tasks": {builtin: {"first_word": heuristic}}}


def forgetting_table(models: dict, finetuned: dict[str, bool], num_shots: int) -> dict:
    """One row per model, before (the base) and after fine-tuning: test bits/byte, each task's answer bits/byte
    and greedy exact match (few-shot before fine-tuning when there are shots, in the chat template after), each
    harness task's metrics. Columns are "test_bits_per_byte", "<task>.<metric>", "harness.<task>.<metric>"."""
    before = "few_shot" if num_shots else "zero_shot"
    rows = []
    for name, m in models.items():
        row = {"model": name, "fine_tuned": finetuned.get(name, False), "test_bits_per_byte": m["test_bits_per_byte"]}
        for task, promptings in m["tasks"].items():
            prompting = next(p for p in ("chat", before, "first_word") if p in promptings)
            row[f"{task}.prompting"] = prompting
            for metric in ("answer_bits_per_byte", "exact_match_greedy"):
                row[f"{task}.{metric}"] = promptings[prompting].get(metric)
        for task, scores in m.get("harness", {}).items():
            for metric, value in (scores or {}).items():
                if metric != "examples" and not metric.endswith("_stderr"):
                    row[f"harness.{task}.{metric}"] = value
        rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row if key not in ("model", "fine_tuned")))
    return {
        "columns": columns,
        "rows": [{key: row.get(key) for key in ("model", "fine_tuned", *columns)} for row in rows],
    }


def markdown(table: dict) -> str:
    def cell(value) -> str:
        return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    columns = ["model", "fine_tuned", *table["columns"]]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in table["rows"]]
    return "\n".join(lines) + "\n"


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested metrics as MLflow keys ("finetune.docstring_to_name.chat.exact_match_greedy"); numbers only."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[f"{prefix}{key}"] = value
    return flat


def main(cfg: StageConfig, out: Path, tracker) -> dict:
    eval_cfg, inputs, seed = cfg.eval, cfg.inputs, cfg.seed
    finetuned = "finetune" in inputs  # with finetune=none there is no task: language-model metrics only
    tests = tasks.examples(inputs["tasks"], "test", eval_cfg.max_task_examples) if finetuned else {}
    shots = {
        task: random.Random(seed).sample(train, min(eval_cfg.num_shots, len(train)))
        for task, train in (tasks.examples(inputs["tasks"], "train") if finetuned else {}).items()
    }
    builtin = next((t["name"] for t in tasks.describe(inputs["tasks"]) if t["builtin"]), None) if finetuned else None
    texts = heldout.test_documents(inputs["curate"], eval_cfg.max_test_documents)
    n_bytes = sum(len(t.encode()) for t in texts)
    models = models_to_score(inputs)
    harness_cfg = eval_cfg.harness
    if builtin is None:  # the shipped harness tasks are the built-in task's
        harness_cfg = dataclasses.replace(harness_cfg, tasks=[t for t in harness_cfg.tasks if t not in harness.SHIPPED])
    if harness_cfg.tasks:
        splits = {s: str(Path(inputs["curate"], "task", f"{s}.parquet")) for s in ("train", "test")}
        harness_specs = harness.task_specs(harness_cfg, splits if tests.get(builtin) else None)
        manager = harness.task_manager(harness_cfg)

    scored = {"baseline": baseline_results(inputs["baseline"], builtin)}
    predictions = []
    progress = stage.Progress(log, "models scored:", len(models), every_s=0)
    for number, (name, (model_dir, tuned)) in enumerate(models.items(), 1):
        log.info("model %d/%d: %s (%s)", number, len(models), name, model_dir)
        model, tokenizer = load(model_dir)
        docs = heldout.document_token_ids(tokenizer, texts)
        nats = test_nats(model, docs, model.config.max_position_embeddings)
        metrics = {**heldout.language_model_metrics(nats, sum(len(d) - 1 for d in docs), n_bytes), "tasks": {}}
        for task, conversations in tests.items():
            promptings = {"chat": []} if tuned else {"zero_shot": [], "few_shot": shots[task]}
            if not eval_cfg.num_shots:
                promptings.pop("few_shot", None)
            metrics["tasks"][task] = {}
            for prompting, task_shots in promptings.items():
                examples = prompted(tokenizer, conversations, task_shots, eval_cfg, code=task == builtin and not tuned)
                task_scores, generations = task_metrics(model, tokenizer, examples, eval_cfg, seed, task == builtin)
                metrics["tasks"][task][prompting] = task_scores
                predictions += [{"model": name, "task": task, "prompting": prompting, **g} for g in generations]
                log.info("%s %s %s: %s", name, task, prompting, task_scores)
        if harness_cfg.tasks:
            metrics["harness"] = harness.evaluate(model, tokenizer, harness_cfg, manager, harness_specs, tuned, seed)
        scored[name] = metrics
        progress(number, f"({name}: test bits/byte {metrics['test_bits_per_byte']:.4f})")

    forgetting = forgetting_table(scored, {name: tuned for name, (_, tuned) in models.items()}, eval_cfg.num_shots)
    report = {
        "models": scored,
        "forgetting": forgetting,
        "seed": seed,
        "sampling": dataclasses.asdict(eval_cfg.sampling),
        "greedy": {"max_new_tokens": eval_cfg.max_new_tokens},
        "num_shots": eval_cfg.num_shots,
        "shots": {task: [shot[-1]["content"] for shot in task_shots] for task, task_shots in shots.items()},
        "harness": dataclasses.asdict(harness_cfg),  # the tasks that ran
        "task_examples": {task: len(conversations) for task, conversations in tests.items()},
        "builtin_task": builtin,  # the name of the built-in task among them, if it is one
        "test_documents": len(texts),
        "test_bytes": n_bytes,
    }
    stage.write_json(out / "results.json", report)
    (out / "forgetting.md").write_text(markdown(forgetting))
    with open(out / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in predictions)
    tracker.log_artifacts([out / "results.json", out / "forgetting.md"])
    metrics = flatten(scored)
    if finetuned:  # how much of the pretraining corpus fine-tuning forgot, in bits per byte, against its own base
        before = scored["base" if "base" in scored else "pretrain"]
        metrics["forgetting.test_bits_per_byte"] = (
            scored["finetune"]["test_bits_per_byte"] - before["test_bits_per_byte"]
        )
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stage.run(main)
