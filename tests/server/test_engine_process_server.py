"""`serve-llm` with its engine in a child process (the default), end to end on the real SmolLM2:
a storm of 100 streams dropped mid-stream frees every KV block; the engine process dying fails
the stream in flight and new requests cleanly and turns /health to 503; neither process outlives
the other (SIGTERM of the server, SIGKILL of the server)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess

import httpx
import psutil
import pytest

from .helpers import metric, start_serve_llm, wait_for

pytestmark = pytest.mark.slow

# 100 streams x (prompt + 64 tokens) fit the KV pool at once, so every stream is running when dropped.
ENGINE_FLAGS = ["--device", "cpu", "--max-model-len", "256", "--num-kv-cache-tokens", "16384"]
STREAM = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 64, "ignore_eos": True, "stream": True,
          "temperature": 0}


def _engine_process(server: subprocess.Popen) -> psutil.Process:
    """The server's engine child (multiprocessing's spawn; not its resource tracker)."""
    children = [c for c in psutil.Process(server.pid).children()
                if "spawn_main" in " ".join(c.cmdline()) and "resource_tracker" not in " ".join(c.cmdline())]
    assert len(children) == 1, [c.cmdline() for c in children]
    return children[0]


async def _storm(url: str, streams: int, events_each: int) -> list[int]:
    """Open ``streams`` streams at once, read ``events_each`` data events from each, drop it."""
    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def one() -> int:
            seen = 0
            async with client.stream("POST", "/v1/completions", json=STREAM) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        seen += 1
                        if seen == events_each:
                            break  # leaving the block closes the connection mid-stream
            return seen

        return await asyncio.gather(*(one() for _ in range(streams)))


def test_storm_of_dropped_streams_then_engine_death_then_shutdown(smollm2_engine_dir, tmp_path):
    proc, url = start_serve_llm(smollm2_engine_dir, tmp_path / "server.log", "--served-model-name", "smollm2",
                                *ENGINE_FLAGS)
    try:
        engine = _engine_process(proc)

        def metrics() -> str:
            return httpx.get(url + "/metrics", timeout=30).text

        aborts = metric(metrics(), "kiln:request_success_total", finished_reason="abort")
        seen = asyncio.run(_storm(url, 100, 3))
        assert seen == [3] * 100  # every stream was mid-generation (3 of 64 tokens) when dropped

        def drained() -> bool:
            text = metrics()
            return (metric(text, "kiln:num_requests_running") == 0 and metric(text, "kiln:num_requests_waiting") == 0
                    and metric(text, "kiln:request_success_total", finished_reason="abort") == aborts + 100)

        assert wait_for(drained, 60), metrics()
        assert metric(metrics(), "kiln:kv_cache_usage_perc") == 0.0  # every block back in the pool
        ok = httpx.post(url + "/v1/completions", json={**STREAM, "stream": False, "max_tokens": 4}, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4

        # The engine process dies under a stream (OOM killer, driver error): the stream ends, no hang.
        with httpx.stream("POST", url + "/v1/completions", json={**STREAM, "max_tokens": 200}, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            engine.kill()
            tail = list(lines)  # returns once the server ends the stream
        assert any("error" in line for line in tail), tail[-3:]
        assert wait_for(lambda: httpx.get(url + "/health").status_code == 503, 30)
        after = httpx.post(url + "/v1/completions", json={**STREAM, "stream": False}, timeout=30)
        assert after.status_code >= 500 and after.json()["error"]["message"]
        assert "engine process died" in (tmp_path / "server.log").read_text()
    finally:
        proc.terminate()
        proc.wait(60)


def test_the_engine_process_never_outlives_the_server(smollm2_engine_dir, tmp_path):
    """SIGTERM: the server drains and its engine exits with it; SIGKILL: the engine sees its pipe
    close and exits by itself."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc, url = start_serve_llm(smollm2_engine_dir, tmp_path / f"server-{sig.name}.log", *ENGINE_FLAGS)
        try:
            engine = _engine_process(proc)
            os.kill(proc.pid, sig)
            proc.wait(60)
            engine.wait(30)  # raises psutil.TimeoutExpired if it lingers
            assert not engine.is_running()
        finally:
            if proc.poll() is None:
                proc.kill()
