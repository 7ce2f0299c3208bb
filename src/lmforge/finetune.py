"""Stage 5, fine-tuning: supervised fine-tuning on docstring -> function name with the chat template.

The loss is on the answer tokens only (the name and <|im_end|>). `finetune.method` is `full` (every weight)
or `lora` (peft adapters, merged into the model for export). Same DeepSpeed loop as pretraining.

Outputs: model/ (a plain Hugging Face model directory with the tokenizer), metrics.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge import heldout, stage, train_loop

IGNORE = -100


def chat_prompt(tokenizer, docstring: str) -> list[int]:
    """The user turn and the assistant header: what the model sees before it answers."""
    messages = [{"role": "user", "content": docstring}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sft_example(tokenizer, pair: dict, max_len: int) -> dict:
    prompt = chat_prompt(tokenizer, pair["docstring"])
    answer = tokenizer(pair["name"], add_special_tokens=False)["input_ids"] + [
        tokenizer.convert_tokens_to_ids("<|im_end|>")
    ]
    prompt = prompt[-(max_len - len(answer)) :]  # keep the end of a long docstring and the assistant header
    return {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer}


def pad_batch(examples: list[dict], pad_id: int) -> dict:
    width = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        fill = width - len(e["input_ids"])
        batch["input_ids"].append(e["input_ids"] + [pad_id] * fill)
        batch["attention_mask"].append([1] * len(e["input_ids"]) + [0] * fill)
        batch["labels"].append(e["labels"] + [IGNORE] * fill)
    return {k: torch.tensor(v) for k, v in batch.items()}


def load_trainable(base: str, ft_cfg: dict) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if ft_cfg["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        lora = ft_cfg["lora"]
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora["r"],
                lora_alpha=lora["alpha"],
                lora_dropout=lora["dropout"],
                target_modules=[m for m in lora["target_modules"] if m in present],
                task_type="CAUSAL_LM",
            ),
        )
    return model


def main(cfg: dict, out: Path, tracker) -> dict:
    ft_cfg, tcfg = cfg["finetune"], cfg["finetune"]["train"]
    base = f"{cfg['inputs']['pretrain']}/model"
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = load_trainable(base, ft_cfg)
    max_len = model.config.max_position_embeddings
    curated = cfg["inputs"]["curate"]
    train_examples = [sft_example(tokenizer, p, max_len) for p in heldout.task_pairs(curated, "train")]
    if not train_examples:
        raise SystemExit(f"no fine-tuning pairs in {curated}/task/train.parquet: the corpus yielded no docstring pairs")
    val_examples = [sft_example(tokenizer, p, max_len) for p in heldout.task_pairs(curated, "validation")]
    mb = tcfg["micro_batch_size"]
    validation = [pad_batch(val_examples[i : i + mb], tokenizer.pad_token_id) for i in range(0, len(val_examples), mb)]
    validation = validation[: tcfg["eval_batches"]]

    state, metrics = train_loop.train(
        model,
        lambda idx: pad_batch([train_examples[i] for i in idx], tokenizer.pad_token_id),
        len(train_examples),
        validation,
        tcfg,
        cfg["seed"],
        Path(cfg["run"]["checkpoint_dir"]),
        tracker,
    )
    if not stage.is_rank_zero():
        return metrics
    final = load_trainable(base, ft_cfg)
    final.load_state_dict(state)
    if ft_cfg["method"] == "lora":
        metrics["trainable_parameters"] = sum(p.numel() for n, p in final.named_parameters() if "lora_" in n)
        final = final.merge_and_unload()
    final.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    metrics["train_examples"] = len(train_examples)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    stage.run(main)
