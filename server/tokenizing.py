"""Tokenizing requests off the event loop without one request holding up the others.

Two lanes, each one thread with its own copy of the tokenizer (a Hugging Face fast tokenizer
must not be called from two threads at once): requests with more than ``long_text_chars``
characters of text go to the long lane, so a huge prompt can only delay other huge prompts.
The Rust tokenizer releases the GIL while it works, so both lanes and the event loop run at
once.

``prompt_bound`` lets the server refuse a prompt whose length alone proves it cannot
fit the context, before tokenizing any of it (the tokenizer's cost grows with the text).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from kiln.scheduler.block_manager import cdiv

logger = logging.getLogger(__name__)

# ~10 ms of tokenization: below it a request is short and never waits behind a long one.
LONG_TEXT_CHARS = 16 * 1024


class _Lane:
    def __init__(self, tokenizer: Any, name: str) -> None:
        self.tokenizer = tokenizer
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=name)


class TokenizerLanes:
    """A short lane and a long lane; ``run(size, fn, *args)`` calls ``fn(tokenizer, *args)``
    in the lane ``size`` (characters of text) picks. Invariant: each lane's tokenizer is only
    ever called from that lane's one thread."""

    def __init__(self, tokenizer: Any, long_text_chars: int = LONG_TEXT_CHARS) -> None:
        self.long_text_chars = long_text_chars
        self.short = _Lane(tokenizer, "kiln-tokenize")
        self.long = _Lane(copy.deepcopy(tokenizer), "kiln-tokenize-long")

    async def run(self, size: int, fn: Callable[..., Any], *args: Any) -> Any:
        lane = self.long if size > self.long_text_chars else self.short
        return await asyncio.get_running_loop().run_in_executor(lane.pool, fn, lane.tokenizer, *args)

    def shutdown(self) -> None:
        for lane in (self.short, self.long):
            lane.pool.shutdown(wait=False)


# Pipeline parts that never drop or merge input text, so every input byte ends up inside a
# token. (A normalizer that composes or deletes characters, a pre-tokenizer that drops
# whitespace, or an unknown token that swallows a run of characters would break the proof.)
_KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation"})
_KEEPING_NORMALIZERS = frozenset({"Prepend", "Replace"})


@dataclass(frozen=True)
class PromptBound:
    """A proven lower bound on a text's token count, from its length alone.

    Every byte of the text's UTF-8 lands inside some token, except the bytes in ``dropped``
    (bytes the vocabulary cannot spell, which the tokenizer skips), and no token stands for
    more than ``bytes_per_token`` input bytes: so a text with b other bytes has at least
    ceil(b / bytes_per_token) tokens.
    """

    bytes_per_token: int
    dropped: bytes = b""

    def min_tokens(self, text: str) -> int:
        counted = len(text.encode("utf-8").translate(None, self.dropped))
        return cdiv(counted, self.bytes_per_token)


def prompt_bound(tokenizer: Any) -> PromptBound | None:
    """The PromptBound of a fast (Rust) BPE tokenizer, or None when its pipeline cannot be
    shown to keep the input (see the parts accepted above).

    Byte-level vocabularies hold one character per byte; other (SentencePiece-style)
    vocabularies are measured in UTF-8 bytes of their strings, never less than the input
    they cover (a Replace normalizer is accepted only when it does not shrink the text).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # noqa: BLE001 - an exotic tokenizer: no bound, nothing else changes
        return None
    model = spec.get("model") or {}
    vocab = model.get("vocab")
    if model.get("type") != "BPE" or not isinstance(vocab, dict) or not vocab:
        return None
    byte_level = "ByteLevel" in _types(spec.get("pre_tokenizer"))
    if not (_keeps_input(spec) and (byte_level or model.get("byte_fallback"))):
        return None
    dropped = _unspellable_bytes(vocab, byte_level)
    if dropped is None:
        return None
    longest = max(len(t) if byte_level else len(t.encode("utf-8")) for t in vocab)
    added = [len(t.get("content", "").encode("utf-8")) for t in spec.get("added_tokens") or []]
    return PromptBound(max([longest, *added]), dropped)


def _types(component: dict | None) -> list[str]:
    """Type names of a tokenizer component, Sequences flattened."""
    if not component:
        return []
    if component.get("type") == "Sequence":
        parts = component.get("pretokenizers") or component.get("normalizers") or []
        return [t for part in parts for t in _types(part)]
    return [component.get("type", "?")]


def _keeps_input(spec: dict) -> bool:
    if any(t not in _KEEPING_NORMALIZERS for t in _types(spec.get("normalizer"))):
        return False
    if not all(_replace_does_not_shrink(part) for part in _parts(spec.get("normalizer"), "normalizers")):
        return False
    if any(t not in _KEEPING_PRE_TOKENIZERS for t in _types(spec.get("pre_tokenizer"))):
        return False
    if any(part.get("behavior") == "Removed" for part in _parts(spec.get("pre_tokenizer"), "pretokenizers")):
        return False
    # An added token with lstrip/rstrip swallows the whitespace next to it, however long.
    return not any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens") or [])


def _parts(component: dict | None, key: str) -> list[dict]:
    if not component:
        return []
    if component.get("type") == "Sequence":
        return [p for part in component.get(key) or [] for p in _parts(part, key)]
    return [component]


def _replace_does_not_shrink(part: dict) -> bool:
    if part.get("type") != "Replace":
        return True
    pattern = (part.get("pattern") or {}).get("String")
    return isinstance(pattern, str) and len(part.get("content", "").encode()) >= len(pattern.encode())


def _byte_level_chars() -> list[str]:
    """The characters byte-level BPE (GPT-2's scheme) writes bytes 0..255 as: printable
    Latin-1 bytes stand for themselves, the others for code points from 256 on."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)}
    chars, shifted = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def _unspellable_bytes(vocab: dict, byte_level: bool) -> bytes | None:
    """The bytes the vocabulary has no token for, which byte-level BPE skips; None for a
    SentencePiece byte fallback that misses any (it would make unknown tokens, which may
    swallow a whole run)."""
    if not byte_level:
        return b"" if all(f"<0x{b:02X}>" in vocab for b in range(256)) else None
    return bytes(b for b, ch in enumerate(_byte_level_chars()) if ch not in vocab)
