"""Small-batch GEMV (M <= 8 rows) with the decode step's element-wise work fused in.

Decode at batch 1..8 reads every weight once per token and does almost no arithmetic, so the
matrix products are bound by weight bytes; the element-wise kernels around them (RMSNorm,
SiLU-and-mul, residual add) cost a launch and a round trip each. This kernel folds them in:

    prologue  NORM      x <- dtype(x * rsqrt(mean(x^2) + eps) * norm_weight)   (rms of the row in fp32)
              SILU_MUL  x <- dtype(silu(g) * u) for x = [g | u] of width 2K
    dot       acc = x @ W^T in fp32 (W is [N, K] row-major, as F.linear takes it)
    epilogue  out = dtype(acc), or with RESIDUAL out = dtype(residual + dtype(acc)) in fp32

The rounding points are those of the unfused chain (norm kernel writes the model dtype, cuBLAS
reads it; the GEMM result is rounded before the next residual add), so the two agree to within
accumulation order. Each program owns BLOCK_N output columns for all M rows and walks all of K:
no split-K, so no atomics and no second reduce launch. A NORM program first makes one pass over
its rows to get their rms (M x K elements, L2-resident) before the weight loop. Each K step runs
either as a tensor-core dot (rows padded to 16) or as fp32 multiply-adds on the CUDA cores
(GemvConfig.use_dot); the prologue is redone by every program, so it is kept to the real rows.

FP8 weights (``gemv_fp8``): W is float8_e4m3fn [N, K] and the prologue's x (in the model dtype)
is rounded through fp8 with the linear's static input scale, x8 = fp8(clamp(x * inv_scale)),
exactly as the big-batch path's fused norm / SiLU / quantize kernels store it; the product of
the fp8 values (exact in the model dtype) is accumulated in fp32 and multiplied by
out_scale = s_x * s_w before the epilogue, as ``torch._scaled_mm`` does. So the small-batch and
big-batch paths compute the same function, and the weight read is half of bf16's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (SUPPORTED_DTYPES, KernelInputError, check, check_dtype, check_scale, device_shared_memory,
                      dot_precision, next_pow2, to_fp8, upcast_dots)

MAX_ROWS = 8
"""Largest M the kernel takes; larger batches belong to a tiled GEMM (cuBLAS)."""
FASTER_UP_TO_ROWS = 2
"""Largest M at which the fused GEMV chain beat the unfused one on an H100 (one CUDA graph of the
32 Llama-3.1-8B layers + lm_head: M=1 -0.25..-0.45 ms, M=2 -0.07 ms, M=4/8 +0.43..0.47 ms)."""
K_MULTIPLE = 16
"""The input width K must be a multiple of this (the dot tiles)."""


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape: BLOCK_N output columns per program, K walked in BLOCK_K steps.

    use_dot=True computes each step as a tensor-core product against the rows padded to 16;
    use_dot=False as fp32 multiplies and sums on the CUDA cores over the real rows only.
    """

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool = True


def m_class(m: int) -> str:
    """Row-count bucket of the tuning table."""
    return "m1" if m == 1 else "m2" if m == 2 else "m8"


# Tuned on an H100 80GB HBM3 (Triton 3.6, torch 2.11; scripts/bench_gemv_gpu.py sweep of 46-62
# configs per entry, bf16, graph-timed over 32 weight copies). Key: (N, K, m_class(M)); a missing
# "m2" entry falls back to "m8". Other shapes use _heuristic, which follows the same pattern.
TUNED: dict[tuple[int, int, str], GemvConfig] = {
    (6144, 4096, "m1"): GemvConfig(8, 1024, 4, 2, False),  # Llama-3.1-8B qkv
    (6144, 4096, "m8"): GemvConfig(64, 256, 4, 4, True),
    (4096, 4096, "m1"): GemvConfig(4, 1024, 4, 2, False),  # o_proj
    (4096, 4096, "m8"): GemvConfig(64, 256, 4, 4, True),
    (28672, 4096, "m1"): GemvConfig(4, 2048, 4, 3, False),  # gate_up
    (28672, 4096, "m8"): GemvConfig(128, 128, 8, 3, True),
    (4096, 14336, "m1"): GemvConfig(4, 1024, 4, 2, False),  # down
    (4096, 14336, "m2"): GemvConfig(8, 1024, 4, 2, False),
    (4096, 14336, "m8"): GemvConfig(64, 256, 4, 3, True),
    (128256, 4096, "m1"): GemvConfig(4, 2048, 4, 3, False),  # lm_head
    (128256, 4096, "m8"): GemvConfig(128, 128, 8, 3, True),
}


