"""InputBatch's half for verify steps (speculative decoding): draft tokens into the rows,
verify steps into tensors, verified tokens back into the rows.

A request carrying k drafts runs its last token plus the drafts; the drafts are written into
its token row past its known tokens (``num_spec`` counts them for this step), so input ids
come from the rows as for any token, and get one logits row each. A verify step of decoding
rows only is padded to ``1 + K`` tokens per row and to a captured batch size, so it can
replay a CUDA graph: padding tokens sit after a row's real ones, write no KV (slot -1) and
their logits are never read; the causal mask keeps them out of the real tokens' attention.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from kiln.runtime.verify import VerifyBatch, VerifyOutput
from kiln.scheduler.block_manager import cdiv

if TYPE_CHECKING:
    from kiln.runtime.input_batch import ModelInputs, SamplingBatch

logger = logging.getLogger(__name__)


def logits_rows(ends: np.ndarray, spec: np.ndarray | None) -> np.ndarray:
    """Flat token index of every logits row: the last token of each sampled request ending
    at ``ends`` (exclusive), or its last ``1 + spec`` tokens when it carries drafts."""
    if spec is None or not spec.any():
        return ends - 1
    n = spec + 1
    return np.repeat(ends - n, n) + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)


class VerifyInputs:
    """Mixin of InputBatch (it owns the arrays used here; see InputBatch's invariants)."""

    def _apply_drafts(self, spec_token_ids: dict[str, list[int]]) -> set[str]:
        """Write this step's drafts after each row's tokens; returns the requests whose drafts
        cannot be held (out of the vocabulary or past max_model_len)."""
        self.num_spec[:] = 0
        self.has_spec = bool(spec_token_ids)
        failed: set[str] = set()
        for request_id, drafts in spec_token_ids.items():
            state = self.requests.get(request_id)
            if state is None:
                continue  # unknown: check_scheduled fails it
            row, start = state.row, int(self.num_tokens[state.row])
            ids = np.asarray(drafts, dtype=np.int64)
            if start + len(ids) > self.max_model_len or not ((ids >= 0) & (ids < self.vocab_size)).all():
                logger.warning("request %s: %d draft tokens out of the vocabulary or past max_model_len",
                               request_id, len(ids))
                self.remove(request_id)
                failed.add(request_id)
                continue
            self.token_ids[row, start: start + len(ids)] = ids
            self.num_spec[row] = len(ids)
        return failed

    def _fits_verify_graph(self, counts: np.ndarray, sampled: np.ndarray, verify_sizes: Sequence[int]) -> bool:
        """Every row decodes (sampled, at most 1 + K tokens) and a captured size holds them."""
        return (bool(verify_sizes) and len(counts) <= verify_sizes[-1] and len(sampled) == len(counts)
                and int(counts.max()) <= 1 + self.spec_k)

    def _verify_graph_inputs(self, rows: np.ndarray, starts: np.ndarray, counts: np.ndarray, spec: np.ndarray,
                             verify_sizes: Sequence[int]) -> ModelInputs:
        """Rows of exactly 1 + K tokens (real ones first), padded to a captured batch size."""
        from kiln.runtime.input_batch import ModelInputs

        q, n, bs = 1 + self.spec_k, len(rows), self.block_size
        size = verify_sizes[bisect.bisect_left(verify_sizes, n)]
        offsets = np.arange(q)
        real = np.zeros((size, q), dtype=bool)
        real[:n] = offsets[None, :] < counts[:, None]
        positions = np.tile(offsets, (size, 1))  # padding rows: positions 0..q-1 of a q-long context
        positions[:n] += starts[:, None]
        seq_lens = np.full(size, q, dtype=np.int32)
        seq_lens[:n] = starts + q
        row_of = np.zeros(size, dtype=np.int64)
        row_of[:n] = rows
        token_rows = np.repeat(row_of, q)
        flat_pos, flat_real = positions.reshape(-1), real.reshape(-1)
        blocks = self.block_table[token_rows, np.minimum(flat_pos // bs, self.max_blocks_per_seq - 1)].astype(np.int64)
        slots = np.where(flat_real, blocks * bs + flat_pos % bs, -1)
        ids = np.where(flat_real, self.token_ids[token_rows, np.minimum(flat_pos, self.max_model_len)], 0)
        max_blocks = cdiv(int(seq_lens.max()), bs)
        table = np.zeros((size, max_blocks), dtype=np.int32)
        table[:n] = self.block_table[rows, :max_blocks]
        known = self.num_tokens[token_rows] + self.num_spec[token_rows]
        fill = np.flatnonzero(flat_real & (flat_pos >= known))  # pending tokens of rows without drafts
        staging = self.staging
        stage = staging.stage
        fill_args = (stage("fill_index", fill), stage("fill_rows", token_rows[fill])) if len(fill) else None
        ends = np.arange(n) * q + counts
        inputs = ModelInputs(
            input_ids=stage("input_ids", ids),
            positions=stage("positions", flat_pos),
            attn=self._stage_attention(slots, table, seq_lens, self.verify_qsl[: size + 1], q),
            logits_indices=stage("logits_indices", logits_rows(ends, spec)),
            num_reqs=n,
            graph_batch_size=size,
            sample_rows=stage("sample_rows", rows),
            graph_query_len=q,
        )
        staging.flush()
        self._fill_pending(inputs.input_ids, fill_args)
        inputs.attn.block_tables = staging.scatter_block_table(inputs.attn.block_tables)
        return inputs

    def _stage_verify(self, rows: np.ndarray, spec: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """The sampled rows' drafts ([S, K], K = the most any carries) and their packed device
        form (staged: it travels with the step's inputs)."""
        base = self.num_tokens[rows] + self.num_pending[rows]
        cols = np.arange(int(spec.max()))
        has = cols[None, :] < spec[:, None]
        drafts = np.where(has, self.token_ids[rows[:, None], np.minimum(base[:, None] + cols, self.max_model_len)], 0)
        packed = VerifyBatch.pack(spec, drafts)
        return drafts, self.staging.stage("verify", packed).view(packed.shape)

    def _verify_sampling_batch(self, request_ids: list[str], rows: np.ndarray, spec: np.ndarray,
                               drafts: np.ndarray, packed: torch.Tensor) -> SamplingBatch:
        """Sampling settings over the 1 + drafts logits rows of each request (position i of a
        request counts its drafts before i as outputs: penalties, min_tokens) and its drafts."""
        from kiln.runtime.input_batch import SamplingBatch

        sampling = self.sampling
        reps = spec + 1
        flat_rows = np.repeat(rows, reps)
        offset = np.arange(len(flat_rows)) - np.repeat(np.cumsum(reps) - reps, reps)
        base = self.num_tokens[rows] + self.num_pending[rows]
        num_outputs = np.repeat(base - self.num_prompt[rows], reps) + offset
        requests = self.requests
        generators = {i: requests[r].generator for i, r in enumerate(request_ids)
                      if requests[r].generator is not None and not sampling.greedy[rows[i]]}
        metadata = None
        if not (sampling.plain_greedy(rows) and not len(sampling.banning_rows(flat_rows, num_outputs))):
            prompt_ids, output_ids = self._flat_penalty_ids(rows, reps, drafts)
            metadata = sampling.metadata(flat_rows, [None] * len(flat_rows), prompt_ids, output_ids,
                                         self.vocab_size, self.device, num_outputs)
        verify = VerifyBatch.from_packed(spec, packed, generators)
        return SamplingBatch(request_ids, metadata, sampling.logprobs[rows], verify)

    def _flat_penalty_ids(self, rows: np.ndarray, reps: np.ndarray, drafts: np.ndarray
                          ) -> tuple[list[list[int]], list[list[int]]]:
        """Prompt and output ids per logits row, for the rows using penalties (others empty)."""
        none: list[int] = []
        prompt_ids: list[list[int]] = []
        output_ids: list[list[int]] = []
        penalties = self.sampling.penalties
        for s, row in enumerate(rows.tolist()):
            if not penalties[row]:
                prompt_ids += [none] * int(reps[s])
                output_ids += [none] * int(reps[s])
                continue
            num_prompt = int(self.num_prompt[row])
            prompt = self.token_ids[row, :num_prompt].tolist()
            history = self.token_ids[row, num_prompt: self.num_tokens[row]].tolist()
            for i in range(int(reps[s])):
                prompt_ids.append(prompt)
                output_ids.append(history + drafts[s, :i].tolist())
        return prompt_ids, output_ids

    def mark_verified(self, rows: np.ndarray, inputs: ModelInputs, result: VerifyOutput) -> None:
        """Like ``mark_sampled`` for a verify step: the last token of each row is what a
        pipelined next step reads from ``last_sampled``."""
        self.num_pending[rows] += 1
        last = result.token_ids.gather(1, (result.num_tokens - 1).unsqueeze(1)).squeeze(1)
        self.last_sampled.index_copy_(0, inputs.sample_rows, last)

    def append_verified(self, rows: np.ndarray, token_ids: np.ndarray, counts: np.ndarray) -> None:
        """Record ``counts[i]`` tokens of ``token_ids[i]`` per row (a verify step's accepted
        drafts and the target's own token), in launch order."""
        cols = np.arange(token_ids.shape[1])
        keep = cols[None, :] < counts[:, None]
        positions = np.minimum(self.num_tokens[rows][:, None] + cols[None, :], self.max_model_len)
        self.token_ids[np.broadcast_to(rows[:, None], keep.shape)[keep], positions[keep]] = token_ids[keep]
        self.num_tokens[rows] = np.minimum(self.num_tokens[rows] + counts, self.max_model_len + 1)
        self.num_pending[rows] -= 1
