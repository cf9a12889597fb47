"""Fused element-wise kernels: residual add + RMSNorm, SiLU-and-multiply, FP8 quantization.

All are memory-bound: each reads its inputs once and writes its outputs once, with all
arithmetic in fp32 registers. The ``*_fp8`` variants feed an FP8 GEMM: they round the result
to the model dtype, as the plain kernel stores it, then quantize it with the GEMM's static
input scale (``x * inv_scale`` saturated to +-448, round to nearest even) and write fp8, so
the activation never makes a round trip through memory in the model dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (SUPPORTED_DTYPES, KernelInputError, check, check_dtype, check_last_dim_contiguous,
                      check_scale, next_pow2, to_fp8)

FP8 = torch.float8_e4m3fn


@triton.jit
def _store_maybe_fp8(out_ptr, offs, y, mask, x_ptr, inv_ptr, QUANT: tl.constexpr):
    """Store fp32 ``y`` as the output dtype; with QUANT first rounded to the model dtype (x's),
    then quantized to fp8."""
    if QUANT:
        y = to_fp8(y.to(x_ptr.dtype.element_ty).to(tl.float32), tl.load(inv_ptr))
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, inv_ptr, eps, hidden,
                         stride_x, stride_r, stride_o, stride_n,
                         BLOCK_H: tl.constexpr, HAS_RESIDUAL: tl.constexpr, QUANT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    valid = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(res_ptr + row * stride_r + offs, mask=valid, other=0.0).to(tl.float32)
        rounded = x.to(new_res_ptr.dtype.element_ty)
        tl.store(new_res_ptr + row * stride_n + offs, rounded, mask=valid)
        # Normalise the residual as stored (model dtype), as the next layer will see it.
        x = rounded.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, 0) / hidden + eps)
    w = tl.load(w_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    _store_maybe_fp8(out_ptr, row * stride_o + offs, x * rstd * w, valid, x_ptr, inv_ptr, QUANT)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual): new_residual = x + residual (x itself when residual is None),
    normed = new_residual * rsqrt(mean(new_residual^2) + eps) * weight, computed in fp32."""
    return _add_rms_norm(x, residual, weight, eps, None)


def fused_add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                           inv_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fused_add_rms_norm`` whose normed output is quantized to fp8 with ``inv_scale``."""
    check_scale("inv_scale", inv_scale, x)
    return _add_rms_norm(x, residual, weight, eps, inv_scale)


def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                  inv_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    ok = (x.dim() == 2 and x.dtype in SUPPORTED_DTYPES and x.stride(1) == 1 and weight.dim() == 1
          and weight.shape[0] == x.shape[1] and weight.is_contiguous()
          and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype
                                    and residual.stride(1) == 1)))
    if not ok:
        _explain_norm_inputs(x, residual, weight)
    new_res = x if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    out = torch.empty(x.shape, dtype=x.dtype if inv_scale is None else FP8, device=x.device)
    tokens, hidden = x.shape
    if tokens == 0:
        return out, new_res
    block_h = next_pow2(hidden)
    res = residual if residual is not None else x
    _add_rms_norm_kernel[(tokens,)](
        x, res, weight, out, new_res, inv_scale if inv_scale is not None else weight, float(eps), hidden,
        x.stride(0), res.stride(0), out.stride(0), new_res.stride(0), BLOCK_H=block_h,
        HAS_RESIDUAL=residual is not None, QUANT=inv_scale is not None, num_warps=min(max(block_h // 512, 1), 16))
    return out, new_res


def _explain_norm_inputs(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> None:
    check(x.dim() == 2, f"x must be [tokens, hidden], got shape {tuple(x.shape)}")
    check(weight.shape == (x.shape[1],), f"weight must be [{x.shape[1]}], got {tuple(weight.shape)}")
    check_dtype("x", x)
    check_last_dim_contiguous("x", x)
    check(weight.is_contiguous(), "weight must be contiguous")
    if residual is not None:
        check(residual.shape == x.shape and residual.dtype == x.dtype,
              f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}")
        check_last_dim_contiguous("residual", residual)
    raise KernelInputError("fused_add_rms_norm: inputs rejected")


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inv_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr,
                         QUANT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=valid, other=0.0).to(tl.float32)
    _store_maybe_fp8(out_ptr, row * stride_o + offs, gate * tl.sigmoid(gate) * up, valid, x_ptr, inv_ptr,
                     QUANT)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:] for x of shape [T, 2I], in fp32, returned in x's dtype."""
    return _silu_and_mul(x, None)


def silu_and_mul_fp8(x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """``silu_and_mul`` quantized to fp8 with ``inv_scale`` (after rounding to x's dtype)."""
    check_scale("inv_scale", inv_scale, x)
    return _silu_and_mul(x, inv_scale)


def _silu_and_mul(x: torch.Tensor, inv_scale: torch.Tensor | None) -> torch.Tensor:
    if not (x.dim() == 2 and x.shape[1] % 2 == 0 and x.dtype in SUPPORTED_DTYPES and x.stride(1) == 1):
        check(x.dim() == 2 and x.shape[1] % 2 == 0, f"x must be [tokens, 2*intermediate], got {tuple(x.shape)}")
        check_dtype("x", x)
        check_last_dim_contiguous("x", x)
    tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((tokens, inter), dtype=x.dtype if inv_scale is None else FP8, device=x.device)
    if tokens == 0 or inter == 0:
        return out
    block = min(next_pow2(inter), 2048)
    _silu_and_mul_kernel[(tokens, triton.cdiv(inter, block))](
        x, out, inv_scale if inv_scale is not None else x, inter, x.stride(0), out.stride(0), BLOCK=block,
        QUANT=inv_scale is not None, num_warps=max(block // 256, 1))
    return out


@triton.jit
def _quantize_kernel(x_ptr, out_ptr, inv_ptr, width, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < width
    x = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, to_fp8(x, tl.load(inv_ptr)), mask=valid)


def quantize_fp8(x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """fp8(clamp(x * inv_scale, -448, 448)) of x [T, W] (e.g. attention's output before dense)."""
    if not (x.dim() == 2 and x.dtype in SUPPORTED_DTYPES and x.stride(1) == 1):
        check(x.dim() == 2, f"x must be [tokens, width], got {tuple(x.shape)}")
        check_dtype("x", x)
        check_last_dim_contiguous("x", x)
    check_scale("inv_scale", inv_scale, x)
    tokens, width = x.shape
    out = torch.empty((tokens, width), dtype=FP8, device=x.device)
    if tokens == 0 or width == 0:
        return out
    block = min(next_pow2(width), 2048)
    _quantize_kernel[(tokens, triton.cdiv(width, block))](
        x, out, inv_scale, width, x.stride(0), out.stride(0), BLOCK=block, num_warps=max(block // 256, 1))
    return out
