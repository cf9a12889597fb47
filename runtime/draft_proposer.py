"""The draft-model proposer (``speculative="draft"``): a smaller engine's greedy continuation.

It wraps a ModelRunner of its own (own weights, KV cache and block pool, tp 1 on rank 0's
device) and drives it with plans it makes itself, the way the engine drives the target: the
runner stays a runner. Each round (one per target step) runs the draft K times:

  1. catch-up: every request's row is sent again whole (``NewRequestData``) with the KV the
     draft still holds: its positions up to the first token where the target's tokens differ
     from what the draft computed last round (its own drafts past the accepted ones). So
     only the 1-2 new tokens run (a whole prompt the first time, chunked by the budget); the
     last position samples draft 1;
  2. K - 1 one-token steps, launched one step ahead (each reads the previous step's token on
     the device), sampling drafts 2..K.

Blocks for the round's positions are taken up front from its own ``BlockManager`` (no prefix
caching); a request that does not fit gets no drafts. Requests not asked for in a round
(finished, paused, or the batch grew past the speculation limit) are dropped, and prefilled
again if they come back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kiln.engine_builder.format import load_engine
from kiln.runtime.config import EngineConfig
from kiln.runtime.model_runner import ModelRunner
from kiln.scheduler.block_manager import BlockManager
from kiln.scheduler.interface import CachedRequestData, NewRequestData, SchedulerOutput
from kiln.scheduler.request import Request
from kiln.scheduler.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kiln.runtime.input_batch import InputBatch

logger = logging.getLogger(__name__)

_GREEDY = SamplingParams(temperature=0.0, max_tokens=None)
_MAX_KV_TOKENS = 1 << 16  # the draft's KV cache: enough for the speculating batch in most cases


class DraftEngineError(ValueError):
    """The draft engine cannot serve this target (tensor parallel, another vocabulary)."""


@dataclass
class _DraftSeq:
    """A request as the draft knows it: ``state.num_computed_tokens`` positions of KV, the
    last ``len(tail)`` of them computed from its own unverified drafts (from ``base`` on)."""

    state: Request
    row_gen: int  # the target row's owner when this started (a reused row means a new request)
    base: int = 0
    tail: list[int] = field(default_factory=list)


class DraftModelProposer:
    """Drafts K tokens per request with a draft engine (module docstring). Invariants: the
    runner holds a row for a request only while ``_seqs`` has it; a request's KV positions
    below ``state.num_computed_tokens`` hold the target's tokens except for ``tail``."""

    def __init__(self, config: EngineConfig, target_tokenizer: Any, target_model_config: Any) -> None:
        loaded = load_engine(config.draft_engine, rank=0)
        _check_compatible(loaded, target_tokenizer, target_model_config)
        self.k = config.num_speculative_tokens
        target_len = config.resolve_max_model_len(target_model_config)
        max_len = min(target_len + self.k, int(loaded.model_config.max_position_embeddings))
        batch = min(config.speculative_max_batch_size, config.max_batch_size)
        draft_config = EngineConfig(
            engine_dir=config.draft_engine, device=config.device, max_num_tokens=config.max_num_tokens,
            max_batch_size=batch, block_size=config.block_size, enable_prefix_caching=False,
            num_kv_cache_tokens=max(max_len, min(batch * max_len, _MAX_KV_TOKENS)), max_model_len=max_len,
            enforce_eager=config.enforce_eager, kernel_backend=config.kernel_backend, seed=config.seed,
        )
        device = config.torch_device
        if device.type == "cuda" and config.devices:
            device = torch.device("cuda", config.devices[0])  # rank 0's GPU, next to its logits
        self.runner = ModelRunner(draft_config, loaded, device=device)
        del loaded
        self.blocks = BlockManager(self.runner.num_blocks, self.runner.block_size, enable_prefix_caching=False)
        self.max_len = max_len
        self._target: InputBatch | None = None
        self._seqs: dict[str, _DraftSeq] = {}
        self._finished: set[str] = set()  # dropped ids the runner has not heard of yet

    def bind(self, input_batch: InputBatch) -> None:
        self._target = input_batch

    def shutdown(self) -> None:
        self.runner.shutdown()
        self._seqs.clear()

    # ------------------------------------------------------------------ one round

    def propose(self, wanted: dict[str, int]) -> dict[str, list[int]]:
        for request_id in [r for r in self._seqs if r not in wanted]:
            self._drop(request_id)
        ready: dict[str, int] = {}
        for request_id, k in wanted.items():
            n = self._sync(request_id, k)
            if n is not None:
                ready[request_id] = n
        if not ready:
            return {}
        try:
            return self._run(ready, wanted)
        except BaseException:
            for request_id in list(self._seqs):  # its rows may be half-updated: start over
                self._drop(request_id)
            raise

    def _sync(self, request_id: str, k: int) -> int | None:
        """Line the draft's KV up with the target's tokens and reserve blocks for the round;
        returns the request's token count, or None when it gets no drafts this time."""
        target = self._target
        live = target.requests.get(request_id)
        if live is None:
            return None
        row = live.row
        n = int(target.num_tokens[row])
        seq = self._seqs.get(request_id)
        if seq is not None and seq.row_gen != target.row_gen[row]:
            self._drop(request_id)
            seq = None
        if seq is None:
            seq = self._seqs[request_id] = _DraftSeq(Request(request_id, [], _GREEDY), int(target.row_gen[row]))
        state = seq.state
        if seq.tail:  # keep the KV of its drafts the target accepted, no more
            actual = target.token_ids[row, seq.base: seq.base + len(seq.tail)]
            same = np.cumprod(actual == np.asarray(seq.tail[: len(actual)])).sum()
            state.num_computed_tokens = min(seq.base + int(same), n - 1)
        state.num_computed_tokens = min(state.num_computed_tokens, n - 1)
        seq.tail = []
        self.blocks.trim(state)
        if n + k - 1 > self.max_len or self.blocks.allocate_slots(state, n + k - 1 - state.num_computed_tokens) is None:
            self._drop(request_id)
            return None
        return n

    def _run(self, ready: dict[str, int], wanted: dict[str, int]) -> dict[str, list[int]]:
        """Catch-up plans until every request sampled its first draft, then K - 1 single-token
        steps one step ahead."""
        drafts: dict[str, list[int]] = {r: [] for r in ready}
        self._catch_up(ready, drafts)
        runner = self.runner
        previous = None
        for j in range(1, self.k):
            ids = [r for r in drafts if r in self._seqs and wanted[r] > j]
            if not ids:
                break
            handle = runner.launch(self._plan([], ids, {r: 1 for r in ids}))
            if previous is not None:
                self._take(runner.collect(previous), drafts)
            previous = handle
        if previous is not None:
            self._take(runner.collect(previous), drafts)
        for request_id, tokens in drafts.items():
            seq = self._seqs.get(request_id)
            if seq is not None:  # its KV past the target's tokens came from its own drafts
                seq.base, seq.tail = ready[request_id], tokens[:-1]
        return {r: t for r, t in drafts.items() if t}

    def _catch_up(self, ready: dict[str, int], drafts: dict[str, list[int]]) -> None:
        target = self._target
        new = [NewRequestData(r, target.token_ids[target.requests[r].row, :n], n, _GREEDY,
                              list(self.blocks.get_block_ids(r)), self._seqs[r].state.num_computed_tokens)
               for r, n in ready.items()]  # token_ids as an array: the runner copies it into a row
        remaining = {r: n - self._seqs[r].state.num_computed_tokens for r, n in ready.items()}
        while remaining:
            budget, counts = self.runner.config.max_num_tokens, {}
            for request_id, left in remaining.items():
                if budget <= 0:
                    break
                counts[request_id] = min(left, budget)
                budget -= counts[request_id]
            cached = [] if new else list(counts)  # the first plan (re)sends every request whole
            output = self.runner.execute_model(self._plan(new, cached, counts))
            new = []
            self._take(output, drafts)
            for request_id, count in counts.items():
                remaining[request_id] -= count
                if not remaining[request_id] or request_id not in self._seqs:
                    del remaining[request_id]

    def _plan(self, new: list[NewRequestData], cached: list[str], counts: dict[str, int]) -> SchedulerOutput:
        """A plan for the draft runner; advances the requests' computed counts."""
        cached_data = [CachedRequestData(r, [], self._seqs[r].state.num_computed_tokens) for r in cached]
        for request_id, count in counts.items():
            self._seqs[request_id].state.num_computed_tokens += count
        finished, self._finished = self._finished, set()
        return SchedulerOutput(new_requests=new, cached_requests=cached_data, num_scheduled_tokens=counts,
                               order=list(counts), finished_request_ids=finished)

    def _take(self, output: Any, drafts: dict[str, list[int]]) -> None:
        for request_id in output.failed_request_ids:
            logger.warning("draft model failed on request %s; it gets no drafts", request_id)
            drafts.pop(request_id, None)
            self._drop(request_id)
        for request_id, tokens in output.sampled_token_ids.items():
            if request_id in drafts:
                drafts[request_id].extend(tokens)

    def _drop(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self.blocks.free(seq.state)
            self._finished.add(request_id)


def _check_compatible(loaded: Any, target_tokenizer: Any, target_model_config: Any) -> None:
    """One line when the draft engine cannot draft for the target."""
    mc = loaded.model_config
    if mc.tp_size != 1:
        raise DraftEngineError(f"the draft engine {loaded.path} has tp {mc.tp_size}; build it with --tp 1")
    if int(mc.vocab_size) != int(target_model_config.vocab_size):
        raise DraftEngineError(f"the draft engine's vocabulary ({mc.vocab_size} tokens) differs from the "
                               f"target's ({target_model_config.vocab_size})")
    from kiln.runtime.engine import load_tokenizer

    draft_tokenizer = load_tokenizer(loaded.path)
    if (draft_tokenizer is None) != (target_tokenizer is None) or (
            draft_tokenizer is not None and draft_tokenizer.get_vocab() != target_tokenizer.get_vocab()):
        raise DraftEngineError(f"the draft engine {loaded.path} has another tokenizer vocabulary than the target")
