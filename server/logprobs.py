"""Engine TokenLogprobs -> OpenAI logprobs objects (chat and legacy completions shapes)."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Sequence


class TokenStrings:
    """Text and UTF-8 bytes of single tokens, cached (the vocabulary is fixed).

    Byte-level BPE tokens can hold part of a UTF-8 character; their text then holds U+FFFD
    while ``bytes`` keeps the real bytes, as OpenAI's ``bytes`` field intends.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._byte_decoder = _byte_level_decoder()
        self.text = lru_cache(maxsize=65536)(self._text)
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)

    def _bytes(self, token_id: int) -> list[int]:
        piece = self._tok.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece and all(ch in self._byte_decoder for ch in piece):
            return [self._byte_decoder[ch] for ch in piece]
        return list(self.text(token_id).encode("utf-8"))


def _byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes -> printable characters map used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _finite(x: float) -> float:
    # JSON has no -inf; OpenAI reports -9999.0 for impossible tokens.
    return x if math.isfinite(x) else -9999.0


def chat_logprobs(entries: Sequence[Any], strings: TokenStrings) -> dict[str, Any]:
    """``{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}``."""
    content = []
    for e in entries:
        content.append({
            "token": strings.text(e.token_id),
            "logprob": _finite(e.logprob),
            "bytes": strings.bytes(e.token_id),
            "top_logprobs": [
                {"token": strings.text(t), "logprob": _finite(lp), "bytes": strings.bytes(t)}
                for t, lp in e.top
            ],
        })
    return {"content": content}


def completion_logprobs(entries: Sequence[Any], strings: TokenStrings, text_offset: int = 0) -> dict[str, Any]:
    """``{tokens, token_logprobs, top_logprobs, text_offset}``; offsets start at ``text_offset``."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    pos = text_offset
    for e in entries:
        text = strings.text(e.token_id)
        tokens.append(text)
        token_logprobs.append(_finite(e.logprob))
        top: dict[str, float] = {}
        for t, lp in e.top:
            top.setdefault(strings.text(t), _finite(lp))
        tops.append(top)
        offsets.append(pos)
        pos += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def echo_logprobs(entries: Sequence[Any] | None, prompt_ids: Sequence[int], strings: TokenStrings
                  ) -> dict[str, Any]:
    """The completions ``logprobs`` of an echoed prompt: every prompt token with its logprob
    given the tokens before it (None for the first, which has no context) and its top
    alternatives; ``entries`` are the engine's prompt logprobs (None first)."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    pos = 0
    for i, token_id in enumerate(prompt_ids):
        text = strings.text(token_id)
        entry = entries[i] if entries is not None and i < len(entries) else None
        tokens.append(text)
        offsets.append(pos)
        pos += len(text)
        if entry is None:
            token_logprobs.append(None)
            tops.append(None)
            continue
        token_logprobs.append(_finite(entry.logprob))
        top: dict[str, float] = {}
        for t, lp in entry.top:
            top.setdefault(strings.text(t), _finite(lp))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def join_completion_logprobs(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    return {key: first[key] + second[key] for key in first}


def prompt_logprobs(entries: Sequence[Any] | None, strings: TokenStrings) -> list[Any] | None:
    """vLLM's ``prompt_logprobs``: per prompt token None (the first) or ``{token id: {logprob,
    rank, decoded_token}}`` for the token itself and its top alternatives; rank is its place
    among those alternatives (1 = most likely), null for a prompt token outside them."""
    if entries is None:
        return None
    out: list[Any] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        ranks = {t: r for r, (t, _) in enumerate(entry.top, start=1)}
        item = {str(entry.token_id): {"logprob": _finite(entry.logprob), "rank": ranks.get(entry.token_id),
                                      "decoded_token": strings.text(entry.token_id)}}
        for t, lp in entry.top:
            item.setdefault(str(t), {"logprob": _finite(lp), "rank": ranks[t], "decoded_token": strings.text(t)})
        out.append(item)
    return out
