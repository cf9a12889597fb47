"""Running a server for tests: in a thread (fake engine) or as a `serve-llm` subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base_url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        try:
            if httpx.get(base_url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{base_url} not healthy after {timeout}s")


def wait_for(predicate, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class ThreadServer:
    """uvicorn serving ``app`` in a background thread (no signal handling), on a free port."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                access_log=False, timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        wait_healthy(self.base_url, 20)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def start_serve_llm(engine_dir: str | Path, log_path: Path, *args: str,
                    env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`python -m kiln.server ENGINE_DIR --port P ...` logging to ``log_path`` (a pipe nobody
    reads would fill up and block the server); returns (process, base URL) once healthy."""
    port = free_port()
    cmd = [sys.executable, "-m", "kiln.server", str(engine_dir), "--port", str(port), *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, text=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, 180, proc)
    except BaseException:
        proc.kill()
        print(Path(log_path).read_text()[-5000:], file=sys.stderr)
        raise
    return proc, base_url


def sse_events(lines: list[str]) -> list[Any]:
    """`data:` payloads of an SSE body, JSON-decoded except the final "[DONE]"."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0.0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def assert_error(r: httpx.Response, status: int, param: str | None = "?") -> dict:
    """The OpenAI-shaped error body of ``r`` (status checked; ``param`` too unless "?")."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "?":
        assert err["param"] == param, err
    return err
