"""`serve-llm` on a tensor-parallel engine (SmolLM2 at tp 3, gloo on CPU): it answers through
the real `openai` client with no extra flag; a worker killed mid-flight makes /health 503 and
requests fail cleanly; the server's exit leaves no worker behind."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import psutil
import pytest

from .helpers import start_serve_llm

pytestmark = pytest.mark.slow

FLAGS = ["--device", "cpu", "--max-model-len", "512", "--num-kv-cache-tokens", "4096"]


def _workers(proc) -> list[psutil.Process]:
    return [c for c in psutil.Process(proc.pid).children(recursive=True) if "kiln.runtime.tp_workers" in " ".join(c.cmdline())]


def test_tp3_server_answers_then_fails_cleanly_when_a_worker_dies(smollm2_tp3_dir, tmp_path) -> None:
    log = tmp_path / "server.log"
    proc, url = start_serve_llm(smollm2_tp3_dir, log, *FLAGS)
    try:
        assert "tp 3" in log.read_text()
        workers = _workers(proc)
        assert len(workers) == 2
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        answer = client.chat.completions.create(
            model=smollm2_tp3_dir.name, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12, temperature=0)
        assert "Paris" in answer.choices[0].message.content

        os.kill(workers[0].pid, signal.SIGKILL)
        with pytest.raises(openai.APIError):  # the engine is gone: an error, not a hang
            client.completions.create(model=smollm2_tp3_dir.name, prompt="Hello", max_tokens=4)
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(url + "/health").status_code == 503
        assert "worker rank" in log.read_text()
    finally:
        survivors = _workers(proc) if proc.poll() is None else []
        proc.terminate()
        proc.wait(60)
    for worker in survivors:
        worker.wait(15)  # the remaining worker exits with its server
        assert not worker.is_running()
