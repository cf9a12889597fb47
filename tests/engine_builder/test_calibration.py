"""Calibration (text sets, token windows, the layer-by-layer run and its statistics) and GPTQ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_hf_checkpoint

from kiln.engine_builder.architectures import get_architecture
from kiln.engine_builder.calibration import (LayerStats, default_calibration_text, load_calibration_text,
                                             make_calibration_set, run_layerwise)
from kiln.engine_builder.errors import BuildOptionError
from kiln.engine_builder.gptq import gptq
from kiln.engine_builder.source import HFCheckpoint


class _Chars:
    """A stand-in tokenizer: one token per character (enough to check the windowing)."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) % 1000 for c in text]}


def test_text_sets(tmp_path: Path):
    default = default_calibration_text()
    assert default.name == "pydoc-topics" and len(default.documents) > 50 and default.sha256 == default_calibration_text().sha256
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    text = load_calibration_text(tmp_path / "a.jsonl")
    assert text.documents == ("one", "two") and text.name == "a.jsonl"
    (tmp_path / "b.txt").write_text("plain text")
    assert load_calibration_text(tmp_path / "b.txt").documents == ("plain text",)
    (tmp_path / "c.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(BuildOptionError, match='c.jsonl:1: expected an object with a "text"'):
        load_calibration_text(tmp_path / "c.jsonl")
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(BuildOptionError, match=".txt or .jsonl"):
        load_calibration_text(tmp_path / "d.csv")


def test_windows_spread_over_the_text_and_held_out_is_its_tail():
    text = default_calibration_text()
    data = make_calibration_set(text, _Chars(), num_samples=8, seq_len=64)
    stream = torch.tensor(_Chars()("\n\n".join(text.documents))["input_ids"])
    split = int(len(stream) * 0.9)
    assert data.calibration.shape == (8, 64) and data.held_out.shape[1] == 64
    assert torch.equal(data.held_out[0], stream[split:split + 64])  # the tail, never calibrated on
    starts = [int((stream[:split].unfold(0, 64, 64) == w).all(1).nonzero()[0]) for w in data.calibration]
    assert starts == sorted(starts) and starts[-1] > 0.8 * (split // 64)  # spread, in order
    assert data.describe()["samples"] == 8
    with pytest.raises(BuildOptionError, match="too short"):
        make_calibration_set(text, _Chars(), 1, len(stream))


def test_site_stats_match_direct_computation():
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(40, 6, generator=gen) for _ in range(3)]
    chunks[1][7, 2] = 50.0  # an outlier row
    stats = LayerStats(sample_rows=12, top_rows=4, gram_sites=("x",))
    for chunk in chunks:
        stats.observe("x", chunk, torch.arange(4))
    site, every = stats.sites["x"], torch.cat(chunks)
    assert torch.equal(site.absmax, every.abs().amax(0))
    torch.testing.assert_close(site.abs_mean, every.abs().mean(0))
    torch.testing.assert_close(site.gram, every.T @ every)
    assert torch.equal(site.top_rows[0], chunks[1][7]) and len(site.top_rows) == 4
    assert site.samples.shape == (12, 6) and site.sample_weight == pytest.approx((120 - 4) / 12)


def test_layerwise_run_matches_transformers(tmp_path: Path):
    """The calibration forward (GQA, rotary with llama3 scaling) is the source model's."""
    from transformers import AutoModelForCausalLM

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    path = make_tiny_hf_checkpoint(tmp_path / "src", "llama", rope_scaling=rope)
    source = HFCheckpoint(path)
    arch = get_architecture(source.config)
    mc = arch.model_config(source.config, 1, None)
    tokens = torch.randint(3, 1000, (3, 24), generator=torch.Generator().manual_seed(1))
    seen = []
    hidden = run_layerwise(source, mc, arch.names, tokens, lambda i, w, s: seen.append((i, sorted(s))),
                           sample_rows=8, progress=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(tokens, output_hidden_states=True).hidden_states[-1]  # after the final norm
    torch.testing.assert_close(model.model.norm(hidden), want, rtol=1e-4, atol=1e-4)
    assert seen == [(i, ["dense", "down", "gate_up", "k", "qkv", "v"]) for i in range(2)]


def _grid(values: torch.Tensor) -> torch.Tensor:
    return torch.round(values * 4) / 4  # a uniform grid: rounding is all that a quantizer does here


def test_gptq_beats_round_to_nearest_and_stays_on_the_grid():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=gen) @ torch.randn(32, 32, generator=gen)  # correlated inputs
    w = torch.randn(16, 32, generator=gen)
    q = gptq(w, x.T @ x, lambda col, j: _grid(col))
    assert torch.equal(q, _grid(q))
    err_gptq, err_rtn = (x @ q.T - x @ w.T).norm(), (x @ _grid(w).T - x @ w.T).norm()
    assert err_gptq < 0.7 * err_rtn


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    diagonal = torch.diag(torch.rand(16, generator=torch.Generator().manual_seed(1)) + 0.5)
    assert torch.equal(gptq(w, diagonal, lambda col, j: _grid(col), damp=0.0), _grid(w))
