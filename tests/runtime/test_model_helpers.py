"""Tiny random models of each architecture, as an HF model and as a built Kiln engine.

``tiny_engine(path, kind)`` saves a random checkpoint (tests/tiny_models.py), builds it
into an engine directory with the real builder, and returns the transformers model of the
same checkpoint with the ``load_engine`` result. No tests here; test_model*/test_runner*
import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tiny_models import make_tiny_hf_checkpoint

from kiln.engine_builder import build_engine
from kiln.engine_builder.format import LoadedEngine, load_engine

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {"num_kv_heads": 1}),  # GQA 4, qkv bias
    "qwen3": ("qwen3", {"head_dim": 32, "num_kv_heads": 4}),  # q/k norm, no GQA
    "llama3_scaled_tied": ("llama", {"tie": True, "rope_scaling": LLAMA3_SCALING}),
}


def tiny_engine(path: Path, kind: str, seed: int = 0, dtype: str = "float32") -> tuple[torch.nn.Module, LoadedEngine]:
    """(float32 HF model, loaded engine built in ``dtype``) of one tiny random checkpoint."""
    from transformers import AutoModelForCausalLM

    arch, options = ARCHS[kind]
    hf_dir = make_tiny_hf_checkpoint(path / "hf", arch, seed=seed, **options)
    build_engine(hf_dir, path / "engine", dtype=dtype, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return hf, load_engine(path / "engine")


def tiny_hf_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """Just the float32, eval-mode HF model of ``kind`` (the checkpoint goes to a temp dir)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    arch, options = ARCHS[kind]
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_tiny_hf_checkpoint(Path(tmp), arch, seed=seed, **options)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()
