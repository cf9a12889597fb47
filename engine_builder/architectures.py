"""Registry of the Hugging Face architectures Kiln converts.

Each entry says how an HF ``config.json`` maps onto ``ModelConfig`` and how the
architecture names its tensors (logical keys of ``format.SOURCE_KEYS`` -> HF names, with
``{l}`` for the layer index). Adding an architecture of the Llama family is one
``register(...)`` call; no code elsewhere branches on architecture names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from kiln.engine_builder.errors import BuildOptionError, UnsupportedArchitectureError
from kiln.engine_builder.format import DTYPES, SOURCE_KEYS, ModelConfig

logger = logging.getLogger(__name__)

LLAMA_NAMES: dict[str, str] = {
    "embed": "model.embed_tokens.weight",
    "input_norm": "model.layers.{l}.input_layernorm.weight",
    "q": "model.layers.{l}.self_attn.q_proj.weight",
    "k": "model.layers.{l}.self_attn.k_proj.weight",
    "v": "model.layers.{l}.self_attn.v_proj.weight",
    "q_bias": "model.layers.{l}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{l}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{l}.self_attn.v_proj.bias",
    "q_norm": "model.layers.{l}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{l}.self_attn.k_norm.weight",
    "o": "model.layers.{l}.self_attn.o_proj.weight",
    "post_norm": "model.layers.{l}.post_attention_layernorm.weight",
    "gate": "model.layers.{l}.mlp.gate_proj.weight",
    "up": "model.layers.{l}.mlp.up_proj.weight",
    "down": "model.layers.{l}.mlp.down_proj.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class Architecture:
    """How one HF architecture maps onto the engine format.

    ``qkv_bias`` True means q/k/v always carry biases (Qwen2); False means they follow the
    config's ``attention_bias`` (which must then be false: an o_proj bias has no slot).
    """

    name: str
    qkv_bias: bool = False
    qk_norm: bool = False
    names: dict[str, str] = field(default_factory=lambda: dict(LLAMA_NAMES))

    def __post_init__(self) -> None:
        assert set(self.names) == set(SOURCE_KEYS), f"{self.name}: names must cover {SOURCE_KEYS}"

    def model_config(self, hf: dict[str, Any], tp: int, dtype: str | None) -> ModelConfig:
        """Validated ModelConfig for ``hf`` (an HF config.json dict) at ``tp`` and ``dtype``."""
        if hf.get("quantization_config"):
            method = hf["quantization_config"].get("quant_method", "?")
            raise UnsupportedArchitectureError(f"quantized source checkpoints ({method}) are not supported; give unquantized weights")
        if hf.get("attention_bias") and not self.qkv_bias:
            raise UnsupportedArchitectureError(f"{self.name} with attention_bias=true is not supported")
        if hf.get("mlp_bias"):
            raise UnsupportedArchitectureError(f"{self.name} with mlp_bias=true is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedArchitectureError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        _warn_sliding_window(hf)
        heads = _int(hf, "num_attention_heads")
        rope_theta, rope_scaling = _rope(hf)
        return ModelConfig(
            architecture=self.name,
            dtype=resolve_dtype(dtype, hf),
            vocab_size=_int(hf, "vocab_size"),
            hidden_size=_int(hf, "hidden_size"),
            num_hidden_layers=_int(hf, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_size=int(hf.get("head_dim") or _int(hf, "hidden_size") // heads),
            intermediate_size=_int(hf, "intermediate_size"),
            norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
            rotary_base=rope_theta,
            rotary_scaling=rope_scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings") or 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=self.qkv_bias,
            qk_norm=self.qk_norm,
            tp_size=tp,
        )


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    _REGISTRY[arch.name] = arch
    return arch


register(Architecture("LlamaForCausalLM"))
register(Architecture("MistralForCausalLM"))
register(Architecture("Qwen2ForCausalLM", qkv_bias=True))
register(Architecture("Qwen3ForCausalLM", qk_norm=True))


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_architecture(hf: dict[str, Any]) -> Architecture:
    """The registry entry for an HF config dict; UnsupportedArchitectureError otherwise."""
    names = hf.get("architectures") or []
    name = names[0] if names else None
    if name not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {name!r} (supported: {', '.join(supported_architectures())})"
        )
    return _REGISTRY[name]


def resolve_dtype(dtype: str | None, hf: dict[str, Any]) -> str:
    """The build dtype: the one asked for, else the source's (``dtype``/``torch_dtype``), else bfloat16."""
    if dtype is None:
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"
        if dtype not in DTYPES:  # e.g. a float8 source: build in bfloat16 unless told otherwise
            dtype = "bfloat16"
    if dtype not in DTYPES:
        raise BuildOptionError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return dtype


def _warn_sliding_window(hf: dict[str, Any]) -> None:
    """Kiln attends over the full context; say so when the source model was trained with a window."""
    window = hf.get("sliding_window")
    if window and hf.get("use_sliding_window", True) and window < int(hf.get("max_position_embeddings") or 0):
        logger.warning(
            "sliding_window=%s is ignored (full attention): outputs differ from the source beyond %s tokens", window, window
        )


def _int(hf: dict[str, Any], key: str) -> int:
    try:
        return int(hf[key])
    except (KeyError, TypeError, ValueError):
        raise UnsupportedArchitectureError(f"config.json lacks a valid {key!r}") from None


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rotary_scaling) from either transformers-5 ``rope_parameters`` or the
    older ``rope_theta`` + ``rope_scaling``; scaling is None for plain RoPE."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or params)
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    scaling.pop("rope_theta", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"rope scaling {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **scaling}