# FP8 weights, tuned on an H200 (Triton 3.6, torch 2.11; scripts/check_fp8_gpu.py --sweep, 2026-11-30,
# bf16 activations, graph-timed over distinct weight copies; Llama-3.1-8B and 70B tp 1 shapes).
# Other shapes use the heuristic, which keeps the bf16 tiles' bytes per weight load.
TUNED_FP8: dict[tuple[int, int, str], GemvConfig] = {
    (6144, 4096, "m1"): GemvConfig(16, 2048, 4, 2, False),  # Llama-3.1-8B qkv
    (6144, 4096, "m2"): GemvConfig(4, 2048, 4, 2, False),
    (6144, 4096, "m8"): GemvConfig(64, 256, 4, 3, True),
    (4096, 4096, "m1"): GemvConfig(8, 2048, 4, 2, False),  # o_proj
    (4096, 4096, "m2"): GemvConfig(4, 2048, 4, 2, False),
    (4096, 4096, "m8"): GemvConfig(32, 256, 4, 3, True),
    (28672, 4096, "m1"): GemvConfig(16, 2048, 4, 2, False),  # gate_up
    (28672, 4096, "m2"): GemvConfig(128, 128, 8, 3, True),
    (28672, 4096, "m8"): GemvConfig(128, 128, 8, 3, True),
    (4096, 14336, "m1"): GemvConfig(16, 2048, 4, 3, False),  # down
    (4096, 14336, "m2"): GemvConfig(4, 2048, 4, 3, False),
    (4096, 14336, "m8"): GemvConfig(32, 256, 4, 3, True),
    (10240, 8192, "m1"): GemvConfig(16, 2048, 4, 2, False),  # Llama-3.1-70B qkv
    (10240, 8192, "m2"): GemvConfig(4, 2048, 4, 2, False),
    (10240, 8192, "m8"): GemvConfig(128, 512, 8, 3, True),
    (8192, 8192, "m1"): GemvConfig(16, 2048, 4, 2, False),  # o_proj
    (8192, 8192, "m2"): GemvConfig(4, 2048, 4, 2, False),
    (8192, 8192, "m8"): GemvConfig(64, 256, 4, 3, True),
    (57344, 8192, "m1"): GemvConfig(16, 2048, 4, 2, False),  # gate_up
    (57344, 8192, "m2"): GemvConfig(128, 128, 8, 3, True),
}


def _heuristic(n: int, k: int, m: int, fp8: bool = False) -> GemvConfig:
    # One row: CUDA cores, narrow and deep tiles (the best one-row shape for all five tuned
    # problems, within 2%). More rows: tensor cores on 64-wide tiles.
    if m == 1:
        return GemvConfig(8, min(2048 if fp8 else 1024, next_pow2(k)), 4, 2, False)
    return GemvConfig(64, max(16, min(256, next_pow2(k))), 4, 4, True)


SMEM_SLACK = 24 * 1024
"""Shared memory left to the compiler's own scratch (reductions, layout conversions, the norm
prologue): an fp32 launch that failed on an H200 asked for 19 KB beyond its staged tiles."""


def pick_config(n: int, k: int, m: int, fp8: bool = False, weight_bytes: int = 2, x_bytes: int = 2,
                shared_memory: int = 232448) -> GemvConfig:
    """The tuned launch shape for this problem, or the heuristic one, fitted to shared memory.

    The tables are tuned on Hopper for bf16 (2-byte) and FP8 (1-byte) weights with bf16
    activations; fp32 (4-byte) operands, or a GPU with less shared memory per block, take the
    same tiles with fewer pipeline stages (or shorter K steps) so the staged tiles fit.
    """
    mc = m_class(m)
    table = TUNED_FP8 if fp8 else TUNED
    cfg = table.get((n, k, mc)) or (mc == "m2" and table.get((n, k, "m8"))) or _heuristic(n, k, m, fp8)
    return fit_shared_memory(cfg, 1 if fp8 else weight_bytes, x_bytes, m, shared_memory)


