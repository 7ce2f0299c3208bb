"""Stage 5, fine-tuning: supervised fine-tuning on docstring -> function name with the chat template.

The starting point, `finetune.base`, is this pipeline's pretrained model (`pretrain`, the default) or any
Hugging Face causal LM by Hub name or local directory; the base model's own tokenizer and chat template
are used. The loss is on the answer tokens only (the name and the template's end of turn).
`finetune.method` is `full` (every weight), `lora` (peft adapters) or `qlora` (LoRA on a 4-bit NF4 base,
bitsandbytes, CUDA only); adapters are merged into the unquantized base for export. Same DeepSpeed loop
as pretraining.

Outputs: model/ (a plain Hugging Face model directory with the tokenizer); metrics in the manifest.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge import heldout, pretrain, stage, train_loop
from lmforge.chat import chat_texts
from lmforge.schema import FinetuneConfig, LoraConfig, StageConfig

IGNORE = -100


def model_dir(stage_dir: str) -> str:
    """The fine-tuned model this stage exported (adapters merged), with the tokenizer."""
    return f"{stage_dir}/model"


def base_model_dir(cfg: StageConfig) -> str:
    """`finetune.base`: `pretrain` (this pipeline's model), or a Hub name or local path of a causal LM.

    Compute nodes usually have no internet: download a Hub model on the login node first
    (`hf download NAME`, with HF_HOME on the shared filesystem); loading then works offline.
    """
    base = cfg.finetune.base
    return pretrain.model_dir(cfg.inputs["pretrain"]) if base == "pretrain" else base


def sft_example(tokenizer, pair: dict, max_len: int) -> dict:
    prompt, answer = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in chat_texts(tokenizer, pair))
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


def load_base(base: str, quantized: bool) -> torch.nn.Module:
    if not quantized:
        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if not torch.cuda.is_available():
        raise stage.StageError(
            "finetune.method=qlora needs a CUDA GPU: bitsandbytes' 4-bit NF4 weights are not faithful on CPU. "
            "On CPU use finetune=lora (same adapters on an unquantized base)."
        )
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    device = {"": int(os.environ.get("LOCAL_RANK", 0))}  # one GPU per process; bitsandbytes places the weights
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=nf4, dtype=torch.bfloat16, device_map=device)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def add_adapters(model: torch.nn.Module, lora: LoraConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    adapters = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=[m for m in lora.target_modules if m in present],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, adapters)


def load_trainable(base: str, ft_cfg: FinetuneConfig, for_export: bool = False) -> torch.nn.Module:
    """The model to train; for export, the same shape on an unquantized base so adapters merge exactly."""
    model = load_base(base, quantized=ft_cfg.method == "qlora" and not for_export)
    return model if ft_cfg.method == "full" else add_adapters(model, ft_cfg.lora)


def main(cfg: StageConfig, out: Path, tracker) -> dict:
    ft_cfg, tcfg = cfg.finetune, cfg.finetune.train
    base = base_model_dir(cfg)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # many base models have no padding token
    model = load_trainable(base, ft_cfg)
    max_len = model.config.max_position_embeddings
    curated = cfg.inputs["curate"]
    train_examples = [sft_example(tokenizer, p, max_len) for p in heldout.task_pairs(curated, "train")]
    if not train_examples:
        raise stage.StageError(f"no fine-tuning pairs in {curated}/task/train.parquet: the corpus yielded no docstring pairs")
    val_examples = [sft_example(tokenizer, p, max_len) for p in heldout.task_pairs(curated, "validation")]
    mb = tcfg.micro_batch_size
    validation = [pad_batch(val_examples[i : i + mb], tokenizer.pad_token_id) for i in range(0, len(val_examples), mb)]
    validation = validation[: tcfg.eval_batches]

    state, metrics = train_loop.train(
        model,
        lambda idx: pad_batch([train_examples[i] for i in idx], tokenizer.pad_token_id),
        len(train_examples),
        validation,
        tcfg,
        cfg.seed,
        Path(cfg.run.checkpoint_dir),
        tracker,
    )
    if not stage.is_rank_zero():
        return metrics
    final = load_trainable(base, ft_cfg, for_export=True)
    if ft_cfg.method == "full":
        final.load_state_dict(state)
    else:  # the base is frozen: only the adapters were trained (a QLoRA state holds 4-bit base weights)
        adapters = {k: v for k, v in state.items() if "lora_" in k}
        missing = [k for k in final.load_state_dict(adapters, strict=False).missing_keys if "lora_" in k]
        if missing:
            raise stage.StageError(f"{len(missing)} trained adapter tensors are not in the checkpoint, e.g. {missing[0]}")
        metrics["trainable_parameters"] = sum(v.numel() for v in adapters.values())
        final = final.merge_and_unload()
    final.save_pretrained(model_dir(out))
    tokenizer.save_pretrained(model_dir(out))
    metrics["train_examples"] = len(train_examples)
    return metrics


if __name__ == "__main__":
    stage.run(main)
