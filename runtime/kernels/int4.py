"""W4A16 kernels: INT4 weights with per-group scales (and zero points), activations in the model dtype.

Numerics (engine_builder/int4.py defines the layout): for output n and group j of g inputs,

    y[m, n] = sum_j  s[j, n] * (sum_{k in j} q[n, k] * x[m, k])  +  z[j, n] * (sum_{k in j} x[m, k])

in fp32, rounded to the model dtype once: exactly x @ (q * s + z)^T evaluated in fp32, up to the
order of the additions.

Kernel layout (``repack`` makes it at load time from the engine's packing): int32 [K/8, N], the
transpose of a packed row: group j of g inputs is g/8 word rows, and nibble i (bits 4i..4i+3) of
word row j*g/8 + w holds, for every output n, u = q + 8 of input k = j*g + i*(g/8) + w. A warp
reads a word row across consecutive outputs (coalesced), each thread keeps its outputs' partial
sums in registers over all of K (one reduction across threads at the end), and for each nibble
the word rows of a step meet a contiguous slice of x.

Dequantization costs two integer ops per weight and no conversion instruction: moving the nibble
to mantissa bits 19..22 and or-ing in the exponent of 1.0 gives the fp32 value 1 + u/16. With
P = sum_i x_k(i) (1 + u_i/16) over a word's eight inputs and X = sum_i x_k(i) their plain sum,
sum_i x_k(i) q_i = 16 P - 24 X, so a word row adds

    16 s P + (z - 24 s) X

to its outputs (s, z of the word's group): two multiply-adds per word on top of one per weight.
The fp32 partial sums keep the cancellation's error at ~2^-20 of sum |x| (the tests bound it
against float64).

``gemv_int4`` (1-8 rows, CUDA cores) takes the fused prologue/epilogue of ``gemv`` (RMSNorm or
SiLU-and-mul of the raw activation, the residual add; the same rounding points) plus an optional
per-input pre-quantization scale. Bigger batches dequantize W to the model dtype
(``dequantize_int4``) for cuBLAS, or run on the tensor-core kernel (kernels/int4_mma.py, 1-32
rows in bf16/fp16) or tinygemm (runtime/quant/int4.py chooses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kiln.engine_builder.int4 import unpack_int4
from kiln.engine_builder.options import INT4_GROUP_SIZES

from ._common import SUPPORTED_DTYPES, KernelInputError, check, check_dtype, next_pow2
from .gemv import MAX_ROWS, _row_rstd, _store

GROUP_SIZES = INT4_GROUP_SIZES  # each a multiple of the 8 inputs of a word
GEMV_UP_TO_ROWS = 0
"""``Int4Linear`` runs products of up to this many rows on ``gemv_int4`` even where tinygemm
takes the linear: none, since on an H200 (scripts/check_int4_gpu.py, Llama-3.1-8B shapes, group
128, 2026-12-01) tinygemm was 1.2-1.4x faster at one row and 1.5-2.6x at two (qkv 9.5 vs 13.5 us,
gate_up 35.1 vs 41.5 us at one row), more than the launches of the norm / SiLU / residual kernels
that gemv_int4 fuses cost."""
GEMV_MAX_ROWS = 2
"""Where tinygemm does not take the linear (fp16 / fp32 activations, shapes it refuses),
products of up to this many rows run on ``gemv_int4`` (the kernel walks the weights once per
row) and bigger ones dequantize W for cuBLAS: on the same H200 table, dequantize + cuBLAS at 16
rows (qkv 37.6 us, down 82.7 us) beat gemv_int4 at four (49.2, 191.5 us) and lost at two (22.5,
51.1 us)."""
TINYGEMM_BELOW_ROWS = 32
"""With ``KILN_INT4_SMALL=tinygemm`` (or no tensor-core kernel: kernels/int4_mma.py is the default
below 33 rows), products of more than ``GEMV_UP_TO_ROWS`` and fewer than this many rows run on
PyTorch's tinygemm where it takes the linear (runtime/quant/tinygemm.py: bf16, sm >= 80); on an H200
(scripts/bench_int4_tinygemm_gpu.py, Llama-3.1-8B shapes, 2026-11-30) dequantize + cuBLAS was
faster from 32 rows (qkv 35.0 vs 61.4 us; gate_up 159.5 vs 261.2 us)."""
_ONE = tl.constexpr(0x3F800000)  # fp32 bits of 1.0
_MANTISSA_NIBBLE = tl.constexpr(0x780000)  # mantissa bits 19..22: u / 16 once the exponent is 1.0's


@dataclass(frozen=True)
class Int4GemvConfig:
    """Launch shape of ``gemv_int4``: BLOCK_N outputs per program, each K step ``groups_per_step``
    groups (g/8 word rows each) of those outputs."""

    block_n: int
    groups_per_step: int = 1
    num_warps: int = 4
    num_stages: int = 3


# Tuned on an H200 (Triton 3.6, torch 2.11; scripts/check_int4_gpu.py --sweep of 165 launch shapes,
# bf16, group 128 with zero points, each shape with its decode fusion, graph-timed over distinct
# weight copies; 2026-12-01). Key: (N, K, group, m_class); other shapes use the heuristic.
TUNED_GEMV: dict[tuple[int, int, int, str], Int4GemvConfig] = {
    (6144, 4096, 128, "m1"): Int4GemvConfig(16, 4, 4, 3),  # Llama-3.1-8B qkv
    (6144, 4096, 128, "m2"): Int4GemvConfig(16, 4, 4, 3),
    (4096, 4096, 128, "m1"): Int4GemvConfig(16, 8, 2, 3),  # o_proj
    (4096, 4096, 128, "m2"): Int4GemvConfig(16, 8, 8, 4),
    (28672, 4096, 128, "m1"): Int4GemvConfig(32, 2, 4, 3),  # gate_up
    (28672, 4096, 128, "m2"): Int4GemvConfig(32, 2, 4, 3),
    (4096, 14336, 128, "m1"): Int4GemvConfig(16, 8, 8, 3),  # down
    (4096, 14336, 128, "m2"): Int4GemvConfig(16, 8, 8, 3),
}


def _m_class(m: int) -> str:
    return "m1" if m == 1 else "m2" if m == 2 else "m8"


def pick_gemv_config(n: int, k: int, m: int, group: int) -> Int4GemvConfig:
    """Tuned launch shape, or the heuristic (the tuned shapes' pattern): 16 outputs per program,
    ~512-1024 inputs per step."""
    tuned = TUNED_GEMV.get((n, k, group, _m_class(m)))
    if tuned is not None:
        return tuned
    return Int4GemvConfig(block_n=16, groups_per_step=_pow2_floor(max(1, min(1024 if k > 4096 else 512, k) // group)),
                          num_warps=8 if k > 4096 else 4, num_stages=3)


def _pow2_floor(v: int) -> int:
    return 1 << (int(v).bit_length() - 1)


def _dividing(groups: int, num_groups: int) -> int:
    """The largest power of two <= ``groups`` dividing ``num_groups`` (steps then take no masks)."""
    while num_groups % groups:
        groups //= 2
    return groups


# ----------------------------------------------------------------------------- layout


def repack(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """The engine's packing (int8 [N, K/2], byte j = columns 2j (low nibble) and 2j+1, two's
    complement) -> the kernels' (int32 [K/8, N], see the module docstring), on packed's device."""
    n, half_k = packed.shape
    k = half_k * 2
    u = unpack_int4(packed).to(torch.int32) + 8  # u = q + 8 in [0, 15], [N, K]
    u = u.reshape(n, k // group_size, 8, group_size // 8)  # [n, group, nibble i, word w]
    shifts = (torch.arange(8, device=packed.device, dtype=torch.int32) * 4).view(1, 1, 8, 1)
    words = (u << shifts).sum(dim=2, dtype=torch.int64)  # disjoint bits: the sum is the or
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).reshape(n, k // 8)
    return words.t().contiguous()


@triton.jit
def _nibble(words, i):
    """Nibble ``i`` of each int32 word as the fp32 value 1 + u/16 (exact in every float dtype)."""
    return ((((words >> (4 * i)) << 19) & _MANTISSA_NIBBLE) | _ONE).to(tl.float32, bitcast=True)


@triton.jit
def _x_row(x_ptr, norm_ptr, p_ptr, rstd_r, r, stride_xm, M, K, offs, NORM: tl.constexpr, SILU_MUL: tl.constexpr,
           PREQUANT: tl.constexpr):
    """Row r of the prologue's x' at ``offs`` (any shape, all < K) in fp32, rounded to the model
    dtype where the unfused chain rounds (``gemv``'s prologue, then the pre-quantization scale);
    zeros for a row past M."""
    ok = (offs * 0 + r) < M
    ptrs = x_ptr + r * stride_xm + offs
    x = tl.load(ptrs, mask=ok, other=0.0)
    if SILU_MUL:
        gate = x.to(tl.float32)
        up = tl.load(ptrs + K, mask=ok, other=0.0).to(tl.float32)
        x = (gate * tl.sigmoid(gate) * up).to(x.dtype)
    if NORM:
        x = (x.to(tl.float32) * rstd_r * tl.load(norm_ptr + offs).to(tl.float32)).to(x.dtype)
    if PREQUANT:
        x = (x.to(tl.float32) * tl.load(p_ptr + offs).to(tl.float32)).to(x.dtype)
    return x.to(tl.float32)


# ----------------------------------------------------------------------------- GEMV (1-8 rows)


@triton.jit(do_not_specialize=["M"])  # the row count only masks; one compile per tile shape
def _gemv_int4_kernel(x_ptr, w_ptr, s_ptr, z_ptr, p_ptr, out_ptr, norm_ptr, res_ptr, M, N, K, stride_xm,
                      stride_om, stride_rm, eps, GROUP: tl.constexpr, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, NORM: tl.constexpr, SILU_MUL: tl.constexpr,
                      RESIDUAL: tl.constexpr, ZERO: tl.constexpr, PREQUANT: tl.constexpr, ROWS: tl.constexpr,
                      NORM_BK: tl.constexpr, NUM_STAGES: tl.constexpr):
    WORDS: tl.constexpr = GROUP // 8
    STEP: tl.constexpr = GROUPS * WORDS  # word rows per K step
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    wr = tl.arange(0, STEP)  # word row within the step
    # x offsets of nibble 0 for each word row (+ i * WORDS for nibble i), and the row's group
    x_offs = (wr // WORDS) * GROUP + wr % WORDS
    w_ptrs = w_ptr + wr[:, None] * N + offs_n[None, :]
    sz_ptrs = (wr // WORDS)[:, None] * N + offs_n[None, :]
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if NORM:
        rstd = _row_rstd(x_ptr, stride_xm, M, K, eps, BLOCK_M, ROWS, NORM_BK, NUM_STAGES)
    cols = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for r in tl.static_range(ROWS):
        rstd_r = tl.sum(tl.where(cols == r, rstd, 0.0))
        part = tl.zeros([STEP, BLOCK_N], dtype=tl.float32)
        for g0 in tl.range(0, K // GROUP, GROUPS, num_stages=NUM_STAGES):  # GROUPS divides the group count
            row0 = g0 * WORDS
            if EVEN_N:
                words = tl.load(w_ptrs + row0 * N)
                s = tl.load(s_ptr + g0 * N + sz_ptrs).to(tl.float32)
            else:
                words = tl.load(w_ptrs + row0 * N, mask=n_ok[None, :], other=0)
                s = tl.load(s_ptr + g0 * N + sz_ptrs, mask=n_ok[None, :], other=0.0).to(tl.float32)
            p = tl.zeros([STEP, BLOCK_N], dtype=tl.float32)
            xs = tl.zeros([STEP], dtype=tl.float32)
            for i in tl.static_range(8):
                xi = _x_row(x_ptr, norm_ptr, p_ptr, rstd_r, r, stride_xm, M, K, g0 * GROUP + x_offs + i * WORDS,
                            NORM, SILU_MUL, PREQUANT)
                p += _nibble(words, i) * xi[:, None]
                xs += xi
            zc = -24.0 * s
            if ZERO:
                if EVEN_N:
                    zc += tl.load(z_ptr + g0 * N + sz_ptrs).to(tl.float32)
                else:
                    zc += tl.load(z_ptr + g0 * N + sz_ptrs, mask=n_ok[None, :], other=0.0).to(tl.float32)
            part += (16.0 * s) * p + zc * xs[:, None]
        acc += tl.where(cols[None, :] == r, tl.sum(part, 0)[:, None], 0.0)
    _store(out_ptr, res_ptr, acc, offs_n, M, N, stride_om, stride_rm, BLOCK_M, RESIDUAL)


def gemv_int4(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              group_size: int, *, prequant: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
              eps: float = 1e-5, silu_mul: bool = False, residual: torch.Tensor | None = None,
              out: torch.Tensor | None = None, config: Int4GemvConfig | None = None) -> torch.Tensor:
    """out[M, N] = x' @ W^T (+ residual) for 1 <= M <= 8; W from ``weight`` (int32 [K/8, N] in the
    kernel layout, see ``repack``), ``scales``/``zeros`` [K/g, N] in x's dtype (zeros None:
    symmetric). x' = prequant * prologue(x) where the prologue is ``gemv``'s: rms_norm with
    ``norm_weight``, silu_and_mul with ``silu_mul`` (x is [M, 2K] then), else x; each step rounds
    to x's dtype. out may alias residual, never x."""
    m, n, k = _check(x, weight, scales, zeros, group_size, silu_mul)
    check(m <= MAX_ROWS, f"gemv_int4 takes at most {MAX_ROWS} rows, got {m}: dequantize_int4 + a GEMM for more")
    check(not (silu_mul and norm_weight is not None), "gemv_int4: silu_mul and norm_weight cannot be combined")
    for name, t in (("norm_weight", norm_weight), ("prequant", prequant)):
        check(t is None or (t.shape == (k,) and t.is_contiguous() and t.device == x.device),
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
    groups = _dividing(_pow2_floor(max(1, min(cfg.groups_per_step, k // group_size))), k // group_size)
    res = residual if residual is not None else out
    _gemv_int4_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, weight, scales, zeros if zeros is not None else scales, prequant if prequant is not None else scales,
        out, norm_weight if norm_weight is not None else scales, res, m, n, k, x.stride(0), out.stride(0),
        res.stride(0), float(eps), GROUP=group_size, GROUPS=groups, BLOCK_M=rows, BLOCK_N=cfg.block_n,
        EVEN_N=n % cfg.block_n == 0, NORM=norm_weight is not None, SILU_MUL=silu_mul, RESIDUAL=residual is not None,
        ZERO=zeros is not None, PREQUANT=prequant is not None, ROWS=rows, NORM_BK=min(4096 // rows, next_pow2(k)),
        NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


# ----------------------------------------------------------------------------- dequantize (large M)


@triton.jit
def _dequantize_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, stride_on, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                       ZERO: tl.constexpr):
    WORDS: tl.constexpr = GROUP // 8
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    n_ok = offs_n < N
    ww = tl.arange(0, WORDS)
    words = tl.load(w_ptr + (g * WORDS + ww)[None, :] * N + offs_n[:, None], mask=n_ok[:, None], other=0)
    s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    zc = -24.0 * s  # W = s q + z = 16 s (1 + u/16) + (z - 24 s)
    if ZERO:
        zc += tl.load(z_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    rows = out_ptr + offs_n.to(tl.int64)[:, None] * stride_on + g * GROUP + ww[None, :]
    for i in tl.static_range(8):
        w = (16.0 * s) * _nibble(words, i) + zc
        tl.store(rows + i * WORDS, w.to(out_ptr.dtype.element_ty), mask=n_ok[:, None])


def dequantize_int4(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int) -> torch.Tensor:
    """W [N, K] = q * s + z (fp32, rounded to the scales' dtype) from the kernel layout: for
    batches large enough that cuBLAS on W beats the GEMV despite writing and reading W."""
    x = torch.empty((0, weight.shape[0] * 8), dtype=scales.dtype, device=weight.device)
    _, n, k = _check(x, weight, scales, zeros, group_size, False)
    out = torch.empty((n, k), dtype=scales.dtype, device=weight.device)
    block_n = 32
    _dequantize_kernel[(triton.cdiv(n, block_n), k // group_size)](
        weight, scales, zeros if zeros is not None else scales, out, n, out.stride(0), GROUP=group_size,
        BLOCK_N=block_n, ZERO=zeros is not None, num_warps=4)
    return out


def _check(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
           group_size: int, silu_mul: bool) -> tuple[int, int, int]:
    """(M, N, K) after checking the shared arguments; KernelInputError names the first problem."""
    check(x.dim() == 2 and weight.dim() == 2, f"x [M, K] and weight [K/8, N] expected, got {tuple(x.shape)} and "
          f"{tuple(weight.shape)}")
    check(group_size in GROUP_SIZES, f"group size {group_size} not supported (choose from {GROUP_SIZES})")
    k, n = weight.shape[0] * 8, weight.shape[1]
    check(weight.dtype == torch.int32 and weight.is_contiguous(), f"weight must be int32 [K/8, N] in the kernel "
          f"layout (repack), contiguous, got {weight.dtype} strides {weight.stride()}")
    check(k > 0 and k % group_size == 0, f"K = {k} is not a positive multiple of the group size {group_size}")
    want = 2 * k if silu_mul else k
    check(x.shape[1] == want, f"x must be [M, {want}] for weight [{k // 8}, {n}] packed"
          f"{' with silu_mul' if silu_mul else ''}, got {tuple(x.shape)}")
    check_dtype("x", x)
    check(x.stride(1) == 1, "x must be contiguous in its last dimension")
    for name, t in (("scales", scales), ("zeros", zeros)):
        check(t is None or (t.shape == (k // group_size, n) and t.dtype == x.dtype and t.is_contiguous()),
              f"{name} must be contiguous [{k // group_size}, {n}] {x.dtype}, got "
              f"{None if t is None else (tuple(t.shape), t.dtype)}")
    return x.shape[0], n, k


__all__ = ["GEMV_MAX_ROWS", "GEMV_UP_TO_ROWS", "GROUP_SIZES", "MAX_ROWS", "Int4GemvConfig", "KernelInputError", "SUPPORTED_DTYPES",
           "TINYGEMM_BELOW_ROWS", "dequantize_int4", "gemv_int4", "pick_gemv_config", "repack"]
