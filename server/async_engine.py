"""The bridge between the asyncio server and the synchronous LLMEngine.

The engine runs in its own thread and is touched by that thread only. Handlers talk to it
through a thread-safe inbox (new requests, aborts) that the engine thread drains at the start
of every step, and receive outputs on per-HTTP-request asyncio queues that the engine thread
fills with one ``loop.call_soon_threadsafe`` per step. No handler ever waits on the engine
while holding the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from kiln.runtime.executor import FatalEngineError
from kiln.runtime.outputs import merge_request_outputs
from kiln.scheduler.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served any more."""


class QueueFullError(RuntimeError):
    """The waiting queue has no room for the request's sequences now (--max-queue)."""


class TooManySequencesError(ValueError):
    """The request has more sequences (prompts x n) than the waiting queue can ever hold."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class EngineStepError(RuntimeError):
    """The engine failed while running this request."""


@dataclass(frozen=True)
class EngineRequest:
    """One engine request: an HTTP request with several prompts makes several."""

    request_id: str
    prompt: str | list[int]
    sampling_params: SamplingParams
    arrival_time: float


class GenerationStream:
    """The outputs of one HTTP request's engine requests, in the order the engine made them.

    Lives on the event loop. Iteration ends once every engine request has finished; an
    engine failure is raised from the iterator as EngineStepError.
    """

    def __init__(self, request_ids: list[str]) -> None:
        self.request_ids = list(request_ids)
        self._unfinished = set(request_ids)
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def put(self, item: Any) -> None:
        self._queue.put_nowait(item)

    def unfinished_ids(self) -> list[str]:
        return [r for r in self.request_ids if r in self._unfinished]

    async def __aiter__(self) -> AsyncIterator[Any]:
        """Outputs as they come; when several are already waiting (the consumer fell behind
        the engine), those of the same request are merged into one, so a slow consumer sends
        fewer, larger chunks instead of falling further behind."""
        queue = self._queue
        while self._unfinished:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            for item in _coalesce(items):
                if isinstance(item, BaseException):
                    self._unfinished.clear()
                    raise item
                if item.finished:
                    self._unfinished.discard(item.request_id)
                yield item


def _coalesce(items: list[Any]) -> list[Any]:
    """Merge each request's consecutive outputs (in order of first appearance); an error
    item ends the list where it stands."""
    if len(items) == 1:
        return items
    merged: dict[str, Any] = {}
    for i, item in enumerate(items):
        if isinstance(item, BaseException):
            return [*merged.values(), item]
        before = merged.get(item.request_id)
        merged[item.request_id] = item if before is None else merge_request_outputs(before, item)
    return list(merged.values())


@dataclass
class _Submission:
    stream: GenerationStream
    requests: list[EngineRequest]
    loop: asyncio.AbstractEventLoop
    ack: asyncio.Future = field(repr=False)

    @property
    def num_sequences(self) -> int:
        return sum(r.sampling_params.n for r in self.requests)


class AsyncEngine:
    """Runs ``engine.step()`` in a dedicated thread and routes outputs to asyncio streams.

    Invariants: only the engine thread calls the engine's mutating methods; ``_routes`` maps
    every live engine request id to its stream and is touched by the engine thread only;
    a request leaves ``_routes`` when it finishes, is aborted or fails. ``max_queue`` counts
    sequences (each prompt's n choices), waiting in the engine or in the inbox.
    """

    def __init__(self, engine: Any, max_queue: int | None = None, metrics: Any = None) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._routes: dict[str, GenerationStream] = {}
        self._loops: dict[str, asyncio.AbstractEventLoop] = {}
        self._pending_lock = threading.Lock()
        self._pending_seqs = 0  # sequences of the submissions still in the inbox
        self._thread: threading.Thread | None = None
        self._dead = False
        self._closed = False  # set under _pending_lock when the engine thread exits: no add gets in after
        self.stats = engine.get_stats()

    # ----- event-loop side -----
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._dead

    @property
    def num_waiting(self) -> int:
        """Sequences waiting: in the engine's queue (as of its last step) and in the inbox."""
        return self.stats.num_waiting + self._pending_seqs

    async def generate(self, requests: list[EngineRequest]) -> GenerationStream:
        """Hand ``requests`` to the engine; returns once the engine accepted them all.

        Raises the engine's ValueError when it rejects one (none of them then runs),
        TooManySequencesError when they could never fit the waiting queue, QueueFullError
        when it has no room for them now, EngineDeadError when the loop is gone.
        """
        if not self.is_alive:
            raise EngineDeadError("The engine loop has stopped.")
        loop = asyncio.get_running_loop()
        stream = GenerationStream([r.request_id for r in requests])
        sub = _Submission(stream, requests, loop, loop.create_future())
        self._check_queue_room(sub)
        with self._pending_lock:  # with _closed: an add is either taken by the thread or rejected
            if self._closed:
                raise EngineDeadError("The engine loop has stopped.")
            self._pending_seqs += sub.num_sequences
            self._inbox.put(("add", sub))
        self._wake_engine()
        try:
            await sub.ack
        except asyncio.CancelledError:
            self.abort(stream)  # queued after the add, so the engine drops what it added
            raise
        return stream

    def _check_queue_room(self, sub: _Submission) -> None:
        if self.max_queue is None:
            return
        num = sub.num_sequences
        if num > self.max_queue:
            param = "n" if any(r.sampling_params.n > 1 for r in sub.requests) else "prompt"
            raise TooManySequencesError(
                f"This request asks for {num} sequences ({len(sub.requests)} prompt(s) x n), more than the "
                f"server's waiting queue holds ({self.max_queue}); send fewer prompts or a smaller n.", param)
        if self.num_waiting + num > self.max_queue:
            raise QueueFullError(f"The server's waiting queue is full ({self.max_queue} sequences).")

    def abort(self, stream: GenerationStream) -> None:
        """Abort the stream's unfinished engine requests (a no-op once all have finished)."""
        ids = stream.unfinished_ids()
        if ids:
            self._inbox.put(("abort", ids))
            self._wake_engine()

    def abort_all(self) -> None:
        """Abort every request in flight (the end of a drain that ran out of time)."""
        self._inbox.put(("abort_all", None))
        self._wake_engine()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread, then release the engine's GPU memory (KV cache, graphs)."""
        self._stop.set()
        self._wake_engine()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # the engine is not thread-safe: never shut it under a step
                logger.warning("engine thread still running after %.0f s; not releasing the engine", timeout)
                return
        release = getattr(self.engine, "shutdown", None)
        if release is not None:
            release()

    def _wake_engine(self) -> None:
        """Wake the engine thread for new inbox items: from its idle wait, and from a step
        waiting on an engine process (``EngineProcess.wake``), so an add or abort never waits
        out the poll while the child has nothing to report."""
        self._wake.set()
        wake = getattr(self.engine, "wake", None)
        if wake is not None:
            wake()

    # ----- engine-thread side -----
    def _run(self) -> None:
        check_alive = getattr(self.engine, "check_alive", lambda: None)
        try:
            while not self._stop.is_set():
                check_alive()  # a dead engine process / tensor-parallel worker ends the loop, even when idle
                self._wake.clear()
                if self._drain_inbox():
                    self.stats = self.engine.get_stats()  # aborts change running/KV at once
                if not self.engine.has_unfinished_requests():
                    # Anything put in the inbox after clear() sets _wake, so this cannot miss it.
                    self._wake.wait(0.5)
                    # An engine process reports the effect of aborts a moment later: refresh.
                    self.stats = self.engine.get_stats()
                    continue
                self._step()
        except BaseException:  # the loop is gone: fail everyone, report unhealthy
            logger.exception("The engine loop died")
            self._dead = True
            self._fail_all(EngineDeadError("The engine loop has stopped."))
        finally:
            with self._pending_lock:
                self._closed = True
            self._fail_all(EngineDeadError("The server is shutting down."))
            self._reject_queued_adds()

    def _reject_queued_adds(self) -> None:
        """Answer the submissions still in the inbox (the loop is gone, nobody else will)."""
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._pending_lock:
                    self._pending_seqs -= payload.num_sequences
                if not payload.loop.is_closed():
                    error = EngineDeadError("The engine loop has stopped.")
                    payload.loop.call_soon_threadsafe(_resolve, payload.ack, error)

    def _drain_inbox(self) -> bool:
        """Apply queued adds and aborts; True if there were any."""
        handled = False
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return handled
            handled = True
            if kind == "add":
                self._add(payload)
            elif kind == "abort":
                self._abort_ids(payload)
            else:
                self._fail_all(EngineDeadError(
                    "The server is shutting down: this request was cut when the drain timed out."))

    def _add(self, sub: _Submission) -> None:
        added: list[str] = []
        error: BaseException | None = None
        try:
            for r in sub.requests:
                self.engine.add_request(
                    r.request_id, r.prompt, r.sampling_params, arrival_time=r.arrival_time
                )
                added.append(r.request_id)
                self._routes[r.request_id] = sub.stream
                self._loops[r.request_id] = sub.loop
        except Exception as e:  # a rejected prompt: undo the siblings, report to the handler
            error = e
            for rid in added:
                self.engine.abort_request(rid)
                self._forget(rid)
        finally:
            with self._pending_lock:
                self._pending_seqs -= sub.num_sequences
        sub.loop.call_soon_threadsafe(_resolve, sub.ack, error)

    def _abort_ids(self, ids: list[str]) -> None:
        for rid in ids:
            if rid in self._routes:
                self.engine.abort_request(rid)
                self._forget(rid)
                if self.metrics is not None:
                    self.metrics.on_abort(rid)
                logger.debug("Aborted request %s", rid)

    def _forget(self, rid: str) -> None:
        self._routes.pop(rid, None)
        self._loops.pop(rid, None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except FatalEngineError:  # the engine cannot go on (a tensor-parallel rank died): the loop dies
            raise
        except Exception:  # a bug in a step: fail the requests in flight, keep serving
            logger.exception("Engine step failed; failing %d in-flight requests", len(self._routes))
            self._fail_all(EngineStepError("The engine failed while generating this response."))
            return
        now = time.monotonic()
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._routes.get(out.request_id)
            if stream is None:
                continue
            loop = self._loops[out.request_id]
            if self.metrics is not None:
                self.metrics.on_output(out, now)
            batches.setdefault(loop, []).append((stream, out))
            if out.finished:
                self._forget(out.request_id)
        self.stats = self.engine.get_stats()
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _fail_all(self, error: BaseException) -> None:
        for rid, stream in list(self._routes.items()):
            try:
                self.engine.abort_request(rid)
            except Exception:
                logger.exception("abort_request(%s) failed", rid)
            loop = self._loops[rid]
            self._forget(rid)
            if self.metrics is not None:
                self.metrics.forget(rid)
            if not loop.is_closed():
                loop.call_soon_threadsafe(stream.put, error)


def _resolve(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():  # the handler was cancelled meanwhile
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


def _deliver(items: list) -> None:
    for stream, out in items:
        stream.put(out)

