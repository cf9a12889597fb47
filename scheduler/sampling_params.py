"""Sampling and stopping settings of one request (pure Python, no torch).

The same object travels from the server (built from OpenAI request fields) through the
scheduler (which reads max_tokens / min_tokens / stop ids / ignore_eos) to the runtime's
sampler (which reads the sampling fields). It is validated once, at the edge.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Integers reach int64 tensors (token ids, counts) and torch.Generator seeds: bound them there.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _is_int(value: object) -> bool:
    """A real integer: JSON ``true`` arrives as a bool, which Python counts as an int."""
    return isinstance(value, int) and not isinstance(value, bool)


class SamplingParamsError(ValueError):
    """A bad sampling setting. ``param`` names the offending field (OpenAI error `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """Per-request sampling and stop settings, familiar to vLLM users.

    temperature == 0 means greedy. top_k <= 0 disables top-k. logprobs=None returns no
    logprobs; logprobs=k returns the chosen token's logprob plus the k most likely
    alternatives (k may be 0). prompt_logprobs=k returns, for every prompt token after the
    first, its logprob given the tokens before it plus the k most likely tokens there (vLLM's
    meaning); such requests get no prefix-cache hits (their prompt must be computed).
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> None:
        """Check every field; integers must be ints (not bools) that fit int64, as the
        tensors and generators they end up in do; a seeded n > 1 also seeds seed + n - 1."""
        def bad(param: str, message: str) -> None:
            raise SamplingParamsError(param, message)

        def check_int(param: str, value: object, low: int, what: str) -> None:
            if not _is_int(value) or not low <= value <= INT64_MAX:
                bad(param, f"{param} must be an integer {what}, got {value!r}")

        check_int("n", self.n, 1, ">= 1")
        if self.max_tokens is not None:
            check_int("max_tokens", self.max_tokens, 1, f"in [1, {INT64_MAX}]")
        check_int("min_tokens", self.min_tokens, 0, f"in [0, {INT64_MAX}]")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if not 0.0 <= self.temperature <= 2.0:
            bad("temperature", f"temperature must be in [0, 2], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        check_int("top_k", self.top_k, -1, f"-1, 0 (disabled) or in [1, {INT64_MAX}]")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"min_p must be in [0, 1], got {self.min_p!r}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            bad("repetition_penalty", f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        if self.seed is not None:
            if not _is_int(self.seed) or not INT64_MIN <= self.seed <= INT64_MAX - (self.n - 1):
                bad("seed", f"seed must be an integer in [{INT64_MIN}, {INT64_MAX}] (with n > 1, seed + n - 1 "
                            f"must be too), got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= self.MAX_LOGPROBS):
            bad("logprobs", f"top_logprobs must be in [0, {self.MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= self.MAX_LOGPROBS:
            bad("prompt_logprobs", f"prompt_logprobs must be in [0, {self.MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "stop must be a non-empty string or a list of non-empty strings")
        if len(self.stop) > 16:
            bad("stop", "at most 16 stop strings are supported")
        if any(not _is_int(t) or not 0 <= t <= INT64_MAX for t in self.stop_token_ids):
            bad("stop_token_ids", "stop_token_ids must be non-negative integers")

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
