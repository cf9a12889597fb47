"""LLMEngine in its own process, so the HTTP process's GIL serves requests and streams only.

In one process the engine thread and the event loop share one GIL: with many streams the
loop's per-chunk Python (HTTP framing, JSON, socket writes) stretches every engine step and
the GPU waits. ``EngineProcess`` offers the part of LLMEngine's API that ``AsyncEngine``
drives (add_request, abort_request, step, has_unfinished_requests, get_stats, check_alive,
tokenizer, max_model_len, model_config, shutdown) over an engine running in a child process:

* The child steps on its own whenever it has work, one step ahead as always, and sends one
  message per step: each changed request's deltas (text, token ids, logprobs, finish) and the
  engine stats. It never waits for the HTTP process: when the loop falls behind, the outputs
  pile up and the streams merge them into fewer, larger chunks.
* Messages are pickled tuples of plain values (``pack_output``; a round-trip test pins the
  schema). Cumulative fields never cross: ``step()`` here rebuilds them from the deltas, so
  no message grows with a generation's length. Prompt logprobs (when asked for) cross once,
  with a request's first output, and are kept here for its later ones.
* Requests are checked here, synchronously, with the engine's own rules (``prepare_prompt``,
  the scheduler's ``check_fits``), so a bad one still gets its 400 at once; they reach the
  child as token ids.
* Each side reads its end of the pipe in a thread of its own, so neither ever blocks on a
  full pipe while the other is writing (both directions can be busy at once at 256 streams).
* The child ignores SIGINT/SIGTERM (the server drains first, then sends "stop") and exits
  when the parent's end of the pipe closes, so it never outlives the server. If it dies,
  ``step``/``check_alive`` raise ``EngineProcessError`` (a FatalEngineError): the server's
  engine loop stops and /health answers 503.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.runtime.config import EngineConfig
from kiln.runtime.engine import check_logit_bias, load_tokenizer, prepare_prompt
from kiln.runtime.grammar import GrammarError, check_structured_output
from kiln.runtime.executor import FatalEngineError
from kiln.runtime.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from kiln.scheduler import RequestRejected
from kiln.scheduler.request import Request
from kiln.scheduler.sampling_params import SamplingParams
from kiln.scheduler.scheduler import check_fits

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 900.0  # loading, KV profiling, CUDA-graph capture, tensor-parallel workers
_POLL_S = 0.05


class EngineProcessError(FatalEngineError):
    """The engine process failed to start or died."""


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None


@dataclass
class _Live:
    prompt: str | None
    prompt_token_ids: list[int]
    choices: dict[int, _Choice] = field(default_factory=dict)
    prompt_logprobs: list[TokenLogprob | None] | None = None


def pack_output(out: RequestOutput, with_prompt_logprobs: bool = True) -> tuple:
    """The wire form of one step's output: its deltas, finish state and metrics, no cumulative
    field; the prompt logprobs (complete by a request's first output) only when asked, once."""
    m = out.metrics
    choices = [(c.index, c.delta_text, c.delta_token_ids, c.finish_reason, c.stop_reason,
                None if c.delta_logprobs is None else [(lp.token_id, lp.logprob, lp.top) for lp in c.delta_logprobs])
               for c in out.outputs]
    metrics = (m.arrival_time, m.first_scheduled_time, m.first_token_time, m.last_token_time, m.finished_time,
               m.num_cached_tokens)
    prompt_lps = None
    if with_prompt_logprobs and out.prompt_logprobs is not None:
        prompt_lps = [None if e is None else (e.token_id, e.logprob, e.top) for e in out.prompt_logprobs]
    return out.request_id, out.finished, metrics, out.num_cached_tokens, choices, prompt_lps


class EngineProcess:
    """An LLMEngine running in a child process (see the module docstring).

    Invariants: ``_live`` holds exactly the requests added and neither finished (as seen in a
    step message) nor aborted; only one thread calls its methods (AsyncEngine's); the reader
    thread only appends to ``_ready``, sets ``_stats`` and ``_error``.
    """

    def __init__(self, config: EngineConfig, start_timeout_s: float = _START_TIMEOUT_S) -> None:
        self.config = config
        ctx = mp.get_context("spawn")  # CUDA cannot be forked
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(config, child_conn), name="kiln-engine", daemon=True)
        self._proc.start()
        child_conn.close()
        if not self._conn.poll(start_timeout_s):
            self._proc.kill()
            raise EngineProcessError(f"the engine process did not start within {start_timeout_s:.0f} s")
        message = self._recv()
        if message[0] == "error":
            self._proc.join(10)
            raise EngineProcessError(message[1])
        _, self.max_model_len, self.model_config, self._scheduler_config, self._eos, self._stats = message
        self.tokenizer = load_tokenizer(Path(config.engine_dir))
        self._live: dict[str, _Live] = {}
        self._ready: queue.SimpleQueue = queue.SimpleQueue()  # step messages not yet returned by step()
        self._error: str | None = None
        self._stopping = False
        threading.Thread(target=self._read, name="kiln-engine-reader", daemon=True).start()
        logger.info("engine process %d ready", self._proc.pid)

    # ------------------------------------------------------------------ LLMEngine's API
    def add_request(self, request_id: str, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                    arrival_time: float | None = None, priority: int = 0) -> None:
        self.check_alive()
        if request_id in self._live:
            raise RequestRejected(f"request id {request_id!r} is already in use")
        params = sampling_params or SamplingParams()
        text, token_ids = prepare_prompt(prompt, self.tokenizer, self.model_config.vocab_size)
        check_logit_bias(params, self.model_config.vocab_size)
        if params.structured_output is not None:  # tokenizer-free; the child compiles it for its vocabulary
            if self.tokenizer is None:
                raise GrammarError("Structured output needs a tokenizer, and this engine has none.")
            check_structured_output(params.structured_output)
        # The scheduler's own admission rules, on a throwaway Request (it may resolve max_tokens).
        check_fits(self._scheduler_config, Request(request_id, token_ids, params, self._eos))
        arrival = time.monotonic() if arrival_time is None else arrival_time
        self._send(("add", request_id, token_ids, params, arrival, priority))
        self._live[request_id] = _Live(text, token_ids)

    def abort_request(self, request_id: str) -> None:
        if self._live.pop(request_id, None) is not None:
            self._send(("abort", request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self._live)

    def get_stats(self) -> Any:
        return self._stats

    def check_alive(self) -> None:
        if self._error is not None:
            raise EngineProcessError(self._error)

    def wake(self) -> None:
        """End a ``step()`` waiting for the child now (thread-safe): the caller has new requests or
        aborts to hand over, which must not wait out the poll while the child is idle."""
        self._ready.put(None)

    def step(self) -> list[RequestOutput]:
        """The outputs of every engine step received since the last call (waiting up to
        ``_POLL_S`` for one when none is there, or until ``wake()``)."""
        self.check_alive()
        ready: list[RequestOutput] = []
        try:
            packed = self._ready.get(timeout=_POLL_S)
        except queue.Empty:
            return ready
        while True:
            for p in packed or ():  # None: a wake-up
                out = self._unpack(p)
                if out is not None:
                    ready.append(out)
            try:
                packed = self._ready.get_nowait()
            except queue.Empty:
                return ready

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the child (it releases the GPU and its tensor-parallel workers) and wait; idempotent."""
        self._stopping = True
        if self._proc.is_alive():
            try:
                self._send(("stop",))
            except (OSError, EOFError):
                pass
            self._proc.join(timeout_s)
            if self._proc.is_alive():
                logger.warning("engine process did not stop within %.0f s; killing it", timeout_s)
                self._proc.kill()
                self._proc.join(5)
        self._live.clear()
        self._conn.close()

    # ------------------------------------------------------------------ messages
    def _read(self) -> None:
        """The reader thread: drain the child's messages as they come."""
        while True:
            try:
                message = pickle.loads(self._conn.recv_bytes())
            except (EOFError, OSError):
                if not self._stopping:
                    self._proc.join(5)
                    self._error = f"the engine process died (exit code {self._proc.exitcode})"
                    logger.error("%s", self._error)
                return
            kind = message[0]
            if kind == "error":
                self._error = message[1]
                logger.error("%s", self._error)
                return
            self._stats = message[-1]
            if kind == "step":
                self._ready.put(message[1])

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        except (OSError, EOFError):
            self.check_alive()
            raise EngineProcessError("the engine process is gone") from None

    def _recv(self) -> tuple:
        try:
            return pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            raise EngineProcessError(f"the engine process died (exit code {self._proc.exitcode})") from None

    def _unpack(self, packed: tuple) -> RequestOutput | None:
        request_id, finished, metrics, num_cached, choices, prompt_lps = packed
        live = self._live.get(request_id)
        if live is None:
            return None  # aborted meanwhile
        if prompt_lps is not None:
            live.prompt_logprobs = [None if e is None else TokenLogprob(e[0], e[1], list(e[2])) for e in prompt_lps]
        outputs = []
        for index, delta_text, delta_ids, finish_reason, stop_reason, delta_lps in choices:
            state = live.choices.setdefault(index, _Choice(logprobs=[] if delta_lps is not None else None))
            state.text += delta_text
            state.token_ids.extend(delta_ids)
            lps = None
            if delta_lps is not None:
                lps = [TokenLogprob(t, lp, list(top)) for t, lp, top in delta_lps]
                if state.logprobs is None:
                    state.logprobs = []
                state.logprobs.extend(lps)
            outputs.append(CompletionOutput(index, state.text, state.token_ids, finish_reason, stop_reason,
                                            state.logprobs, delta_text, delta_ids, lps))
        if finished:
            del self._live[request_id]
        return RequestOutput(request_id, live.prompt, live.prompt_token_ids, outputs, finished,
                             RequestMetrics(*metrics), num_cached, live.prompt_logprobs)


# ----------------------------------------------------------------------------- the child


def _child_main(config: EngineConfig, conn: Any) -> None:
    """The engine process: load, report, then step while there is work, between messages."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent drains first, then sends "stop"
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine %(name)s: %(message)s")
    from kiln.runtime.engine import LLMEngine

    def send(message: tuple) -> None:
        conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    try:
        engine = LLMEngine(config)
    except Exception as exc:  # the parent prints it as one line
        send(("error", f"{exc}" if type(exc).__module__.startswith("kiln.") else f"{type(exc).__name__}: {exc}"))
        return
    send(("ready", engine.max_model_len, engine.model_config, engine.scheduler.config, engine.eos_token_ids,
          engine.get_stats()))
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_child_reader, args=(conn, inbox), name="kiln-engine-inbox", daemon=True).start()
    try:
        _serve(engine, inbox, send)
    except (EOFError, OSError):  # the parent is gone: nothing to report to
        pass
    except Exception as exc:
        logging.getLogger(__name__).exception("engine process failed")
        try:
            send(("error", f"the engine process failed: {type(exc).__name__}: {exc}"))
        except (EOFError, OSError):
            pass
    finally:
        engine.shutdown()


def _child_reader(conn: Any, inbox: queue.SimpleQueue) -> None:
    """Move the parent's messages into the inbox as they come (a closed pipe is a stop)."""
    while True:
        try:
            inbox.put(pickle.loads(conn.recv_bytes()))
        except (EOFError, OSError):
            inbox.put(("stop",))
            return


def _pack_once(out: RequestOutput, sent: set[str]) -> tuple:
    """pack_output, sending a request's prompt logprobs with its first output only."""
    first = out.prompt_logprobs is not None and out.request_id not in sent
    if first and not out.finished:
        sent.add(out.request_id)
    elif out.finished:
        sent.discard(out.request_id)
    return pack_output(out, with_prompt_logprobs=first)


def _serve(engine: Any, inbox: queue.SimpleQueue, send: Any) -> None:
    sent_prompt_logprobs: set[str] = set()  # requests whose prompt logprobs went out
    while True:
        try:
            message = inbox.get(timeout=0.0 if engine.has_unfinished_requests() else 0.5)
        except queue.Empty:
            message = None
        handled = False
        while message is not None:
            handled = True
            if message[0] == "stop":
                return
            _apply(engine, message, send)
            try:
                message = inbox.get_nowait()
            except queue.Empty:
                message = None
        engine.check_alive()  # a dead tensor-parallel worker ends this process, even when idle
        if engine.has_unfinished_requests():
            outputs = engine.step()
            send(("step", [_pack_once(o, sent_prompt_logprobs) for o in outputs], engine.get_stats()))
        elif handled:  # aborts change the running count and KV usage: report them
            send(("stats", engine.get_stats()))


def _apply(engine: Any, message: tuple, send: Any) -> None:
    kind = message[0]
    if kind == "add":
        _, request_id, token_ids, params, arrival, priority = message
        try:
            engine.add_request(request_id, token_ids, params, arrival_time=arrival, priority=priority)
        except FatalEngineError:  # the engine cannot go on: this process ends and says why
            raise
        except Exception as exc:  # checked by the parent already; report it as a failed request
            send(("step", [(request_id, True, (arrival, None, None, None, None, 0), 0,
                            [(0, "", [], "error", str(exc), None)], None)], engine.get_stats()))
    elif kind == "abort":
        engine.abort_request(message[1])
