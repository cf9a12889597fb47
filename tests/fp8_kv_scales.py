"""Turn a built engine into one with an FP8 KV cache, for tests (the builder's --kv-cache-dtype fp8
does this for real, from its calibration set).

``add_fp8_kv_scales(engine_dir, prompts)`` runs the prompts through the engine's model (CPU,
float32, Kiln's runtime), takes each layer's max |K|, |V| from the cache the forward writes, and
stores TensorRT-LLM's ``transformer.layers.{l}.attention.kv_cache_scaling_factor`` = amax / 448
(float32, shape (1,)) in rank0.safetensors and ``quantization.kv_cache_quant_algo = "FP8"`` in
config.json. Returns the scales.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from kiln.engine_builder.format import load_engine
from kiln.runtime.attention import AttentionMetadata
from kiln.runtime.model import LlamaFamilyModel

SCALE_NAME = "transformer.layers.{l}.attention.kv_cache_scaling_factor"  # TensorRT-LLM's name
E4M3_MAX = 448.0


def prompt_kv_absmax(model: LlamaFamilyModel, mc, prompt: list[int]) -> torch.Tensor:
    """[layers] max |K|, |V| the model writes for one prompt (one sequence, contiguous blocks)."""
    n, block = len(prompt), 16
    attn = AttentionMetadata.prompts([n], block)
    blocks = attn.block_tables.shape[1]
    kv = [torch.zeros(2, blocks, block, mc.num_kv_heads_per_rank, mc.head_size) for _ in range(mc.num_hidden_layers)]
    model(torch.tensor(prompt), torch.arange(n), kv, attn, None)
    return torch.stack([layer.abs().max() for layer in kv])


def add_fp8_kv_scales(engine_dir: str | Path, prompts: list[list[int]]) -> list[float]:
    engine_dir = Path(engine_dir)
    engine = load_engine(engine_dir)
    mc = engine.model_config
    model = LlamaFamilyModel(mc, engine.tensors, torch.device("cpu"), torch.float32)
    amax = torch.stack([prompt_kv_absmax(model, mc, p) for p in prompts]).amax(0)
    scales = (amax / E4M3_MAX).float()
    tensors = {name: t.clone() for name, t in engine.tensors.items()}
    tensors.update({SCALE_NAME.format(l=layer): s.reshape(1) for layer, s in enumerate(scales)})
    del engine, model
    rank_file = engine_dir / "rank0.safetensors"
    save_file(tensors, str(rank_file) + ".tmp")
    os.replace(str(rank_file) + ".tmp", rank_file)
    config = json.loads((engine_dir / "config.json").read_text())
    config["quantization"]["kv_cache_quant_algo"] = "FP8"
    (engine_dir / "config.json").write_text(json.dumps(config, indent=2))
    return scales.tolist()
