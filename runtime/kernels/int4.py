"""W4A16 kernels: INT4 weights with per-group scales (and zero points), activations in the model dtype.

Numerics (engine_builder/int4.py defines the layout): for output n and group j of g inputs,

    y[m, n] = sum_j  s[j, n] * (sum_{k in j} q[n, k] * x[m, k])  +  z[j, n] * (sum_{k in j} x[m, k])

in fp32, rounded to the model dtype once: exactly x @ (q * s + z)^T evaluated in fp32, up to the
order of the additions. The int4 values are exact in every float dtype, so a tensor-core product
on them and on x (in the model dtype) loses nothing; the scale and zero point are applied once per
group to the partial sums instead of to every weight.

Weights are dequantized in registers from the kernel layout ``repack`` makes at load time: per
row, each group's g/2 bytes hold its first half in the low nibbles and its second half in the
high nibbles (byte i = elements i and g/2 + i of the group), so both halves meet a contiguous
slice of x. A nibble becomes its float value with integer ops only: ``(b & 0xF) ^ 0x4B000008``
is the fp32 bit pattern of 2^23 + (q + 8), and subtracting 2^23 + 8 leaves q (no int->float
conversion instruction, whose throughput is a fraction of the ALUs').

``gemv_int4`` (1-8 rows) takes the fused prologue/epilogue of ``gemv`` (RMSNorm or SiLU-and-mul
of the raw activation, the residual add; the same helpers, so the rounding points are the same)
plus an optional per-input pre-quantization scale. Per K step it runs either on the CUDA cores
over GROUPS_PER_STEP groups at once or as tensor-core dots on one group (rows padded to 16).
``gemm_int4`` tiles any number of rows (tensor cores, one group per K step). For prefill-sized
batches ``dequantize_int4`` writes W in the model dtype (rounded once) for cuBLAS instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kiln.engine_builder.options import INT4_GROUP_SIZES

from ._common import SUPPORTED_DTYPES, KernelInputError, check, check_dtype, dot_precision, next_pow2, upcast_dots
from .gemv import MAX_ROWS, _row_rstd, _store, _x_step

GROUP_SIZES = INT4_GROUP_SIZES  # a group's bytes split into two halves of >= 16 (the dots' K)
DEQUANTIZE_FROM_ROWS = 16
"""From this many rows ``Int4Linear`` dequantizes the weight to the model dtype and calls cuBLAS:
on an H200 (scripts/bench_int4_tinygemm_gpu.py, Llama-3.1-8B shapes, 2026-11-30) that beat
``gemm_int4`` at every row count from 16 (qkv at 16 rows: 34.8 vs 47.5 us; at 1024: 93 vs 373 us)
and tinygemm from 32 (qkv 35.0 vs 61.4 us; gate_up 159.5 vs 261.2 us): writing and reading W in
bf16 costs less than these kernels lose to cuBLAS's tensor-core tiles."""
TINYGEMM_BELOW_ROWS = 32
"""Products of fewer rows run on PyTorch's tinygemm where it takes the linear (runtime/quant/
tinygemm.py: bf16, sm >= 80). On the same H200 table: 1.6-11x faster than ``gemv_int4`` at 1-8
rows (gate_up at one row 33.0 vs 54.2 us, 1.9 TB/s of INT4 weights; at two rows 34.0 vs 393 us),
and within 4% of or ahead of dequantize + cuBLAS at 16 rows; from 32 rows cuBLAS wins."""
_MAGIC = tl.constexpr(0x4B000008)  # fp32 bits of 2^23 + 8; xor with a nibble n gives 2^23 + (n ^ 8) = 2^23 + q + 8
_MAGIC_VALUE = tl.constexpr(8388616.0)  # 2^23 + 8


@dataclass(frozen=True)
class Int4GemvConfig:
    """Launch shape of ``gemv_int4``: BLOCK_N outputs per program; each K step covers
    ``groups_per_step`` groups on the CUDA cores (use_dot=False) or one group as two
    tensor-core dots (use_dot=True, rows padded to 16)."""

    block_n: int
    groups_per_step: int = 1
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool = False


