"""ModelRunner: executes one SchedulerOutput (prepare inputs, forward, sample) on one rank.

The runner decides nothing about who runs: it holds the model, the KV cache and the
per-request ``InputBatch``, and turns each plan into tensors and the sampled tokens back into
Python lists with one host sync per step. A step is split in two so the engine loop can work
while the device runs: ``launch`` (prepare, forward, sample, queue the copy of the sampled
ids into pinned memory) and ``collect`` (wait for that copy, record the tokens). Step N+1
may be launched before step N is collected: its rows then read their input token from
step N's sampled ids on the device (input_batch.py), so the device never waits for the host
between steps. Decode-only steps replay CUDA graphs (runtime/cuda_graphs.py) unless
``enforce_eager``; everything else runs eagerly.

After capture the runner calls ``gc.freeze()`` (keeps GC passes out of decode steps), so its
objects are never collected, cycles included: ``shutdown`` is the way to free its device memory.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from kiln.runtime.attention import AttentionMetadata, select_kernels
from kiln.runtime.config import EngineConfig
from kiln.runtime.cuda_graphs import DecodeGraphs, graph_batch_sizes, graph_memory_estimate
from kiln.runtime.fp8_kv import resolve_kv_cache_dtype
from kiln.runtime.grammar import GrammarCompiler, GrammarRows
from kiln.runtime.input_batch import InputBatch, ModelInputs, SamplingBatch
from kiln.runtime.kv_cache import KVCache, KVCacheSpec, cpu_num_blocks, explicit_num_blocks, gpu_num_blocks
from kiln.runtime.model import LlamaFamilyModel
from kiln.runtime.parallel import SINGLE_RANK, Collectives
from kiln.runtime.quant.fp8 import tune_accumulation
from kiln.runtime.sampler import Sampler, SamplerOutput, SamplingMetadata
from kiln.runtime.verify import VerifyOutput, verify
from kiln.scheduler.interface import RunnerOutput, SchedulerOutput
from kiln.scheduler.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Steps launched and not yet collected, at most: the engine runs one step ahead.
_MAX_IN_FLIGHT = 2


class EngineShutDownError(RuntimeError):
    """The engine (its model runner) was shut down: it has no model or KV cache any more."""


class ModelRunner:
    """One rank's model, KV cache and request state.

    Invariants: ``num_blocks``/``block_size`` describe the KV cache the scheduler allocates
    from (the same on every rank of a tensor-parallel group); the runner's token rows always
    hold every token the scheduler knows about for a live request (it appends what it samples
    itself). Every rank of a group runs the same plans in the same order, so their states
    stay identical; rank 0 samples and broadcasts the ids.
    """

    def __init__(self, engine_config: EngineConfig, loaded_engine: Any, group: Collectives = SINGLE_RANK,
                 device: torch.device | None = None) -> None:
        self.config = engine_config
        mc = loaded_engine.model_config
        self.model_config = mc
        self.group = group
        self.device = device if device is not None else engine_config.torch_device
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # a rank's own GPU (plain "cuda" keeps the current one)
        self.dtype = engine_config.compute_dtype(mc.dtype)
        self.block_size = engine_config.block_size
        self.vocab_size = int(mc.vocab_size)
        torch.manual_seed(engine_config.seed)
        # The longest sequence served: the option capped by the model (the KV sizing below
        # refuses a cache that cannot hold one such sequence). The engine and the scheduler
        # take it from here.
        self.max_model_len = engine_config.resolve_max_model_len(mc)
        self.kernels = select_kernels(self.device, engine_config.kernel_backend)
        self.model = LlamaFamilyModel(
            mc, loaded_engine.tensors, self.device, self.dtype, self.kernels,
            max_positions=self.max_model_len, group=group,
        )
        self.sampler = Sampler()
        spec = KVCacheSpec(
            num_layers=int(mc.num_hidden_layers), block_size=self.block_size,
            num_kv_heads=mc.num_kv_heads_per_rank, head_size=int(mc.head_size),
            dtype=resolve_kv_cache_dtype(engine_config.kv_cache_dtype, mc, self.dtype, self.device),
        )
        if self.device.type == "cuda":  # FP8 GEMMs: fast accumulation where it is faster at full steps
            try:
                with torch.inference_mode():
                    methods = [lin.method for layer in self.model.layers for lin in layer.linears]
                    timed = tune_accumulation(methods, engine_config.max_num_tokens, agree=group.min_int)
                if timed:
                    exact = {(m.out_features, m.in_features) for m in methods
                             if engine_config.max_num_tokens in getattr(m, "exact_accum_rows", ())}
                    logger.info("FP8 GEMM accumulation at %d rows: fast for %d of %d shapes",
                                engine_config.max_num_tokens, len(timed) - len(exact), len(timed))
            except RuntimeError as exc:  # speed only (out of memory included): keep fast accumulation
                logger.warning("FP8 accumulation tuning skipped (%s: %s)", type(exc).__name__, exc)
        # Every rank sizes its own cache; all use the smallest block count, so one block id
        # means the same slots everywhere.
        self.spec_k = engine_config.spec_tokens  # the graph memory estimate counts the verify graphs
        self.num_blocks = group.min_int(self._size_kv_cache(spec))
        self.kv_cache = KVCache(spec, self.num_blocks, self.device)
        self.input_batch = InputBatch(
            engine_config.max_batch_size, self.max_model_len, engine_config.max_num_tokens,
            self.block_size, self.num_blocks, self.vocab_size, self.device, self.spec_k,
        )
        # Pinned landing buffers of the sampled ids, one per step that may be in flight (and of
        # a verify step's [tokens..., count] per request).
        pinned = self.device.type == "cuda"
        self._sampled_host = [torch.zeros(engine_config.max_batch_size, dtype=torch.int64, pin_memory=pinned)
                              for _ in range(_MAX_IN_FLIGHT)]
        self._verified_host = [torch.zeros(engine_config.max_batch_size, 2 + self.spec_k, dtype=torch.int64,
                                           pin_memory=pinned) for _ in range(_MAX_IN_FLIGHT if self.spec_k else 0)]
        self._num_launched = 0
        self._unresolved: list[StepHandle] = []  # launched steps whose ids are not on the host yet
        self.graphs: DecodeGraphs | None = None
        self.verify_graphs: DecodeGraphs | None = None
        if self._use_graphs():
            self.enable_decode_graphs(use_graphs=True)
            # Everything allocated so far (modules, weights' wrappers, graphs) lives as long as
            # the process: keep it out of the cyclic GC, whose full passes over it cost
            # tens of milliseconds and otherwise land in random decode steps. The price: deleting
            # the runner frees nothing (its cycles are never collected); ``shutdown`` does.
            gc.collect()
            gc.freeze()

    @property
    def is_shut_down(self) -> bool:
        return self.model is None

    @property
    def num_batch_slots_used(self) -> int:
        """Batch rows held by requests (a finished one keeps its row until the next launch)."""
        return 0 if self.input_batch is None else len(self.input_batch.requests)

    def shutdown(self) -> None:
        """Release the model weights, KV cache, CUDA graphs and batch buffers now; idempotent.

        Drops every reference the runner holds to them (the graphs' bound methods make a cycle
        with the runner, which ``gc.freeze`` keeps from ever being collected), so their
        refcounts reach zero, then returns the cached blocks to the device. Afterwards
        ``launch`` raises ``EngineShutDownError``.
        """
        if self.is_shut_down:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # nothing in flight may still use what is freed
        for graphs in (self.graphs, self.verify_graphs):
            if graphs is not None:
                graphs.release()
        self.graphs = self.verify_graphs = None
        self.model = None
        self.kv_cache = None
        self.input_batch = None
        self._sampled_host = self._verified_host = []
        self._unresolved = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        logger.info("model runner shut down: weights, KV cache and graphs released")

    # ------------------------------------------------------------------ CUDA graphs

    @property
    def graph_sizes(self) -> list[int]:
        return graph_batch_sizes(min(self.config.max_batch_size, self.config.max_num_tokens))

    @property
    def verify_graph_sizes(self) -> list[int]:
        """Batch sizes of the verify graphs (rows of 1 + K tokens): up to the batch size at
        which speculation switches off. None without speculation."""
        cfg = self.config
        if not self.spec_k:
            return []
        rows = min(cfg.speculative_max_batch_size, cfg.max_batch_size, cfg.max_num_tokens // (1 + self.spec_k))
        return graph_batch_sizes(rows) if rows >= 1 else []

    def _use_graphs(self) -> bool:
        if self.config.enforce_eager or self.device.type != "cuda":
            return False
        if self.kernels.name != "triton":
            # The torch reference ops sync with the host (boolean masks), which a capture forbids.
            logger.warning("CUDA graphs need the Triton kernels (ops are %r); running eagerly", self.kernels.name)
            return False
        return True

    def enable_decode_graphs(self, use_graphs: bool) -> None:
        """Capture decode graphs (``use_graphs=False``: run the same padded static inputs
        eagerly, which lets CPU tests check the padding path)."""
        batch = self.input_batch
        self.graphs = DecodeGraphs(self._graph_body, batch.static_inputs, self.graph_sizes, use_graphs)
        self.graphs.capture()
        if self.verify_graph_sizes:
            self.verify_graphs = DecodeGraphs(self._graph_body, partial(batch.static_inputs, query_len=1 + self.spec_k),
                                              self.verify_graph_sizes, use_graphs, pool=self.graphs.pool)
            self.verify_graphs.capture()

    def _graph_body(self, inputs: ModelInputs) -> torch.Tensor:
        return self.model.hidden_states(inputs.input_ids, inputs.positions, self.kv_cache.kv, inputs.attn)

    # ------------------------------------------------------------------ KV sizing

    def _size_kv_cache(self, spec: KVCacheSpec) -> int:
        cfg = self.config
        if cfg.num_kv_cache_tokens is not None:
            return explicit_num_blocks(spec, cfg.num_kv_cache_tokens, self.max_model_len)
        if self.device.type != "cuda":
            return cpu_num_blocks(spec, self.max_model_len)
        peak = self._profile_peak_memory(spec)
        if self._use_graphs():
            peak += self._graph_memory_estimate(spec)
        return gpu_num_blocks(spec, self.device, cfg.kv_cache_fraction, peak, self.max_model_len)

    @torch.inference_mode()
    def _graph_memory_estimate(self, spec: KVCacheSpec) -> int:
        """Memory the decode (and verify) graphs will hold: one eager decode forward at the
        largest graph's token count (on a one-block scratch cache, no KV writes) measures the
        shared pool's size."""
        tokens = self.graph_sizes + [size * (1 + self.spec_k) for size in self.verify_graph_sizes]
        size, dev = max(tokens), self.device
        scratch = KVCache(spec, 1, dev)
        attn = AttentionMetadata.padding(
            torch.empty(size, dtype=torch.int64, device=dev), torch.empty((size, 1), dtype=torch.int32, device=dev),
            torch.empty(size, dtype=torch.int32, device=dev), torch.arange(size + 1, dtype=torch.int32, device=dev),
            query_len=1, max_seq_len=self.max_model_len,
        )
        ids = torch.zeros(size, dtype=torch.int64, device=dev)
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        self.model.hidden_states(ids, ids, scratch.kv, attn)
        torch.cuda.synchronize(dev)
        activations = torch.cuda.max_memory_allocated(dev) - base
        del scratch, attn, ids
        torch.cuda.empty_cache()
        estimate = graph_memory_estimate(activations, tokens, self.model.shape.hidden_size,
                                         torch.empty((), dtype=self.dtype).element_size())
        logger.info("CUDA graphs: %d sizes up to %d tokens, memory kept free for them %.3f GiB",
                    len(tokens), size, estimate / 2**30)
        return estimate

    @torch.inference_mode()
    def _profile_peak_memory(self, spec: KVCacheSpec) -> int:
        """Peak bytes allocated by a forward + sample at the full token budget.

        ``max_num_tokens`` prompt tokens spread over up to ``max_batch_size`` sequences, each
        sampled with top-k/top-p and logprobs (the sampler's most memory-hungry path). The
        sequences share one throwaway cache of a few blocks: only memory matters here.
        """
        cfg = self.config
        num_tokens = min(cfg.max_num_tokens, cfg.max_batch_size * self.max_model_len)
        num_seqs = min(cfg.max_batch_size, num_tokens)
        counts = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        dev = self.device
        attn = AttentionMetadata.prompts(counts, spec.block_size, dev)
        scratch = KVCache(spec, attn.block_tables.shape[1], dev)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        input_ids = torch.randint(0, self.vocab_size, (num_tokens,), device=dev)
        last = attn.query_start_loc[1:].long() - 1  # each prompt's last token: its logits row
        logits = self.model(input_ids, attn.slot_mapping, scratch.kv, attn, last)
        params = [SamplingParams(temperature=1.0, top_p=0.9, top_k=50, logprobs=SamplingParams.MAX_LOGPROBS)] * num_seqs
        metadata = SamplingMetadata.build(params, [None] * num_seqs, [[]] * num_seqs, [[]] * num_seqs,
                                          self.vocab_size, dev)
        self.sampler(logits, metadata)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        del scratch, logits, attn, input_ids
        torch.cuda.empty_cache()
        logger.info("profiled %d tokens over %d sequences: peak %.2f GiB", num_tokens, num_seqs, peak / 2**30)
        return peak

    # ------------------------------------------------------------------ step

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        """Run one step to completion (``launch`` then ``collect``)."""
        return self.collect(self.launch(scheduler_output))

    @torch.inference_mode()
    def launch(self, scheduler_output: SchedulerOutput) -> StepHandle:
        """Prepare, run and sample one step without waiting for the device.

        A request that cannot be prepared fails alone (``failed_request_ids``). The sampled
        ids are copied into pinned host memory behind the step's kernels; ``collect`` waits
        for them. One step may be launched before the previous one is collected (steps are
        collected in launch order); a further launch first waits for the oldest.
        """
        batch = self.input_batch
        if batch is None:
            raise EngineShutDownError("the model runner was shut down")
        if len(self._unresolved) >= _MAX_IN_FLIGHT:
            self._resolve(self._unresolved[0])
        if self._unresolved and (scheduler_output.spec_token_ids or any(h.verify for h in self._unresolved)):
            # Drafts go after a row's tokens, and a verify step's token count decides where its
            # rows go on: both need the rows up to date (tensor-parallel workers get here with
            # the previous step uncollected; rank 0 has collected it already).
            self._resolve_all()
        failed = batch.apply(scheduler_output)
        failed |= batch.check_scheduled(scheduler_output)
        for request_id in failed:
            batch.remove(request_id)
        handle = StepHandle(RunnerOutput(failed_request_ids=failed))
        scheduled = batch.scheduled_rows(scheduler_output, skip=failed)
        if scheduled is None:
            return handle
        if batch.needs_pending_history(scheduled):
            self._resolve_all()
        inputs, sampling, rows = batch.prepare(scheduled, self.graphs.sizes if self.graphs is not None else (),
                                               self.verify_graphs.sizes if self.verify_graphs is not None else ())
        logits = self._forward(inputs)
        if inputs.prompt_logprobs is not None:  # their rows follow the sampled ones
            split = logits.shape[0] - inputs.prompt_logprobs.num_rows
            handle.output.prompt_logprobs = inputs.prompt_logprobs.collect(logits[split:])
            logits = logits[:split]
        if not sampling.request_ids:
            return handle
        handle.sampling, handle.rows, handle.row_gens = sampling, rows, batch.row_gen[rows]
        if sampling.verify is not None:
            verified, ids = self._verify(logits, sampling)
            handle.verify = True
            batch.mark_verified(rows, inputs, verified)
            self._start_copy(handle, ids, verified.logprobs)
        else:
            self._attach_grammar_masks(sampling, rows)
            sampled = self._sample(logits, sampling)
            batch.mark_sampled(rows, inputs, sampled.sampled_token_ids)
            self._start_copy(handle, sampled.sampled_token_ids, sampled.logprobs)
        self._unresolved.append(handle)
        return handle

    def enable_structured_output(self, compiler: GrammarCompiler) -> None:
        """Rows of requests with a ``structured_output`` get grammar matchers (rank 0: it samples)."""
        if self.group.is_first_rank and self.input_batch is not None:
            self.input_batch.grammar = GrammarRows(compiler, self.config.max_batch_size, self.device)

    def _attach_grammar_masks(self, sampling: SamplingBatch, rows: np.ndarray) -> None:
        """Constrained rows need their matchers advanced by the step in flight: wait for it
        (the forward just queued keeps the device busy meanwhile), then fill their masks."""
        grammar = self.input_batch.grammar
        if grammar is None or sampling.metadata is None or not grammar.any(rows):
            return
        self._resolve_all()
        sampling.metadata.allowed_tokens = grammar.bitmask(rows)
    def _start_copy(self, handle: StepHandle, ids: torch.Tensor, lp: Any) -> None:
        """Queue the device-to-host copies of the step's results and an event after them."""
        if self.device.type != "cuda":
            handle.token_ids = ids
            handle.logprobs = None if lp is None else (lp.chosen, lp.top_ids, lp.top_logprobs)
            return
        self._num_launched += 1
        slot = self._num_launched % _MAX_IN_FLIGHT
        if ids.dim() == 2:  # a verify step's packed tokens and counts
            host = self._verified_host[slot].view(-1)[: ids.numel()].view(ids.shape)  # contiguous
        else:
            host = self._sampled_host[slot][: ids.shape[0]]
        host.copy_(ids, non_blocking=True)
        handle.token_ids = host
        if lp is not None:
            handle.logprobs = tuple(t.to("cpu", non_blocking=True)
                                    for t in (lp.chosen, lp.top_ids, lp.top_logprobs))
        handle.event = torch.cuda.Event()
        handle.event.record()

    def collect(self, handle: StepHandle) -> RunnerOutput:
        """Wait for a launched step (its one host sync) and return its sampled tokens."""
        output = handle.output
        if handle.sampling is None:
            return output
        self._resolve(handle)
        ids = handle.token_ids.numpy()
        if handle.verify:
            self._collect_verified(handle.sampling, ids, handle.logprobs, output)
        else:
            self._collect(handle.sampling, ids, handle.logprobs, output)
        return output

    def _resolve(self, handle: StepHandle) -> None:
        """Bring the sampled ids of ``handle`` and every step launched before it to the host
        rows (in launch order), skipping rows that changed owner since."""
        if not any(h is handle for h in self._unresolved):
            return
        batch = self.input_batch
        while self._unresolved:
            oldest = self._unresolved.pop(0)
            if oldest.event is not None:
                oldest.event.synchronize()
            rows = oldest.rows
            live = batch.row_gen[rows] == oldest.row_gens
            ids = oldest.token_ids.numpy()
            if not live.all():
                rows, ids = rows[live], ids[live]
            if oldest.verify:
                batch.append_verified(rows, ids[:, :-1], ids[:, -1])
            else:
                batch.append_sampled(rows, ids)
            if oldest is handle:
                return

    def _resolve_all(self) -> None:
        """Bring every launched step's sampled ids to the host rows."""
        if self._unresolved:
            self._resolve(self._unresolved[-1])

    def _forward(self, inputs: ModelInputs) -> torch.Tensor:
        if inputs.graph_batch_size is not None and self.graphs is not None:
            if inputs.graph_query_len == 1:
                hidden = self.graphs.replay(inputs.graph_batch_size)
                return self.model.logits(hidden[: inputs.num_reqs])
            hidden = self.verify_graphs.replay(inputs.graph_batch_size)
            return self.model.logits(hidden[inputs.logits_indices])
        indices = inputs.logits_indices
        if inputs.prompt_logprobs is not None:  # prompt tokens scored this step: their rows follow
            indices = torch.cat([indices, inputs.prompt_logprobs.token_index])
        return self.model(inputs.input_ids, inputs.positions, self.kv_cache.kv, inputs.attn, indices)

    def _sample(self, logits: torch.Tensor, sampling: SamplingBatch) -> SamplerOutput:
        """Rank 0 samples; with tensor parallelism the other ranks receive its ids (every
        rank feeds the same tokens to the next step) and no logprobs."""
        group = self.group
        if not group.is_first_rank:
            ids = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
            return SamplerOutput(sampled_token_ids=group.broadcast(ids), logprobs=None)
        try:
            if sampling.metadata is None:  # every row plain greedy
                sampled = SamplerOutput(sampled_token_ids=logits.argmax(dim=-1), logprobs=None)
            else:
                sampled = self.sampler(logits, sampling.metadata)
        except BaseException:
            if group.world_size > 1:  # the other ranks wait for ids: never leave them hanging
                group.broadcast(torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device))
            raise
        group.broadcast(sampled.sampled_token_ids)
        return sampled

    def _verify(self, logits: torch.Tensor, sampling: SamplingBatch) -> tuple[VerifyOutput, torch.Tensor]:
        """Rank 0 accepts drafts and draws the next tokens; the other ranks receive them
        (every rank appends the same tokens). Returns the result and its packed form."""
        group, vb = self.group, sampling.verify
        shape = (vb.index.shape[0], vb.index.shape[1] + 1)
        if not group.is_first_rank:
            packed = group.broadcast(torch.empty(shape, dtype=torch.int64, device=logits.device))
            return VerifyOutput(packed[:, :-1], packed[:, -1], None), packed
        try:
            verified = verify(logits, vb, sampling.metadata)
        except BaseException:
            if group.world_size > 1:  # the other ranks wait for the tokens: never leave them hanging
                group.broadcast(torch.zeros(shape, dtype=torch.int64, device=logits.device))
            raise
        packed = group.broadcast(verified.packed())
        return verified, packed

    def _collect_verified(self, sampling: SamplingBatch, packed: np.ndarray,
                          logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                          output: RunnerOutput) -> None:
        """A verify step's tokens (accepted drafts, then the target's own) per request."""
        counts = packed[:, -1].tolist()
        rows = packed[:, :-1].tolist()
        output.sampled_token_ids = {r: t[:n] for r, t, n in zip(sampling.request_ids, rows, counts)}
        if logprobs is None:
            return
        chosen, top_ids, top_lps = (t.tolist() for t in logprobs)
        for i in np.flatnonzero(sampling.logprobs >= 0).tolist():
            k = int(sampling.logprobs[i])
            output.logprobs[sampling.request_ids[i]] = [
                (chosen[i][j], list(zip(top_ids[i][j][:k], top_lps[i][j][:k]))) for j in range(counts[i])]

    def _collect(self, sampling: SamplingBatch, token_ids: np.ndarray,
                 logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, output: RunnerOutput) -> None:
        """The sampled ids (already on the host) per request."""
        output.sampled_token_ids = {r: [t] for r, t in zip(sampling.request_ids, token_ids.tolist())}
        if logprobs is None:
            return
        chosen, top_ids, top_lps = (t.tolist() for t in logprobs)
        for i in np.flatnonzero(sampling.logprobs >= 0).tolist():
            k = int(sampling.logprobs[i])
            top = list(zip(top_ids[i][:k], top_lps[i][:k]))
            output.logprobs[sampling.request_ids[i]] = [(chosen[i], top)]


@dataclass(eq=False)  # identity: handles are tracked in a list
class StepHandle:
    """A launched step. ``sampling`` is None when nothing was sampled (then ``output`` is
    final at once); else ``token_ids`` (and ``logprobs``) are host tensors that hold the
    results once ``event`` (None on CPU: already done) has completed."""

    output: RunnerOutput
    sampling: SamplingBatch | None = None
    rows: np.ndarray | None = None
    row_gens: np.ndarray | None = None  # the rows' owners at launch (InputBatch.row_gen)
    token_ids: torch.Tensor | None = None
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    event: torch.cuda.Event | None = None
    verify: bool = False  # token_ids is [S, K + 2]: each request's tokens, then their count

    @property
    def in_flight(self) -> bool:
        """True when the step produced samples still to be collected."""
        return self.sampling is not None
