"""What the engine hands back: per-request outputs, their choices, logprobs, metrics, stats.

The output types are plain dataclasses (no torch) so the server can serialise them and tests
can build them by hand. ``SequenceTracker`` builds them: it follows one scheduled sequence,
detokenizes its new tokens and applies stop strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kiln.runtime.detokenizer import IncrementalDetokenizer, StopStringMatcher
from kiln.scheduler.request import FINISH_REASONS, Request, RequestStatus

_FINISHED = frozenset(status for status in RequestStatus if status.finished)


@dataclass(frozen=True)
class TokenLogprob:
    """The logprob of one generated token and the ``top`` most likely alternatives.

    ``top`` is ordered most likely first and holds exactly ``SamplingParams.logprobs`` entries.
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestMetrics:
    """Timestamps of one request's life, all from ``time.monotonic()``.

    A field is None until the event happened. For a request with n > 1 choices the times are
    those of the earliest choice (first_*) and the latest one (last_token_time, finished_time).
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    def snapshot(self) -> RequestMetrics:
        """A copy (several times cheaper than copy.copy or dataclasses.replace)."""
        return RequestMetrics(self.arrival_time, self.first_scheduled_time, self.first_token_time,
                              self.last_token_time, self.finished_time, self.num_cached_tokens)


@dataclass
class CompletionOutput:
    """One choice of a request.

    ``text``, ``token_ids`` and ``logprobs`` are cumulative; ``delta_*`` hold what this step
    added. ``text`` never contains a stop string unless include_stop_str_in_output was set,
    and while streaming it may lag ``token_ids`` by the characters that could still turn
    into a stop string. ``finish_reason`` is None while the choice runs, else "stop",
    "length", "abort" or "error"; ``stop_reason`` is the stop string or stop token id that
    ended it (None for EOS).

    ``token_ids`` and ``logprobs`` are the choice's own growing lists, shared by every output
    of that choice (as in vLLM): a per-step copy would cost O(n^2) over a long generation.
    An unfinished output's lists keep growing; copy them to keep a snapshot.
    """

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request after a step.

    ``outputs`` lists the choices that changed in that step (all of them in ``LLM.generate``
    results), sorted by index. ``finished`` is True once every choice has finished.
    ``prompt_logprobs`` (when SamplingParams.prompt_logprobs was set) has one entry per prompt
    token: None for the first, then its logprob given the tokens before it with the top
    alternatives; it is complete once the prompt's prefill is (by the first output token).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's counters; token counts are cumulative since start."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use, 0..1
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of which served from it
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    num_failed_steps: int = 0
    kv_cache_tokens: int = 0  # the KV cache's capacity in tokens
    # Runner batch rows held. A request keeps its row until the step after it finished, so
    # an idle engine may still hold the rows of the requests that finished last.
    num_batch_slots_used: int = 0


def merge_completions(earlier: CompletionOutput, later: CompletionOutput) -> CompletionOutput:
    """One output for two consecutive outputs of the same choice: ``later``'s cumulative
    fields with both deltas joined (a caller that fell behind, or two steps in one call)."""
    logprobs = None
    if earlier.delta_logprobs is not None or later.delta_logprobs is not None:
        logprobs = (earlier.delta_logprobs or []) + (later.delta_logprobs or [])
    return CompletionOutput(
        index=later.index, text=later.text, token_ids=later.token_ids, finish_reason=later.finish_reason,
        stop_reason=later.stop_reason, logprobs=later.logprobs,
        delta_text=earlier.delta_text + later.delta_text,
        delta_token_ids=earlier.delta_token_ids + later.delta_token_ids,
        delta_logprobs=logprobs,
    )


def merge_request_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One output for two consecutive outputs of the same request: choices changed in either
    (by index), deltas joined; ``later``'s state (finished, metrics)."""
    choices = {c.index: c for c in earlier.outputs}
    for c in later.outputs:
        before = choices.get(c.index)
        choices[c.index] = c if before is None else merge_completions(before, c)
    return RequestOutput(
        request_id=later.request_id, prompt=later.prompt, prompt_token_ids=later.prompt_token_ids,
        outputs=[choices[i] for i in sorted(choices)], finished=later.finished, metrics=later.metrics,
        num_cached_tokens=later.num_cached_tokens, prompt_logprobs=later.prompt_logprobs,
    )