@dataclass(frozen=True)
class Int4GemmConfig:
    """Launch shape of ``gemm_int4``: a BLOCK_N x BLOCK_M output tile per program; each K step
    covers ``groups_per_step`` groups (unrolled, so their loads are in flight together)."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3
    groups_per_step: int = 1


# Not tuned on a GPU yet: scripts/check_int4_gpu.py --sweep prints the best launch shapes per
# problem in this form, to be pasted here. Key: (N, K, group, m_class).
TUNED_GEMV: dict[tuple[int, int, int, str], Int4GemvConfig] = {}
TUNED_GEMM: dict[tuple[int, int, int, str], Int4GemmConfig] = {}


def _m_class(m: int) -> str:
    return "m1" if m == 1 else "m2" if m == 2 else "m8" if m <= 8 else "m64" if m <= 64 else "mbig"


def pick_gemv_config(n: int, k: int, m: int, group: int) -> Int4GemvConfig:
    """Tuned launch shape, or the heuristic: CUDA cores over ~1024 inputs per step for one or
    two rows, tensor-core dots over ~512 inputs per step for more."""
    tuned = TUNED_GEMV.get((n, k, group, _m_class(m)))
    if tuned is not None:
        return tuned
    # Enough bytes in flight to cover the memory latency needs many programs and several groups
    # per step: 4 bits per weight make every tile a quarter of bf16's.
    if m <= 2:
        return Int4GemvConfig(block_n=8 // m, groups_per_step=_pow2_floor(max(1, min(1024, k) // group)))
    return Int4GemvConfig(block_n=32 if n >= 8192 else 16, groups_per_step=max(1, 512 // group), num_warps=4,
                          num_stages=3, use_dot=True)


def _pow2_floor(v: int) -> int:
    return 1 << (int(v).bit_length() - 1)


def _dividing(groups: int, num_groups: int) -> int:
    """The largest power of two <= ``groups`` dividing ``num_groups`` (unrolled steps take no masks)."""
    while num_groups % groups:
        groups //= 2
    return groups


def pick_gemm_config(n: int, k: int, m: int, group: int) -> Int4GemmConfig:
    """Tuned launch shape, or a heuristic that keeps the weight tile wide and grows the row tile with M."""
    tuned = TUNED_GEMM.get((n, k, group, _m_class(m)))
    if tuned is not None:
        return tuned
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    block_n = 32 if m <= 32 else 64 if m <= 64 else 128
    return Int4GemmConfig(block_m=block_m, block_n=block_n, num_warps=8 if block_m >= 64 else 4,
                          groups_per_step=max(1, (256 if m <= 64 else 128) // group))


# ----------------------------------------------------------------------------- layout


def repack(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """The engine's packing (byte j = columns 2j, 2j+1) -> the kernels' (per group of g, byte i =
    columns i and g/2 + i). int8 [N, K/2] in and out, on packed's device."""
    n, half_k = packed.shape
    b = packed.view(torch.uint8)
    q = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(n, half_k * 2 // group_size, 2, group_size // 2)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, half_k).view(torch.int8).contiguous()


@triton.jit
def _unpack(b):
    """int8 bytes -> (low nibbles, high nibbles) as exact fp32 values in [-8, 7]."""
    b32 = b.to(tl.int32)
    lo = ((b32 & 0xF) ^ _MAGIC).to(tl.float32, bitcast=True) - _MAGIC_VALUE
    hi = (((b32 >> 4) & 0xF) ^ _MAGIC).to(tl.float32, bitcast=True) - _MAGIC_VALUE
    return lo, hi


@triton.jit
def _prescale(x, p_ptr, offs_k, k_ok, PREQUANT: tl.constexpr):
    """x * p (the pre-quantization scale per input), rounded to x's dtype; x [len(offs_k), M]."""
    if PREQUANT:
        p = tl.load(p_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) * p[:, None]).to(x.dtype)
    return x


# ----------------------------------------------------------------------------- GEMV (1-8 rows)


