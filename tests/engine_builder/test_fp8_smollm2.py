"""The real SmolLM2-135M (fp32 source) built with --fp8: the quality bound of issue 11, measured
by the build's own report (perplexity through Kiln's runtime on held-out text)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_fp8_perplexity_within_bound(smollm2_fp8_engine_dir: Path):
    quant = json.loads((smollm2_fp8_engine_dir / "kiln.json").read_text())["quantization"]
    quality = quant["quality"]
    assert quality["held_out_samples"] == 8 and quality["seq_len"] == 128 and quality["text"] == "pydoc-topics"
    assert 1 < quality["source_ppl"] < 50
    assert quality["fp8_delta_pct"] < 2.5, quality  # issue 11's bound; measured +1.58%
    # Issue 11 asks FP8 KV to add at most +0.5%; it adds +2.9% on these 8 short windows (main's
    # own FP8 KV measurement on longer text: +0.8-1.0%, BENCHMARKS.md). A regression guard,
    # not the target, which stays open (BENCHMARKS.md "FP8 quality").
    assert quality["fp8_kv"] == "measured", quality
    assert quality["fp8_kv_delta_pct"] - quality["fp8_delta_pct"] < 4.0, quality
    assert quant["recipe"]["unquantized_layers"] == []
