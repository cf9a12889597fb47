"""Tensor-parallel execution over processes: rank 0 in the engine's process, one worker per other rank.

What crosses the process boundary (an explicit schema; tests/runtime/test_tp_messages.py
round-trips every message):

  engine -> worker   ``WorkerSpec`` once (the process's argument), then per step one pickled
                     ``StepMessage`` (the scheduler's plan, nothing else), ``ShutdownMessage``
                     at the end.
  worker -> engine   ``ReadyMessage`` once its runner is built, or ``FailedMessage`` (the
                     error's text) if it could not start.

Tensors never cross the pipes: the ranks meet in torch.distributed collectives (NCCL on CUDA,
one GPU per rank; gloo on CPU) inside the model (row-parallel all-reduce, lm_head all-gather)
and in the sampler (rank 0 broadcasts the sampled ids). Each worker mirrors the engine's calls
exactly: launch step N, then collect step N-1 (or N itself when it samples nothing), so every
rank's runner holds the same state.

Lifecycle: workers are fresh interpreters (``python -m kiln.runtime.tp_workers``; unlike
multiprocessing's spawn, that never re-runs the caller's main script) connected back over an
authenticated local socket. They start with the executor and die with it: ``shutdown`` stops
them (politely, then by force), and a worker whose parent disappears exits by itself. A
monitor thread per worker waits on it: when one dies, the executor is dead, the process group
is aborted (so no collective waits forever) and every later call raises ``FatalEngineError``
naming the rank and its exit code.
"""

from __future__ import annotations

import logging
import os
import pickle
import secrets
import socket
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client, Listener
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from kiln.runtime.config import EngineConfig
from kiln.runtime.executor import Executor, FatalEngineError
from kiln.runtime.model_runner import ModelRunner, StepHandle
from kiln.scheduler.interface import RunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

_COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # a rank missing a collective this long fails it
_START_TIMEOUT_S = 600.0  # the workers' start: import, load, KV sizing, CUDA-graph capture
_STOP_TIMEOUT_S = 10.0
_AUTHKEY_ENV = "KILN_TP_AUTHKEY"


# ----------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to become rank ``rank`` (its process argument)."""

    engine_dir: str
    config: EngineConfig
    rank: int
    world_size: int
    init_method: str  # tcp://127.0.0.1:PORT, the rendezvous of the process group
    backend: str  # "nccl" | "gloo"
    device: str  # "cpu" | "cuda:N"
    log_level: int = logging.WARNING


@dataclass(frozen=True)
class StepMessage:
    """Run this plan (launch it, then collect the step before it)."""

    plan: SchedulerOutput


@dataclass(frozen=True)
class ShutdownMessage:
    """Release the runner and exit."""


@dataclass(frozen=True)
class ReadyMessage:
    """The worker's runner is built; ``num_blocks`` is the agreed KV block count."""

    rank: int
    num_blocks: int


@dataclass(frozen=True)
class FailedMessage:
    """The worker could not start; ``error`` is the exception's text (one line first)."""

    rank: int
    error: str


# ----------------------------------------------------------------------------- engine side


