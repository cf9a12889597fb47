"""In-flight batching scheduler: one plan per step, no prefill/decode phases.

Every request catches up from ``num_computed_tokens`` to ``num_tokens`` under one token
budget per step, so chunked prefill, prefix-cache hits and (later) speculative tokens are
the same rule. Running requests are served first, in order; then waiting ones in queue
order while the budget, the batch size and the KV blocks allow.

The engine may schedule step N+1 before ``update()`` has step N's sampled tokens (it runs
one step ahead so the device never waits for the host): ``schedule()`` advances
``num_computed_tokens`` itself and counts the token each sampling step will produce as
pending, so a decode request is scheduled again for a token the runner feeds from the
device. A request whose pending token will certainly end it (max_tokens, max_model_len) is
not scheduled again; one that ends on EOS or a stop string runs one wasted token, dropped.
Speculative requests are the exception: their next step depends on how many of their draft
tokens were accepted, so they are planned only once their last step was updated
(scheduler/speculation.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from itertools import count

from kiln.scheduler.block_manager import BlockManager, PrefixHit, cdiv
from kiln.scheduler.config import SchedulerConfig
from kiln.scheduler.interface import CachedRequestData, NewRequestData, RunnerOutput, SchedulerOutput
from kiln.scheduler.request import Request, RequestStatus
from kiln.scheduler.request_queue import WaitingQueue
from kiln.scheduler.speculation import SpecDecodeStats, SpeculationPolicy
from kiln.scheduler.stopping import check_stop, reaches_length_limit

logger = logging.getLogger(__name__)

RUNNING = RequestStatus.RUNNING


class RequestRejected(ValueError):
    """A request that can never run (too long for max_model_len or the KV cache)."""


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot for metrics. Prefix-cache counters are in tokens and cumulative."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    spec_decode: SpecDecodeStats = SpecDecodeStats()


@dataclass(frozen=True)
class _StepRecord:
    """The scheduler's own memory of a scheduled step, kept until its update(): which
    requests it samples, and which Request object each scheduled id meant (an aborted id may
    be reused before the step's results come back, and those must not reach the newcomer)."""

    sampled: set[str]
    refs: dict[str, Request]
    drafts: dict[str, int]  # speculating requests it samples -> draft tokens they carry (maybe 0)
    # request -> (its computed count once this step has run, its preemption count then): what
    # update() may offer the prefix cache. The request's own count may already include a later
    # step in flight (pipelined engine) whose KV is not there yet and may never be (a failure).
    ends: dict[str, tuple[int, int]]


class _StepPlan:
    """What one schedule() call has decided so far (mutable, lives for one call)."""

    __slots__ = ("budget", "num_tokens", "cached", "new_requests", "preempted", "sampled", "refs", "drafts",
                 "spec_token_ids", "ends")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.num_tokens: dict[str, int] = {}  # insertion order is batch order
        self.cached: dict[str, CachedRequestData] = {}  # running requests
        self.new_requests: list[NewRequestData] = []
        self.preempted: set[str] = set()
        self.sampled: set[str] = set()  # requests this step samples (their pending count rose)
        self.refs: dict[str, Request] = {}
        self.drafts: dict[str, int] = {}
        self.spec_token_ids: dict[str, list[int]] = {}
        self.ends: dict[str, tuple[int, int]] = {}

    def add(self, request: Request, num_new: int, drafts: list[int] | None = None, speculates: bool = False) -> None:
        """Schedule num_new tokens of the request (its ``drafts`` are the last of them): its
        computed (and pending) counts advance now."""
        rid = request.request_id
        self.num_tokens[rid] = num_new
        self.refs[rid] = request
        self.budget -= num_new
        request.num_computed_tokens += num_new
        self.ends[rid] = (request.num_computed_tokens, request.num_preemptions)
        if request.num_computed_tokens >= request.num_tokens + request.num_pending_tokens:
            request.num_pending_tokens += 1
            self.sampled.add(rid)
            if speculates:
                self.drafts[rid] = len(drafts) if drafts else 0
        if drafts:
            self.spec_token_ids[rid] = drafts
            request.num_drafts_in_flight = len(drafts)

    def unschedule(self, request: Request) -> None:
        """Undo ``add`` (the request is being preempted; its computed count is reset anyway)."""
        rid = request.request_id
        self.budget += self.num_tokens.pop(rid)
        del self.refs[rid]
        del self.ends[rid]
        self.cached.pop(rid, None)
        if rid in self.sampled:
            self.sampled.discard(rid)
            request.num_pending_tokens -= 1
        self.drafts.pop(rid, None)
        if self.spec_token_ids.pop(rid, None) is not None:
            request.num_drafts_in_flight = 0


def check_fits(cfg: SchedulerConfig, request: Request) -> None:
    """Raise RequestRejected if ``request`` could never run under ``cfg``; resolves
    ``max_tokens=None`` to the room left (the request then always runs to its limit)."""
    num_prompt = request.num_prompt_tokens
    if num_prompt == 0:
        raise RequestRejected("the prompt is empty: at least one prompt token is needed")
    if num_prompt >= cfg.max_model_len:
        raise RequestRejected(
            f"the prompt has {num_prompt} tokens; max_model_len ({cfg.max_model_len}) "
            "leaves no room for an output token"
        )
    params = request.sampling_params
    if params.max_tokens is None:
        room = min(cfg.max_model_len, cfg.kv_cache_capacity) - num_prompt
        if 1 <= room and params.min_tokens <= room:
            request.sampling_params = replace(params, max_tokens=room)  # never mutate a shared one
        else:
            raise RequestRejected(
                f"the prompt ({num_prompt} tokens) + min_tokens ({params.min_tokens}) leaves no room "
                f"in the KV cache ({cfg.kv_cache_capacity} tokens)"
            )
    total = num_prompt + request.max_tokens
    if total > cfg.max_model_len:
        raise RequestRejected(
            f"prompt ({num_prompt} tokens) + max_tokens ({request.max_tokens}) = {total} "
            f"exceeds max_model_len ({cfg.max_model_len})"
        )
    if cdiv(total, cfg.block_size) > cfg.num_blocks:
        raise RequestRejected(
            f"prompt + max_tokens = {total} tokens exceeds the KV cache capacity "
            f"({cfg.kv_cache_capacity} tokens = {cfg.num_blocks} blocks of {cfg.block_size})"
        )


class Scheduler:
    """Decides, each step, which requests run how many tokens, and owns their KV blocks.

    Invariants:
      * ``_requests`` holds every unfinished request; each is either in ``_running``
        (status RUNNING, holding blocks) or in ``_waiting`` (WAITING/PREEMPTED, no blocks);
      * ``len(_running) <= max_batch_size``; a step schedules at most ``max_num_tokens``;
      * ``num_computed_tokens <= num_tokens + num_pending_tokens + num_drafts_in_flight``
        for every unfinished request, and the last two are 0 outside the window between a schedule()
        and the update() of the same step (at most one step is ahead; none for a request
        whose step carries drafts);
      * guaranteed_no_evict: the blocks still owed to running requests (their reservation
        for prompt + max_tokens minus what they hold) never exceed the free blocks, so
        running requests always get their next block and nothing is preempted.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.block_manager = BlockManager(
            config.num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching
        )
        self._requests: dict[str, Request] = {}
        self._running: list[Request] = []
        self._waiting = WaitingQueue()
        self._finished_ids: set[str] = set()  # reported in the next SchedulerOutput
        self._steps: dict[int, _StepRecord] = {}  # scheduled and not yet updated
        self._step_ids = count(1)
        self._num_reserved = 0  # sum of reservations of running requests (blocks)
        self._num_preemptions = 0
        self._spec = SpeculationPolicy(config)

    # ------------------------------------------------------------------ requests in and out
    def add_request(self, request: Request) -> None:
        """Queue a request; raise RequestRejected if it could never run.

        ``max_tokens=None`` is resolved here: up to max_model_len (or the whole KV cache,
        if that is smaller), so the request can always run to its limit.
        """
        rid = request.request_id
        if rid in self._requests:
            raise RequestRejected(f"request id {rid!r} is already in use")
        check_fits(self.config, request)
        request.status = RequestStatus.WAITING
        self._requests[rid] = request
        self._waiting.push(request)

    def abort_request(self, request_id: str) -> bool:
        """Drop a request now (its blocks are freed at once). False if it is unknown."""
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(
        self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None
    ) -> bool:
        """End a request from outside (stop strings, aborts). False if it is unknown."""
        assert status.finished, f"finish_request needs a finished status, got {status}"
        request = self._requests.get(request_id)
        if request is None:
            return False
        if request.status is RUNNING:
            self._running.remove(request)
        else:
            self._waiting.remove(request_id)
        self._release(request, status, stop_reason)
        return True

    def _release(self, request: Request, status: RequestStatus, stop_reason: int | str | None) -> None:
        """Finish a request; the caller takes it out of the running list / waiting queue."""
        if request.status is RUNNING:
            self._num_reserved -= self._reservation(request)
        request.status = status
        request.stop_reason = stop_reason
        self.block_manager.free(request)
        del self._requests[request.request_id]
        self._finished_ids.add(request.request_id)
        logger.debug("request %s finished: %s", request.request_id, status.value)

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # ------------------------------------------------------------------ stats
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_cache_usage(self) -> float:
        return self.block_manager.usage

    @property
    def num_preemptions(self) -> int:
        return self._num_preemptions

    @property
    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            kv_cache_usage=bm.usage,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            num_preemptions=self._num_preemptions,
            spec_decode=self._spec.stats,
        )

    # ------------------------------------------------------------------ speculative decoding
    def draft_requests(self) -> dict[str, int]:
        """Requests to propose draft tokens for before the next schedule(), each with the most
        it may carry: speculating running requests whose next step is a decode (prefill done)
        and that have nothing in flight. Empty while speculation is off."""
        return self._spec.draft_requests(self._running)

    def set_draft_tokens(self, drafts: dict[str, list[int]]) -> None:
        """Draft tokens proposed for running requests; the next schedule() plans them (as many
        as the budget and ``draft_requests``' limit allow). Unknown ids are ignored."""
        for rid, tokens in drafts.items():
            request = self._requests.get(rid)
            if request is not None and request.status is RUNNING and tokens:
                request.spec_token_ids = list(tokens)

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> SchedulerOutput:
        """Plan one step: running requests first, then admissions from the waiting queue."""
        plan = _StepPlan(self.config.max_num_tokens)
        self._schedule_running(plan)
        if not plan.preempted:  # memory is short: do not admit while evicting
            self._schedule_waiting(plan)
        if plan.drafts and len(self._running) > self._spec.max_batch_size:
            # Admissions took the batch past the limit: only requests carrying drafts still verify.
            plan.drafts = {rid: n for rid, n in plan.drafts.items() if n}
        step_id = next(self._step_ids)
        self._steps[step_id] = _StepRecord(plan.sampled, plan.refs, plan.drafts, plan.ends)
        output = SchedulerOutput(
            new_requests=plan.new_requests,
            cached_requests=list(plan.cached.values()),
            num_scheduled_tokens=plan.num_tokens,
            order=list(plan.num_tokens),
            preempted_request_ids=plan.preempted,
            finished_request_ids=self._finished_ids,
            step_id=step_id,
            spec_token_ids=plan.spec_token_ids,
            synchronous=bool(plan.drafts),
        )
        self._finished_ids = set()
        return output

    def _chunk(self, num_remaining: int, budget: int) -> int:
        """Tokens a request may run this step: its remaining ones, capped by the budget."""
        num = num_remaining if num_remaining < budget else budget
        cap = self.config.long_prefill_token_threshold
        return cap if 0 < cap < num else num

    def _schedule_running(self, plan: _StepPlan) -> None:
        # The hot loop of a decode-heavy step: keep per-request work to a few operations.
        allocate = self.block_manager.allocate_slots
        chunk = self._chunk
        cached = plan.cached
        max_model_len = self.config.max_model_len
        spec = self._spec
        speculating = spec.enabled and len(self._running) <= spec.max_batch_size
        for request in list(self._running):  # a copy: preemption edits the list
            if plan.budget <= 0:
                break
            if request.status is not RUNNING:
                continue  # preempted earlier in this loop
            pending = request.num_pending_tokens
            if pending:
                if request.num_drafts_in_flight:
                    continue  # its verify step is in flight: where its next step starts is unknown
                num_outputs = request.num_output_tokens + pending
                if reaches_length_limit(request, num_outputs, max_model_len):
                    continue  # its pending token ends it: update() will finish it
            num_computed = request.num_computed_tokens
            remaining = request.num_tokens + pending - num_computed
            drafts = self._take_drafts(request, remaining) if request.spec_token_ids else None
            num_new = chunk(remaining + (len(drafts) if drafts else 0), plan.budget)
            if num_new <= 0:
                continue
            if drafts and num_new < remaining + len(drafts):
                drafts = drafts[: num_new - remaining]  # the budget cuts drafts first
            new_ids = allocate(request, num_new)
            if new_ids is None and drafts:  # short of blocks: run without drafts before preempting
                drafts, num_new = None, remaining
                new_ids = allocate(request, num_new)
            if new_ids is None:
                new_ids = self._preempt_until_allocated(request, num_new, plan)
                if new_ids is None:
                    continue
            cached[request.request_id] = CachedRequestData(request.request_id, new_ids, num_computed)
            plan.add(request, num_new, drafts,
                     speculating and request.num_output_tokens >= request.spec_resume_at)

    def _take_drafts(self, request: Request, remaining: int) -> list[int] | None:
        """The request's proposed drafts (taken: they are good for one step), when its step is
        a decode with nothing in flight; at most ``room`` of them."""
        drafts, request.spec_token_ids = request.spec_token_ids, []
        if remaining != 1 or request.num_pending_tokens:
            return None  # proposed against tokens that have changed since: stale
        return drafts[: self._spec.room(request)] or None

    def _preempt_until_allocated(self, request: Request, num_new: int, plan: _StepPlan) -> list[int] | None:
        """Free blocks by preempting the newest lowest-priority running requests."""
        if self.config.guaranteed_no_evict:
            # Cannot happen while the reservation invariant holds; never preempt anyway.
            logger.error("guaranteed_no_evict: no KV block for running request %s", request.request_id)
            return None
        while True:
            victim = max(self._running, key=lambda r: (r.priority, r.arrival_time))
            self._preempt(victim, plan)
            if victim is request:
                return None
            new_ids = self.block_manager.allocate_slots(request, num_new)
            if new_ids is not None:
                return new_ids

    def _preempt(self, request: Request, plan: _StepPlan) -> None:
        rid = request.request_id
        self._running.remove(request)
        if rid in plan.num_tokens:
            plan.unschedule(request)
        self._num_reserved -= self._reservation(request)
        self.block_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0  # its KV is gone: recompute prompt + outputs so far
        request.spec_token_ids = []
        request.num_preemptions += 1
        self._num_preemptions += 1
        self._waiting.push(request)
        plan.preempted.add(rid)
        logger.info("preempted request %s (%d tokens) to free KV blocks", rid, request.num_tokens)

    def _schedule_waiting(self, plan: _StepPlan) -> None:
        max_batch = self.config.max_batch_size
        while plan.budget > 0 and len(self._running) < max_batch:
            request = self._waiting.peek()
            if request is None or not self._admit(request, plan):
                break  # strict queue order: nobody overtakes a request that does not fit
            self._waiting.pop()

    def _reservation(self, request: Request) -> int:
        """Blocks a request may ever need: prompt + max_tokens, capped at max_model_len."""
        total = min(request.num_prompt_tokens + request.max_tokens, self.config.max_model_len)
        return cdiv(total, self.config.block_size)

    def _admit(self, request: Request, plan: _StepPlan) -> bool:
        bm = self.block_manager
        if request.num_pending_tokens:
            return False  # preempted while its last step ran: resumable once update() has its token
        hit = bm.get_computed_blocks(request)
        num_new = self._chunk(request.num_tokens - hit.num_tokens, plan.budget)
        reservation = self._reservation(request)
        if self.config.guaranteed_no_evict and not self._can_reserve(reservation, hit):
            return False
        if bm.allocate_slots(request, num_new, hit) is None:
            return False
        self._num_reserved += reservation
        request.status = RUNNING
        request.num_computed_tokens = hit.num_tokens
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
            request.num_cached_tokens = hit.num_tokens
        self._running.append(request)
        rid = request.request_id
        spec = self._spec
        plan.add(request, num_new, None, spec.speculates(request, len(self._running)))
        plan.new_requests.append(
            NewRequestData(
                request_id=rid,
                token_ids=request.all_token_ids,
                num_prompt_tokens=request.num_prompt_tokens,
                sampling_params=request.sampling_params,
                block_ids=list(bm.get_block_ids(rid)),
                num_computed_tokens=hit.num_tokens,
                eos_token_ids=request.eos_token_ids,
            )
        )
        return True

    def _can_reserve(self, reservation: int, hit: PrefixHit) -> bool:
        """guaranteed_no_evict admission: can the pool still honour every reservation?"""
        bm = self.block_manager
        owed = self._num_reserved - bm.num_assigned_blocks  # blocks running requests may still take
        # Hit blocks already in use cost nothing; cached-but-free ones come out of the pool.
        needed = reservation - len(hit.block_ids) + hit.num_evictable
        return needed <= bm.num_free_blocks - owed

    # ------------------------------------------------------------------ update
    def update(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> list[Request]:
        """Apply a step's results; return the requests that got tokens or finished.

        Steps are updated in the order they were scheduled. A request may have been scheduled
        again (or preempted) since this step; its token still counts. Results for a request
        that finished or was aborted meanwhile, or whose id now names a newer request, are
        dropped.
        """
        changed: list[Request] = []
        record = self._steps.pop(scheduler_output.step_id)
        if runner_output.plan_not_applied:  # the runner never dropped these: tell it again
            self._finished_ids |= scheduler_output.finished_request_ids
        failed = runner_output.failed_request_ids
        sampled_by_id = runner_output.sampled_token_ids
        expected = record.sampled
        refs = record.refs
        drafts = record.drafts
        ends = record.ends
        cache_blocks = self.block_manager.cache_computed_blocks
        requests = self._requests
        any_finished = False
        for rid in scheduler_output.num_scheduled_tokens:
            request = requests.get(rid)
            if request is None or request is not refs.get(rid, request):
                continue  # finished, aborted, or the id now names another request
            sampled = sampled_by_id.get(rid)
            if rid in expected:
                request.num_pending_tokens -= 1
                if drafts and rid in drafts:
                    self._settle_drafts(request, drafts[rid], sampled)
            if (failed and rid in failed) or (rid in expected and not sampled):
                if not (failed and rid in failed):
                    logger.error("request %s: the runner returned no token for a sampling step", rid)
                any_finished |= self._finish(request, RequestStatus.FINISHED_ERROR, None)
                changed.append(request)
                continue
            end, preemptions = ends[rid]
            if request.status is RUNNING and preemptions == request.num_preemptions:
                # KV up to this step's end exists now (drafts it rejected rolled the count back)
                cache_blocks(request, min(end, request.num_computed_tokens))
            if not sampled:
                continue  # a partial prefill chunk
            any_finished |= self._append_outputs(request, sampled)
            changed.append(request)
        if any_finished:
            self._running = [r for r in self._running if r.status is RUNNING]
        return changed

    def _settle_drafts(self, request: Request, num_drafts: int, sampled: list[int] | None) -> None:
        """A speculating request's step came back: roll its computed tokens back past the
        rejected drafts (their KV is overwritten later) and free the blocks only they needed."""
        request.num_drafts_in_flight = 0
        accepted = min(len(sampled) - 1, num_drafts) if sampled else 0  # none: failed, finished below
        if accepted < num_drafts and request.status is RUNNING:  # a preempted one has no KV left
            request.num_computed_tokens -= num_drafts - accepted
            self.block_manager.trim(request)
        if sampled:
            self._spec.record(request, num_drafts, accepted)

    def _append_outputs(self, request: Request, sampled: list[int]) -> bool:
        """Append sampled tokens, stopping at the first that ends the request; True if it ended."""
        outputs = request.output_token_ids
        max_model_len = self.config.max_model_len
        for token in sampled:
            outputs.append(token)
            stop = check_stop(request, token, max_model_len)
            if stop is not None:
                self._finish(request, stop[0], stop[1])
                return True  # tokens after a stop (speculative ones) are dropped
        return False

    def _finish(self, request: Request, status: RequestStatus, stop_reason: int | str | None) -> bool:
        """Finish a running or preempted request during update(); the caller filters
        ``_running`` once at the end (returns True for that)."""
        if request.status is not RUNNING:
            self._waiting.remove(request.request_id)  # preempted while its last step ran
        self._release(request, status, stop_reason)
        return True
