"""Draft-token proposers of speculative decoding, and the one that serves an EngineConfig.

A proposer runs in the engine's process between a step's update and the next schedule()
(DESIGN.md "Speculative decoding"): ``propose({request_id: max_drafts})`` returns up to that
many draft tokens per request, or none. It reads each request's tokens from rank 0's runner
rows (``InputBatch``: every token the scheduler knows, accepted drafts included). Every
proposer drafts deterministically, so the verifier treats q as one-hot (runtime/verify.py).

  * ``NgramProposer`` (``speculative="ngram"``): prompt lookup. The longest suffix of the
    request's tokens (``ngram_max`` down to ``ngram_min`` tokens) that occurred earlier; the
    tokens that followed its latest occurrence are the drafts. Vectorised over the row.
  * ``DraftModelProposer`` (``speculative="draft"``, runtime/draft_proposer.py): a smaller
    engine with the same tokenizer, its greedy continuation.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from kiln.runtime.config import EngineConfig

if TYPE_CHECKING:
    from kiln.runtime.input_batch import InputBatch

logger = logging.getLogger(__name__)


class Proposer(Protocol):
    """Proposes draft tokens. ``bind`` hands it rank 0's InputBatch once the runner exists."""

    def bind(self, input_batch: InputBatch) -> None: ...

    def propose(self, wanted: dict[str, int]) -> dict[str, list[int]]: ...

    def shutdown(self) -> None: ...


def ngram_lookup(tokens: np.ndarray, ngram_min: int, ngram_max: int, k: int) -> np.ndarray:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix of
    ``tokens`` of ngram_min..ngram_max tokens (empty when no suffix of ngram_min recurs)."""
    length = len(tokens)
    if length <= ngram_min:
        return tokens[:0]
    # Candidate ends e (exclusive) of an earlier occurrence; e == length would be the suffix itself.
    ends = np.arange(ngram_min, length)
    match = np.ones(len(ends), dtype=bool)
    for j in range(1, ngram_min + 1):
        match &= tokens[ends - j] == tokens[length - j]
    found = ends[match]
    n = ngram_min
    while len(found) and n < min(ngram_max, length - 1):
        n += 1
        longer = found[found >= n]
        longer = longer[tokens[longer - n] == tokens[length - n]]
        if not len(longer):
            break
        found = longer
    if not len(found):
        return tokens[:0]
    end = int(found[-1])
    return tokens[end: end + k]


class NgramProposer:
    """Prompt lookup over the runner's token rows (see the module docstring)."""

    def __init__(self, ngram_min: int, ngram_max: int) -> None:
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self._batch: InputBatch | None = None

    def bind(self, input_batch: InputBatch) -> None:
        self._batch = input_batch

    def propose(self, wanted: dict[str, int]) -> dict[str, list[int]]:
        batch = self._batch
        drafts: dict[str, list[int]] = {}
        for request_id, k in wanted.items():
            state = batch.requests.get(request_id)
            if state is None:
                continue
            row = state.row
            found = ngram_lookup(batch.token_ids[row, : batch.num_tokens[row]], self.ngram_min, self.ngram_max, k)
            if len(found):
                drafts[request_id] = found.tolist()
        return drafts

    def shutdown(self) -> None:
        self._batch = None


def make_proposer(config: EngineConfig, tokenizer: Any, model_config: Any, proposer: Proposer | None
                  ) -> Proposer | None:
    """The proposer ``config.speculative`` asks for (None when off); ``proposer`` is the
    caller's own for "external"."""
    method = config.speculative
    if (method == "external") != (proposer is not None):
        raise ValueError("a proposer object goes with speculative='external', and only with it")
    if method is None or proposer is not None:
        return proposer
    if method == "ngram":
        return NgramProposer(config.ngram_min, config.ngram_max)
    from kiln.runtime.draft_proposer import DraftModelProposer

    return DraftModelProposer(config, tokenizer, model_config)