def rank_devices(config: EngineConfig, world_size: int) -> list[torch.device]:
    """The device of each rank: the CPU for all, or one GPU each (``config.devices`` or 0..N-1)."""
    base = config.torch_device
    if base.type != "cuda":
        return [torch.device("cpu")] * world_size
    indices = list(config.devices) if config.devices is not None else list(range(world_size))
    if len(indices) != world_size:
        raise FatalEngineError(f"the engine has tp {world_size} but devices lists {len(indices)} GPUs: give one per rank")
    count = torch.cuda.device_count()
    if max(indices) >= count:
        raise FatalEngineError(f"the engine has tp {world_size} and needs GPUs {indices}, but {count} are visible")
    return [torch.device("cuda", i) for i in indices]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiProcExecutor(Executor):
    """tp > 1: rank 0's runner here, ranks 1..tp-1 in worker processes.

    Invariants: while ``_dead`` is None every worker is alive and has run every plan sent;
    plans reach the workers before rank 0 runs them; at most one such executor per process
    (torch.distributed has one default process group).
    """

    def __init__(self, config: EngineConfig, loaded_engine: Any) -> None:
        import torch.distributed as dist

        from kiln.runtime.parallel import DistributedCollectives

        if dist.is_initialized():
            raise FatalEngineError("a tensor-parallel engine is already running in this process; shut it down first")
        world = loaded_engine.model_config.tp_size
        devices = rank_devices(config, world)
        backend = "nccl" if devices[0].type == "cuda" else "gloo"
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self._dead: str | None = None
        self._stopping = False
        self._procs: list[subprocess.Popen] = []
        self._conns: list[Any] = []
        authkey = secrets.token_bytes(32)
        listener = Listener(family="AF_UNIX", authkey=authkey)
        env = {**os.environ, _AUTHKEY_ENV: authkey.hex()}
        for rank in range(1, world):
            cmd = [sys.executable, "-m", "kiln.runtime.tp_workers", str(listener.address), str(rank)]
            self._procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL))
        for rank, proc in enumerate(self._procs, start=1):
            threading.Thread(target=self._watch, args=(rank, proc), name=f"kiln-tp-watch{rank}", daemon=True).start()
        level = logging.getLogger("kiln").getEffectiveLevel()
        specs = {rank: WorkerSpec(str(loaded_engine.path), config, rank, world, init_method, backend,
                                  str(devices[rank]), level) for rank in range(1, world)}
        logger.info("tensor parallel: %d ranks (%s), rank 0 here, workers pids %s", world, backend,
                    [p.pid for p in self._procs])
        try:
            try:
                self._conns = self._accept_workers(listener, specs)
            finally:
                listener.close()
            self._init_group(dist, backend, init_method, world)
            group = DistributedCollectives(0, world, devices[0])
            self.driver = ModelRunner(config, loaded_engine, group=group, device=devices[0])
            self._wait_ready()
        except BaseException as exc:
            reason = self._worker_death(wait_s=5.0) or f"rank 0 failed to start: {exc}"
            self.shutdown()
            raise FatalEngineError(f"tensor-parallel engine did not start: {reason}") from exc

    def _accept_workers(self, listener: Listener, specs: dict[int, WorkerSpec]) -> list[Any]:
        """Each worker connects and names its rank; it gets its spec back. In rank order."""
        conns: dict[int, Any] = {}

        def accept() -> None:
            while len(conns) < len(specs):
                conn = listener.accept()
                rank = conn.recv()
                conn.send(specs[rank])
                conns[rank] = conn

        self._wait(accept, "the workers did not connect in time")
        return [conns[rank] for rank in sorted(conns)]

    def _init_group(self, dist: Any, backend: str, init_method: str, world: int) -> None:
        """Join the process group; give up early when a worker dies before joining."""
        self._wait(lambda: dist.init_process_group(backend, init_method=init_method, rank=0, world_size=world,
                                                   timeout=_COLLECTIVE_TIMEOUT),
                   "the workers did not join the process group in time")

    def _wait(self, fn: Any, timeout_message: str) -> None:
        """Run ``fn`` in a thread; stop waiting (raising) as soon as a worker dies."""
        done = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)
            finally:
                done.set()

        threading.Thread(target=run, name="kiln-tp-start", daemon=True).start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not done.wait(0.2):
            if self._dead is not None:
                raise FatalEngineError(self._dead)
            if time.monotonic() > deadline:
                raise FatalEngineError(timeout_message)
        if errors:
            raise errors[0]

    def _wait_ready(self) -> None:
        for rank, conn in enumerate(self._conns, start=1):
            if not conn.poll(_START_TIMEOUT_S):
                raise FatalEngineError(f"worker rank {rank} did not report ready")
            message = conn.recv()
            if isinstance(message, FailedMessage):
                raise FatalEngineError(f"worker rank {rank} failed to start: {message.error}")
            if message.num_blocks != self.driver.num_blocks:
                raise FatalEngineError(f"worker rank {rank} sized {message.num_blocks} KV blocks, rank 0 "
                                       f"{self.driver.num_blocks}")

    def _watch(self, rank: int, proc: subprocess.Popen) -> None:
        """Mark the executor dead as soon as worker ``rank`` exits without being asked to."""
        code = proc.wait()
        if self._stopping or self._dead is not None:
            return
        error = self._failure_text(rank)
        self._dead = f"tensor-parallel worker rank {rank} exited (code {code})" + (f": {error}" if error else "")
        logger.error("%s; the engine cannot continue", self._dead)
        _abort_process_group()

    def _failure_text(self, rank: int) -> str | None:
        """The error a worker reported before dying, if it got to report one."""
        if len(self._conns) < rank:
            return None
        try:
            conn = self._conns[rank - 1]
            if conn.poll(0):
                message = conn.recv()
                if isinstance(message, FailedMessage):
                    return message.error
        except (EOFError, OSError):
            pass
        return None

    def check_alive(self) -> None:
        if self._dead is not None:
            raise FatalEngineError(self._dead)

    def launch(self, scheduler_output: SchedulerOutput) -> StepHandle:
        self.check_alive()
        data = pickle.dumps(StepMessage(scheduler_output), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for conn in self._conns:
                conn.send_bytes(data)
        except (BrokenPipeError, OSError) as exc:
            raise FatalEngineError(self._dead or f"a tensor-parallel worker is gone: {exc}") from exc
        return self._guarded(self.driver.launch, scheduler_output)

    def collect(self, handle: StepHandle) -> RunnerOutput:
        return self._guarded(self.driver.collect, handle)

    def _guarded(self, fn: Any, arg: Any) -> Any:
        """A failure while a worker is dead is the worker's death, not the step's."""
        try:
            return fn(arg)
        except Exception:
            dead = self._worker_death(wait_s=2.0)
            if dead is not None:
                raise FatalEngineError(dead) from None
            raise

    def _worker_death(self, wait_s: float) -> str | None:
        """Why a worker died, waiting up to ``wait_s`` for the monitor to notice: a collective
        that lost its peer can fail a moment before the monitor sees the exit."""
        deadline = time.monotonic() + wait_s
        while self._dead is None and time.monotonic() < deadline:
            if not any(_readable(conn) for conn in self._conns):
                return None  # a dead worker's socket reads as closed; none does: all alive
            time.sleep(0.02)
        return self._dead

    def shutdown(self) -> None:
        """Stop the workers (politely, then by force), release rank 0, leave the group; idempotent."""
        import torch.distributed as dist

        if self._stopping:
            return
        self._stopping = True
        for conn in self._conns:
            try:
                conn.send_bytes(pickle.dumps(ShutdownMessage()))
            except (BrokenPipeError, OSError):
                pass
        driver = getattr(self, "driver", None)
        if driver is not None:
            driver.shutdown()
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for rank, proc in enumerate(self._procs, start=1):
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("tensor-parallel worker rank %d did not stop in time; killing it", rank)
                proc.kill()
                proc.wait(5.0)
        for conn in self._conns:
            conn.close()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a group broken by a dead rank cannot be torn down cleanly
                logger.debug("destroy_process_group failed", exc_info=True)

    @property
    def is_shut_down(self) -> bool:
        return self._stopping


def _readable(conn: Any) -> bool:
    """A worker's connection has something to read: a message, or end of file once it died."""
    try:
        return conn.poll(0)
    except (EOFError, OSError):
        return True


def _abort_process_group() -> None:
    """Make collectives waiting on a dead rank fail instead of hanging (NCCL; gloo already
    fails when its peer's connection closes)."""
    try:
        from torch.distributed import distributed_c10d

        abort = getattr(distributed_c10d, "_abort_process_group", None)
        if abort is not None and distributed_c10d.is_initialized() and distributed_c10d.get_backend() == "nccl":
            abort()
    except Exception:  # noqa: BLE001 - best effort; the error is reported either way
        logger.debug("aborting the process group failed", exc_info=True)


# ----------------------------------------------------------------------------- worker side


def _worker_main(address: str, rank: int) -> None:
    """A worker process: connect, build rank ``rank``'s runner, then run plans until told to stop."""
    authkey = bytes.fromhex(os.environ.pop(_AUTHKEY_ENV))
    _exit_with_parent()
    conn = Client(address, family="AF_UNIX", authkey=authkey)
    conn.send(rank)
    spec: WorkerSpec = conn.recv()
    logging.basicConfig(level=spec.log_level, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    try:
        runner = _start_worker(spec)
    except BaseException as exc:  # noqa: BLE001 - reported to the engine, then exit
        text = f"{type(exc).__name__}: {exc}".splitlines()[0]
        logging.getLogger(__name__).error("rank %d failed to start:\n%s", rank, traceback.format_exc())
        conn.send(FailedMessage(rank, text))
        sys.stdout.flush()
        os._exit(1)
    conn.send(ReadyMessage(rank, runner.num_blocks))
    _serve(runner, conn)
    sys.stdout.flush()
    os._exit(0)


def _start_worker(spec: WorkerSpec) -> ModelRunner:
    import torch.distributed as dist

    from kiln.engine_builder.format import load_engine
    from kiln.runtime.parallel import DistributedCollectives

    device = torch.device(spec.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # ranks share the machine's cores
    else:
        torch.cuda.set_device(device)
    dist.init_process_group(spec.backend, init_method=spec.init_method, rank=spec.rank,
                            world_size=spec.world_size, timeout=_COLLECTIVE_TIMEOUT)
    loaded = load_engine(spec.engine_dir, rank=spec.rank)
    group = DistributedCollectives(spec.rank, spec.world_size, device)
    return ModelRunner(spec.config, loaded, group=group, device=device)


def _serve(runner: ModelRunner, conn: Any) -> None:
    """Mirror the engine loop: launch N, collect N-1 (or N at once when it samples nothing)."""
    log = logging.getLogger(__name__)
    previous: StepHandle | None = None
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the engine is gone
        if isinstance(message, ShutdownMessage):
            runner.shutdown()
            return
        try:
            handle = runner.launch(message.plan)
        except Exception:  # the same failure fails the step on rank 0 (same plan, same state)
            log.exception("step launch failed")
            handle = None
        if previous is not None:
            _collect_quietly(runner, previous, log)
        previous = None
        if handle is not None:
            if handle.in_flight:
                previous = handle
            else:
                _collect_quietly(runner, handle, log)


def _collect_quietly(runner: ModelRunner, handle: StepHandle, log: logging.Logger) -> None:
    try:
        runner.collect(handle)
    except Exception:
        log.exception("step collect failed")


def _exit_with_parent() -> None:
    """Exit when the engine's process disappears (even if it was killed and sent nothing)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="kiln-parent-watch", daemon=True).start()


if __name__ == "__main__":
    # Run the module under its real name, so the messages it pickles name kiln.runtime.tp_workers.
    from kiln.runtime import tp_workers

    tp_workers._worker_main(sys.argv[1], int(sys.argv[2]))