@triton.jit
def _gemv_int4_kernel(x_ptr, w_ptr, s_ptr, z_ptr, p_ptr, out_ptr, norm_ptr, res_ptr, M, N, K, stride_xm,
                      stride_wn, stride_om, stride_rm, eps, GROUP: tl.constexpr, GROUPS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_G: tl.constexpr, NORM: tl.constexpr,
                      SILU_MUL: tl.constexpr, RESIDUAL: tl.constexpr, ZERO: tl.constexpr, PREQUANT: tl.constexpr,
                      USE_DOT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, ROWS: tl.constexpr,
                      NORM_BK: tl.constexpr, NUM_STAGES: tl.constexpr):
    HALF: tl.constexpr = GROUP // 2
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Columns past N re-read row N-1 (in bounds, so no weight mask); dropped at the store.
    n_safe = tl.minimum(offs_n, N - 1)
    w_rows = w_ptr + n_safe.to(tl.int64) * stride_wn
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if NORM:
        rstd = _row_rstd(x_ptr, stride_xm, M, K, eps, BLOCK_M, ROWS, NORM_BK, NUM_STAGES)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    num_groups = K // GROUP
    for g0 in tl.range(0, num_groups, GROUPS, num_stages=NUM_STAGES):
        if USE_DOT:  # GROUPS divides the group count here: independent loads, unrolled
            for j in tl.static_range(GROUPS):
                acc += _dot_group(x_ptr, w_rows, s_ptr, z_ptr, p_ptr, norm_ptr, rstd, n_safe, g0 + j, M, N, K,
                                  stride_xm, GROUP, BLOCK_M, NORM, SILU_MUL, ZERO, PREQUANT, UPCAST, PREC)
        else:
            acc += _fma_groups(x_ptr, w_rows, s_ptr, z_ptr, p_ptr, norm_ptr, rstd, n_safe, g0, num_groups, M, N, K,
                               stride_xm, GROUP, GROUPS, BLOCK_M, BLOCK_N, EVEN_G, NORM, SILU_MUL, ZERO, PREQUANT)
    _store(out_ptr, res_ptr, acc, offs_n, M, N, stride_om, stride_rm, BLOCK_M, RESIDUAL)


