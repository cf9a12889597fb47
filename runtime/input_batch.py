"""Persistent per-request state of the runner and the ONE place a step's plan becomes tensors.

``InputBatch.apply`` folds a SchedulerOutput into the state (new, resumed, cached, finished,
preempted requests); ``InputBatch.prepare`` turns it into ``ModelInputs`` with numpy
vectorised index arithmetic, staged in pinned CPU buffers (on CUDA) and copied with
``non_blocking``. The buffers are reused step after step: the previous step's copies are done
by then, because each step ends by reading the sampled ids back to the host.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from kiln.runtime.attention import AttentionMetadata
from kiln.scheduler.interface import SchedulerOutput
from kiln.scheduler.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class InvalidRequestError(ValueError):
    """A request the runner cannot hold (bad token id, too long, bad block id)."""


@dataclass
class RequestState:
    """One request's runner-side state. ``num_tokens`` counts the valid ids in its token row."""

    row: int
    num_prompt_tokens: int
    num_tokens: int
    num_computed_tokens: int
    num_blocks: int
    sampling_params: SamplingParams
    generator: torch.Generator | None


@dataclass
class ModelInputs:
    """Device tensors of one step (DESIGN.md "Flattened batch tensors")."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [S] int64


@dataclass
class SamplingBatch:
    """The requests sampled this step, in logits row order, with what the sampler needs."""

    request_ids: list[str]
    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    prompt_ids: list[list[int]]
    output_ids: list[list[int]]


class _Staging:
    """Reusable host buffers (pinned on CUDA) and their device copies, one per input tensor."""

    def __init__(self, sizes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype], device: torch.device):
        pin = device.type == "cuda"
        self.host = {k: torch.zeros(sizes[k], dtype=dtypes[k], pin_memory=pin) for k in sizes}
        self.device = device

    def to_device(self, name: str, values: np.ndarray) -> torch.Tensor:
        buf = self.host[name][tuple(slice(0, n) for n in values.shape)]
        buf.copy_(torch.from_numpy(values))
        if self.device.type == "cpu":
            return buf.clone()  # the host buffer is overwritten next step
        return buf.to(self.device, non_blocking=True)


class InputBatch:
    """Per-request state keyed by request_id, stored in preallocated numpy rows.

    Invariants: every live request owns one row of ``token_ids`` ([max_batch_size,
    max_model_len + 1]) and ``block_table``; ``free_rows`` holds exactly the other rows; ids
    in a row are valid token ids (< vocab_size) up to ``num_tokens``.
    """

    def __init__(
        self, max_batch_size: int, max_model_len: int, max_num_tokens: int, block_size: int,
        num_blocks: int, vocab_size: int, device: torch.device,
    ) -> None:
        self.max_batch_size, self.max_model_len = max_batch_size, max_model_len
        self.block_size, self.num_blocks, self.vocab_size = block_size, num_blocks, vocab_size
        self.device = device
        self.max_blocks_per_seq = -(-(max_model_len + 1) // block_size)
        self.token_ids = np.zeros((max_batch_size, max_model_len + 1), dtype=np.int64)
        self.block_table = np.zeros((max_batch_size, self.max_blocks_per_seq), dtype=np.int32)
        self.requests: dict[str, RequestState] = {}
        self.free_rows = list(range(max_batch_size - 1, -1, -1))
        max_tokens = max(max_num_tokens, max_batch_size)
        self.staging = _Staging(
            sizes={
                "input_ids": (max_tokens,), "positions": (max_tokens,), "slot_mapping": (max_tokens,),
                "block_tables": (max_batch_size, self.max_blocks_per_seq), "seq_lens": (max_batch_size,),
                "query_start_loc": (max_batch_size + 1,), "logits_indices": (max_batch_size,),
            },
            dtypes={
                "input_ids": torch.int64, "positions": torch.int64, "slot_mapping": torch.int64,
                "block_tables": torch.int32, "seq_lens": torch.int32, "query_start_loc": torch.int32,
                "logits_indices": torch.int64,
            },
            device=device,
        )

    # ------------------------------------------------------------------ state

    def apply(self, so: SchedulerOutput) -> set[str]:
        """Fold a step's plan into the state; returns the ids that failed to be added/updated."""
        for request_id in so.finished_request_ids | so.preempted_request_ids:
            self.remove(request_id)
        failed: set[str] = set()
        for new in so.new_requests:
            self.remove(new.request_id)  # a resumed request replaces its old state
            try:
                self.add(new.request_id, new.token_ids, new.num_prompt_tokens, new.sampling_params,
                         new.block_ids, new.num_computed_tokens)
            except InvalidRequestError as exc:
                logger.warning("request %s rejected by the runner: %s", new.request_id, exc)
                failed.add(new.request_id)
        for cached in so.cached_requests:
            state = self.requests.get(cached.request_id)
            try:
                if state is None:
                    raise InvalidRequestError("unknown request id (it failed or was never added)")
                self._append_blocks(state, cached.new_block_ids)
                state.num_computed_tokens = cached.num_computed_tokens
            except InvalidRequestError as exc:
                logger.warning("request %s failed in the runner: %s", cached.request_id, exc)
                self.remove(cached.request_id)
                failed.add(cached.request_id)
        return failed

    def add(self, request_id: str, token_ids: list[int], num_prompt_tokens: int, params: SamplingParams,
            block_ids: list[int], num_computed_tokens: int) -> None:
        """Create a request's row; validates everything a later step would trip on."""
        if not self.free_rows:
            raise InvalidRequestError(f"more than max_batch_size={self.max_batch_size} live requests")
        ids = np.asarray(token_ids, dtype=np.int64)
        if len(ids) == 0 or len(ids) > self.max_model_len:
            raise InvalidRequestError(f"{len(ids)} tokens; must be between 1 and max_model_len={self.max_model_len}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
            raise InvalidRequestError(f"token id {bad} is out of the vocabulary (size {self.vocab_size})")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
        state = RequestState(self.free_rows[-1], num_prompt_tokens, len(ids), num_computed_tokens, 0, params, generator)
        self._append_blocks(state, block_ids)
        self.free_rows.pop()
        self.token_ids[state.row, : len(ids)] = ids
        self.requests[request_id] = state

    def _append_blocks(self, state: RequestState, block_ids: list[int]) -> None:
        if not block_ids:
            return
        blocks = np.asarray(block_ids, dtype=np.int64)
        if state.num_blocks + len(blocks) > self.max_blocks_per_seq:
            raise InvalidRequestError(f"more than {self.max_blocks_per_seq} KV blocks for one sequence")
        if blocks.min() < 0 or blocks.max() >= self.num_blocks:
            raise InvalidRequestError(f"KV block id out of range [0, {self.num_blocks})")
        self.block_table[state.row, state.num_blocks : state.num_blocks + len(blocks)] = blocks
        state.num_blocks += len(blocks)

    def remove(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is not None:
            self.free_rows.append(state.row)

    def append_sampled(self, request_id: str, token_id: int) -> None:
        """Record a sampled token; the scheduler stops a request before its row overflows."""
        state = self.requests[request_id]
        if state.num_tokens <= self.max_model_len:
            self.token_ids[state.row, state.num_tokens] = token_id
            state.num_tokens += 1

    # ------------------------------------------------------------------ tensors

    def check_scheduled(self, so: SchedulerOutput) -> set[str]:
        """Scheduled ids this step cannot run: unknown, past their known tokens, or without
        KV blocks for their positions. One check per request, not per token."""
        bad: set[str] = set()
        for request_id, count in so.num_scheduled_tokens.items():
            state = self.requests.get(request_id)
            if state is None:
                bad.add(request_id)
                continue
            end = state.num_computed_tokens + count
            if end > state.num_tokens or -(-end // self.block_size) > state.num_blocks:
                logger.warning(
                    "request %s scheduled up to token %d but has %d tokens and %d blocks",
                    request_id, end, state.num_tokens, state.num_blocks,
                )
                bad.add(request_id)
        return bad

    def prepare(self, so: SchedulerOutput, skip: set[str]) -> tuple[ModelInputs, SamplingBatch] | None:
        """Build the step's device tensors for every scheduled request not in ``skip``.

        Returns None when nothing is left to run. Tokens of request b run at positions
        ``num_computed_tokens .. num_computed_tokens + n_b``; it is sampled when that range
        reaches its known tokens.
        """
        order = [r for r in so.order if r not in skip and so.num_scheduled_tokens.get(r, 0) > 0]
        if not order:
            return None
        states = [self.requests[r] for r in order]
        rows = np.fromiter((s.row for s in states), dtype=np.int64, count=len(states))
        starts = np.fromiter((s.num_computed_tokens for s in states), dtype=np.int64, count=len(states))
        counts = np.fromiter((so.num_scheduled_tokens[r] for r in order), dtype=np.int64, count=len(states))
        known = np.fromiter((s.num_tokens for s in states), dtype=np.int64, count=len(states))

        query_start_loc = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        seq_lens = starts + counts
        # Position of flattened token t: its sequence's start plus its offset in the chunk.
        token_rows = np.repeat(rows, counts)
        positions = np.repeat(starts - query_start_loc[:-1], counts) + np.arange(num_tokens)
        input_ids = self.token_ids[token_rows, positions]
        block_ids = self.block_table[token_rows, positions // self.block_size].astype(np.int64)
        slot_mapping = block_ids * self.block_size + positions % self.block_size

        sampled = np.flatnonzero(seq_lens >= known)
        logits_indices = query_start_loc[1:][sampled] - 1
        max_blocks = -(-int(seq_lens.max()) // self.block_size)

        stage = self.staging.to_device
        inputs = ModelInputs(
            input_ids=stage("input_ids", input_ids),
            positions=stage("positions", positions),
            attn=AttentionMetadata(
                slot_mapping=stage("slot_mapping", slot_mapping),
                block_tables=stage("block_tables", self.block_table[rows, :max_blocks]),
                seq_lens=stage("seq_lens", seq_lens.astype(np.int32)),
                query_start_loc=stage("query_start_loc", query_start_loc.astype(np.int32)),
                max_query_len=int(counts.max()),
                max_seq_len=int(seq_lens.max()),
            ),
            logits_indices=stage("logits_indices", logits_indices),
        )
        return inputs, self._sampling_batch([order[i] for i in sampled])

    def _sampling_batch(self, request_ids: list[str]) -> SamplingBatch:
        states = [self.requests[r] for r in request_ids]
        params = [s.sampling_params for s in states]
        prompt_ids: list[list[int]] = []
        output_ids: list[list[int]] = []
        for s in states:  # per sampled request, and only for those using penalties
            if s.sampling_params.needs_penalties:
                row = self.token_ids[s.row]
                prompt_ids.append(row[: s.num_prompt_tokens].tolist())
                output_ids.append(row[s.num_prompt_tokens : s.num_tokens].tolist())
            else:
                prompt_ids.append([])
                output_ids.append([])
        return SamplingBatch(request_ids, params, [s.generator for s in states], prompt_ids, output_ids)
