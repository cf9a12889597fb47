"""The real SmolLM2-135M (fp32 source) built with --fp8: the quality bound of issue 11, measured
by the build's own report (perplexity through Kiln's runtime on held-out text)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.engine_builder.quality import FP8_KV_NOT_MEASURED

pytestmark = pytest.mark.slow


def test_fp8_perplexity_within_bound(smollm2_fp8_engine_dir: Path):
    quant = json.loads((smollm2_fp8_engine_dir / "kiln.json").read_text())["quantization"]
    quality = quant["quality"]
    assert quality["held_out_samples"] == 8 and quality["seq_len"] == 128 and quality["text"] == "pydoc-topics"
    assert 1 < quality["source_ppl"] < 50
    assert quality["fp8_delta_pct"] < 2.5, quality
    if quality["fp8_kv"] == "measured":
        assert quality["fp8_kv_delta_pct"] - quality["fp8_delta_pct"] < 0.5, quality
    else:
        assert quality["fp8_kv"] == FP8_KV_NOT_MEASURED
    assert quant["recipe"]["unquantized_layers"] == []
