"""SIGTERM drains `serve-llm`: the request in flight completes, new ones get 503, exit 0."""

from __future__ import annotations

import signal
import threading

import httpx
import pytest

from .helpers import sse_events, start_serve_llm

pytestmark = pytest.mark.slow


def test_sigterm_lets_the_request_in_flight_finish(smollm2_engine_dir, tmp_path):
    proc, url = start_serve_llm(smollm2_engine_dir, tmp_path / "server.log", "--device", "cpu",
                                "--max-model-len", "256", "--num-kv-cache-tokens", "2048",
                                "--shutdown-timeout", "120")
    body = {"messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 24,
            "ignore_eos": True, "stream": True}
    lines: list[str] = []
    first_token = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(sse_events(lines)) >= 2:
                    first_token.set()

    try:
        reader = threading.Thread(target=stream)
        reader.start()
        assert first_token.wait(120), "no token streamed"
        proc.send_signal(signal.SIGTERM)
        late = None
        for _ in range(50):  # the drain starts within a moment; until then requests still pass
            late = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=60)
            if late.status_code == 503:
                break
        assert late is not None and late.status_code == 503
        assert "shutting down" in late.json()["error"]["message"]
        reader.join(300)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    events = sse_events(lines)
    assert events[-1] == "[DONE]"
    finish = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]]
    assert finish[-1] == "length"
    assert sum(1 for e in events[:-1] if e["choices"] and e["choices"][0]["delta"].get("content")) >= 20
