"""LLMEngine: the loop that joins the scheduler (a plan), the model runner (tensors) and the
detokenizer (text) into per-request outputs.

One ``step()`` runs one step ahead: ``Scheduler.schedule()`` and ``ModelRunner.launch()`` of
step N+1 are queued while the device still runs step N; then step N is collected
(``ModelRunner.collect()``, ``Scheduler.update()``) and its tokens become outputs
(detokenize, stop strings, ``RequestOutput``s) while the device runs N+1. So the device never
waits for the host between steps. The engine owns no tensors and makes no scheduling
decision; it translates between request ids the caller knows (a parent request with n
choices) and the sequences the scheduler runs (one child per choice).

Deleting an engine does not free its device memory (the runner calls ``gc.freeze()`` after
CUDA-graph capture, so the engine's reference cycles are never collected): call ``shutdown()``,
or use the engine as a context manager, before building another one in the same process.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from kiln.engine_builder.format import load_engine
from kiln.engine_builder.source import TOKENIZER_FILES
from kiln.runtime.config import EngineConfig
from kiln.runtime.executor import Executor, FatalEngineError, make_executor
from kiln.runtime.grammar import GrammarCompiler
from kiln.runtime.model_runner import EngineShutDownError, ModelRunner, StepHandle
from kiln.runtime.outputs import (CompletionOutput, EngineStats, RequestMetrics, RequestOutput, SequenceTracker,
                                  merge_completions)
from kiln.runtime.proposers import Proposer, make_proposer
from kiln.scheduler import RequestRejected, Scheduler, SchedulerConfig
from kiln.scheduler.interface import RunnerOutput, SchedulerOutput
from kiln.scheduler.request import Request, RequestStatus
from kiln.scheduler.sampling_params import SamplingParams, SamplingParamsError

logger = logging.getLogger(__name__)



@dataclasses.dataclass
class _ParentRequest:
    """A caller's request: its prompt and the child sequences (one per choice) it fans out to."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    child_ids: list[str]
    metrics: RequestMetrics
    num_finished: int = 0

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.child_ids)