def fit_shared_memory(cfg: GemvConfig, weight_bytes: int, x_bytes: int, m: int, shared_memory: int) -> GemvConfig:
    """``cfg`` with its stages, then its K step, cut until the pipelined tiles fit.

    Triton keeps num_stages - 1 buffers in flight, each a [BLOCK_N, BLOCK_K] weight tile and a
    [rows, BLOCK_K] x tile (rows = 16 for the tensor-core dot, the real row count on the CUDA cores).
    """
    stages, block_k = cfg.num_stages, cfg.block_k
    rows = 16 if cfg.use_dot else next_pow2(m)
    budget = shared_memory - SMEM_SLACK

    def staged() -> int:
        return (stages - 1) * block_k * (cfg.block_n * weight_bytes + rows * x_bytes)

    while staged() > budget and stages > 2:
        stages -= 1
    while staged() > budget and block_k > K_MULTIPLE:
        block_k //= 2
    if (stages, block_k) == (cfg.num_stages, cfg.block_k):
        return cfg
    return GemvConfig(cfg.block_n, block_k, cfg.num_warps, stages, cfg.use_dot)


@triton.jit
def _load_x(x_ptr, stride_xm, rows, row_ok, offs_k, k_ok, K, SILU_MUL: tl.constexpr):
    """x tile [BLOCK_K, len(rows)] (K down, the batch rows across); rows past M are zero."""
    ptrs = x_ptr + rows[None, :] * stride_xm + offs_k[:, None]
    # The x tile is small (M x BLOCK_K, L2-resident), so it is always fully masked.
    mask = row_ok[None, :] & k_ok[:, None]
    x = tl.load(ptrs, mask=mask, other=0.0)
    if SILU_MUL:
        gate = x.to(tl.float32)
        up = tl.load(ptrs + K, mask=mask, other=0.0).to(tl.float32)
        x = (gate * tl.sigmoid(gate) * up).to(x.dtype)
    return x


@triton.jit
def _row_rstd(x_ptr, stride_xm, M, K, eps, BLOCK_M: tl.constexpr, ROWS: tl.constexpr, NORM_BK: tl.constexpr,
              NUM_STAGES: tl.constexpr):
    """rsqrt(mean(x^2) + eps) per row in fp32 as a [BLOCK_M] vector (0 for padded rows).

    Every program runs this before its first weight load, so it is kept to few, wide, pipelined
    steps over just the real rows (ROWS = next_pow2(M), not the 16 of the dot tile)."""
    r = tl.arange(0, ROWS)
    offs = tl.arange(0, NORM_BK)
    ptrs = x_ptr + r[:, None] * stride_xm + offs[None, :]
    sumsq = tl.zeros([ROWS, NORM_BK], dtype=tl.float32)
    for k0 in tl.range(0, K, NORM_BK, num_stages=NUM_STAGES):
        x = tl.load(ptrs + k0, mask=(r < M)[:, None] & (k0 + offs < K)[None, :], other=0.0).to(tl.float32)
        sumsq += x * x
    rstd = tl.math.rsqrt(tl.sum(sumsq, 1) / K + eps)
    rows = tl.arange(0, BLOCK_M)
    return tl.sum(tl.where((rows[:, None] == r[None, :]) & (r < M)[None, :], rstd[None, :], 0.0), 1)


