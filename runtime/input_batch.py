"""Persistent per-request state of the runner and the ONE place a step's plan becomes tensors.

``InputBatch.apply`` folds a SchedulerOutput into the state (new, resumed, cached, finished,
preempted requests); ``InputBatch.prepare`` turns it into ``ModelInputs`` with numpy
vectorised index arithmetic over per-row arrays (no per-token Python, and per request only
O(1) list work), staged in pinned CPU buffers and copied with one ``non_blocking`` copy per
buffer into persistent device buffers. A decode-only step whose batch size has a CUDA graph
is padded to that size: the persistent device buffers are the graphs' static inputs.

The runner prepares step N+1 before step N's sampled ids reach the host. A row whose next
input token is still pending (sampled by a step not yet collected) takes it on the device
from ``last_sampled``, which every step scatters its sampled ids into; ``num_pending`` counts
those tokens per row. Device buffers are reused safely because everything runs on one
stream; the pinned host staging bytes are guarded by an event (staging.py).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kiln.runtime.attention import AttentionMetadata
from kiln.runtime.grammar import GrammarRows
from kiln.runtime.prompt_logprobs import PromptLogprobsBatch, plan_prompt_logprobs
from kiln.runtime.sampler import SamplingMetadata, SamplingRows
from kiln.runtime.staging import Staging
from kiln.runtime.verify import VerifyBatch
from kiln.runtime.verify_inputs import VerifyInputs, logits_rows
from kiln.scheduler.block_manager import cdiv
from kiln.scheduler.interface import SchedulerOutput
from kiln.scheduler.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class InvalidRequestError(ValueError):
    """A request the runner cannot hold (bad token id, too long, bad block id)."""


def _log_failure(request_id: str, what: str, exc: Exception) -> None:
    if isinstance(exc, InvalidRequestError):  # expected: one line
        logger.warning("request %s %s: %s", request_id, what, exc)
    else:  # a bug: keep the traceback
        logger.error("request %s %s", request_id, what, exc_info=exc)


@dataclass
class RequestState:
    """One request's runner-side state; its token counts and sampling settings live in
    InputBatch's row arrays."""

    row: int
    generator: torch.Generator | None


