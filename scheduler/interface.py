"""The two small objects through which the scheduler and the model runner meet.

``Scheduler.schedule() -> SchedulerOutput`` says which requests run how many tokens this
step; ``Scheduler.update(scheduler_output, runner_output)`` takes what the runner sampled.
A request's full data is sent once (``NewRequestData``, also when it resumes after a
preemption, since its KV cache was dropped); afterwards only what changed
(``CachedRequestData``). The runner keeps its own per-request state keyed by request_id and
drops it when the id shows up in ``finished_request_ids`` or ``preempted_request_ids``.

Pure Python data: no torch here, so the scheduler can be tested with hand-made
RunnerOutputs and no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from kiln.scheduler.sampling_params import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    """First scheduling of a request (or its resumption after preemption).

    ``token_ids`` are all tokens known so far (prompt + outputs when resuming), and
    ``num_computed_tokens`` how many of them already have KV in ``block_ids`` (prefix-cache
    hits). ``num_prompt_tokens`` separates prompt from output (the sampler's penalties
    need it). ``eos_token_ids`` are the request's EOS ids: the sampler bans them (unless
    ignore_eos) and its stop_token_ids until ``min_tokens`` outputs exist.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    eos_token_ids: frozenset[int] = frozenset()


@dataclass(slots=True)
class CachedRequestData:
    """A request the runner already knows: the blocks it gained since last step.

    Treat as read-only. Not frozen on purpose: one is built per running request per step
    and a frozen dataclass's __init__ costs about 3x more.
    """

    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    """One step's plan.

    ``num_scheduled_tokens[request_id]`` tokens run for each scheduled request, starting at
    its ``num_computed_tokens``. Requests appear in batch order: new ones and cached ones
    together follow ``order``. A request is sampled this step only when its scheduled tokens
    reach the end of its tokens, counting the one a still-running step is sampling for it (a
    partial prefill chunk samples nothing). ``num_computed_tokens`` in the request data is the
    value before this step.
    """

    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    preempted_request_ids: set[str] = field(default_factory=set)
    finished_request_ids: set[str] = field(default_factory=set)
    # Which schedule() made this plan: update() finds its own record of the step by it.
    step_id: int = 0

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


@dataclass
class RunnerOutput:
    """What the runner produced for a SchedulerOutput.

    ``sampled_token_ids[request_id]`` lists the tokens sampled for that request this step
    (empty for a partial prefill chunk; one token normally; up to k+1 with speculative
    decoding). ``logprobs[request_id]`` holds, per sampled token, (chosen token logprob,
    [(token_id, logprob), ...] top alternatives) when the request asked for logprobs.
    ``failed_request_ids`` are requests whose step raised; the scheduler finishes them with
    an error and the rest of the batch goes on. ``plan_not_applied`` says the runner failed
    before folding the plan into its state: the plan's finished / preempted ids must reach it
    again with the next plan. ``prompt_logprobs[request_id]`` lists, for the prompt tokens this
    step scored (SamplingParams.prompt_logprobs), (position, logprob, [(token_id, logprob), ...]
    top alternatives); the scheduler ignores it.
    """

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[tuple[float, list[tuple[int, float]]]]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[tuple[int, float, list[tuple[int, float]]]]] = field(default_factory=dict)
    failed_request_ids: set[str] = field(default_factory=set)
    plan_not_applied: bool = False
