"""The FP8 (E4M3) KV cache: which dtype the cache gets, its per-layer scales, and the reference
arithmetic that the Triton kernels reproduce.

Engine format (TensorRT-LLM's): config.json ``quantization.kv_cache_quant_algo == "FP8"`` and per
layer ``transformer.layers.{l}.attention.kv_cache_scaling_factor``, float32 of shape (1,): the
dequantization scale ``s`` (amax / 448) shared by K and V of that layer.

Arithmetic: the cache stores ``fp8(clamp(x * inv, -448, 448))`` where ``inv = 1/s`` is rounded to
float32 once (TensorRT-LLM's ``kv_scale_orig_quant``) and the fp8 rounding is to nearest, ties to
even; it is read back as ``float(fp8) * s``. The write kernels produce bit for bit what
``quantize`` produces from the same input. The attention kernels fold ``s`` into the softmax scale
(K) and into the output (V) instead of scaling every element; the reference attention does the
same, so the two differ only by float32 rounding order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from kiln.runtime.config import KV_CACHE_DTYPES  # one definition; the config module stays torch-free

logger = logging.getLogger(__name__)

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_KV_DTYPE).max)  # 448
KV_SCALE_NAME = "transformer.layers.{l}.attention.kv_cache_scaling_factor"
_FP8_CAPABILITY = (8, 9)  # Ada / Hopper and later convert E4M3 in hardware


class KVCacheDtypeError(ValueError):
    """The KV cache dtype asked for cannot be used with this engine or device."""


def inverse_scale(scale: float) -> float:
    """1/scale rounded to float32: the factor every quantizing write multiplies by."""
    return float(np.float32(1.0) / np.float32(scale))


def quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x * (1/scale), saturated to +-448, rounded to E4M3 (nearest, ties to even)."""
    return (x.float() * inverse_scale(scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


def dequantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 values of a quantized tensor: float(x) * scale."""
    return x.float() * scale


def engine_kv_algo(model_config: Any) -> str | None:
    """config.json's ``quantization.kv_cache_quant_algo`` (None: the KV cache is not quantized)."""
    return (model_config.quantization or {}).get("kv_cache_quant_algo")


def resolve_kv_cache_dtype(option: str, model_config: Any, compute_dtype: torch.dtype,
                           device: torch.device) -> torch.dtype:
    """The KV cache dtype for ``EngineConfig.kv_cache_dtype``.

    "auto": FP8 when the engine says so (its scales), else the compute dtype; on a GPU without
    FP8 conversions (before sm_89) an FP8 engine falls back to the compute dtype with a warning.
    "model": the compute dtype always (an FP8 engine's scales are ignored). "fp8": FP8 always; an
    engine without scales gets scale 1.0 and a warning (as vLLM does), a GPU before sm_89 an error.
    """
    algo = engine_kv_algo(model_config)
    if option == "model":
        return compute_dtype
    if algo not in (None, "FP8"):
        raise KVCacheDtypeError(f"kv_cache_quant_algo {algo!r} is not supported (supported: FP8); "
                                "run it with kv_cache_dtype='model'")
    if option == "auto" and algo is None:
        return compute_dtype
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < _FP8_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        if option == "fp8":
            raise KVCacheDtypeError(f"kv_cache_dtype='fp8' needs a GPU with FP8 (sm_89 or later); {name} has none")
        logger.warning("engine has an FP8 KV cache but %s has no FP8 (sm_89+): KV cache in %s", name, compute_dtype)
        return compute_dtype
    if algo is None:
        logger.warning("kv_cache_dtype='fp8' on an engine without KV cache scales: scale 1.0 "
                       "(K/V beyond +-%g saturate); build with --kv-cache-dtype fp8 for calibrated scales", FP8_MAX)
    return FP8_KV_DTYPE


def layer_kv_scales(tensors: Mapping[str, torch.Tensor], layer: int,
                    quantization: Mapping[str, Any]) -> dict[str, float]:
    """``{"k_scale", "v_scale"}`` of one layer for the attention ops: the engine's
    kv_cache_scaling_factor (required when the engine declares FP8 KV), else 1.0."""
    name = KV_SCALE_NAME.format(l=layer)
    tensor = tensors.get(name)
    if tensor is None:
        if quantization.get("kv_cache_quant_algo") == "FP8":
            from kiln.runtime.linear import MissingWeightError  # linear imports attention, which imports this

            raise MissingWeightError(f"engine tensor {name!r} is missing (the engine declares an FP8 KV cache)")
        return {"k_scale": 1.0, "v_scale": 1.0}
    scale = float(tensor.reshape(-1)[0])
    if tensor.numel() != 1 or not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"engine tensor {name!r} must be one positive finite float32, got {tensor.tolist()}")
    return {"k_scale": scale, "v_scale": scale}
