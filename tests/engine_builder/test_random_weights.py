"""Random-weight builds: same layout as a real build, seeded, tp-consistent, sane values."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import make_tiny_hf_checkpoint

from kiln.engine_builder import build_engine, load_engine
from kiln.engine_builder.architectures import get_architecture
from kiln.engine_builder.errors import BuildOptionError
from kiln.engine_builder.random_weights import RandomSource, available_presets, load_preset


def test_presets_cover_the_required_models_and_shard_cleanly():
    required = {"llama-3.1-8b", "llama-3.1-70b", "llama-3.2-1b", "qwen2.5-7b", "mistral-7b", "tiny-llama"}
    assert required <= set(available_presets())
    for name in available_presets():
        cfg = load_preset(name)
        for tp in (1, 2, 4):
            mc = get_architecture(cfg).model_config(cfg, tp, None)
            assert mc.dtype in ("bfloat16", "float32")
    mc = get_architecture(load_preset("llama-3.1-8b")).model_config(load_preset("llama-3.1-8b"), 8, None)
    assert mc.rotary_scaling["rope_type"] == "llama3" and mc.num_kv_heads_per_rank == 1


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(BuildOptionError, match="available: .*llama-3.1-8b"):
        load_preset("gpt-5")


def test_row_ranges_equal_slices_of_the_whole_tensor():
    cfg = load_preset("tiny-llama")
    source = RandomSource(cfg, seed=3, dtype=torch.bfloat16)
    name = "model.embed_tokens.weight"
    whole = source.read(name)
    assert whole.shape == (1001, 64) and whole.dtype == torch.bfloat16
    for rows in [(0, 1), (5, 300), (999, 1001)]:
        assert torch.equal(source.read(name, rows), whole[rows[0] : rows[1]])
    assert 0.015 < whole.float().std().item() < 0.025
    assert torch.equal(RandomSource(cfg, seed=3, dtype=torch.bfloat16).read(name), whole)
    assert not torch.equal(RandomSource(cfg, seed=4, dtype=torch.bfloat16).read(name), whole)
    assert torch.all(source.read("model.norm.weight") == 1)


def test_random_build_matches_a_real_build_layout_and_is_tp_consistent(tmp_path):
    cfg = load_preset("tiny-llama")
    real_src = make_tiny_hf_checkpoint(
        tmp_path / "real", "llama", num_heads=4, num_kv_heads=2, head_dim=16, vocab=cfg["vocab_size"],
        rope_scaling=dict(cfg["rope_scaling"]), rope_theta=cfg["rope_theta"], max_position_embeddings=4096,
    )
    build_engine(real_src, tmp_path / "real-engine", tp=2, progress=False)
    build_engine(None, tmp_path / "rand2", tp=2, random_weights="tiny-llama", seed=7, progress=False)
    build_engine(None, tmp_path / "rand1", tp=1, random_weights="tiny-llama", seed=7, progress=False)
    real, rand = load_engine(tmp_path / "real-engine", rank=1), load_engine(tmp_path / "rand2", rank=1)
    assert {k: v.shape for k, v in real.tensors.items()} == {k: v.shape for k, v in rand.tensors.items()}
    for key in ("architecture", "vocab_size", "num_key_value_heads", "head_size", "rotary_scaling", "mapping"):
        assert real.config[key] == rand.config[key]
    manifest = json.loads((tmp_path / "rand2" / "kiln.json").read_text())
    assert manifest["source"]["random_weights"] == "tiny-llama" and manifest["source"]["seed"] == 7
    assert not (tmp_path / "rand2" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "rand2" / "generation_config.json").read_text())["eos_token_id"] == 2
    one = load_engine(tmp_path / "rand1").tensors
    shards = [load_engine(tmp_path / "rand2", rank=r).tensors for r in range(2)]
    fc = "transformer.layers.1.mlp.fc.weight"
    assert torch.equal(torch.cat([s[fc] for s in shards]), one[fc])
    proj = "transformer.layers.0.mlp.proj.weight"
    assert torch.equal(torch.cat([s[proj] for s in shards], dim=1), one[proj])
