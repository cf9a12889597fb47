"""The executor: how the ranks of an engine run each step, between the engine loop and the runners.

The engine loop and the scheduler are single; an executor takes one plan per step and runs it
on every tensor-parallel rank:

  * ``UniProcExecutor`` (tp 1): the one ``ModelRunner`` in this process.
  * ``MultiProcExecutor`` (tp > 1, runtime/tp_workers.py): rank 0's runner in this process
    (it samples, so the ids land where the engine reads them) and one worker process per
    other rank, each owning a runner on its own device with its own rank file. Every plan is
    sent to the workers before rank 0 runs it; the ranks meet in the model's collectives.

Both keep the runner's two-phase step (``launch`` then ``collect``), so the engine's one-step-
ahead loop is the same for every tp.
"""

from __future__ import annotations

from typing import Any

from kiln.runtime.config import EngineConfig
from kiln.runtime.model_runner import EngineShutDownError, ModelRunner, StepHandle
from kiln.scheduler.interface import RunnerOutput, SchedulerOutput


class FatalEngineError(EngineShutDownError):
    """The engine cannot go on (a tensor-parallel worker died): every request fails and the
    engine must be rebuilt. Raised from ``LLMEngine.step`` rather than failing one step."""


class Executor:
    """Runs plans on all ranks. Invariants: ``num_blocks``, ``block_size`` and
    ``max_model_len`` are the same on every rank; ``driver`` is rank 0's runner (in this
    process), whose ``collect`` returns the step's results; steps are collected in launch order.
    """

    driver: ModelRunner

    @property
    def num_blocks(self) -> int:
        return self.driver.num_blocks

    @property
    def block_size(self) -> int:
        return self.driver.block_size

    @property
    def max_model_len(self) -> int:
        return self.driver.max_model_len

    @property
    def is_shut_down(self) -> bool:
        return self.driver.is_shut_down

    def launch(self, scheduler_output: SchedulerOutput) -> StepHandle:
        raise NotImplementedError

    def collect(self, handle: StepHandle) -> RunnerOutput:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError

    def check_alive(self) -> None:
        """Raise FatalEngineError if a rank is gone (nothing to check with one process)."""


class UniProcExecutor(Executor):
    """tp 1: the engine's one runner, in this process."""

    def __init__(self, config: EngineConfig, loaded_engine: Any) -> None:
        self.driver = ModelRunner(config, loaded_engine)

    def launch(self, scheduler_output: SchedulerOutput) -> StepHandle:
        return self.driver.launch(scheduler_output)

    def collect(self, handle: StepHandle) -> RunnerOutput:
        return self.driver.collect(handle)

    def shutdown(self) -> None:
        self.driver.shutdown()


def make_executor(config: EngineConfig, loaded_engine: Any) -> Executor:
    """The executor for the engine's tensor-parallel size (rank 0's tensors already loaded)."""
    if loaded_engine.model_config.tp_size == 1:
        return UniProcExecutor(config, loaded_engine)
    from kiln.runtime.tp_workers import MultiProcExecutor

    return MultiProcExecutor(config, loaded_engine)
