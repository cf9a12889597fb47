"""Engine format: ModelConfig validation, the manifest, and load_engine's checks."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_tiny_hf_checkpoint

from kiln.engine_builder import EngineFormatError, build_engine, load_engine
from kiln.engine_builder.architectures import get_architecture
from kiln.engine_builder.errors import BuildOptionError, UnsupportedArchitectureError
from kiln.engine_builder.format import ModelConfig


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmt")
    src = make_tiny_hf_checkpoint(root / "src", "qwen2", num_kv_heads=2)
    build_engine(src, root / "engine", tp=2, progress=False)
    return root / "engine", src


def test_manifest_describes_source_and_ranks(engine):
    out, src = engine
    manifest = json.loads((out / "kiln.json").read_text())
    assert manifest["format"] == "kiln-engine" and manifest["format_version"] == 1
    assert manifest["kiln_version"] and manifest["created"].startswith("20")
    source = manifest["source"]
    assert source["architecture"] == "Qwen2ForCausalLM"
    assert source["config_sha256"] == hashlib.sha256((src / "config.json").read_bytes()).hexdigest()
    assert source["weight_files"] == {"model.safetensors": (src / "model.safetensors").stat().st_size}
    assert manifest["dtype"] == "float32" and manifest["mapping"]["tp_size"] == 2
    assert manifest["quantization"]["quant_algo"] is None
    for r, entry in enumerate(manifest["ranks"]):
        data = (out / f"rank{r}.safetensors").read_bytes()
        assert entry["file"] == f"rank{r}.safetensors" and entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_loaded_tensors_are_memory_mapped_and_equal_the_file(engine):
    out, _ = engine
    loaded = load_engine(out, rank=1)
    reference = load_file(str(out / "rank1.safetensors"))
    assert loaded.tensors.keys() == reference.keys()
    assert all(torch.equal(loaded.tensors[k], v) for k, v in reference.items())
    assert loaded.path == out and loaded.config["mapping"]["tp_size"] == 2
    assert loaded.model_config == ModelConfig.from_trtllm_config(loaded.config)
    assert loaded.model_config.qkv_bias and not loaded.model_config.qk_norm


def _copy(engine, tmp_path):
    out, _ = engine
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst


def test_load_errors(engine, tmp_path):
    dst = _copy(engine, tmp_path)
    with pytest.raises(EngineFormatError, match="does not exist"):
        load_engine(tmp_path / "nowhere")
    with pytest.raises(EngineFormatError, match="rank 2 does not exist.*tp=2"):
        load_engine(dst, rank=2)
    (dst / "rank1.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(EngineFormatError, match="rank1.safetensors"):
        load_engine(dst, rank=1)
    (dst / "rank1.safetensors").unlink()
    with pytest.raises(EngineFormatError, match="rank1.safetensors is missing"):
        load_engine(dst, rank=1)
    manifest = json.loads((dst / "kiln.json").read_text())
    (dst / "kiln.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(EngineFormatError, match="version 99 is not supported"):
        load_engine(dst)
    (dst / "kiln.json").unlink()
    with pytest.raises(EngineFormatError, match="kiln.json is missing"):
        load_engine(dst)


def _mc(**overrides) -> ModelConfig:
    base = dict(
        architecture="LlamaForCausalLM", dtype="bfloat16", vocab_size=1001, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_size=8, intermediate_size=128, norm_epsilon=1e-5,
        rotary_base=1e4, rotary_scaling=None, max_position_embeddings=128, tie_word_embeddings=False,
        qkv_bias=False, qk_norm=False,
    )
    return ModelConfig(**{**base, **overrides})


def test_model_config_per_rank_helpers():
    mc = _mc(tp_size=4)
    assert (mc.num_heads_per_rank, mc.num_kv_heads_per_rank, mc.intermediate_size_per_rank) == (2, 1, 32)
    assert mc.padded_vocab_size == 1004 and mc.vocab_rows_per_rank == 251
    assert [list(mc.kv_heads_of_rank(r)) for r in range(4)] == [[0], [0], [1], [1]]
    assert [list(_mc(tp_size=2, num_key_value_heads=4).kv_heads_of_rank(r)) for r in range(2)] == [[0, 1], [2, 3]]
    assert ModelConfig.from_trtllm_config(mc.to_trtllm_config()) == mc


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"tp_size": 3}, "does not divide the 8 attention heads"),
        ({"tp_size": 8, "num_key_value_heads": 3, "num_attention_heads": 24}, "neither divides"),
        ({"tp_size": 2, "intermediate_size": 127}, "intermediate_size"),
        ({"dtype": "int8"}, "unknown dtype"),
        ({"num_key_value_heads": 3}, "do not divide"),
    ],
)
def test_model_config_rejects_bad_splits(overrides, message):
    with pytest.raises(BuildOptionError, match=message):
        _mc(**overrides)


def test_architecture_registry_and_config_forms():
    with pytest.raises(UnsupportedArchitectureError, match="supported: LlamaForCausalLM, MistralForCausalLM"):
        get_architecture({"architectures": ["GPT2LMHeadModel"]})
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16}
    arch = get_architecture(base)
    old = arch.model_config({**base, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", "factor": 8.0}}, 1, None)
    new = arch.model_config({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, 1, None)
    assert old.rotary_scaling == new.rotary_scaling == {"rope_type": "llama3", "factor": 8.0}
    assert old.rotary_base == new.rotary_base == 5e5 and old.dtype == "bfloat16" and old.head_size == 4
    with pytest.raises(UnsupportedArchitectureError, match="rope scaling 'yarn'"):
        arch.model_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, 1, None)
    with pytest.raises(UnsupportedArchitectureError, match="quantized"):
        arch.model_config({**base, "quantization_config": {"quant_method": "awq"}}, 1, None)
