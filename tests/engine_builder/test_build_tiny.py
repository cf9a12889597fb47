"""Tiny random models of every architecture, built at tp 1, 2 and 4.

The shards are re-assembled here with an independent, plain reading of REFERENCE.md
section 1 (not with engine_builder.format) and compared with the source tensors exactly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_tiny_hf_checkpoint

from kiln.engine_builder import build_engine, load_engine

# (arch, heads, kv heads, head_dim, tie): GQA and MHA, tied and untied, head_dim != hidden/heads
CASES = {
    "llama-gqa": ("llama", 4, 2, 16, False),
    "mistral-mha-tied": ("mistral", 4, 4, 16, True),
    "qwen2-gqa-tied": ("qwen2", 4, 2, 16, True),
    "qwen3-kv1": ("qwen3", 4, 1, 32, False),
}
VOCAB = 1001  # odd: no tp > 1 divides it


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-src")
    return {
        case: make_tiny_hf_checkpoint(root / case, arch, num_heads=h, num_kv_heads=kv, head_dim=d, tie=tie, vocab=VOCAB)
        for case, (arch, h, kv, d, tie) in CASES.items()
    }


def reassemble(ranks: list[dict[str, torch.Tensor]], hf_cfg: dict, tp: int) -> dict[str, torch.Tensor]:
    """Undo the TP split (REFERENCE.md section 1) and rename back to HF names."""
    heads, kv, layers = hf_cfg["num_attention_heads"], hf_cfg["num_key_value_heads"], hf_cfg["num_hidden_layers"]
    d = hf_cfg["head_dim"]
    kv_per_rank = max(kv // tp, 1)
    out = {"model.embed_tokens.weight": ranks[0]["transformer.vocab_embedding.weight"],
           "model.norm.weight": ranks[0]["transformer.ln_f.weight"]}
    lm_head = torch.cat([r["lm_head.weight"] for r in ranks])
    assert lm_head.shape[0] == math.ceil(VOCAB / tp) * tp
    assert torch.count_nonzero(lm_head[VOCAB:]) == 0, "vocab padding rows must be zero"
    out["lm_head.weight"] = lm_head[:VOCAB]
    for layer in range(layers):
        t, h = f"transformer.layers.{layer}.", f"model.layers.{layer}."
        for suffix in ("weight", "bias") if f"{t}attention.qkv.bias" in ranks[0] else ("weight",):
            parts = [r[f"{t}attention.qkv.{suffix}"].split([heads // tp * d, kv_per_rank * d, kv_per_rank * d]) for r in ranks]
            out[f"{h}self_attn.q_proj.{suffix}"] = torch.cat([p[0] for p in parts])
            for i, name in ((1, "k_proj"), (2, "v_proj")):
                if kv >= tp:
                    out[f"{h}self_attn.{name}.{suffix}"] = torch.cat([p[i] for p in parts])
                else:  # each KV head is duplicated over tp // kv consecutive ranks
                    group = tp // kv
                    for r in range(tp):
                        assert torch.equal(parts[r][i], parts[r - r % group][i])
                    out[f"{h}self_attn.{name}.{suffix}"] = torch.cat([parts[g * group][i] for g in range(kv)])
        out[f"{h}self_attn.o_proj.weight"] = torch.cat([r[f"{t}attention.dense.weight"] for r in ranks], dim=1)
        out[f"{h}mlp.gate_proj.weight"] = torch.cat([r[f"{t}mlp.fc.weight"] for r in ranks])
        out[f"{h}mlp.up_proj.weight"] = torch.cat([r[f"{t}mlp.gate.weight"] for r in ranks])
        out[f"{h}mlp.down_proj.weight"] = torch.cat([r[f"{t}mlp.proj.weight"] for r in ranks], dim=1)
        out[f"{h}input_layernorm.weight"] = ranks[0][f"{t}input_layernorm.weight"]
        out[f"{h}post_attention_layernorm.weight"] = ranks[0][f"{t}post_layernorm.weight"]
        if f"{t}attention.q_layernorm.weight" in ranks[0]:
            out[f"{h}self_attn.q_norm.weight"] = ranks[0][f"{t}attention.q_layernorm.weight"]
            out[f"{h}self_attn.k_norm.weight"] = ranks[0][f"{t}attention.k_layernorm.weight"]
    replicated = [k for k in ranks[0] if "layernorm" in k or "vocab_embedding" in k or "ln_f" in k]
    for r in ranks[1:]:
        assert all(torch.equal(r[k], ranks[0][k]) for k in replicated)
    return out


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_shards_reassemble_to_the_source(sources, tmp_path, case, tp):
    src = sources[case]
    hf_cfg = json.loads((src / "config.json").read_text())
    summary = build_engine(src, tmp_path / "engine", tp=tp, progress=False)
    out = tmp_path / "engine"
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == [f"rank{r}.safetensors" for r in range(tp)]
    ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in range(tp)]
    names = set(ranks[0])
    assert all(set(r) == names for r in ranks)
    assert all(t.dtype == torch.float32 for r in ranks for t in r.values())
    source = load_file(str(src / "model.safetensors"))
    if hf_cfg["tie_word_embeddings"]:
        source["lm_head.weight"] = source["model.embed_tokens.weight"]
    rebuilt = reassemble(ranks, hf_cfg, tp)
    assert rebuilt.keys() == source.keys()
    for name, tensor in source.items():
        assert torch.equal(rebuilt[name], tensor), name
    assert summary.num_parameters == sum(t.numel() for k, t in source.items() if not (hf_cfg["tie_word_embeddings"] and k == "lm_head.weight"))
    _check_config(json.loads((out / "config.json").read_text()), hf_cfg, tp)
    _check_rank_shapes(load_engine(out, rank=tp - 1), hf_cfg, tp)


def _check_config(cfg: dict, hf_cfg: dict, tp: int) -> None:
    expect = {
        "architecture": hf_cfg["architectures"][0], "dtype": "float32", "vocab_size": VOCAB,
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": hf_cfg["num_attention_heads"],
        "num_key_value_heads": hf_cfg["num_key_value_heads"], "head_size": hf_cfg["head_dim"],
        "intermediate_size": 128, "norm_epsilon": 1e-5, "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": 512, "rotary_base": 10000.0, "rotary_scaling": None, "hidden_act": "silu",
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1}, "logits_dtype": "float32",
        "tie_word_embeddings": hf_cfg["tie_word_embeddings"],
    }
    assert {k: cfg[k] for k in expect} == expect
    assert cfg["quantization"]["quant_algo"] is None


def _check_rank_shapes(engine, hf_cfg: dict, tp: int) -> None:
    mc = engine.model_config
    d, kv = hf_cfg["head_dim"], hf_cfg["num_key_value_heads"]
    assert mc.num_heads_per_rank == hf_cfg["num_attention_heads"] // tp
    assert mc.num_kv_heads_per_rank == max(kv // tp, 1)
    assert mc.padded_vocab_size == math.ceil(VOCAB / tp) * tp
    t = engine.tensors
    assert t["transformer.layers.0.attention.qkv.weight"].shape == ((mc.num_heads_per_rank + 2 * mc.num_kv_heads_per_rank) * d, 64)
    assert t["transformer.layers.1.attention.dense.weight"].shape == (64, mc.num_heads_per_rank * d)
    assert t["transformer.layers.1.mlp.fc.weight"].shape == (128 // tp, 64)
    assert t["transformer.layers.1.mlp.proj.weight"].shape == (64, 128 // tp)
    assert t["lm_head.weight"].shape == (mc.padded_vocab_size // tp, 64)
    assert ("transformer.layers.0.attention.qkv.bias" in t) == (hf_cfg["architectures"][0] == "Qwen2ForCausalLM")
    assert ("transformer.layers.0.attention.q_layernorm.weight" in t) == (hf_cfg["architectures"][0] == "Qwen3ForCausalLM")


def test_bfloat16_build_converts_every_tensor(sources, tmp_path):
    src = sources["llama-gqa"]
    build_engine(src, tmp_path / "e", tp=2, dtype="bfloat16", progress=False)
    engine = load_engine(tmp_path / "e", rank=1)
    source = load_file(str(src / "model.safetensors"))
    assert engine.model_config.dtype == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in engine.tensors.values())
    fc = source["model.layers.0.mlp.gate_proj.weight"][64:].to(torch.bfloat16)
    assert torch.equal(engine.tensors["transformer.layers.0.mlp.fc.weight"], fc)


def test_llama3_rope_scaling_is_kept(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    src = make_tiny_hf_checkpoint(tmp_path / "src", "llama", rope_scaling=dict(scaling), rope_theta=500000.0)
    build_engine(src, tmp_path / "e", progress=False)
    mc = load_engine(tmp_path / "e").model_config
    assert mc.rotary_scaling == scaling and mc.rotary_base == 500000.0
