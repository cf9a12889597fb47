"""Speculative decoding, the scheduler's part (pure Python): who speculates, how many draft
tokens a request may carry, and what its verify steps accepted.

A speculating request's step verifies its draft tokens: the target runs on its last token
plus the drafts, and ``update()`` learns how many drafts were accepted (the runner returns
the accepted drafts and one token of the target's own). Where its next step starts depends
on that count, so a speculating request is never scheduled while such a step is in flight;
the engine collects a step holding speculating requests before planning the next one
(``SchedulerOutput.synchronous``).

Speculation pays only while the device is memory-bound and drafts are accepted, so it
switches itself off: for every request while more than ``speculative_max_batch_size`` run,
and for one request while its moving average of accepted drafts per speculative step is
below ``speculative_min_acceptance`` (it pauses for ``PAUSE_TOKENS`` outputs, then tries again).
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.scheduler.config import SchedulerConfig
from kiln.scheduler.request import Request


@dataclass(frozen=True)
class SpecDecodeStats:
    """Cumulative counters of verified drafts (steps that carried at least one draft).

    ``acceptance_counts[i]`` counts verify steps that produced ``i + 1`` tokens (i drafts
    accepted, plus the target's own token): the acceptance-length histogram.
    """

    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    acceptance_counts: tuple[int, ...] = ()

    @property
    def num_verify_steps(self) -> int:
        return sum(self.acceptance_counts)

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per verify step (1 + accepted drafts), 0 when nothing was verified."""
        steps = self.num_verify_steps
        return (steps + self.num_accepted_tokens) / steps if steps else 0.0


class SpeculationPolicy:
    """Decides per request and step whether it speculates, and keeps the acceptance counters.

    Invariants: ``num_tokens == 0`` means speculation is off (nobody speculates); a request
    speculates only while at most ``max_batch_size`` requests run and its output count has
    reached ``request.spec_resume_at``; ``room`` never lets a verify step produce more
    outputs than max_tokens allows.
    """

    EMA_WEIGHT = 0.25  # weight of the newest step in a request's acceptance average
    PAUSE_TOKENS = 32  # outputs a request with poor acceptance runs without speculating

    def __init__(self, config: SchedulerConfig) -> None:
        self.num_tokens = config.num_speculative_tokens
        self.max_batch_size = config.speculative_max_batch_size
        self.min_acceptance = float(config.speculative_min_acceptance)
        self._num_drafts = 0
        self._num_accepted = 0
        self._counts = [0] * (self.num_tokens + 1)

    @property
    def enabled(self) -> bool:
        return self.num_tokens > 0

    def speculates(self, request: Request, num_running: int) -> bool:
        return (self.num_tokens > 0 and num_running <= self.max_batch_size
                and request.num_output_tokens >= request.spec_resume_at)

    def room(self, request: Request) -> int:
        """Drafts the request's next step may carry: K, or fewer near max_tokens (a verify
        step yields up to drafts + 1 outputs)."""
        return max(0, min(self.num_tokens, request.max_tokens - request.num_output_tokens - 1))

    def draft_requests(self, running: list[Request]) -> dict[str, int]:
        """Scheduler.draft_requests over the running requests (in batch order)."""
        if not self.num_tokens or len(running) > self.max_batch_size:
            return {}
        wanted: dict[str, int] = {}
        for request in running:
            if (request.num_pending_tokens == 0 and request.num_computed_tokens == request.num_tokens - 1
                    and request.num_output_tokens >= request.spec_resume_at):
                room = self.room(request)
                if room:
                    wanted[request.request_id] = room
        return wanted

    def record(self, request: Request, num_drafts: int, num_accepted: int) -> None:
        """A speculative step of ``request`` was updated (``num_drafts`` may be 0 when the
        proposer had none): fold it into the request's average and the counters."""
        if num_drafts:
            self._num_drafts += num_drafts
            self._num_accepted += num_accepted
            self._counts[num_accepted] += 1
        w = self.EMA_WEIGHT
        request.spec_acceptance = (1.0 - w) * request.spec_acceptance + w * num_accepted
        if request.spec_acceptance < self.min_acceptance:
            request.spec_resume_at = request.num_output_tokens + self.PAUSE_TOKENS
            request.spec_acceptance = 1.0  # a fresh start when it resumes

    @property
    def stats(self) -> SpecDecodeStats:
        return SpecDecodeStats(self._num_drafts, self._num_accepted, tuple(self._counts))
