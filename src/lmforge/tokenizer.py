"""Stage 2, tokenizer: byte-level BPE trained with HF tokenizers on the train split only.

Outputs:
  tokenizer/                        a transformers fast tokenizer (save_pretrained) with a chat template
  tokens/{train,validation}.npy     the split's documents tokenized and packed, each followed by <|endoftext|>,
                                    so training reads token ids without the tokenizer in the loop
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lmforge import curate, stage
from lmforge.schema import StageConfig

EOS, PAD = "<|endoftext|>", "<|pad|>"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]


def load(stage_dir: str) -> PreTrainedTokenizerFast:
    """The tokenizer this stage trained."""
    return AutoTokenizer.from_pretrained(f"{stage_dir}/tokenizer")


def tokens(stage_dir: str, split: str) -> np.ndarray:
    """A split's documents as one array of token ids, each document followed by <|endoftext|>."""
    return np.load(f"{stage_dir}/tokens/{split}.npy")


def load_texts(curated: str, split: str) -> list[str]:
    return list(curate.load_split(curated, "data", split)["text"])


def train_bpe(texts, vocab_size: int, min_frequency: int) -> Tokenizer:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS, PAD, *CHAT_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return bpe


def pack(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> np.ndarray:
    """All documents' token ids in one array, each document followed by the end-of-text token."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    dtype = np.uint16 if len(tokenizer) < 2**16 else np.uint32
    return np.fromiter((t for doc in ids for t in (*doc, tokenizer.eos_token_id)), dtype=dtype)


def main(cfg: StageConfig, out: Path, tracker) -> dict:
    tok_cfg, curated = cfg.tokenizer, cfg.inputs["curate"]
    train_texts = load_texts(curated, "train")
    bpe = train_bpe(train_texts, tok_cfg.vocab_size, tok_cfg.min_frequency)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=CHAT_TOKENS,
        chat_template=tok_cfg.chat_template,
        model_max_length=1_000_000,
    )
    tokenizer.save_pretrained(out / "tokenizer")

    (out / "tokens").mkdir()
    metrics = {"vocab_size": len(tokenizer)}
    for split, texts in (("train", train_texts), ("validation", load_texts(curated, "validation"))):
        tokens = pack(tokenizer, texts)
        np.save(out / "tokens" / f"{split}.npy", tokens)
        n_bytes = sum(len(t.encode()) for t in texts)
        metrics[f"{split}_tokens"] = int(len(tokens))
        metrics[f"{split}_bytes_per_token"] = n_bytes / (len(tokens) - len(texts))
    return metrics


if __name__ == "__main__":
    stage.run(main)