@dataclass
class ModelInputs:
    """Device tensors of one step (DESIGN.md "Flattened batch tensors").

    ``graph_batch_size`` is set for a decode-only step padded to a captured CUDA-graph size;
    then every tensor is a view of the static buffers and ``num_reqs`` rows are real.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata
    logits_indices: torch.Tensor | None  # [S] int64; None = every row
    num_reqs: int = 0
    graph_batch_size: int | None = None
    sample_rows: torch.Tensor | None = None  # [S] int64 device: the rows sampled, logits order
    prompt_logprobs: PromptLogprobsBatch | None = None  # prompt tokens scored this step (their logits rows follow)
    graph_query_len: int = 1  # tokens per row of the graph: 1 (decode) or 1 + K (verify)


@dataclass
class ScheduledRows:
    """The requests a step runs, in batch order: their rows and scheduled token counts."""

    order: list[str]
    rows: np.ndarray  # int64
    counts: np.ndarray  # int64


@dataclass
class SamplingBatch:
    """The requests sampled this step, in logits row order.

    ``metadata`` is None when every one is plain greedy (the sampler is then a bare argmax);
    ``logprobs[i]`` is the number of top logprobs request i wants, -1 for none. ``verify`` is
    set when some request carries draft tokens: the logits then hold 1 + drafts rows per
    request and ``metadata`` covers those rows.
    """

    request_ids: list[str]
    metadata: SamplingMetadata | None
    logprobs: np.ndarray
    verify: VerifyBatch | None = None


class InputBatch(VerifyInputs):
    """Per-request state keyed by request_id, stored in preallocated numpy rows.

    Invariants: every live request owns one row of ``token_ids`` ([max_batch_size,
    max_model_len + 1]), ``block_table`` and the per-row counters (``num_tokens``,
    ``num_computed``, ``num_blocks``) and sampling settings; ``free_rows`` holds exactly the
    other rows; ids in a row are valid token ids (< vocab_size) up to ``num_tokens[row]``;
    ``num_pending[row]`` more tokens were sampled by launched steps and are not on the host
    yet (the last of them is ``last_sampled[row]`` on the device); ``row_gen[row]`` changes
    whenever the row changes owner, so late results for a former owner can be told apart.
    During a step, ``num_spec[row]`` draft tokens follow the row's tokens (verify_inputs.py).
    A pending verify step (its count unknown) is always resolved before the next ``apply``.
    """

    def __init__(
        self, max_batch_size: int, max_model_len: int, max_num_tokens: int, block_size: int,
        num_blocks: int, vocab_size: int, device: torch.device, num_speculative_tokens: int = 0,
    ) -> None:
        self.max_batch_size, self.max_model_len = max_batch_size, max_model_len
        self.block_size, self.num_blocks, self.vocab_size = block_size, num_blocks, vocab_size
        self.device = device
        # A padded verify row reads K positions past its tokens: its table must reach them.
        self.spec_k = num_speculative_tokens
        self.max_blocks_per_seq = cdiv(max_model_len + 1 + self.spec_k, block_size)
        self.token_ids = np.zeros((max_batch_size, max_model_len + 1), dtype=np.int64)
        self.block_table = np.zeros((max_batch_size, self.max_blocks_per_seq), dtype=np.int32)
        self.num_tokens = np.zeros(max_batch_size, dtype=np.int64)
        self.num_computed = np.zeros(max_batch_size, dtype=np.int64)
        self.num_blocks_of = np.zeros(max_batch_size, dtype=np.int64)
        self.num_prompt = np.zeros(max_batch_size, dtype=np.int64)
        self.prompt_logprobs = np.full(max_batch_size, -1, dtype=np.int64)  # SamplingParams.prompt_logprobs, -1 = none
        self.num_pending = np.zeros(max_batch_size, dtype=np.int64)
        self.row_gen = np.zeros(max_batch_size, dtype=np.int64)
        self.last_sampled = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.sampling = SamplingRows(max_batch_size, vocab_size)
        self.grammar: GrammarRows | None = None  # rank 0 with a tokenizer: structured output (grammar.py)
        self.requests: dict[str, RequestState] = {}
        self.free_rows = list(range(max_batch_size - 1, -1, -1))
        max_rows = max_batch_size * (1 + self.spec_k)  # a verify step: 1 + K tokens and logits per request
        self.staging = Staging(max(max_num_tokens, max_rows), max_batch_size, self.max_blocks_per_seq, device,
                               max_logits=max_rows, max_verify=max_batch_size * (2 * self.spec_k + 2))
        self.num_spec = np.zeros(max_batch_size, dtype=np.int64)  # draft tokens of this step, per row
        self.has_spec = False
        self.verify_qsl = torch.arange(max_batch_size + 1, dtype=torch.int32, device=device) * (1 + self.spec_k)

    # ------------------------------------------------------------------ state

    def apply(self, so: SchedulerOutput) -> set[str]:
        """Fold a step's plan into the state; returns the ids that failed to be added/updated.

        A request that fails here, whatever the exception, fails alone and holds no row
        afterwards (the scheduler frees its blocks when it sees it failed); the others go on.
        """
        for request_id in so.finished_request_ids | so.preempted_request_ids:
            self.remove(request_id)
        failed: set[str] = set()
        for new in so.new_requests:
            self.remove(new.request_id)  # a resumed request replaces its old state
            try:
                self.add(new.request_id, new.token_ids, new.num_prompt_tokens, new.sampling_params,
                         new.block_ids, new.num_computed_tokens, new.eos_token_ids)
            except Exception as exc:  # noqa: BLE001 - any bug here must stay this request's
                _log_failure(new.request_id, "rejected by the runner", exc)
                self.remove(new.request_id)
                failed.add(new.request_id)
        for cached in so.cached_requests:
            state = self.requests.get(cached.request_id)
            try:
                if state is None:
                    raise InvalidRequestError("unknown request id (it failed or was never added)")
                if cached.new_block_ids:
                    # It holds cdiv(computed) blocks before these: after rejected drafts, fewer than before.
                    row = state.row
                    self.num_blocks_of[row] = min(self.num_blocks_of[row], cdiv(cached.num_computed_tokens, self.block_size))
                    self._append_blocks(state.row, cached.new_block_ids)
                self.num_computed[state.row] = cached.num_computed_tokens
            except Exception as exc:  # noqa: BLE001
                _log_failure(cached.request_id, "failed in the runner", exc)
                self.remove(cached.request_id)
                failed.add(cached.request_id)
        if self.has_spec or so.spec_token_ids:
            failed |= self._apply_drafts(so.spec_token_ids)
        return failed

    def add(self, request_id: str, token_ids: list[int], num_prompt_tokens: int, params: SamplingParams,
            block_ids: list[int], num_computed_tokens: int, eos_token_ids: frozenset[int] = frozenset()) -> None:
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
            try:
                generator.manual_seed(params.seed)
            except (RuntimeError, OverflowError, TypeError) as exc:
                raise InvalidRequestError(f"seed {params.seed!r} cannot seed a generator: {exc}") from None
        # Everything that can fail writes into the top free row before it is taken: a failure
        # leaves the row free (its stale values are overwritten by its next owner).
        row = self.free_rows[-1]
        self.num_blocks_of[row] = 0
        self._append_blocks(row, block_ids)
        self.sampling.set(row, params, eos_token_ids)
        self._set_grammar(row, params, token_ids[num_prompt_tokens:])
        self.token_ids[row, : len(ids)] = ids
        self.free_rows.pop()
        self.num_tokens[row] = len(ids)
        self.num_computed[row] = num_computed_tokens
        self.num_prompt[row] = num_prompt_tokens
        self.prompt_logprobs[row] = -1 if params.prompt_logprobs is None else params.prompt_logprobs
        self.num_pending[row] = 0
        self.row_gen[row] += 1
        self.requests[request_id] = RequestState(row, generator)

    def _set_grammar(self, row: int, params: SamplingParams, output_ids: list[int]) -> None:
        grammar = self.grammar
        if grammar is not None:
            grammar.remove(row)  # the row's former owner
            if params.structured_output is not None:
                grammar.add(row, params.structured_output, list(output_ids))
        elif params.structured_output is not None:
            raise InvalidRequestError("structured output needs the engine's grammar compiler (a tokenizer)")

    def _append_blocks(self, row: int, block_ids: list[int]) -> None:
        if not block_ids:
            return
        blocks = np.asarray(block_ids, dtype=np.int64)
        have = int(self.num_blocks_of[row])
        if have + len(blocks) > self.max_blocks_per_seq:
            raise InvalidRequestError(f"more than {self.max_blocks_per_seq} KV blocks for one sequence")
        if blocks.min() < 0 or blocks.max() >= self.num_blocks:
            raise InvalidRequestError(f"KV block id out of range [0, {self.num_blocks})")
        self.block_table[row, have : have + len(blocks)] = blocks
        self.num_blocks_of[row] = have + len(blocks)

    def remove(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is not None:
            self.free_rows.append(state.row)
            if self.grammar is not None:
                self.grammar.remove(state.row)

    def mark_sampled(self, rows: np.ndarray, inputs: ModelInputs, token_ids: torch.Tensor) -> None:
        """A launched step samples ``token_ids`` (device) for ``rows``: they are pending until
        ``append_sampled``, and the next step reads them from ``last_sampled``."""
        self.num_pending[rows] += 1
        self.last_sampled.index_copy_(0, inputs.sample_rows, token_ids)

    def append_sampled(self, rows: np.ndarray, token_ids: np.ndarray) -> None:
        """Record one sampled token per row (pending until now), in launch order; the
        scheduler stops a request before its row overflows, the clip only guards the bound."""
        at = np.minimum(self.num_tokens[rows], self.max_model_len)
        self.token_ids[rows, at] = token_ids
        self.num_tokens[rows] = at + 1
        self.num_pending[rows] -= 1
        if self.grammar is not None:
            self.grammar.accept(rows, token_ids)

    # ------------------------------------------------------------------ tensors

    def check_scheduled(self, so: SchedulerOutput) -> set[str]:
        """Scheduled ids this step cannot run: unknown, past their known tokens, or without
        KV blocks for their positions. Vectorised over the scheduled requests."""
        scheduled = so.num_scheduled_tokens
        requests = self.requests
        if all(r in requests for r in scheduled):  # the common case, without per-request lists
            rows = np.fromiter((requests[r].row for r in scheduled), dtype=np.int64, count=len(scheduled))
            counts = np.fromiter(scheduled.values(), dtype=np.int64, count=len(scheduled))
            end = self.num_computed[rows] + counts
            if not ((end > self.num_tokens[rows] + self.num_pending[rows] + self.num_spec[rows])
                    | (cdiv(end, self.block_size) > self.num_blocks_of[rows])).any():
                return set()
        ids = list(scheduled)
        states = [requests.get(r) for r in ids]
        bad = {r for r, s in zip(ids, states) if s is None}
        known = [(r, s.row) for r, s in zip(ids, states) if s is not None]
        if not known:
            return bad
        rows = np.fromiter((row for _, row in known), dtype=np.int64, count=len(known))
        counts = np.fromiter((so.num_scheduled_tokens[r] for r, _ in known), dtype=np.int64, count=len(known))
        end = self.num_computed[rows] + counts
        available = self.num_tokens[rows] + self.num_pending[rows] + self.num_spec[rows]
        wrong = (end > available) | (cdiv(end, self.block_size) > self.num_blocks_of[rows])
        for i in np.flatnonzero(wrong):
            r, row = known[i]
            logger.warning("request %s scheduled up to token %d but has %d tokens and %d blocks",
                           r, end[i], self.num_tokens[row], self.num_blocks_of[row])
            bad.add(r)
        return bad

    def scheduled_rows(self, so: SchedulerOutput, skip: set[str]) -> ScheduledRows | None:
        """The rows and token counts of every scheduled request not in ``skip``, in batch
        order; None when nothing is left to run."""
        scheduled = so.num_scheduled_tokens
        order = [r for r in so.order if scheduled.get(r, 0) > 0 and r not in skip]
        if not order:
            return None
        requests = self.requests
        rows = np.fromiter((requests[r].row for r in order), dtype=np.int64, count=len(order))
        counts = np.fromiter((scheduled[r] for r in order), dtype=np.int64, count=len(order))
        return ScheduledRows(order, rows, counts)

    def needs_pending_history(self, scheduled: ScheduledRows) -> bool:
        """True when a row that samples with penalties (which read its whole token history on
        the host) still has tokens pending on the device: resolve them before ``prepare``."""
        rows = scheduled.rows
        pending = self.num_pending[rows]
        return bool(pending.any() and self.sampling.penalties[rows[pending > 0]].any())

    def prepare(self, scheduled: ScheduledRows, graph_sizes: Sequence[int] = (), verify_sizes: Sequence[int] = ()
                ) -> tuple[ModelInputs, SamplingBatch, np.ndarray]:
        """Build the step's device tensors for the scheduled rows: (inputs, sampling, sampled rows).

        Tokens of request b run at positions ``num_computed .. num_computed + n_b``; it is
        sampled when that range reaches its tokens, pending ones included (its draft tokens,
        when it carries some, are the last of them and each gets logits). A decode-only step
        is padded to the smallest of ``graph_sizes`` (sorted batch sizes with a captured CUDA
        graph) that holds it; a verify step of decoding rows to one of ``verify_sizes``.
        """
        order, rows, counts = scheduled.order, scheduled.rows, scheduled.counts
        starts = self.num_computed[rows]
        seq_lens = starts + counts
        sampled = np.flatnonzero(seq_lens >= self.num_tokens[rows] + self.num_pending[rows])
        num_tokens = int(counts.sum())
        spec = self.num_spec[rows] if self.has_spec else None
        verify = None
        if spec is not None and spec[sampled].any():  # staged first: copied with the inputs
            verify = self._stage_verify(rows[sampled], spec[sampled])
        if spec is None and num_tokens == len(order) == len(sampled):  # decode only
            inputs = self._decode_inputs(rows, starts, graph_sizes)
        elif spec is not None and self._fits_verify_graph(counts, sampled, verify_sizes):
            inputs = self._verify_graph_inputs(rows, starts, counts, spec, verify_sizes)
        else:
            inputs = self._mixed_inputs(rows, starts, counts, seq_lens, sampled, spec)
            if (self.prompt_logprobs[rows] >= 0).any():
                inputs.prompt_logprobs = plan_prompt_logprobs(order, rows, self.prompt_logprobs[rows], starts, counts,
                                                              self.num_prompt[rows], self.token_ids, self.device)
        sampled_ids = order if len(sampled) == len(order) else [order[i] for i in sampled]
        sampled_rows = rows[sampled]
        if verify is not None:
            return inputs, self._verify_sampling_batch(sampled_ids, sampled_rows, spec[sampled], *verify), sampled_rows
        return inputs, self._sampling_batch(sampled_ids, sampled_rows), sampled_rows

    def _mixed_inputs(self, rows: np.ndarray, starts: np.ndarray, counts: np.ndarray, seq_lens: np.ndarray,
                      sampled: np.ndarray, spec: np.ndarray | None = None) -> ModelInputs:
        query_start_loc = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        # Position of flattened token t: its sequence's start plus its offset in the chunk.
        token_rows = np.repeat(rows, counts)
        positions = np.repeat(starts - query_start_loc[:-1], counts) + np.arange(num_tokens)
        block_ids = self.block_table[token_rows, positions // self.block_size].astype(np.int64)
        max_blocks = cdiv(int(seq_lens.max()), self.block_size)
        staging = self.staging
        stage = staging.stage
        known = self.num_tokens[token_rows] if spec is None else self.num_tokens[token_rows] + np.repeat(spec, counts)
        fill = np.flatnonzero(positions >= known)  # pending: on the device (drafts are in the rows)
        fill_args = (stage("fill_index", fill), stage("fill_rows", token_rows[fill])) if len(fill) else None
        inputs = ModelInputs(
            input_ids=stage("input_ids", self.token_ids[token_rows, np.minimum(positions, self.max_model_len)]),
            positions=stage("positions", positions),
            attn=self._stage_attention(block_ids * self.block_size + positions % self.block_size,
                                       self.block_table[rows, :max_blocks], seq_lens,
                                       stage("query_start_loc", query_start_loc), int(counts.max()),
                                       prefill_rows=np.flatnonzero(counts > 1)),
            logits_indices=stage("logits_indices", logits_rows(query_start_loc[1:][sampled],
                                                               None if spec is None else spec[sampled])),
            num_reqs=len(rows),
            sample_rows=stage("sample_rows", rows[sampled]),
        )
        staging.flush()
        self._fill_pending(inputs.input_ids, fill_args)
        return inputs

    def _fill_pending(self, input_ids: torch.Tensor, fill_args: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Input tokens still pending on the host come from the previous step's sampled ids."""
        if fill_args is not None:
            index, rows = fill_args
            input_ids.index_copy_(0, index, self.last_sampled.index_select(0, rows))

    def _decode_inputs(self, rows: np.ndarray, positions: np.ndarray, graph_sizes: Sequence[int]) -> ModelInputs:
        """One token per request, all sampled; padded to a CUDA-graph size when one fits.

        Padding rows write no KV (slot -1) and attend to one position of block 0 (seq_len 1):
        harmless reads whose results are dropped.
        """
        n = len(rows)
        index = bisect.bisect_left(graph_sizes, n)
        size = graph_sizes[index] if index < len(graph_sizes) else None
        padded = size or n
        seq_lens = np.ones(padded, dtype=np.int32)
        seq_lens[:n] = positions + 1
        max_blocks = cdiv(int(seq_lens[:n].max()), self.block_size)
        table = np.zeros((padded, max_blocks), dtype=np.int32)
        table[:n] = self.block_table[rows, :max_blocks]
        slots = np.full(padded, -1, dtype=np.int64)
        blocks = self.block_table[rows, positions // self.block_size].astype(np.int64)
        slots[:n] = blocks * self.block_size + positions % self.block_size
        pos = np.zeros(padded, dtype=np.int64)
        pos[:n] = positions
        ids = np.zeros(padded, dtype=np.int64)
        ids[:n] = self.token_ids[rows, np.minimum(positions, self.max_model_len)]
        staging = self.staging
        stage = staging.stage
        fill = np.flatnonzero(positions >= self.num_tokens[rows])  # pending: on the device
        fill_args = (stage("fill_index", fill), stage("fill_rows", rows[fill])) if len(fill) else None
        inputs = ModelInputs(
            input_ids=stage("input_ids", ids),
            positions=stage("positions", pos),
            # Decode: query_start_loc is always arange; the device buffer is kept that way.
            attn=self._stage_attention(slots, table, seq_lens, staging.decode_qsl[: padded + 1], 1),
            logits_indices=None,
            num_reqs=n,
            graph_batch_size=size,
            sample_rows=stage("sample_rows", rows),
        )
        staging.flush()
        self._fill_pending(inputs.input_ids, fill_args)
        if size is not None:
            inputs.attn.block_tables = staging.scatter_block_table(inputs.attn.block_tables)
        return inputs

    def _stage_attention(self, slots: np.ndarray, table: np.ndarray, seq_lens: np.ndarray,
                         query_start_loc: torch.Tensor, max_query_len: int,
                         prefill_rows: np.ndarray | None = None) -> AttentionMetadata:
        """A step's attention metadata, staged (its block table compact until the graph path
        scatters it). Padding rows' seq_lens never exceed a real row's, so their max is the real one.
        ``prefill_rows`` (the rows of more than one token) is staged when decode rows share the
        step: the prefill kernel then launches over those rows only."""
        stage = self.staging.stage
        listed = prefill_rows is not None and 0 < len(prefill_rows) < len(seq_lens)
        return AttentionMetadata(stage("slot_mapping", slots), self.staging.stage_block_table(table),
                                 stage("seq_lens", seq_lens), query_start_loc, max_query_len, int(seq_lens.max()),
                                 stage("prefill_rows", prefill_rows) if listed else None)

    def static_inputs(self, size: int, query_len: int = 1) -> ModelInputs:
        """The static views a CUDA graph of ``size`` rows x ``query_len`` tokens (1: decode,
        1 + K: verify) is captured on: the persistent device buffers every step padded to that
        graph stages into, filled with padding rows (no KV writes), so capturing touches no
        request's cache."""
        if query_len not in (1, 1 + self.spec_k):
            raise ValueError(f"graphs run 1 or 1 + K = {1 + self.spec_k} tokens per row, not {query_len}")
        staging, num = self.staging, size * query_len
        input_ids, positions = staging.dev["input_ids"][:num], staging.dev["positions"][:num]
        input_ids.zero_()
        positions.copy_(torch.arange(query_len, device=self.device).repeat(size))
        qsl = staging.decode_qsl if query_len == 1 else self.verify_qsl
        attn = AttentionMetadata.padding(staging.dev["slot_mapping"][:num], staging.block_tables[:size],
                                         staging.dev["seq_lens"][:size], qsl[: size + 1], query_len,
                                         max_seq_len=self.max_model_len)  # the kernels' grids: any length fits
        return ModelInputs(input_ids, positions, attn, logits_indices=None, num_reqs=size, graph_batch_size=size,
                           graph_query_len=query_len)

    def _sampling_batch(self, request_ids: list[str], rows: np.ndarray) -> SamplingBatch:
        sampling = self.sampling
        logprobs = sampling.logprobs[rows]
        num_outputs = self.num_tokens[rows] + self.num_pending[rows] - self.num_prompt[rows]
        if (sampling.plain_greedy(rows) and not len(sampling.banning_rows(rows, num_outputs))
                and not (self.grammar is not None and self.grammar.any(rows))):
            return SamplingBatch(request_ids, None, logprobs)
        requests = self.requests
        generators = [requests[r].generator for r in request_ids]
        none: list[int] = []  # shared, never mutated: rows without penalties read no token ids
        prompt_ids = [none] * len(rows)
        output_ids = [none] * len(rows)
        for i in np.flatnonzero(sampling.penalties[rows]).tolist():  # only the rows using penalties
            row = int(rows[i])
            num_prompt = int(self.num_prompt[row])
            prompt_ids[i] = self.token_ids[row, :num_prompt].tolist()
            output_ids[i] = self.token_ids[row, num_prompt : self.num_tokens[row]].tolist()
        metadata = sampling.metadata(rows, generators, prompt_ids, output_ids, self.vocab_size, self.device,
                                     num_outputs)
        return SamplingBatch(request_ids, metadata, logprobs)
