"""Prompts in a model's own chat template: what fine-tuning trains on and what evaluation asks."""

from __future__ import annotations

from lmforge.stage import StageError


def chat_texts(tokenizer, pair: dict) -> tuple[str, str]:
    """The prompt (user turn + assistant header) and the answer (name + end of turn) in the model's template."""
    user = [{"role": "user", "content": pair["docstring"]}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": pair["name"]}], tokenize=False)
    if not full.startswith(prompt):
        raise StageError(
            "the model's chat template does not render the prompt as a prefix of the dialogue, so the answer "
            "tokens cannot be told apart: use a base model whose template does (tokenizer.chat_template)"
        )
    return prompt, full[len(prompt) :]


def chat_prompt(tokenizer, docstring: str) -> list[int]:
    """What the model sees before it answers."""
    prompt, _ = chat_texts(tokenizer, {"docstring": docstring, "name": "f"})
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def end_of_turn_ids(tokenizer) -> list[int]:
    """Tokens that end an answer: EOS and the special tokens the template puts after the assistant's text."""
    _, answer = chat_texts(tokenizer, {"docstring": "d", "name": "f"})
    special = set(tokenizer.all_special_ids) & set(tokenizer(answer, add_special_tokens=False)["input_ids"])
    return sorted(special | {tokenizer.eos_token_id})
