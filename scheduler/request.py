"""One generation request as the scheduler tracks it (pure Python, no torch)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from kiln.scheduler.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"  # EOS, stop token id or stop string
    FINISHED_LENGTH = "finished_length"  # max_tokens or max_seq_len
    FINISHED_ABORTED = "finished_aborted"  # client went away / abort_request
    FINISHED_ERROR = "finished_error"  # the runtime failed on this request

    @property
    def finished(self) -> bool:
        return self.value.startswith("finished")


# OpenAI finish_reason for each finished status.
FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)
class Request:
    """A request's token state.

    Invariant: ``num_computed_tokens <= num_tokens + num_pending_tokens``; tokens at
    positions ``[num_computed_tokens, num_tokens + num_pending_tokens)`` still need a forward
    pass before the next token can be sampled. Prefill, chunked prefill, prefix-cache hits and
    recompute after preemption are all this one rule.

    ``num_computed_tokens`` counts tokens whose forward pass has been *scheduled* (it advances
    in ``schedule()``); ``num_pending_tokens`` counts tokens sampled by scheduled steps whose
    results ``update()`` has not received yet (0 or 1: the engine runs one step ahead). A
    pending token is real to the runner (it feeds it to the next step from the device) but
    not yet in ``output_token_ids``.

    Speculative decoding (scheduler/speculation.py): ``spec_token_ids`` are draft tokens
    proposed for the request's next step; once scheduled they count as computed and
    ``num_drafts_in_flight`` says how many, until ``update()`` learns how many the target
    accepted and rolls ``num_computed_tokens`` back by the rejected ones. So in general
    ``num_computed_tokens <= num_tokens + num_pending_tokens + num_drafts_in_flight``.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # lower runs first; ties by arrival (FCFS)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_pending_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    first_scheduled_time: float | None = None
    spec_token_ids: list[int] = field(default_factory=list)  # drafts for the next step
    num_drafts_in_flight: int = 0  # drafts scheduled by a step not updated yet
    spec_acceptance: float = 1.0  # moving average of drafts accepted per speculative step
    spec_resume_at: int = 0  # a paused request speculates again from this many outputs

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def max_tokens(self) -> int:
        mt = self.sampling_params.max_tokens
        assert mt is not None, "max_tokens is resolved before a request reaches the scheduler"
        return mt

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)
