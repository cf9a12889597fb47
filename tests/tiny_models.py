"""Tiny random Hugging Face checkpoints for tests (a stable helper other test folders use).

``make_tiny_hf_checkpoint(path, arch)`` builds a random model with transformers' own config
and model classes, saves it with ``save_pretrained`` (safetensors) plus a
generation_config.json (bos 1, eos 2), and returns ``path``. ``arch`` is one of
``TINY_ARCHS`` (llama, mistral, qwen2, qwen3) or a full HF architecture name.
With ``with_tokenizer=True`` the SmolLM2 tokenizer (from the cached default-model
checkpoint) is saved next to it so text prompts work; the vocabulary must then be at least
the tokenizer's (49152), so leave ``vocab`` at its default or make it larger.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

TINY_ARCHS: dict[str, str] = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
SMOLLM2_VOCAB = 49152


def make_tiny_hf_checkpoint(
    path: str | Path,
    arch: str,
    *,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    hidden: int = 64,
    layers: int = 2,
    intermediate: int = 128,
    vocab: int | None = None,
    tie: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    with_tokenizer: bool = False,
    weight_std: float = 0.15,
    **config_overrides: Any,
) -> Path:
    """Save a random ``arch`` model to ``path``; returns ``path``.

    Weights are N(0, weight_std) and norm weights 1 + N(0, 0.2) so that layers visibly
    matter (transformers' default init makes tiny models near-constant). ``vocab`` defaults
    to 1001 (odd, so no tp divides it) or the SmolLM2 vocabulary when ``with_tokenizer``.
    Extra keyword arguments go into the config (e.g. ``rope_scaling=...``).
    """
    import transformers

    prefix = TINY_ARCHS.get(arch.lower()) or arch.removesuffix("ForCausalLM")
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}ForCausalLM")
    if vocab is None:
        vocab = SMOLLM2_VOCAB if with_tokenizer else 1001
    fields: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    config = config_cls(**{**fields, **config_overrides})
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(weight_std * torch.randn_like(param))
    model = model.to(dtype).eval()
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 1, 2
    model.generation_config.pad_token_id = 0
    path = Path(path)
    model.save_pretrained(path)
    if with_tokenizer:
        copy_smollm2_tokenizer(path)
    return path


def copy_smollm2_tokenizer(dest: str | Path) -> None:
    """Copy the SmolLM2 tokenizer files (from the cached default model) into ``dest``."""
    from kiln.engine_builder.source import TOKENIZER_FILES, resolve_source

    src = resolve_source("smollm2-135m")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, Path(dest) / name)


ENGINE_LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")


def hf_with_engine_weights(src: str | Path, engine: dict[str, torch.Tensor], weight_of: Any,
                           input_hook_of: Any = None) -> Any:
    """transformers' model of checkpoint ``src`` (a Llama) computing what a quantized engine
    computes, without Kiln's runtime: the engine's norms, and for each linear module of
    ``ENGINE_LINEARS`` the float weight ``weight_of(prefix, module)`` (qkv split back into q, k, v)
    and, when ``input_hook_of(prefix, module)`` gives one, a forward pre-hook on its input.
    ``engine``: rank 0's tensors."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    for i, layer in enumerate(model.model.layers):
        pre = f"transformer.layers.{i}."
        layer.input_layernorm.weight.data = engine[pre + "input_layernorm.weight"]
        layer.post_attention_layernorm.weight.data = engine[pre + "post_layernorm.weight"]
        attn, mlp = layer.self_attn, layer.mlp
        qkv = weight_of(pre, "attention.qkv").split([p.weight.shape[0] for p in (attn.q_proj, attn.k_proj, attn.v_proj)])
        targets = {"attention.qkv": list(zip((attn.q_proj, attn.k_proj, attn.v_proj), qkv)),
                   "attention.dense": [(attn.o_proj, weight_of(pre, "attention.dense"))],
                   "mlp.fc": [(mlp.gate_proj, weight_of(pre, "mlp.fc"))],
                   "mlp.gate": [(mlp.up_proj, weight_of(pre, "mlp.gate"))],
                   "mlp.proj": [(mlp.down_proj, weight_of(pre, "mlp.proj"))]}
        for module, pairs in targets.items():
            hook = input_hook_of(pre, module) if input_hook_of is not None else None
            for linear, weight in pairs:
                linear.weight.data = weight
                if hook is not None:
                    linear.register_forward_pre_hook(hook)
    return model