@triton.jit
def _x_step(x_ptr, norm_ptr, rstd, stride_xm, M, K, offs_k, k_ok, BLOCK_M: tl.constexpr, EVEN_K: tl.constexpr,
            NORM: tl.constexpr, SILU_MUL: tl.constexpr):
    """One K step of the prologue: the [BLOCK_K, BLOCK_M] x tile as the dot reads it (model dtype).

    With the tensor-core dot the SiLU runs on all 16 padded rows: every program redoes it, which
    makes the fused SiLU slow for M >= 2 on that path (measured; narrowing it to the real rows
    with join/permute/reshape was slower still), so down uses the CUDA-core path at M = 2."""
    rows = tl.arange(0, BLOCK_M)
    x = _load_x(x_ptr, stride_xm, rows, rows < M, offs_k, k_ok, K, SILU_MUL)
    if NORM:
        if EVEN_K:
            g = tl.load(norm_ptr + offs_k).to(tl.float32)
        else:
            g = tl.load(norm_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        # Rounded to the model dtype before the dot, as the unfused norm kernel stores it.
        x = (x.to(tl.float32) * rstd[None, :] * g[:, None]).to(x.dtype)
    return x


@triton.jit(do_not_specialize=["M"])  # the row count only masks; one compile for every M of a tile
def _gemv_kernel(x_ptr, w_ptr, out_ptr, norm_ptr, res_ptr, inv_ptr, scale_ptr, M, N, K, stride_xm, stride_wn,
                 stride_om, stride_rm, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, NORM: tl.constexpr, SILU_MUL: tl.constexpr, RESIDUAL: tl.constexpr,
                 USE_DOT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, ROWS: tl.constexpr,
                 NORM_BK: tl.constexpr, NUM_STAGES: tl.constexpr, FP8: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Columns past N re-read row N-1 (always in bounds, so the weight loads need no mask); their
    # results are dropped at the store.
    w_rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64)[:, None] * stride_wn
    offs = tl.arange(0, BLOCK_K)
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if NORM:
        rstd = _row_rstd(x_ptr, stride_xm, M, K, eps, BLOCK_M, ROWS, NORM_BK, NUM_STAGES)
    inv_scale = 1.0
    if FP8:
        inv_scale = tl.load(inv_ptr)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    # An explicit stage count also pipelines the loads of the CUDA-core path (no dot in the loop).
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        offs_k = k0 + offs
        k_ok = offs_k < K
        if EVEN_K:
            w = tl.load(w_rows + offs_k[None, :])
        else:
            w = tl.load(w_rows + offs_k[None, :], mask=k_ok[None, :], other=0.0)
        x = _x_step(x_ptr, norm_ptr, rstd, stride_xm, M, K, offs_k, k_ok, BLOCK_M, EVEN_K, NORM, SILU_MUL)
        if FP8:  # x rounded through fp8 and both operands in the model dtype (exact) for the dot
            x = to_fp8(x.to(tl.float32), inv_scale).to(x_ptr.dtype.element_ty)
            if USE_DOT:
                w = w.to(x_ptr.dtype.element_ty)
        if USE_DOT:
            if UPCAST:
                acc += tl.dot(w.to(tl.float32), x.to(tl.float32), input_precision=PREC)
            else:
                acc += tl.dot(w, x, input_precision=PREC)
        elif BLOCK_M == 1:
            acc += tl.sum(w.to(tl.float32) * tl.reshape(x.to(tl.float32), [1, BLOCK_K]), 1)[:, None]
        else:  # CUDA cores for a few rows: [BLOCK_N, BLOCK_K, BLOCK_M] products summed over K
            acc += tl.sum(w.to(tl.float32)[:, :, None] * x.to(tl.float32)[None, :, :], 1)
    if FP8:
        acc = acc * tl.load(scale_ptr)
    _store(out_ptr, res_ptr, acc, offs_n, M, N, stride_om, stride_rm, BLOCK_M, RESIDUAL)


@triton.jit
def _store(out_ptr, res_ptr, acc, offs_n, M, N, stride_om, stride_rm, BLOCK_M: tl.constexpr,
           RESIDUAL: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    mask = (offs_n < N)[:, None] & (rows < M)[None, :]
    y = acc.to(out_ptr.dtype.element_ty)
    if RESIDUAL:
        # The GEMM result is rounded to the model dtype first, as the unfused chain stores it.
        h = tl.load(res_ptr + rows[None, :] * stride_rm + offs_n[:, None], mask=mask, other=0.0)
        y = (h.to(tl.float32) + y.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[None, :] * stride_om + offs_n[:, None], y, mask=mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, *, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
         silu_mul: bool = False, residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """out[M, N] = x' @ weight^T (+ residual) for 1 <= M <= 8, see the module docstring.

    x is [M, K] ([M, 2K] = [gate | up] with silu_mul), weight [N, K]; norm_weight [K] turns on the
    RMSNorm prologue; residual [M, N] the residual-add epilogue. out may alias residual (each
    program reads its residual tile before writing the same tile), never x. K must be a multiple
    of K_MULTIPLE.
    """
    return _gemv(x, weight, None, None, norm_weight, eps, silu_mul, residual, out, config)


def gemv_fp8(x: torch.Tensor, weight: torch.Tensor, inv_scale: torch.Tensor, out_scale: torch.Tensor, *,
             norm_weight: torch.Tensor | None = None, eps: float = 1e-5, silu_mul: bool = False,
             residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
             config: GemvConfig | None = None) -> torch.Tensor:
    """``gemv`` with a float8_e4m3fn weight [N, K]: x' is rounded through fp8 with ``inv_scale``
    (1 / the input scale) and the fp32 product is multiplied by ``out_scale`` (input scale *
    weight scale; both fp32, one element) before the epilogue. Output in x's dtype."""
    check(weight.dtype == torch.float8_e4m3fn, f"gemv_fp8 takes a float8_e4m3fn weight, got {weight.dtype}")
    check_scale("inv_scale", inv_scale, x)
    check_scale("out_scale", out_scale, x)
    return _gemv(x, weight, inv_scale, out_scale, norm_weight, eps, silu_mul, residual, out, config)


def _gemv(x: torch.Tensor, weight: torch.Tensor, inv_scale: torch.Tensor | None, out_scale: torch.Tensor | None,
          norm_weight: torch.Tensor | None, eps: float, silu_mul: bool, residual: torch.Tensor | None,
          out: torch.Tensor | None, config: GemvConfig | None) -> torch.Tensor:
    fp8 = inv_scale is not None
    m, k_in = x.shape if x.dim() == 2 else (0, 0)
    n, k = weight.shape if weight.dim() == 2 else (0, 0)
    ok = (x.dim() == 2 and weight.dim() == 2 and m <= MAX_ROWS and k % K_MULTIPLE == 0 and k > 0
          and k_in == (2 * k if silu_mul else k) and x.dtype in SUPPORTED_DTYPES and (fp8 or weight.dtype == x.dtype)
          and x.stride(1) == 1 and weight.stride(1) == 1 and not (silu_mul and norm_weight is not None)
          and (norm_weight is None or (norm_weight.shape == (k,) and norm_weight.is_contiguous()))
          and (residual is None or _is_output_like(residual, m, n, x.dtype))
          and (out is None or _is_output_like(out, m, n, x.dtype)))
    if not ok:
        _explain_gemv_inputs(x, weight, norm_weight, silu_mul, residual, out, fp8)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    cfg = config or pick_config(n, k, m, fp8, weight.element_size(), x.element_size(), device_shared_memory(x))
    res = residual if residual is not None else out
    rows = next_pow2(m)
    block_m = 16 if cfg.use_dot else rows  # the tensor-core dot wants 16 rows
    scales = (inv_scale, out_scale) if fp8 else (out, out)  # unused pointers when not fp8
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, weight, out, norm_weight if norm_weight is not None else weight, res, *scales, m, n, k, x.stride(0),
        weight.stride(0), out.stride(0), res.stride(0), float(eps),
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0,
        NORM=norm_weight is not None, SILU_MUL=silu_mul, RESIDUAL=residual is not None, USE_DOT=cfg.use_dot,
        UPCAST=upcast_dots(x), PREC=dot_precision(x.dtype), ROWS=rows, NORM_BK=min(4096 // rows, next_pow2(k)),
        NUM_STAGES=cfg.num_stages, FP8=fp8, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _is_output_like(t: torch.Tensor, m: int, n: int, dtype: torch.dtype) -> bool:
    return t.shape == (m, n) and t.dtype == dtype and t.stride(1) == 1


def _explain_gemv_inputs(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None,
                         silu_mul: bool, residual: torch.Tensor | None, out: torch.Tensor | None, fp8: bool) -> None:
    check(x.dim() == 2 and weight.dim() == 2,
          f"gemv takes x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    m, n, k = x.shape[0], weight.shape[0], weight.shape[1]
    check(m <= MAX_ROWS, f"gemv takes at most {MAX_ROWS} rows, got {m}: use a GEMM (F.linear)")
    check(k > 0 and k % K_MULTIPLE == 0, f"gemv needs K a positive multiple of {K_MULTIPLE}, got weight [{n}, {k}]")
    check(not (silu_mul and norm_weight is not None), "gemv: silu_mul and norm_weight cannot be combined")
    want = 2 * k if silu_mul else k
    check(x.shape[1] == want, f"x must be [M, {want}] for weight [{n}, {k}]"
          f"{' with silu_mul' if silu_mul else ''}, got {tuple(x.shape)}")
    check_dtype("x", x)
    check(fp8 or weight.dtype == x.dtype, f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    check(x.stride(1) == 1 and weight.stride(1) == 1, "x and weight must be contiguous in their last dimension")
    if norm_weight is not None:
        check(norm_weight.shape == (k,) and norm_weight.is_contiguous(),
              f"norm_weight must be contiguous [{k}], got {tuple(norm_weight.shape)}")
    for name, t in (("residual", residual), ("out", out)):
        if t is not None:
            check(_is_output_like(t, m, n, x.dtype), f"{name} must be [{m}, {n}] {x.dtype} with unit last stride, "
                  f"got {tuple(t.shape)} {t.dtype} strides {t.stride()}")
    raise KernelInputError("gemv: inputs rejected")
