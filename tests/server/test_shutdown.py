"""SIGTERM drains `serve-llm`: the request in flight completes, new ones and /health get 503,
exit 0; streams still running at the drain timeout are told the server is shutting down; a
second SIGTERM exits at once, nonzero, saying what it cut."""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from .helpers import sse_events, start_serve_llm, wait_for

pytestmark = pytest.mark.slow

ENGINE_FLAGS = ("--device", "cpu", "--max-model-len", "256", "--num-kv-cache-tokens", "2048")


class _Stream:
    """A streaming chat request read in a thread; ``started`` is set once tokens flow."""

    def __init__(self, url: str, max_tokens: int) -> None:
        self.lines: list[str] = []
        self.started = threading.Event()
        body = {"messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": max_tokens,
                "ignore_eos": True, "stream": True}
        self.thread = threading.Thread(target=self._read, args=(url, body))
        self.thread.start()

    def _read(self, url: str, body: dict) -> None:
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
                for line in r.iter_lines():
                    self.lines.append(line)
                    if len(sse_events(self.lines)) >= 2:
                        self.started.set()
        except httpx.TransportError:
            pass  # cut by a forced exit

    @property
    def events(self) -> list:
        return sse_events(self.lines)


def _health(url: str) -> int:
    return httpx.get(url + "/health", timeout=30).status_code


@contextmanager
def _streaming_server(engine_dir, log: Path, shutdown_timeout: str, max_tokens: int) -> Iterator[tuple]:
    """`serve-llm` with one stream already producing tokens: (process, URL, stream)."""
    proc, url = start_serve_llm(engine_dir, log, *ENGINE_FLAGS, "--shutdown-timeout", shutdown_timeout)
    stream = None
    try:
        stream = _Stream(url, max_tokens)
        assert stream.started.wait(120), "no token streamed"
        yield proc, url, stream
    finally:
        if proc.poll() is None:
            proc.kill()
        if stream is not None:
            stream.thread.join(60)


def test_sigterm_lets_the_request_in_flight_finish(smollm2_engine_dir, tmp_path):
    with _streaming_server(smollm2_engine_dir, tmp_path / "server.log", "120", 24) as (proc, url, stream):
        proc.send_signal(signal.SIGTERM)
        # The drain starts within a moment: /health says 503 so load balancers stop routing here.
        assert wait_for(lambda: _health(url) == 503, 30)
        late = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=60)
        assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
        stream.thread.join(300)
        assert proc.wait(120) == 0
    events = stream.events
    assert events[-1] == "[DONE]"
    finish = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]]
    assert finish[-1] == "length"
    assert sum(1 for e in events[:-1] if e["choices"] and e["choices"][0]["delta"].get("content")) >= 20


def test_streams_cut_at_the_drain_timeout_are_told_the_server_is_shutting_down(smollm2_engine_dir, tmp_path):
    with _streaming_server(smollm2_engine_dir, tmp_path / "server.log", "1", 200) as (proc, _, stream):
        proc.send_signal(signal.SIGTERM)
        stream.thread.join(120)
        assert proc.wait(60) == 0
    events = stream.events
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert "shutting down" in error["message"] and error["type"] == "service_unavailable", error


def test_a_second_sigterm_exits_at_once_nonzero_and_says_what_it_cut(smollm2_engine_dir, tmp_path):
    log = tmp_path / "server.log"
    with _streaming_server(smollm2_engine_dir, log, "300", 200) as (proc, _, _stream):
        proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: "draining" in log.read_text().lower(), 30)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        assert time.monotonic() - start < 10
        assert code == 128 + signal.SIGTERM
    assert "cutting 1 request" in log.read_text()
