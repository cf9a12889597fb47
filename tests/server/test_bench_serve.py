"""`bench-llm serve` against a FakeEngine server: counts and timings add up."""

from __future__ import annotations

import json

from kiln.runtime.config import EngineConfig
from kiln.server.app import create_app
from kiln.server.bench_serve import main, summarize, RequestResult
from kiln.server.config import ServerConfig

from .fake_engine import FakeEngine
from .helpers import ThreadServer


def test_bench_serve_reports_every_request(capsys):
    engine = FakeEngine(max_model_len=256, step_delay=0.002)
    app = create_app(engine, ServerConfig(engine=EngineConfig(engine_dir="fake"), served_model_name="fake"))
    with ThreadServer(app) as server:
        for endpoint in ("completions", "chat"):
            code = main([server.base_url, "--endpoint", endpoint, "-n", "12", "--concurrency", "4",
                         "--isl", "8", "--osl", "5", "--token-range", "40", "100", "--json",
                         "--warmup", "--repeat", "2"])
            assert code == 0
            figures = json.loads(capsys.readouterr().out)["figures"]
            assert figures["completed"] == 12 and figures["failed"] == 0
            assert figures["output_tokens"] == 12 * 5
            assert 0 < figures["ttft_p50_ms"] <= figures["ttft_p99_ms"]
            assert figures["itl_mean_ms"] > 0 and figures["tpot_mean_ms"] > 0
        code = main([server.base_url, "-n", "2", "--isl", "300", "--osl", "5", "--token-range", "40", "100", "--json"])
        assert code == 1 and json.loads(capsys.readouterr().out)["figures"]["failed"] == 2


def test_summarize_percentiles_and_tpot():
    results = [RequestResult(ok=True, ttft=0.1 * i, latency=0.1 * i + 0.9, output_tokens=10, itls=[0.1] * 9)
               for i in range(1, 11)]
    f = summarize(results + [RequestResult(ok=False, error="x")], duration=2.0)
    assert f["completed"] == 10 and f["failed"] == 1
    assert f["output_tokens_per_s"] == 50.0 and f["request_per_s"] == 5.0
    assert abs(f["tpot_mean_ms"] - 100.0) < 1e-6 and abs(f["ttft_p50_ms"] - 550.0) < 1e-6
    assert abs(f["ttft_p99_ms"] - 991.0) < 1e-6
