"""Incremental detokenization and stop-string matching for streamed generation.

``IncrementalDetokenizer`` turns sampled token ids into text pieces whose concatenation is
exactly ``tokenizer.decode(output_ids, skip_special_tokens=...)``, decoding only a short
window of recent tokens per step. ``StopStringMatcher`` then cuts the text at the first stop
string and holds back a tail that could still grow into one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

# What a decoder yields for bytes that are not (yet) a complete UTF-8 character.
_REPLACEMENT = "\ufffd"
# How many token boundaries before the end to try when the window's text ends in an
# incomplete character (a UTF-8 character has at most 4 bytes, one token at least 1).
_MAX_BACKOFF = 4


class IncrementalDetokenizer:
    """Streams the text of one sequence's output tokens.

    Window technique: text is decoded from ``_prefix`` (context start) on, and everything
    decoded from ``_prefix`` up to ``_read`` has already been emitted. A new piece is emitted
    only up to a token boundary where the decoded text does not end in U+FFFD, so a
    character split across tokens comes out whole. ``_read`` only ever sits at such a clean
    boundary, which makes (emitted pieces) == decode(all output ids) at the end; the window
    is then moved so it holds just the last emitted piece as context (for tokenizers whose
    decoding of a token depends on its left neighbour, e.g. SentencePiece spaces).

    The window starts at the first output token rather than in the prompt, because the
    reference is ``decode(output_ids)`` alone: prompt context would keep a leading space that
    a standalone decode strips. ``prompt_token_ids`` is kept for callers that need it.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.prompt_token_ids = list(prompt_token_ids)
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.output_text = ""
        self._prefix = 0
        self._read = 0
        self._prefix_text = ""  # decode(token_ids[_prefix:_read])

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.token_ids[start:end],
                                     skip_special_tokens=self.skip_special_tokens)

    def add_tokens(self, token_ids: Sequence[int], finished: bool = False) -> str:
        """Append tokens; return the text they complete (maybe ""). ``finished`` flushes."""
        self.token_ids.extend(token_ids)
        piece = self._emit_up_to_clean_boundary()
        if finished:
            piece += self.flush()
        return piece

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete character at the very end stays U+FFFD)."""
        if self._read == len(self.token_ids):
            return ""
        return self._advance(len(self.token_ids), self._decode(self._prefix, len(self.token_ids)))

    def _emit_up_to_clean_boundary(self) -> str:
        end = len(self.token_ids)
        lowest = max(self._read + 1, end - _MAX_BACKOFF)
        while end >= lowest:
            text = self._decode(self._prefix, end)
            if not text.endswith(_REPLACEMENT):
                return self._advance(end, text)
            end -= 1
        return ""

    def _advance(self, end: int, window_text: str) -> str:
        piece = window_text[len(self._prefix_text):]
        self.output_text += piece
        self._prefix, self._read = self._read, end
        self._prefix_text = self._decode(self._prefix, self._read)
        return piece


class StopStringMatcher:
    """Cuts streamed text at the first stop string, even one spanning several pieces.

    Invariant: ``_pending`` holds the text received but not yet emitted; it is the longest
    suffix of the received text that is a proper prefix of some stop string (so shorter
    than the longest stop), and it never contains a whole stop string. "First" means the
    stop string that completes earliest in the text (ties: the one starting earlier), which
    does not depend on how the text was split into pieces.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.output_text = ""
        self.stop_reason: str | None = None
        self._pending = ""

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def process(self, new_text: str, finished: bool = False) -> tuple[str, str | None]:
        """Feed new text; return (text to emit now, the stop string that ended it or None).

        Once a stop string was found, later calls emit nothing. ``finished`` releases the
        held-back tail (the sequence ended for another reason).
        """
        if self.stopped:
            return "", None
        text = self._pending + new_text
        match = self._first_stop(text)
        if match is not None:
            start, stop = match
            end = start + len(stop) if self.include_stop_str_in_output else start
            self._pending = ""
            self.stop_reason = stop
            return self._emit(text[:end]), stop
        hold = 0 if finished else self._partial_stop_len(text)
        self._pending = text[len(text) - hold:] if hold else ""
        return self._emit(text[: len(text) - hold]), None

    def flush(self) -> str:
        """Release the held-back tail (call when generation ends without a stop string)."""
        return self.process("", finished=True)[0]

    def _emit(self, piece: str) -> str:
        self.output_text += piece
        return piece

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self.stop:
            start = text.find(stop)
            if start >= 0:
                candidate = (start + len(stop), start, stop)
                if best is None or candidate[:2] < best[:2]:
                    best = candidate
        return None if best is None else (best[1], best[2])

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        longest = max((len(s) for s in self.stop), default=0)
        for k in range(min(len(text), longest - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
