"""Building blocks of the Llama-family model: the torch reference ops and the rotary cache.

The reference ops (``fused_add_rms_norm``, ``silu_and_mul``, ``apply_rotary``,
``fused_linear``) have the exact signatures of DESIGN.md "Kernel API"; on CUDA the Triton
kernels replace them through ``attention.KernelSet``. Linear layers (precision and tensor
parallelism) live in runtime/linear.py.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

class UnsupportedRopeScalingError(ValueError):
    """The engine asks for a rotary scaling type Kiln does not implement."""


# ----------------------------------------------------------------------------- reference ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32 and cast back before the weight (as HF)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); with residual None the residual is x itself."""
    if residual is not None:
        x = x + residual
    return rms_norm(x, weight, eps), x


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:] for x of shape [T, 2I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-5,
    silu_mul: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x' @ weight^T (+ residual), where x' = rms_norm(x) with ``norm_weight``, or
    silu_and_mul(x) with ``silu_mul``, else x: the small-batch decode op that the Triton
    ``gemv`` fuses into one launch. Rounding points as the unfused chain: the normed (or
    activated) input and the product are rounded to x's dtype, the residual add is fp32."""
    x = linear_prologue(x, norm_weight, eps, silu_mul)
    out = F.linear(x, weight)
    if residual is not None:
        out = (residual.float() + out.float()).to(x.dtype)
    return out


def linear_prologue(x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, silu_mul: bool) -> torch.Tensor:
    """``fused_linear``'s input: rms_norm(x) (fp32, one rounding to x's dtype) with ``norm_weight``,
    silu_and_mul(x) with ``silu_mul``, else x."""
    if norm_weight is not None:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps) * norm_weight.float()).to(x.dtype)
    if silu_mul:
        gate, up = x.float().chunk(2, dim=-1)
        return (F.silu(gate) * up).to(x.dtype)
    return x


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX-style rotary (rotate halves) of q [T, Hq, D] and k [T, Hkv, D].

    ``cos_sin_cache[p]`` is ``cat(cos(p * inv_freq), sin(p * inv_freq))``, each half D/2 wide.
    """
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)

    return rotate(q), rotate(k)


# ----------------------------------------------------------------------------- rotary cache


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama-3.1 frequency scaling: long wavelengths slowed by `factor`, short ones kept,
    a smooth blend in between."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = ((original / wavelen) - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, blended)
    return torch.where(wavelen < original / high, inv_freq, scaled)


def build_cos_sin_cache(
    head_size: int, max_positions: int, base: float, scaling: dict[str, Any] | None
) -> torch.Tensor:
    """float32 [max_positions, head_size]: cat(cos, sin) of position * inverse frequency."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size))
    positions = torch.arange(max_positions, dtype=torch.float64)
    rope_type = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        pass
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif rope_type == "linear":
        positions = positions / float(scaling["factor"])
    else:
        raise UnsupportedRopeScalingError(
            f"rotary scaling {rope_type!r} is not supported (supported: default, linear, llama3)"
        )
    freqs = torch.outer(positions, inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()
