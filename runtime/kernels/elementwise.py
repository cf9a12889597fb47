"""Fused element-wise kernels: residual add + RMSNorm, and SiLU-and-multiply.

Both are memory-bound: each reads its inputs once and writes its outputs once, with all
arithmetic in fp32 registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (SUPPORTED_DTYPES, KernelInputError, check, check_dtype, check_last_dim_contiguous,
                      next_pow2)


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, eps, hidden,
                         stride_x, stride_r, stride_o, stride_n,
                         BLOCK_H: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
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
    tl.store(out_ptr + row * stride_o + offs, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=valid)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual): new_residual = x + residual (x itself when residual is None),
    normed = new_residual * rsqrt(mean(new_residual^2) + eps) * weight, computed in fp32."""
    ok = (x.dim() == 2 and x.dtype in SUPPORTED_DTYPES and x.stride(1) == 1 and weight.dim() == 1
          and weight.shape[0] == x.shape[1] and weight.is_contiguous()
          and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype
                                    and residual.stride(1) == 1)))
    if not ok:
        _explain_norm_inputs(x, residual, weight)
    new_res = x if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    tokens, hidden = x.shape
    if tokens == 0:
        return out, new_res
    block_h = next_pow2(hidden)
    res = residual if residual is not None else x
    _add_rms_norm_kernel[(tokens,)](
        x, res, weight, out, new_res, float(eps), hidden, x.stride(0), res.stride(0), out.stride(0),
        new_res.stride(0), BLOCK_H=block_h, HAS_RESIDUAL=residual is not None,
        num_warps=min(max(block_h // 512, 1), 16))
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
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=valid, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=valid)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:] for x of shape [T, 2I], in fp32, returned in x's dtype."""
    if not (x.dim() == 2 and x.shape[1] % 2 == 0 and x.dtype in SUPPORTED_DTYPES and x.stride(1) == 1):
        check(x.dim() == 2 and x.shape[1] % 2 == 0, f"x must be [tokens, 2*intermediate], got {tuple(x.shape)}")
        check_dtype("x", x)
        check_last_dim_contiguous("x", x)
    tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((tokens, inter), dtype=x.dtype, device=x.device)
    if tokens == 0 or inter == 0:
        return out
    block = min(next_pow2(inter), 2048)
    _silu_and_mul_kernel[(tokens, triton.cdiv(inter, block))](
        x, out, inter, x.stride(0), out.stride(0), BLOCK=block, num_warps=max(block // 256, 1))
    return out