class LLMEngine:
    """Runs generation requests on one engine directory, one ``step()`` at a time.

    Invariants: every child id in ``_children`` belongs to exactly one live parent in
    ``_parents``; a parent is dropped (and its ids may be reused) the step all its choices
    finish, or at once on ``abort_request``. The engine is not thread-safe: one caller drives
    add_request / abort_request / step (the server's engine thread). After ``shutdown`` it holds
    no request and ``add_request`` / ``step`` raise ``EngineShutDownError``.
    """

    def __init__(self, config: EngineConfig, proposer: Proposer | None = None) -> None:
        self.config = config
        # Not kept: its memory-mapped tensors are only read while rank 0's runner builds the model.
        loaded_engine = load_engine(config.engine_dir, rank=0)
        self.model_config = loaded_engine.model_config
        self.tokenizer = load_tokenizer(Path(loaded_engine.path))
        self.eos_token_ids = _eos_token_ids(Path(loaded_engine.path), self.tokenizer)
        # Before the target's runner: a draft model's memory must be taken before the KV cache's.
        self.proposer = make_proposer(config, self.tokenizer, self.model_config, proposer)
        try:
            self.executor: Executor = make_executor(config, loaded_engine)
        except BaseException:
            if self.proposer is not None:
                self.proposer.shutdown()
            raise
        del loaded_engine
        # Structured output: grammars compiled here (cached), matched by rank 0's runner.
        self.grammar_compiler = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self.runner.enable_structured_output(self.grammar_compiler)
        if self.proposer is not None:
            self.proposer.bind(self.runner.input_batch)
        self.max_model_len = self.executor.max_model_len
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_tokens=config.max_num_tokens,
                max_batch_size=config.max_batch_size,
                block_size=self.executor.block_size,
                num_blocks=self.executor.num_blocks,
                max_model_len=self.max_model_len,
                capacity_policy=config.capacity_policy,
                enable_prefix_caching=config.enable_prefix_caching,
                num_speculative_tokens=config.spec_tokens,
                speculative_max_batch_size=config.speculative_max_batch_size,
                speculative_min_acceptance=config.speculative_min_acceptance,
            )
        )
        self._parents: dict[str, _ParentRequest] = {}
        self._children: dict[str, SequenceTracker] = {}
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        self._num_failed_steps = 0
        # The step launched by the last step() and not collected yet (it runs on the device).
        self._in_flight: tuple[SchedulerOutput, StepHandle] | None = None
        self._froze_gc = self.runner.graphs is not None
        if self._froze_gc:
            _configure_gc()
        logger.info(
            "engine ready: %s, tp %d, max_model_len=%d, %d KV blocks of %d tokens",
            self.model_config.architecture, self.model_config.tp_size, self.max_model_len,
            self.executor.num_blocks, self.executor.block_size,
        )

    @classmethod
    def from_engine_dir(cls, engine_dir: str | Path, proposer: Proposer | None = None, **options: Any) -> LLMEngine:
        """Build an engine from a directory; options are EngineConfig fields."""
        return cls(EngineConfig(engine_dir=str(engine_dir), **options), proposer=proposer)

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    @property
    def runner(self) -> ModelRunner:
        """Rank 0's model runner (in this process)."""
        return self.executor.driver

    def shutdown(self) -> None:
        """Abort every request and release the device memory (weights, KV cache, CUDA graphs,
        batch buffers) now; idempotent. ``del engine`` alone frees none of it (module docstring).
        Afterwards ``add_request`` and ``step`` raise ``EngineShutDownError``."""
        if self.executor.is_shut_down:
            return
        for request_id in list(self._parents):
            self.abort_request(request_id)
        self._in_flight = None
        self.executor.shutdown()
        if self.proposer is not None:
            self.proposer.shutdown()
        if self._froze_gc:  # what this engine froze may now be garbage (its block lists are cycles)
            gc.unfreeze()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def check_alive(self) -> None:
        """Raise FatalEngineError if the engine cannot go on (a tensor-parallel worker died)."""
        self.executor.check_alive()

    def _check_running(self) -> None:
        self.executor.check_alive()
        if self.executor.is_shut_down:
            raise EngineShutDownError("the engine was shut down; build a new one")

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> None:
        """Queue a request; raises a ValueError subclass at once if it can never run."""
        self._check_running()
        if request_id in self._parents or request_id in self._children:
            raise RequestRejected(f"request id {request_id!r} is already in use")
        params = sampling_params or SamplingParams()
        text, token_ids = prepare_prompt(prompt, self.tokenizer, self.model_config.vocab_size)
        check_logit_bias(params, self.model_config.vocab_size)
        if self.proposer is not None and (params.structured_output is not None or params.logit_bias):
            # Verify steps score several positions per row; masks and biases are per row (not yet merged).
            raise RequestRejected("structured output and logit_bias are not supported with speculative decoding yet")
        if params.structured_output is not None:
            self.grammar_compiler.compile(params.structured_output)  # GrammarError at once; cached for the runner
        arrival = time.monotonic() if arrival_time is None else arrival_time
        child_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        parent = _ParentRequest(request_id, text, token_ids, child_ids, RequestMetrics(arrival_time=arrival))
        added: list[str] = []
        try:
            for index, child_id in enumerate(child_ids):
                child_params = self._child_params(params, index)
                request = Request(
                    request_id=child_id,
                    prompt_token_ids=list(token_ids),
                    sampling_params=child_params,
                    eos_token_ids=self.eos_token_ids,
                    arrival_time=arrival,
                    priority=priority,
                )
                self.scheduler.add_request(request)
                added.append(child_id)
                self._children[child_id] = SequenceTracker(request, index, request_id, self.tokenizer)
        except Exception:
            for child_id in added:  # all or nothing: never leave half a fan-out queued
                self.scheduler.abort_request(child_id)
                self._children.pop(child_id, None)
            raise
        self._parents[request_id] = parent

    @staticmethod
    def _child_params(params: SamplingParams, index: int) -> SamplingParams:
        if params.n == 1:
            return params
        changes: dict[str, Any] = {"n": 1}
        if params.seed is not None:
            changes["seed"] = params.seed + index  # distinct yet reproducible choices
        return dataclasses.replace(params, **changes)

    def abort_request(self, request_id: str) -> None:
        """Abort a request (all its choices) and free its KV blocks now; unknown ids are ignored."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return
        for child_id in parent.child_ids:
            self.scheduler.abort_request(child_id)
            self._children.pop(child_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents) or self.scheduler.has_unfinished_requests()

    # ------------------------------------------------------------------ the loop

    def step(self) -> list[RequestOutput]:
        """Launch the next step, then finish the one launched by the previous call; return one
        output per request that changed.

        A token sampled by step N reaches the caller from the ``step()`` call after the one
        that launched N, as soon as N is done on the device (that call first queues N+1, so
        the device stays busy). A request that ends on EOS or a stop string has had one more
        step queued by then: the token it samples is dropped.

        Speculative decoding: a step holding speculating requests (``synchronous``) is
        collected and updated before the next plan (which depends on how many drafts were
        accepted), and drafts are proposed in between; its outputs are still built while the
        device runs the next step.
        """
        self._check_running()
        touched: dict[str, dict[int, CompletionOutput]] = {}
        settled = None
        if self._in_flight is not None and self._in_flight[0].synchronous:
            settled, self._in_flight = self._settle(*self._in_flight), None
        if self.proposer is not None:
            self._propose()
        scheduler_output = self.scheduler.schedule()
        handle = self._launch(scheduler_output)
        if settled is not None:
            self._process_all(*settled, touched)
        previous, self._in_flight = self._in_flight, None
        if previous is not None:
            self._finish_step(*previous, touched)
        if handle.in_flight:
            self._in_flight = (scheduler_output, handle)
        else:  # nothing to wait for: its results (failures, chunk progress) count now
            self._finish_step(scheduler_output, handle, touched)
        return [self._parent_output(pid, choices) for pid, choices in touched.items()]

    def _finish_step(self, scheduler_output: SchedulerOutput, handle: StepHandle,
                     touched: dict[str, dict[int, CompletionOutput]]) -> None:
        """Collect a launched step, give its results to the scheduler, build the outputs."""
        self._process_all(*self._settle(scheduler_output, handle), touched)

    def _settle(self, scheduler_output: SchedulerOutput, handle: StepHandle) -> tuple[list[Request], RunnerOutput]:
        """Collect a launched step and give its results to the scheduler."""
        runner_output = self._collect(handle, scheduler_output)
        for request_id, entries in runner_output.prompt_logprobs.items():
            tracker = self._children.get(request_id)
            if tracker is not None:
                tracker.add_prompt_logprobs(entries)
        return self.scheduler.update(scheduler_output, runner_output), runner_output

    def _propose(self) -> None:
        """Draft tokens for the speculating requests the next plan may verify. A failing
        proposer costs speed, not requests: they go on without drafts."""
        wanted = self.scheduler.draft_requests()
        try:
            drafts = self.proposer.propose(wanted)
        except FatalEngineError:
            raise
        except Exception:
            logger.exception("draft proposal failed for %d requests; they run without drafts", len(wanted))
            return
        if drafts:
            self.scheduler.set_draft_tokens(drafts)

    def _process_all(self, requests: list[Request], runner_output: RunnerOutput | None,
                     touched: dict[str, dict[int, CompletionOutput]]) -> None:
        now = time.monotonic()
        children = self._children
        logprobs = runner_output.logprobs if runner_output is not None else {}
        for request in requests:
            tracker = children.get(request.request_id)
            if tracker is None or tracker.request is not request:
                continue  # aborted by the caller in the meantime (its id may be reused)
            completion = self._process(tracker, logprobs, now)
            if completion is not None:
                choices = touched.setdefault(tracker.parent_id, {})
                earlier = choices.get(tracker.index)
                choices[tracker.index] = completion if earlier is None else merge_completions(earlier, completion)

    def _launch(self, scheduler_output: SchedulerOutput) -> StepHandle:
        """Start the model step; a failing step fails only the requests it held (a dead
        tensor-parallel rank fails the engine: FatalEngineError propagates)."""
        try:
            return self.executor.launch(scheduler_output)
        except FatalEngineError:
            raise
        except Exception:
            # The runner may have raised before folding in the plan's finished ids.
            return StepHandle(self._failed_step(scheduler_output, plan_not_applied=True))

    def _collect(self, handle: StepHandle, scheduler_output: SchedulerOutput) -> RunnerOutput:
        try:
            return self.executor.collect(handle)
        except FatalEngineError:
            raise
        except Exception:
            return self._failed_step(scheduler_output)

    def _failed_step(self, scheduler_output: SchedulerOutput, plan_not_applied: bool = False) -> RunnerOutput:
        ids = sorted(scheduler_output.num_scheduled_tokens)
        self._num_failed_steps += 1
        logger.exception("model step failed for %d requests %s; finishing them with an error", len(ids), ids[:8])
        return RunnerOutput(failed_request_ids=set(ids), plan_not_applied=plan_not_applied)

    def _process(self, tracker: SequenceTracker, logprobs: dict[str, list[tuple[float, list[tuple[int, float]]]]],
                 now: float) -> CompletionOutput | None:
        request = tracker.request
        num_before = len(tracker.token_ids)
        try:
            completion = tracker.update(logprobs.get(request.request_id) if logprobs else None)
        except Exception:
            logger.exception("output processing failed for request %s", request.request_id)
            if not request.is_finished:
                self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_ERROR)
            completion = tracker.fail()
        if tracker.stop_string_hit and not request.is_finished:
            self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED, completion.stop_reason)
        num_new = len(tracker.token_ids) - num_before
        if num_new and num_before == 0:  # the prompt counts once its prefill produced a token
            self._num_prompt_tokens += request.num_prompt_tokens
        self._num_generation_tokens += num_new
        self._update_metrics(tracker, num_new, now)
        return completion

    def _update_metrics(self, tracker: SequenceTracker, num_new: int, now: float) -> None:
        parent = self._parents[tracker.parent_id]
        metrics, request = parent.metrics, tracker.request
        if request.first_scheduled_time is not None and metrics.first_scheduled_time is None:
            metrics.first_scheduled_time = request.first_scheduled_time
        if num_new:
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            metrics.last_token_time = now
        metrics.num_cached_tokens = max(metrics.num_cached_tokens, request.num_cached_tokens)
        if tracker.finished and not tracker.counted_finished:
            tracker.counted_finished = True
            parent.num_finished += 1
            if parent.finished:
                metrics.finished_time = now

    def _parent_output(self, parent_id: str, choices: dict[int, CompletionOutput]) -> RequestOutput:
        parent = self._parents[parent_id]
        output = RequestOutput(
            request_id=parent_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=list(choices.values()) if len(choices) == 1 else [choices[i] for i in sorted(choices)],
            finished=parent.finished,
            metrics=parent.metrics.snapshot(),  # the parent's own keeps changing
            num_cached_tokens=parent.metrics.num_cached_tokens,
            prompt_logprobs=getattr(self._children.get(parent.child_ids[0]), "prompt_logprobs", None),
        )
        if parent.finished:
            del self._parents[parent_id]
            for child_id in parent.child_ids:
                self._children.pop(child_id, None)
        return output

    def get_stats(self) -> EngineStats:
        stats = self.scheduler.stats
        return EngineStats(
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            kv_cache_usage=stats.kv_cache_usage,
            prefix_cache_queries=stats.prefix_cache_queries,
            prefix_cache_hits=stats.prefix_cache_hits,
            num_preemptions=stats.num_preemptions,
            spec_decode=stats.spec_decode,
            prompt_tokens=self._num_prompt_tokens,
            generation_tokens=self._num_generation_tokens,
            num_failed_steps=self._num_failed_steps,
            kv_cache_tokens=self.executor.num_blocks * self.executor.block_size,
            num_batch_slots_used=self.runner.num_batch_slots_used,
        )


def _configure_gc() -> None:
    """Keep cyclic-GC passes short on the serving path (a GPU engine; CPU engines are left alone).

    Freezes what the engine holds for its lifetime: the scheduler's KV-block objects (tens of
    thousands) join the runner's modules, frozen after graph capture, so no full pass walks them
    again. What full passes still walk is the live requests' objects (BENCHMARKS.md, seventh
    session: passes of ~40-50 ms at 512 sequences on an H200 host). ``KILN_GC_THRESHOLD=a,b,c``
    sets ``gc.set_threshold`` (a tuning aid; the measured alternatives did not raise throughput)."""
    gc.collect()
    gc.freeze()
    spec = os.environ.get("KILN_GC_THRESHOLD")
    if spec:
        gc.set_threshold(*(int(x) for x in spec.split(",")))


def prepare_prompt(prompt: str | list[int], tokenizer: Any, vocab_size: int) -> tuple[str | None, list[int]]:
    """(text or None, token ids) of a prompt, checked: raises RequestRejected for a text prompt
    without a tokenizer, non-integer ids, an empty prompt or an id outside the vocabulary.
    Length limits (max_model_len, KV capacity) are the scheduler's to check: it names them."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise RequestRejected("this engine has no tokenizer: pass the prompt as token ids")
        text, token_ids = prompt, list(tokenizer.encode(prompt))
    else:
        text, token_ids = None, list(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in token_ids):
            raise RequestRejected("a token-id prompt must be a list of integers")
    if not token_ids:
        raise RequestRejected("the prompt is empty")
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestRejected(f"prompt token id {bad[0]} is out of the vocabulary (size {vocab_size})")
    return text, token_ids


def check_logit_bias(params: SamplingParams, vocab_size: int) -> None:
    """Raise SamplingParamsError (param logit_bias) for a biased token id outside the vocabulary."""
    bad = [t for t in params.logit_bias or {} if not 0 <= t < vocab_size]
    if bad:
        raise SamplingParamsError("logit_bias", f"logit_bias token id {bad[0]} is outside the vocabulary "
                                                f"[0, {vocab_size})")


def load_tokenizer(path: Path) -> Any:
    """The engine directory's tokenizer, or None for engines built without one."""
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        logger.info("no tokenizer in %s: prompts must be token ids and texts will be empty", path)
        return None
    from transformers import AutoTokenizer  # heavy import, only when there is a tokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _eos_token_ids(path: Path, tokenizer: Any) -> frozenset[int]:
    """EOS ids from generation_config.json plus the tokenizer's own EOS."""
    ids: set[int] = set()
    gen_config = path / "generation_config.json"
    if gen_config.exists():
        eos = json.loads(gen_config.read_text()).get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(e) for e in eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
