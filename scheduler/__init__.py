"""Kiln's scheduler: requests, the paged-KV block manager and the batching policy.

Pure Python: nothing here imports torch, so the scheduler is tested with hand-made
RunnerOutputs and no model.
"""

from kiln.scheduler.block_manager import BlockManager, PrefixHit, hash_block_tokens
from kiln.scheduler.config import (
    CAPACITY_POLICIES,
    GUARANTEED_NO_EVICT,
    MAX_UTILIZATION,
    SchedulerConfig,
    SchedulerConfigError,
)
from kiln.scheduler.interface import CachedRequestData, NewRequestData, RunnerOutput, SchedulerOutput
from kiln.scheduler.request import FINISH_REASONS, Request, RequestStatus
from kiln.scheduler.request_queue import WaitingQueue
from kiln.scheduler.sampling_params import SamplingParams, SamplingParamsError
from kiln.scheduler.scheduler import RequestRejected, Scheduler, SchedulerStats

__all__ = [
    "BlockManager",
    "CAPACITY_POLICIES",
    "CachedRequestData",
    "FINISH_REASONS",
    "GUARANTEED_NO_EVICT",
    "MAX_UTILIZATION",
    "NewRequestData",
    "PrefixHit",
    "Request",
    "RequestRejected",
    "RequestStatus",
    "RunnerOutput",
    "SamplingParams",
    "SamplingParamsError",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerConfigError",
    "SchedulerOutput",
    "SchedulerStats",
    "WaitingQueue",
    "hash_block_tokens",
]
