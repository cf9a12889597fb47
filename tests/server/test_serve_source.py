"""`serve-llm SOURCE` in one step: a Hugging Face directory is built once into the engine cache
(KILN_CACHE_DIR) and served under the directory's name; a taken port fails before anything
loads; a hub id gets one line. Reference: the offline LLM on the engine the server built."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import httpx
import pytest
from tiny_models import make_tiny_hf_checkpoint

from kiln.scheduler.sampling_params import SamplingParams

from .helpers import free_port, start_serve_llm

pytestmark = pytest.mark.slow


def _serve_llm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "kiln.server", *args], capture_output=True, text=True,
                          timeout=120, env=full_env)


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip() and " INFO " not in line]
    assert len(lines) == 1 and lines[0].startswith("serve-llm: error: "), r.stderr
    return lines[0]


def test_a_hf_directory_is_built_once_into_the_cache_and_served(tmp_path):
    src = make_tiny_hf_checkpoint(tmp_path / "tiny-chat", "llama", with_tokenizer=True)
    cache = tmp_path / "cache"
    log = tmp_path / "server.log"
    proc, url = start_serve_llm(src, log, "--device", "cpu", "--dtype", "fp32", "--max-model-len", "256",
                                "--num-kv-cache-tokens", "1024", env={"KILN_CACHE_DIR": str(cache)})
    try:
        (entry,) = (cache / "engines").iterdir()
        assert entry.name.startswith("tiny-chat-") and (entry / "kiln.json").is_file()
        assert f"into the engine cache (once; later starts reuse it): {entry}" in log.read_text()
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny-chat"
        body = {"prompt": "Hello there", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        served = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    finally:
        proc.terminate()
        proc.wait(60)
    from kiln.runtime import LLM

    with LLM(entry, device="cpu", max_model_len=256, num_kv_cache_tokens=1024) as llm:
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        assert served == llm.generate(["Hello there"], params, use_tqdm=False)[0].outputs[0].text


def test_a_taken_port_fails_before_the_engine_is_looked_at(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The engine does not exist either: the port's error proves the port was checked first.
        line = _one_line_error(_serve_llm(str(tmp_path / "no-such-engine"), "--port", str(port)))
    assert f"port {port} on 127.0.0.1 is already in use" in line and "PORT=" in line and "--port" in line


def test_a_hub_id_gets_one_line(tmp_path):
    line = _one_line_error(_serve_llm("meta-llama/Llama-3.1-8B", "--port", str(free_port()),
                                      env={"KILN_CACHE_DIR": str(tmp_path)}))
    assert "Hugging Face hub id" in line and "does not download" in line and "local directory" in line
