"""Stage 6, fine-tuning: supervised fine-tuning on the tasks of `finetune.data` (the tasks stage's conversations).

The starting point, `finetune.base`, is this pipeline's pretrained model (`pretrain`, the default) or any
Hugging Face causal LM by Hub name or local directory; the base model's own tokenizer and chat template
are used. Each conversation is rendered in that template (lmforge.chat, as evaluation renders it) and the
loss is on the assistant's tokens only (every assistant message and the template's end of turn).

An example longer than its task's `max_tokens` (or the model's context) is truncated from its start, keeping
the last answer whole, or dropped (`overlong`); both are counted. The training examples are a mixture: each
drawn from a task with probability weight / sum of weights, a task's examples in a seeded order that is
reshuffled each pass, so the mixture is a function of the seed. With `finetune.packing`, consecutive examples
share a row (as long as the longest example), each attending only to itself: position ids restart at every
example, and without an attention mask transformers builds the block-diagonal causal mask from them.

`finetune.method` is `full` (every weight), `lora` (peft adapters) or `qlora` (LoRA on a 4-bit NF4 base,
bitsandbytes, CUDA only); adapters are merged into the unquantized base for export. Same DeepSpeed loop
as pretraining.

Outputs: model/ (a plain Hugging Face model directory with the tokenizer); metrics in the manifest.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge import chat, pretrain, stage, tasks, train_loop
from lmforge.chat import IGNORE
from lmforge.schema import FinetuneConfig, FinetuneTaskConfig, LoraConfig, StageConfig

log = logging.getLogger(__name__)


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


def sft_examples(tokenizer, conversations: list[list[dict]], limit: int, overlong: str, counts: Counter) -> list[dict]:
    """Token ids and labels (the assistant's tokens) of each conversation at most `limit` tokens long.

    A longer one is dropped, or truncated from its start; truncation keeps the last answer and at least one
    token before it (the answer is trained on what precedes it), else the example is dropped too.
    """
    examples = []
    for conversation in conversations:
        ids, labels = chat.render(tokenizer, conversation)
        if len(ids) > limit:
            answer = len(labels) - next(i for i in range(len(labels) - 1, -1, -1) if labels[i] == IGNORE) - 1
            if overlong == "drop" or answer >= limit:
                counts["dropped_overlong"] += 1
                continue
            ids, labels = ids[-limit:], labels[-limit:]
            counts["truncated"] += 1
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def task_limit(task: FinetuneTaskConfig, context: int) -> int:
    return min(task.max_tokens or context, context)


def mixture(sizes: list[int], weights: list[float], seed: int) -> Iterator[tuple[int, int]]:
    """Endless (task, example) draws: a task with probability weight / sum of weights, then its next example in
    an order shuffled by the seed, reshuffled after each pass."""
    rng = np.random.default_rng([seed, len(sizes)])
    shares = np.asarray(weights, dtype=float) / sum(weights)
    orders = [rng.permutation(n) for n in sizes]
    positions = [0] * len(sizes)
    while True:
        for task in rng.choice(len(sizes), size=4096, p=shares):
            if positions[task] == sizes[task]:
                orders[task], positions[task] = rng.permutation(sizes[task]), 0
            yield int(task), int(orders[task][positions[task]])
            positions[task] += 1


def pack_rows(draws: Iterator, length: Callable, row_tokens: int, rows: int, packing: bool) -> list[list]:
    """`rows` rows of consecutive draws, each row at most `row_tokens` tokens (one draw per row without packing)."""
    packed, row, used = [], [], 0
    for draw in draws:
        if row and (not packing or used + length(draw) > row_tokens):
            packed.append(row)
            if len(packed) == rows:
                return packed
            row, used = [], 0
        row.append(draw)
        used += length(draw)
    if row:  # the draws ran out (a finite list): the last row
        packed.append(row)
    return packed


def training_rows(
    examples: list[list[dict]], weights: list[float], rows: int, packing: bool, seed: int
) -> tuple[list[list[tuple[int, int]]], int]:
    """`rows` rows of (task, example) drawn from the seeded mixture, and the row length: the longest example's,
    so packing fills rows and no row is longer than an unpacked batch would be."""

    def length(draw: tuple[int, int]) -> int:
        return len(examples[draw[0]][draw[1]]["input_ids"])

    row_tokens = max(len(e["input_ids"]) for task in examples for e in task)
    draws = mixture([len(task) for task in examples], weights, seed)
    return pack_rows(draws, length, row_tokens, rows, packing), row_tokens


def collate(rows: list[list[dict]], pad_id: int) -> dict:
    """Rows of examples, as one tensor each of token ids, labels and position ids, padded to the longest row.

    No attention mask: position ids that restart at each example (and at the padding) make transformers mask
    attention block-diagonally, so no example sees another.
    """
    batch = {"input_ids": [], "labels": [], "position_ids": []}
    width = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    for row in rows:
        fill = width - sum(len(e["input_ids"]) for e in row)
        batch["input_ids"].append([t for e in row for t in e["input_ids"]] + [pad_id] * fill)
        batch["labels"].append([t for e in row for t in e["labels"]] + [IGNORE] * fill)
        batch["position_ids"].append([p for e in row for p in range(len(e["input_ids"]))] + list(range(fill)))
    return {k: torch.tensor(v) for k, v in batch.items()}


def read_examples(cfg: StageConfig, tokenizer, context: int, split: str) -> tuple[list[list[dict]], Counter]:
    """Each task's examples of one split, tokenized within its length limit, in finetune.data's order."""
    conversations = tasks.examples(cfg.inputs["tasks"], split)
    counts = Counter()
    examples = []
    for task in cfg.finetune.data:
        task_counts = Counter()
        examples.append(
            sft_examples(tokenizer, conversations[task.name], task_limit(task, context), task.overlong, task_counts)
        )
        counts.update({f"{task.name}.{split}_{k}": v for k, v in task_counts.items()})
        counts[f"{task.name}.{split}_examples"] = len(examples[-1])
    return examples, counts


def interleaved(examples: list[list[dict]]) -> Iterator[tuple[int, int]]:
    """Every example once, the tasks taking turns: validation batches hold every task."""
    longest = max(len(e) for e in examples)
    return ((task, i) for i in range(longest) for task in range(len(examples)) if i < len(examples[task]))


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
    model.config.use_cache = False  # no generation in training; a cache would also turn off the packed-sequence mask
    context = model.config.max_position_embeddings
    train_examples, counts = read_examples(cfg, tokenizer, context, "train")
    val_examples, val_counts = read_examples(cfg, tokenizer, context, "validation")
    counts.update(val_counts)
    for task, examples in zip(ft_cfg.data, train_examples):
        if not examples:
            raise stage.StageError(
                f"task {task.name}: all {counts[f'{task.name}.train_dropped_overlong']} training examples are longer "
                f"than its limit of {task_limit(task, context)} tokens: raise its max_tokens or set overlong=truncate"
            )

    needed = tcfg.steps * tcfg.micro_batch_size * tcfg.grad_accum * tcfg.processes
    rows, row_tokens = training_rows(train_examples, [t.weight for t in ft_cfg.data], needed, ft_cfg.packing, cfg.seed)
    drawn = Counter(task for row in rows for task, _ in row)
    log.info(
        "%d training rows of up to %d tokens, %.2f examples per row", len(rows), row_tokens, drawn.total() / len(rows)
    )

    val_rows = pack_rows(interleaved(val_examples), lambda d: len(val_examples[d[0]][d[1]]["input_ids"]), row_tokens,
                         tcfg.eval_batches * tcfg.micro_batch_size, ft_cfg.packing)  # fmt: skip
    mb = tcfg.micro_batch_size
    validation = [
        collate([[val_examples[t][i] for t, i in row] for row in val_rows[start : start + mb]], tokenizer.pad_token_id)
        for start in range(0, len(val_rows), mb)
    ]

    def train_batch(indices: list[int]) -> dict:
        return collate([[train_examples[t][i] for t, i in rows[index]] for index in indices], tokenizer.pad_token_id)

    state, metrics = train_loop.train(
        model,
        train_batch,
        len(rows),
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
            raise stage.StageError(
                f"{len(missing)} trained adapter tensors are not in the checkpoint, e.g. {missing[0]}"
            )
        metrics["trainable_parameters"] = sum(v.numel() for v in adapters.values())
        final = final.merge_and_unload()
    final.save_pretrained(model_dir(out))
    tokenizer.save_pretrained(model_dir(out))
    metrics.update(counts)
    metrics["train_examples"] = sum(len(e) for e in train_examples)
    metrics["train_rows"] = len(rows)
    metrics["row_tokens"] = row_tokens
    metrics["examples_per_row"] = drawn.total() / len(rows)
    for index, task in enumerate(ft_cfg.data):  # the mixture as drawn, against the weights asked for
        metrics[f"{task.name}.drawn_share"] = drawn[index] / drawn.total()
    return metrics


if __name__ == "__main__":
    stage.run(main)