@triton.jit
def _dot_group(x_ptr, w_rows, s_ptr, z_ptr, p_ptr, norm_ptr, rstd, n_safe, g, M, N, K, stride_xm,
               GROUP: tl.constexpr, BLOCK_M: tl.constexpr, NORM: tl.constexpr, SILU_MUL: tl.constexpr,
               ZERO: tl.constexpr, PREQUANT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """One group's contribution [BLOCK_N, BLOCK_M] as two tensor-core dots (fp32 accumulate)."""
    HALF: tl.constexpr = GROUP // 2
    offs = tl.arange(0, HALF)
    lo, hi = _unpack(tl.load(w_rows[:, None] + (g * HALF + offs)[None, :]))
    k_lo = g * GROUP + offs
    k_ok = k_lo < K  # always true: g < num_groups
    x_lo = _x_step(x_ptr, norm_ptr, rstd, stride_xm, M, K, k_lo, k_ok, BLOCK_M, True, NORM, SILU_MUL)
    x_hi = _x_step(x_ptr, norm_ptr, rstd, stride_xm, M, K, k_lo + HALF, k_ok, BLOCK_M, True, NORM, SILU_MUL)
    x_lo = _prescale(x_lo, p_ptr, k_lo, k_ok, PREQUANT)
    x_hi = _prescale(x_hi, p_ptr, k_lo + HALF, k_ok, PREQUANT)
    if UPCAST:
        part = tl.dot(lo, x_lo.to(tl.float32), input_precision=PREC)
        part = tl.dot(hi, x_hi.to(tl.float32), part, input_precision=PREC)
    else:
        part = tl.dot(lo.to(x_lo.dtype), x_lo, input_precision=PREC)
        part = tl.dot(hi.to(x_lo.dtype), x_hi, part, input_precision=PREC)
    s = tl.load(s_ptr + g * N + n_safe).to(tl.float32)
    out = part * s[:, None]
    if ZERO:
        z = tl.load(z_ptr + g * N + n_safe).to(tl.float32)
        xsum = tl.sum(x_lo.to(tl.float32), 0) + tl.sum(x_hi.to(tl.float32), 0)
        out += z[:, None] * xsum[None, :]
    return out


@triton.jit
def _fma_groups(x_ptr, w_rows, s_ptr, z_ptr, p_ptr, norm_ptr, rstd, n_safe, g0, num_groups, M, N, K, stride_xm,
                GROUP: tl.constexpr, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                EVEN_G: tl.constexpr, NORM: tl.constexpr, SILU_MUL: tl.constexpr, ZERO: tl.constexpr,
                PREQUANT: tl.constexpr):
    """GROUPS groups' contribution [BLOCK_N, BLOCK_M] on the CUDA cores (fp32 multiply-adds)."""
    HALF: tl.constexpr = GROUP // 2
    gi = g0 + tl.arange(0, GROUPS)
    g_ok = gi < num_groups
    offs = tl.arange(0, HALF)
    byte = (gi * HALF)[:, None] + offs[None, :]  # [GROUPS, HALF]
    if EVEN_G:
        b = tl.load(w_rows[:, None, None] + byte[None, :, :])
    else:
        b = tl.load(w_rows[:, None, None] + byte[None, :, :], mask=g_ok[None, :, None], other=0)
    lo, hi = _unpack(b)  # [BLOCK_N, GROUPS, HALF]
    k_lo = tl.reshape((gi * GROUP)[:, None] + offs[None, :], [GROUPS * HALF])
    k_ok = tl.reshape(g_ok[:, None] & (offs < HALF)[None, :], [GROUPS * HALF])
    x_lo = _x_step(x_ptr, norm_ptr, rstd, stride_xm, M, K, k_lo, k_ok, BLOCK_M, EVEN_G, NORM, SILU_MUL)
    x_hi = _x_step(x_ptr, norm_ptr, rstd, stride_xm, M, K, k_lo + HALF, k_ok, BLOCK_M, EVEN_G, NORM, SILU_MUL)
    x_lo = _prescale(x_lo, p_ptr, k_lo, k_ok, PREQUANT).to(tl.float32)
    x_hi = _prescale(x_hi, p_ptr, k_lo + HALF, k_ok, PREQUANT).to(tl.float32)
    sz_ptrs = gi[None, :] * N + n_safe[:, None]  # [BLOCK_N, GROUPS]
    s = tl.load(s_ptr + sz_ptrs, mask=g_ok[None, :], other=0.0).to(tl.float32)
    z = s * 0.0
    if ZERO:
        z = tl.load(z_ptr + sz_ptrs, mask=g_ok[None, :], other=0.0).to(tl.float32)
    if BLOCK_M == 1:  # one row: 3-D tiles, [BLOCK_N, GROUPS] partial sums
        x_lo = tl.reshape(x_lo, [GROUPS, HALF])
        x_hi = tl.reshape(x_hi, [GROUPS, HALF])
        part = tl.sum(lo * x_lo[None, :, :], 2) + tl.sum(hi * x_hi[None, :, :], 2)
        out = part * s + z * (tl.sum(x_lo, 1) + tl.sum(x_hi, 1))[None, :]
        return tl.sum(out, 1)[:, None]
    x_lo = tl.reshape(x_lo, [GROUPS, HALF, BLOCK_M])
    x_hi = tl.reshape(x_hi, [GROUPS, HALF, BLOCK_M])
    part = tl.sum(lo[:, :, :, None] * x_lo[None, :, :, :], 2) + tl.sum(hi[:, :, :, None] * x_hi[None, :, :, :], 2)
    xsum = tl.sum(x_lo, 1) + tl.sum(x_hi, 1)  # [GROUPS, BLOCK_M]
    return tl.sum(part * s[:, :, None] + z[:, :, None] * xsum[None, :, :], 1)


def gemv_int4(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              group_size: int, *, prequant: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
              eps: float = 1e-5, silu_mul: bool = False, residual: torch.Tensor | None = None,
              out: torch.Tensor | None = None, config: Int4GemvConfig | None = None) -> torch.Tensor:
    """out[M, N] = x' @ W^T (+ residual) for 1 <= M <= 8; W from ``weight`` (int8 [N, K/2] in the
    kernel layout, see ``repack``), ``scales``/``zeros`` [K/g, N] in x's dtype (zeros None:
    symmetric). x' = prequant * prologue(x) where the prologue is ``gemv``'s: rms_norm with
    ``norm_weight``, silu_and_mul with ``silu_mul`` (x is [M, 2K] then), else x; each step rounds
    to x's dtype. out may alias residual, never x."""
    m, n, k = _check(x, weight, scales, zeros, group_size, silu_mul)
    check(m <= MAX_ROWS, f"gemv_int4 takes at most {MAX_ROWS} rows, got {m}: use gemm_int4")
    check(not (silu_mul and norm_weight is not None), "gemv_int4: silu_mul and norm_weight cannot be combined")
    for name, t, shape in (("norm_weight", norm_weight, (k,)), ("prequant", prequant, (k,))):
        check(t is None or (t.shape == shape and t.is_contiguous() and t.device == x.device),
              f"{name} must be contiguous [{k}] on {x.device}")
    for name, t in (("residual", residual), ("out", out)):
        check(t is None or (t.shape == (m, n) and t.dtype == x.dtype and t.stride(1) == 1),
              f"{name} must be [{m}, {n}] {x.dtype} with unit last stride")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    cfg = config or pick_gemv_config(n, k, m, group_size)
    rows = next_pow2(m)
    groups = _pow2_floor(max(1, min(cfg.groups_per_step, k // group_size)))
    if cfg.use_dot:
        groups = _dividing(groups, k // group_size)
    res = residual if residual is not None else out
    _gemv_int4_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, weight, scales, zeros if zeros is not None else scales, prequant if prequant is not None else scales,
        out, norm_weight if norm_weight is not None else scales, res, m, n, k, x.stride(0), weight.stride(0),
        out.stride(0), res.stride(0), float(eps), GROUP=group_size, GROUPS=groups,
        BLOCK_M=16 if cfg.use_dot else rows, BLOCK_N=cfg.block_n, EVEN_G=(k // group_size) % groups == 0,
        NORM=norm_weight is not None, SILU_MUL=silu_mul, RESIDUAL=residual is not None, ZERO=zeros is not None,
        PREQUANT=prequant is not None, USE_DOT=cfg.use_dot, UPCAST=upcast_dots(x), PREC=dot_precision(x.dtype),
        ROWS=rows, NORM_BK=min(4096 // rows, next_pow2(k)), NUM_STAGES=cfg.num_stages,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


# ----------------------------------------------------------------------------- GEMM (any rows)


@triton.jit
def _gemm_int4_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                      GROUP: tl.constexpr, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      ZERO: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, NUM_STAGES: tl.constexpr):
    HALF: tl.constexpr = GROUP // 2
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_safe = tl.minimum(offs_n, N - 1)
    m_ok = offs_m < M
    w_rows = w_ptr + n_safe.to(tl.int64) * stride_wn
    x_cols = x_ptr + offs_m.to(tl.int64) * stride_xm  # the x^T tile: K down, rows across
    offs = tl.arange(0, HALF)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for g0 in tl.range(0, K // GROUP, GROUPS, num_stages=NUM_STAGES):
        for j in tl.static_range(GROUPS):  # GROUPS divides the group count
            g = g0 + j
            lo, hi = _unpack(tl.load(w_rows[:, None] + (g * HALF + offs)[None, :]))
            x_lo = tl.load(x_cols[None, :] + (g * GROUP + offs)[:, None], mask=m_ok[None, :], other=0.0)
            x_hi = tl.load(x_cols[None, :] + (g * GROUP + HALF + offs)[:, None], mask=m_ok[None, :], other=0.0)
            if UPCAST:
                part = tl.dot(lo, x_lo.to(tl.float32), input_precision=PREC)
                part = tl.dot(hi, x_hi.to(tl.float32), part, input_precision=PREC)
            else:
                part = tl.dot(lo.to(x_lo.dtype), x_lo, input_precision=PREC)
                part = tl.dot(hi.to(x_lo.dtype), x_hi, part, input_precision=PREC)
            s = tl.load(s_ptr + g * N + n_safe).to(tl.float32)
            acc += part * s[:, None]
            if ZERO:
                z = tl.load(z_ptr + g * N + n_safe).to(tl.float32)
                xsum = tl.sum(x_lo.to(tl.float32), 0) + tl.sum(x_hi.to(tl.float32), 0)
                acc += z[:, None] * xsum[None, :]
    mask = (offs_n < N)[:, None] & m_ok[None, :]
    tl.store(out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


def gemm_int4(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              group_size: int, *, out: torch.Tensor | None = None, config: Int4GemmConfig | None = None) -> torch.Tensor:
    """out[M, N] = x @ W^T for any M (arguments as ``gemv_int4``, without the fusions)."""
    m, n, k = _check(x, weight, scales, zeros, group_size, False)
    check(out is None or (out.shape == (m, n) and out.dtype == x.dtype and out.stride(1) == 1),
          f"out must be [{m}, {n}] {x.dtype} with unit last stride")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    cfg = config or pick_gemm_config(n, k, m, group_size)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m))
    _gemm_int4_kernel[grid](
        x, weight, scales, zeros if zeros is not None else scales, out, m, n, k, x.stride(0), weight.stride(0),
        out.stride(0), GROUP=group_size, GROUPS=_dividing(_pow2_floor(max(1, cfg.groups_per_step)), k // group_size),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, ZERO=zeros is not None,
        UPCAST=upcast_dots(x), PREC=dot_precision(x.dtype), NUM_STAGES=cfg.num_stages,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


# ----------------------------------------------------------------------------- dequantize (large M)


@triton.jit
def _dequantize_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, stride_wn, stride_on, GROUP: tl.constexpr,
                       BLOCK_N: tl.constexpr, ZERO: tl.constexpr):
    HALF: tl.constexpr = GROUP // 2
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    n_ok = offs_n < N
    offs = tl.arange(0, HALF)
    lo, hi = _unpack(tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + (g * HALF + offs)[None, :],
                             mask=n_ok[:, None], other=0))
    s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    z = 0.0
    if ZERO:
        z = tl.load(z_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    rows = out_ptr + offs_n.to(tl.int64)[:, None] * stride_on + g * GROUP + offs[None, :]
    tl.store(rows, (lo * s + z).to(out_ptr.dtype.element_ty), mask=n_ok[:, None])
    tl.store(rows + HALF, (hi * s + z).to(out_ptr.dtype.element_ty), mask=n_ok[:, None])


def dequantize_int4(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int) -> torch.Tensor:
    """W [N, K] = q * s + z (fp32, rounded to the scales' dtype) from the kernel layout: for
    batches large enough that cuBLAS on W beats ``gemm_int4`` despite writing and reading it."""
    x = torch.empty((0, weight.shape[1] * 2), dtype=scales.dtype, device=weight.device)
    _, n, k = _check(x, weight, scales, zeros, group_size, False)
    out = torch.empty((n, k), dtype=scales.dtype, device=weight.device)
    block_n = 32
    _dequantize_kernel[(triton.cdiv(n, block_n), k // group_size)](
        weight, scales, zeros if zeros is not None else scales, out, n, weight.stride(0), out.stride(0),
        GROUP=group_size, BLOCK_N=block_n, ZERO=zeros is not None, num_warps=4)
    return out


def _check(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
           group_size: int, silu_mul: bool) -> tuple[int, int, int]:
    """(M, N, K) after checking the shared arguments; KernelInputError names the first problem."""
    check(x.dim() == 2 and weight.dim() == 2, f"x [M, K] and weight [N, K/2] expected, got {tuple(x.shape)} and "
          f"{tuple(weight.shape)}")
    check(group_size in GROUP_SIZES, f"group size {group_size} not supported (choose from {GROUP_SIZES})")
    n, k = weight.shape[0], weight.shape[1] * 2
    check(weight.dtype == torch.int8 and weight.stride(1) == 1, f"weight must be int8 packed [N, K/2], contiguous "
          f"rows, got {weight.dtype} strides {weight.stride()}")
    check(k > 0 and k % group_size == 0, f"K = {k} is not a positive multiple of the group size {group_size}")
    want = 2 * k if silu_mul else k
    check(x.shape[1] == want, f"x must be [M, {want}] for weight [{n}, {k // 2}] packed"
          f"{' with silu_mul' if silu_mul else ''}, got {tuple(x.shape)}")
    check_dtype("x", x)
    check(x.stride(1) == 1, "x must be contiguous in its last dimension")
    for name, t in (("scales", scales), ("zeros", zeros)):
        check(t is None or (t.shape == (k // group_size, n) and t.dtype == x.dtype and t.is_contiguous()),
              f"{name} must be contiguous [{k // group_size}, {n}] {x.dtype}, got "
              f"{None if t is None else (tuple(t.shape), t.dtype)}")
    return x.shape[0], n, k


__all__ = ["DEQUANTIZE_FROM_ROWS", "GROUP_SIZES", "Int4GemmConfig", "Int4GemvConfig", "KernelInputError",
           "SUPPORTED_DTYPES", "TINYGEMM_BELOW_ROWS", "dequantize_int4", "gemm_int4", "gemv_int4", "pick_gemm_config",
           "pick_gemv_config", "repack"]
