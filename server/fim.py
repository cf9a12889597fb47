"""Fill-in-the-middle (``suffix`` on /v1/completions): the code model's FIM tokens, from a registry.

A code model trained for FIM reads ``<prefix-token> prefix <suffix-token> suffix
<middle-token>`` (prefix-suffix-middle order) and writes the middle. The template is picked by
which FIM tokens the tokenizer has as single tokens; a model without any cannot fill in the
middle, and a request with ``suffix`` gets a 400 saying so. The prompt is assembled from token
ids (the text parts tokenized on their own), so text that merely looks like a FIM token stays
text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FimTemplate:
    """The three FIM tokens of one model family (prefix-suffix-middle order)."""

    name: str
    prefix: str
    suffix: str
    middle: str

    @property
    def tokens(self) -> tuple[str, str, str]:
        return self.prefix, self.suffix, self.middle


FIM_TEMPLATES = (
    FimTemplate("qwen2.5-coder", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    FimTemplate("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    FimTemplate("deepseek-coder", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
)


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of ``token`` when the vocabulary holds it as one token."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    token_id = vocab.get(token)
    return int(token_id) if token_id is not None else None


def fim_template(tokenizer: Any) -> tuple[FimTemplate, tuple[int, int, int]] | None:
    """The first registered template whose three tokens the tokenizer has, with their ids."""
    if tokenizer is None:
        return None
    for template in FIM_TEMPLATES:
        ids = [_token_id(tokenizer, t) for t in template.tokens]
        if all(i is not None for i in ids):
            return template, (ids[0], ids[1], ids[2])
    return None


def fim_prompt_ids(tokenizer: Any, ids: tuple[int, int, int], prefix: str, suffix: str) -> list[int]:
    """``[special prefix tokens the tokenizer adds (BOS)] <P> prefix <S> suffix <M>`` as token ids."""
    def encode(text: str) -> list[int]:
        # split_special_tokens: a user's "<|fim_prefix|>" is text, never the control token
        return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]) if text else []

    lead = list(tokenizer("", add_special_tokens=True)["input_ids"])
    return lead + [ids[0]] + encode(prefix) + [ids[1]] + encode(suffix) + [ids[2]]


def no_fim_message() -> str:
    names = ", ".join(f"{t.name} ({t.prefix} {t.suffix} {t.middle})" for t in FIM_TEMPLATES)
    return (f"suffix (fill-in-the-middle) needs a model with FIM tokens, and this model's tokenizer has none "
            f"of the known sets: {names}.")
