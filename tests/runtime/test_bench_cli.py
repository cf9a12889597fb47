"""`bench-llm throughput|latency` end to end on a tiny random-weight engine (CPU), its error
path, and the append-only performance history in BENCHMARKS.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.engine_builder import build_engine
from kiln.runtime import bench


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "tiny"
    build_engine(None, out, random_weights="tiny-llama", progress=False)
    return out


def test_throughput_counts_every_output_token(tiny_engine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["throughput", str(tiny_engine), "--isl", "8", "--osl", "5", "--num-requests", "6", "--device", "cpu",
            "--max-batch-size", "4", "--json"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    result = json.loads(out[0])
    figures = result["figures"]
    assert result["mode"] == "throughput"
    # The settings it ran with, defaults resolved, are printed before the figures.
    settings = result["settings"]
    assert (settings["device"], settings["max_batch_size"], settings["num_requests"]) == ("cpu", 4, 6)
    assert settings["max_num_tokens"] == 8192 and settings["kv_cache_tokens"] > 0
    assert out[1].startswith("settings: isl=8, osl=5, num_requests=6") and "max_batch_size=4" in out[1]
    # 6 requests x 5 tokens (EOS ignored) in total_s seconds.
    assert figures["output_tok_s"] * figures["total_s"] == pytest.approx(30, rel=1e-6)
    assert figures["requests_s"] * figures["total_s"] == pytest.approx(6, rel=1e-6)


class _TickingClock:
    """perf_counter that advances 0.25 s per call: each iteration reads it at the start, at the
    first token and at the end, so TTFT is 250 ms and decoding the other tokens takes 0.25 s."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.25
        return self.now


def test_latency_reports_ttft_and_decode_rate(tiny_engine: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "time", _TickingClock())
    args = ["latency", str(tiny_engine), "--isl", "8", "--osl", "6", "--iterations", "2", "--device", "cpu", "--json"]
    assert bench.main(args) == 0
    figures = json.loads(capsys.readouterr().out.splitlines()[0])["figures"]
    assert figures["ttft_ms_p50"] == pytest.approx(250)
    # 6 tokens: the first is the TTFT, the 5 others decode in 0.25 s.
    assert figures["decode_tok_s_p50"] == pytest.approx(5 / 0.25)
    assert figures["decode_tok_s_best"] == pytest.approx(5 / 0.25)


def test_latency_with_speculation_prints_the_mean_acceptance_length(tiny_engine: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # The engine drafts for itself: every draft is accepted, K + 1 tokens per verify step
    # (fewer only where max_tokens leaves less room).
    args = ["latency", str(tiny_engine), "--isl", "8", "--osl", "12", "--iterations", "1", "--warmup", "0",
            "--device", "cpu", "--speculative", "draft", "--draft-engine", str(tiny_engine),
            "--num-speculative-tokens", "3", "--json"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    figures = json.loads(out[0])["figures"]
    assert 3.0 < figures["mean_acceptance_length"] <= 4.0
    assert figures["accepted_tokens"] == figures["draft_tokens"] > 0
    assert "speculative=draft" in out[1] and "mean_acceptance_length" in out[2]


def test_latency_batch_counts_every_sequence(tiny_engine: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "time", _TickingClock())
    args = ["latency", str(tiny_engine), "--isl", "8", "--osl", "6", "--iterations", "1", "--batch", "3",
            "--device", "cpu", "--json"]
    assert bench.main(args) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert result["settings"]["batch"] == 3
    # 3 sequences x 6 tokens: the first token of each is the TTFT, the other 15 decode in 0.25 s.
    assert result["figures"]["decode_tok_s_p50"] == pytest.approx(15 / 0.25)


def test_missing_engine_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["latency", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench-llm: error:")


def test_record_appends_rows_and_keeps_history(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Kiln benchmarks\n\n## Engine build\n\nold text\n")
    first = bench.BenchResult("latency", {"decode_tok_s_p50": 150.0}, "GPU-A", "e")
    second = bench.BenchResult("throughput", {"output_tok_s": 14075.0}, "GPU-B", "e")
    bench.record(first, "bench-llm latency e", path)
    bench.record(second, "bench-llm throughput e", path)
    text = path.read_text()
    assert "old text" in text
    rows = [line for line in text.splitlines() if line.startswith("| 20")]
    assert len(rows) == 2
    assert "GPU-A" in rows[0] and "decode_tok_s_p50 150" in rows[0]
    assert "GPU-B" in rows[1] and "output_tok_s 14,075" in rows[1]
