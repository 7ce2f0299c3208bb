"""Conversations in a model's own chat template: what fine-tuning trains on and what evaluation asks.

A conversation is a list of {"role", "content"} messages (roles system, user, assistant) whose last message is
the assistant's answer. Fine-tuning and evaluation tokenize it the same way, piece by piece (`pieces`): the
template's text before each assistant message (the prompt, with the assistant header) and each assistant
message with its end of turn. The loss is on the assistant pieces; evaluation scores or generates the last one.
"""

from __future__ import annotations

from lmforge.stage import StageError

ROLES = ("system", "user", "assistant")
IGNORE = -100  # the label of a token without a loss


def conversation(prompt: str, response: str, system: str | None = None) -> list[dict]:
    """A prompt/response pair (the built-in task's docstring and name) as a conversation."""
    head = [{"role": "system", "content": system}] if system is not None else []
    return [*head, {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def pieces(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is the assistant's) pieces, in order; their texts join to the whole.

    Each piece is the difference between renderings of longer and longer prefixes of the conversation, so a
    template that renders an earlier prefix differently in a longer conversation cannot be split: say so.
    """
    done, split = "", []

    def extend(text: str, assistant: bool) -> None:
        nonlocal done
        if not text.startswith(done):
            raise StageError(
                "the model's chat template does not render a conversation's beginning as a prefix of the whole, so "
                "the assistant's tokens cannot be told apart: use a base model whose template does "
                "(tokenizer.chat_template)"
            )
        split.append((text[len(done) :], assistant))
        done = text

    for end, message in enumerate(messages, 1):
        if message["role"] == "assistant":  # the prompt: everything before, with the assistant's header
            extend(
                tokenizer.apply_chat_template(messages[: end - 1], add_generation_prompt=True, tokenize=False), False
            )
        extend(tokenizer.apply_chat_template(messages[:end], tokenize=False), message["role"] == "assistant")
    return [(text, assistant) for text, assistant in split if text]


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels: the assistant's tokens (and their end of turn) labelled, every other token IGNORE."""
    ids, labels = [], []
    for text, assistant in pieces(tokenizer, messages):
        piece = token_ids(tokenizer, text)
        ids += piece
        labels += piece if assistant else [IGNORE] * len(piece)
    return ids, labels


def prompt_and_answer(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """The tokens the model sees before its last answer, and the answer's tokens with the end of turn."""
    split = pieces(tokenizer, messages)
    prompt = [t for text, _ in split[:-1] for t in token_ids(tokenizer, text)]
    return prompt, token_ids(tokenizer, split[-1][0])


def chat_prompt(tokenizer, docstring: str) -> list[int]:
    """What the model sees before it names the function of `docstring` (the built-in task)."""
    prompt, _ = prompt_and_answer(tokenizer, conversation(docstring, "f"))
    return prompt


def end_of_turn_ids(tokenizer) -> list[int]:
    """Tokens that end an answer: EOS and the special tokens the template puts after the assistant's text."""
    _, answer = prompt_and_answer(tokenizer, conversation("d", "f"))
    return sorted((set(tokenizer.all_special_ids) & set(answer)) | {tokenizer.eos_token_id})
