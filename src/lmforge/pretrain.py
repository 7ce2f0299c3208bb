"""Stage 4, pretraining: a Llama-style (or GPT-2) model built from config, trained with DeepSpeed.

Reads the tokenizer stage's token shards, memory-mapped (no tokenizer in the loop), trains on blocks of
`model.max_seq_len` tokens (each rank reads only those of its own micro-batches), and writes the final
weights as a plain Hugging Face model directory.

Outputs: model/ (save_pretrained, safetensors, with the tokenizer); the manifest's metrics hold the final
losses, the parameters with and without embeddings, and the tokens seen.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from lmforge import stage, tokenizer, train_loop
from lmforge.schema import ModelConfig, StageConfig


def special_token_ids(bpe) -> dict:
    return dict(
        bos_token_id=bpe.bos_token_id, eos_token_id=bpe.eos_token_id, pad_token_id=bpe.pad_token_id
    )


def model_dir(stage_dir: str) -> str:
    """The trained model this stage exported: a plain Hugging Face directory, with the tokenizer."""
    return f"{stage_dir}/model"


def build_model(model_cfg: ModelConfig, vocab_size: int, special: dict) -> torch.nn.Module:
    if model_cfg.architecture == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=model_cfg.hidden_size,
            intermediate_size=model_cfg.intermediate_size,
            num_hidden_layers=model_cfg.num_layers,
            num_attention_heads=model_cfg.num_heads,
            num_key_value_heads=model_cfg.num_kv_heads,
            max_position_embeddings=model_cfg.max_seq_len,
            tie_word_embeddings=False,
            **special,
        )
    else:
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=model_cfg.hidden_size,
            n_inner=model_cfg.intermediate_size,
            n_layer=model_cfg.num_layers,
            n_head=model_cfg.num_heads,
            n_positions=model_cfg.max_seq_len,
            tie_word_embeddings=False,
            **special,
        )
    return AutoModelForCausalLM.from_config(config)


class Blocks:
    """A split's token stream cut into non-overlapping training blocks of `length` tokens.

    Over the memory-mapped shards: a rank reads only the blocks of its own micro-batches from disk.
    """

    def __init__(self, tokens: tokenizer.Tokens | np.ndarray, length: int):
        self.tokens, self.length = tokens, length

    def __len__(self) -> int:
        return len(self.tokens) // self.length

    def __getitem__(self, indices: list[int]) -> np.ndarray:
        if any(not 0 <= i < len(self) for i in indices):
            raise IndexError(f"blocks {indices} of {len(self)}")
        return np.stack([self.tokens[i * self.length : (i + 1) * self.length] for i in indices])


def block_batch(blocks: Blocks, indices: list[int]) -> dict:
    ids = torch.from_numpy(blocks[indices].astype(np.int64))
    return {"input_ids": ids, "labels": ids}


def main(cfg: StageConfig, out: Path, tracker) -> dict:
    model_cfg, tcfg = cfg.model, cfg.train
    bpe = tokenizer.load(cfg.inputs["tokenizer"])
    train_blocks = Blocks(tokenizer.tokens(cfg.inputs["tokenizer"], "train"), model_cfg.max_seq_len)
    val_blocks = Blocks(tokenizer.tokens(cfg.inputs["tokenizer"], "validation"), model_cfg.max_seq_len)
    mb = tcfg.micro_batch_size
    validation = [
        block_batch(val_blocks, list(range(i, i + mb)))
        for i in range(0, min(len(val_blocks) - mb + 1, tcfg.eval_batches * mb), mb)
    ]

    model = build_model(model_cfg, len(bpe), special_token_ids(bpe))
    state, metrics = train_loop.train(
        model,
        lambda idx: block_batch(train_blocks, idx),
        len(train_blocks),
        validation,
        tcfg,
        cfg.seed,
        Path(cfg.run.checkpoint_dir),
        tracker,
    )
    if not stage.is_rank_zero():
        return metrics
    final = build_model(model_cfg, len(bpe), special_token_ids(bpe))
    final.load_state_dict(state)
    final.save_pretrained(model_dir(out))
    bpe.save_pretrained(model_dir(out))
    metrics["parameters"] = sum(p.numel() for p in final.parameters())
    # N of scaling laws: the parameters outside the token embedding and the output layer.
    embeddings = final.get_input_embeddings().weight.numel() + final.get_output_embeddings().weight.numel()
    metrics["non_embedding_parameters"] = metrics["parameters"] - embeddings
    metrics["train_tokens_seen"] = (
        tcfg.steps * mb * tcfg.grad_accum * int(os.environ["WORLD_SIZE"]) * model_cfg.max_seq_len
    )
    return metrics


if __name__ == "__main__":
    stage.run(main)