class SequenceTracker:
    """Turns one scheduled sequence's progress into ``CompletionOutput``s, step by step.

    Invariants: ``token_ids`` mirrors the request's output tokens seen so far (all of them,
    the stop token included); ``text`` is their detokenization with stop strings cut and, while
    running, possible stop-string prefixes held back; once ``finish_reason`` is set nothing
    changes any more. A stop string found here sets ``stop_string_hit``: the engine must then
    finish the request in the scheduler.
    """

    def __init__(self, request: Request, index: int, parent_id: str, tokenizer: Any) -> None:
        self.request = request
        self.index = index
        self.parent_id = parent_id
        params = request.sampling_params
        self._detokenizer = None
        self._stop_matcher = None
        if tokenizer is not None:
            self._detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_token_ids, params.skip_special_tokens)
            if params.stop:
                self._stop_matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        # One entry per prompt token scored so far (None for the first); grows during prefill.
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if params.prompt_logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.stop_string_hit = False
        self.counted_finished = False  # the engine's bookkeeping of finished choices

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, runner_logprobs: list[tuple[float, list[tuple[int, float]]]] | None) -> CompletionOutput | None:
        """Take the request's new tokens; None when nothing visible changed.

        The hot path of the engine loop (once per running request per step): no work for
        logprobs or text unless the request has them.
        """
        if self.finish_reason is not None:
            return None
        request = self.request
        new_ids = request.output_token_ids[len(self.token_ids):]
        self.token_ids.extend(new_ids)
        finished = request.status in _FINISHED  # an enum property is slow here
        delta_logprobs = None if self.logprobs is None else self._take_logprobs(new_ids, runner_logprobs)
        delta_text = "" if self._detokenizer is None else self._take_text(new_ids, finished)
        if finished and self.finish_reason is None:
            self.finish_reason = FINISH_REASONS[request.status]
            self.stop_reason = request.stop_reason
        if not new_ids and self.finish_reason is None:
            return None
        return self._completion(delta_text, new_ids, delta_logprobs)

    def add_prompt_logprobs(self, entries: list[tuple[int, float, list[tuple[int, float]]]]) -> None:
        """Take the runner's (position, logprob, top) for prompt tokens, in order; positions
        already held (recomputed after a preemption) are skipped."""
        held = self.prompt_logprobs
        if held is None:
            return
        prompt = self.request.prompt_token_ids
        for position, logprob, top in entries:
            if position == len(held):
                held.append(TokenLogprob(prompt[position], float(logprob), list(top)))

    def fail(self) -> CompletionOutput:
        """Finish with an error (output processing raised); keeps what was produced."""
        self.finish_reason = "error"
        return self._completion("", [], [] if self.logprobs is not None else None)

    def _take_logprobs(
        self, new_ids: list[int], runner_logprobs: list[tuple[float, list[tuple[int, float]]]] | None
    ) -> list[TokenLogprob]:
        entries = runner_logprobs or []
        # The scheduler may accept fewer tokens than were sampled (a stop mid-way): zip cuts.
        delta = [TokenLogprob(tid, float(lp), list(top)) for tid, (lp, top) in zip(new_ids, entries)]
        self.logprobs.extend(delta)
        return delta

    def _take_text(self, new_ids: list[int], finished: bool) -> str:
        request = self.request
        params = request.sampling_params
        ids = new_ids
        stopped_by_token = request.status is RequestStatus.FINISHED_STOPPED and not isinstance(request.stop_reason, str)
        if ids and stopped_by_token and not params.include_stop_str_in_output:
            ids = ids[:-1]  # EOS / stop token ids end the text; they are not part of it
        # A finished request flushes what both stages hold back (partial characters, stop prefixes).
        delta = self._detokenizer.add_tokens(ids, finished=finished)
        if self._stop_matcher is not None:
            delta, stop = self._stop_matcher.process(delta, finished=finished)
            if stop is not None:
                self.stop_string_hit = True
                self.finish_reason, self.stop_reason = "stop", stop
        self.text += delta
        return delta

    def _completion(
        self, delta_text: str, delta_ids: list[int], delta_logprobs: list[TokenLogprob] | None
    ) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.text,
            token_ids=self.token_ids,  # shared, not copied: see CompletionOutput
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=self.logprobs,
            delta_text=delta_text,
            delta_token_ids=delta_ids,  # the caller's fresh list, never touched again
            delta_logprobs=delta_logprobs,
        )
