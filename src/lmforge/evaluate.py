"""Stage 7, evaluation: every model on the same held-out data.

For the pretrained, fine-tuned and quantized models (the baseline's figures come from its own stage), and
for the fine-tuning's base model when that is not the pipeline's own pretrained model (with `finetune=none`:
the pretrained model and its quantized copy):
  - test perplexity and bits per byte on the test documents (chunks of the model's context length);
  - task exact match (with its standard error), docstring -> function name, with greedy decoding and with seeded sampling
    (temperature, top-k, top-p from config). Models before fine-tuning are prompted zero-shot and few-shot
    with code-style prompts; the fine-tuned models with their chat template. Without test pairs the task's
    metrics are None (null in results.json, not logged).

Outputs: results.json (metrics per model, sampling settings, seed), predictions.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge import finetune, heldout, pretrain, quantize, stage
from lmforge.chat import chat_prompt, end_of_turn_ids
from lmforge.schema import EvalConfig, StageConfig


def results(stage_dir: str) -> dict:
    """This stage's report: metrics per model, sampling settings, seed, how many examples and documents."""
    return json.loads(Path(stage_dir, "results.json").read_text())


def load(model_dir: str):
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer


@torch.no_grad()
def test_nats(model, docs: list[list[int]], context: int, batch_size: int = 16) -> float:
    """Summed negative log-likelihood of every document token after the first, in chunks of `context` tokens."""
    chunks = [doc[start : start + context + 1] for doc in docs for start in range(0, len(doc) - 1, context)]
    total = 0.0
    for i in range(0, len(chunks), batch_size):
        batch = chunks[i : i + batch_size]
        width = max(len(c) for c in batch)
        ids = torch.tensor([c + [0] * (width - len(c)) for c in batch])
        targets = torch.tensor([c[1:] + [-100] * (width - len(c)) for c in batch])
        ids, targets = ids.to(model.device), targets.to(model.device)
        logits = model(input_ids=ids[:, :-1], attention_mask=(targets != -100).long()).logits
        flat_logits = logits.float().reshape(-1, logits.shape[-1])  # (tokens, vocab): 3.5x faster than (B, V, T) on CPU
        total += F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=-100, reduction="sum").item()
    return total


@torch.no_grad()
def generate_names(
    model, tokenizer, prompts: list[list[int]], eval_cfg: EvalConfig, sample: bool, seed: int
) -> list[str]:
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
    torch.manual_seed(seed)
    names = []
    for i in range(0, len(prompts), 32):
        batch = tokenizer.pad({"input_ids": prompts[i : i + 32]}, return_tensors="pt").to(model.device)
        output = model.generate(**batch, **settings)
        for row in output[:, batch["input_ids"].shape[1] :]:
            names.append(heldout.identifier(tokenizer.decode(row, skip_special_tokens=True)))
    return names


def code_prompts(tokenizer, pairs: list[dict], shots: list[dict], eval_cfg: EvalConfig) -> list[list[int]]:
    prefix = "".join(eval_cfg.shot_template.format(**shot) for shot in shots)
    texts = [prefix + eval_cfg.prompt_template.format(docstring=p["docstring"]) for p in pairs]
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # a tokenizer fails on []


def task_metrics(model, tokenizer, prompt_sets: dict, pairs: list[dict], eval_cfg: EvalConfig, seed: int):
    """Exact match per prompting and decoding, and the predictions; None for each without test pairs."""
    metrics, predictions = {}, []
    for prompting, prompts in prompt_sets.items():
        for decoding in ("greedy", "sampled"):
            names = generate_names(model, tokenizer, prompts, eval_cfg, decoding == "sampled", seed) if pairs else []
            rate = heldout.exact_match(names, pairs)
            metrics[f"task_exact_match_{prompting}_{decoding}"] = rate
            metrics[f"task_exact_match_{prompting}_{decoding}_stderr"] = heldout.standard_error(rate, len(pairs))
            predictions += [
                {"prompting": prompting, "decoding": decoding, "name": p["name"], "predicted": n}
                for n, p in zip(names, pairs)
            ]
    return metrics, predictions


def main(cfg: StageConfig, out: Path, tracker) -> dict:
    eval_cfg, inputs, seed = cfg.eval, cfg.inputs, cfg.seed
    pairs = heldout.task_pairs(inputs["curate"], "test", eval_cfg.max_task_examples)
    train_pairs = heldout.task_pairs(inputs["curate"], "train")
    shots = random.Random(seed).sample(train_pairs, min(eval_cfg.few_shot, len(train_pairs)))
    texts = heldout.test_documents(inputs["curate"], eval_cfg.max_test_documents)
    n_bytes = sum(len(t.encode()) for t in texts)

    baseline = stage.metrics(inputs["baseline"])
    results = {"baseline": {k: baseline[k] for k in ("test_perplexity", "test_bits_per_byte", "task_exact_match")}}
    results["baseline"]["task_exact_match_stderr"] = heldout.standard_error(
        baseline["task_exact_match"], baseline["task_examples"]
    )
    predictions = []
    model_dirs = {"pretrain": pretrain.model_dir(inputs["pretrain"])}
    if "finetune" in inputs:  # not with finetune=none
        model_dirs["finetune"] = finetune.model_dir(inputs["finetune"])
        base = stage.manifest(inputs["finetune"])["config"]["finetune"]["base"]
        if base != "pretrain":
            model_dirs = {"base": base, **model_dirs}
    model_dirs["quantize"] = quantize.model_dir(inputs["quantize"])
    for name, model_dir in model_dirs.items():
        model, tokenizer = load(model_dir)
        docs = heldout.document_token_ids(tokenizer, texts)
        nats = test_nats(model, docs, model.config.max_position_embeddings)
        metrics = heldout.language_model_metrics(nats, sum(len(d) - 1 for d in docs), n_bytes)
        if name == "finetune" or (name == "quantize" and "finetune" in inputs):
            prompt_sets = {"chat": [chat_prompt(tokenizer, p["docstring"]) for p in pairs]}
        else:  # a model before fine-tuning
            prompt_sets = {
                "zero_shot": code_prompts(tokenizer, pairs, [], eval_cfg),
                "few_shot": code_prompts(tokenizer, pairs, shots, eval_cfg),
            }
        task, model_predictions = task_metrics(model, tokenizer, prompt_sets, pairs, eval_cfg, seed)
        metrics.update(task)
        predictions += [{"model": name, **p} for p in model_predictions]
        results[name] = metrics
        print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if v is not None), flush=True)

    report = {
        "models": results,
        "seed": seed,
        "sampling": dataclasses.asdict(eval_cfg.sampling),
        "greedy": {"max_new_tokens": eval_cfg.max_new_tokens},
        "few_shot": eval_cfg.few_shot,
        "task_examples": len(pairs),
        "test_documents": len(texts),
        "test_bytes": n_bytes,
    }
    stage.write_json(out / "results.json", report)
    with open(out / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in predictions)
    tracker.log_artifacts([out / "results.json"])
    flat = {f"{model}.{k}": v for model, m in results.items() for k, v in m.items() if isinstance(v, (int, float))}
    return {k: v for k, v in flat.items() if math.isfinite(v)}


if __name__ == "__main__":
    stage.run(main)
