"""SchedulerConfig: the scheduler's one frozen config, built once at the edge (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

GUARANTEED_NO_EVICT = "guaranteed_no_evict"
MAX_UTILIZATION = "max_utilization"
CAPACITY_POLICIES = (GUARANTEED_NO_EVICT, MAX_UTILIZATION)


class SchedulerConfigError(ValueError):
    """A scheduler setting that cannot work; the message names the setting."""


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Batching limits and KV cache geometry the scheduler plans with.

    Invariants (checked at construction): every count is positive, ``capacity_policy`` is
    one of ``CAPACITY_POLICIES``. The KV cache holds ``num_blocks * block_size`` tokens
    (``kv_cache_capacity``); an engine should keep ``max_model_len`` within it, otherwise
    requests that need more are rejected at submission.

    Capacity policies (TensorRT-LLM names):
      * ``guaranteed_no_evict``: admit a request only when blocks for its prompt plus
        max_tokens can be reserved; running requests are never preempted.
      * ``max_utilization``: admit greedily (blocks for the tokens scheduled now) and
        preempt the newest, lowest-priority running request when blocks run out.
    """

    num_blocks: int
    max_model_len: int
    max_num_tokens: int = 8192  # token budget of one step (all requests together)
    max_batch_size: int = 512  # requests in one step (EngineConfig's default: runtime/config.py)
    block_size: int = 32
    capacity_policy: str = GUARANTEED_NO_EVICT
    enable_prefix_caching: bool = True
    long_prefill_token_threshold: int = 0  # cap on one request's prefill chunk per step; 0 = none
    # Speculative decoding (scheduler/speculation.py): up to this many draft tokens per request
    # and step (0 = off); nobody speculates while more than speculative_max_batch_size requests
    # run; a request whose moving average of accepted drafts per step falls below
    # speculative_min_acceptance pauses speculating for a while.
    num_speculative_tokens: int = 0
    speculative_max_batch_size: int = 8
    speculative_min_acceptance: float = 0.3

    def __post_init__(self) -> None:
        for name in ("num_blocks", "max_model_len", "max_num_tokens", "max_batch_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SchedulerConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.capacity_policy not in CAPACITY_POLICIES:
            raise SchedulerConfigError(
                f"capacity_policy must be one of {', '.join(CAPACITY_POLICIES)}, got {self.capacity_policy!r}"
            )
        threshold = self.long_prefill_token_threshold
        if not isinstance(threshold, int) or threshold < 0:
            raise SchedulerConfigError(
                f"long_prefill_token_threshold must be an integer >= 0, got {threshold!r}"
            )

        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 0:
            raise SchedulerConfigError(
                f"num_speculative_tokens must be an integer >= 0, got {self.num_speculative_tokens!r}"
            )
        if not isinstance(self.speculative_max_batch_size, int) or self.speculative_max_batch_size < 1:
            raise SchedulerConfigError(
                f"speculative_max_batch_size must be a positive integer, got {self.speculative_max_batch_size!r}"
            )
        if not isinstance(self.speculative_min_acceptance, (int, float)) or self.speculative_min_acceptance < 0:
            raise SchedulerConfigError(
                f"speculative_min_acceptance must be a number >= 0, got {self.speculative_min_acceptance!r}"
            )

    @property
    def kv_cache_capacity(self) -> int:
        """Tokens the whole KV cache can hold."""
        return self.num_blocks * self.block_size

    @property
    def guaranteed_no_evict(self) -> bool:
        return self.capacity_policy == GUARANTEED_NO_EVICT
