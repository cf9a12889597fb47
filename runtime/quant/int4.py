"""W4A16 linears: INT4 weights in groups along the input (TensorRT-LLM's ``W4A16_AWQ`` / ``W4A16``
layout, engine_builder/int4.py), activations and outputs in the model dtype.

Numerics (one definition every path follows): W = q * s + z per group in fp32, x' = dtype(x * p)
when the engine has pre-quantization scales p (else x' = x), y = dtype(x' @ W^T) accumulated in
fp32. On the Triton kernel set, products of up to ``Int4Ops.gemv_up_to_rows`` rows run on
``gemv_int4`` (the fused small-batch path adds gemv's norm / SiLU prologue and residual epilogue
and folds p in), and so do those of up to ``max_small_rows`` that tinygemm (below) does not
take; its weights are repacked once at load (``kernels.int4.repack``). Bigger batches multiply
W rounded to the model dtype (``dequantize_int4``) with cuBLAS (a relative difference of at most
2^-9 per weight in bf16). Elsewhere (CPU, or the torch kernel set) the reference
dequantizes W in fp32 and multiplies: exact up to summation order.

Tensor cores (kernels/int4_mma.py, the default): with bf16/fp16 activations on sm >= 80, a
linear with N % 16 == 0 and K % 64 == 0 runs products of 1-``Int4Ops.mma_max_rows`` rows on the
NVRTC-compiled mma kernel (its layout made at load next to Kiln's; ``small`` runs the norm /
SiLU kernel first and fuses the residual). ``KILN_INT4_SMALL=tinygemm`` (or a failed compile) selects
tinygemm instead (quant/tinygemm.py): then a linear whose shape tinygemm takes runs the products
of more than ``gemv_up_to_rows`` and fewer than ``Int4Ops.tinygemm_below_rows`` rows on it. Either
way such a linear keeps two layouts on the GPU: 1 byte per weight instead of 0.5 (half of bf16).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kiln.engine_builder.int4 import GROUP_SIZES, INT4_ALGOS, PREQUANT, SCALE, ZERO, dequantize, unpack_int4
from kiln.runtime.layers import linear_prologue
from kiln.runtime.linear import LinearContext, LinearMethod, TensorGetter, UnsupportedQuantizationError, _required, _to
from kiln.runtime.quant.tinygemm import TinygemmWeight, tinygemm_accepts

MMA_ENV = "KILN_INT4_SMALL"
"""``mma`` (default): bf16/fp16 products of 1-``Int4Ops.mma_max_rows`` rows run on the tensor-core
kernel (kernels/int4_mma.py) where it takes the linear and compiles; ``tinygemm``: the previous
route (tinygemm / Triton GEMV), for comparison."""

# ----------------------------------------------------------------------------- references
# Same signatures as the kernels of kiln.runtime.kernels.int4 (weights in the engine's packing).


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                group_size: int) -> torch.Tensor:
    """x @ W^T in fp32, rounded to x's dtype; W dequantized from the engine's packing."""
    w = dequantize(unpack_int4(packed), scales, zeros, group_size)
    return F.linear(x.float(), w).to(x.dtype)


def fused_linear_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      group_size: int, *, prequant: torch.Tensor | None = None,
                      norm_weight: torch.Tensor | None = None, eps: float = 1e-5, silu_mul: bool = False,
                      residual: torch.Tensor | None = None) -> torch.Tensor:
    """``gemv_int4``'s reference: layers.fused_linear's prologue and epilogue around ``int4_linear``,
    the pre-quantization scale applied (and rounded) after the prologue."""
    x = linear_prologue(x, norm_weight, eps, silu_mul)
    if prequant is not None:
        x = prescale(x, prequant)
    out = int4_linear(x, packed, scales, zeros, group_size)
    if residual is not None:
        out = (residual.float() + out.float()).to(x.dtype)
    return out


def prescale(x: torch.Tensor, prequant: torch.Tensor) -> torch.Tensor:
    """dtype(x * p): the pre-quantization scale of AWQ scales that no previous op absorbed."""
    return (x.float() * prequant.float()).to(x.dtype)


# ----------------------------------------------------------------------------- op selection


@dataclass(frozen=True)
class Int4Ops:
    """The products an INT4 model uses, chosen once: the Triton kernels (taking the repacked
    weight) when the model runs the Triton kernel set, else the references (engine packing)."""

    linear: Callable[..., torch.Tensor] = int4_linear
    small: Callable[..., torch.Tensor] = fused_linear_int4  # 1-8 rows, with the fused prologue/epilogue
    dequantize: Callable[..., torch.Tensor] | None = None  # W in the model dtype, for cuBLAS; None: ``linear``
    repack: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    gemv_up_to_rows: int = 0  # ``apply`` runs ``small`` up to this many rows (tinygemm or not)
    max_small_rows: int = 0  # ... and up to this many where tinygemm does not take the linear; cuBLAS on
    # ``dequantize``'s W above
    fused_layers: bool = False  # whether the model should run its fused small-batch layers on ``small``
    tinygemm_below_rows: int = 0  # bigger products of fewer rows run on tinygemm where it takes the linear
    mma_max_rows: int = 0  # products of 1..this many rows run on kernels/int4_mma.py where it takes the linear


def select_int4_ops(ops: Any) -> Int4Ops:
    if ops.name != "triton":
        return Int4Ops()
    from kiln.runtime.kernels import int4 as k
    from kiln.runtime.kernels import int4_mma

    mode = os.environ.get(MMA_ENV, "mma")
    if mode not in ("mma", "tinygemm"):
        raise ValueError(f"{MMA_ENV}={mode!r}: expected 'mma' or 'tinygemm'")
    return Int4Ops(small=k.gemv_int4, dequantize=k.dequantize_int4, repack=k.repack,
                   gemv_up_to_rows=k.GEMV_UP_TO_ROWS, max_small_rows=k.GEMV_MAX_ROWS, fused_layers=True,
                   tinygemm_below_rows=k.TINYGEMM_BELOW_ROWS,
                   mma_max_rows=int4_mma.MMA_UP_TO_ROWS if mode == "mma" else 0)


# ----------------------------------------------------------------------------- the method


class Int4Linear(LinearMethod):
    """An INT4 linear of this rank: packed weight [N, K/2], ``scales`` (and ``zeros``) [K/g, N] and
    optional ``prequant`` [K], all but the weight in the compute dtype.

    Invariants: g divides K; ``weight`` is in the layout ``int4.small``/``dequantize`` read
    (repacked at load on the Triton path, the engine's packing otherwise); ``tinygemm``, when not None,
    holds the same q, s, z in tinygemm's layout (an extra 0.5 byte per weight: Kiln's layout stays
    for the dequantize + cuBLAS path of big batches); ``mma``, when not None, holds them in the
    tensor-core kernel's layout instead (words, packed scales: kernels/int4_mma.py), and then
    there is no tinygemm weight; ``prepare`` applies ``prequant`` so
    ``apply`` takes x' (``small`` applies it itself); parts joined by ``concat`` share one
    ``prequant`` (they read the same input).
    """

    quant_algo = "W4A16_AWQ"

    def __init__(self, ctx: LinearContext, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 prequant: torch.Tensor | None, group_size: int, repacked: bool = False,
                 tinygemm: TinygemmWeight | None = None,
                 mma: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """``repacked``: ``packed`` is already in the kernels' layout (``concat``), and then
        ``tinygemm`` / ``mma`` are the parts' joined weights, if any (else they are made here)."""
        super().__init__(ctx, scales.shape[0] * group_size, scales.shape[1])  # either layout
        self.int4 = select_int4_ops(ctx.ops)
        self.group_size = group_size
        packed = packed.to(ctx.device).contiguous()
        self.scales = _to(ctx, scales)
        self.zeros = None if zeros is None else _to(ctx, zeros)
        self.prequant = None if prequant is None else _to(ctx, prequant.reshape(-1))
        if not repacked and self.int4.mma_max_rows and _mma_takes(self.out_features, self.in_features,
                                                                  group_size, ctx):
            from kiln.runtime.kernels import int4_mma

            mma = (int4_mma.repack(packed), int4_mma.pack_scales(self.scales, self.zeros))
        if (not repacked and mma is None and self._tinygemm_rows(self.int4.gemv_up_to_rows + 1)
                and tinygemm_accepts(self.out_features, self.in_features, group_size, ctx.dtype, ctx.device)):
            tinygemm = TinygemmWeight.from_engine(packed, self.scales, self.zeros, group_size)
        self.tinygemm = tinygemm
        self.mma = mma
        if self.int4.repack is not None and not repacked:
            packed = self.int4.repack(packed, group_size)
        self.weight = packed

    @classmethod
    def load(cls, ctx: LinearContext, get: TensorGetter, prefix: str) -> Int4Linear:
        quant = ctx.quantization
        group = int(quant.get("group_size") or 128)
        if group not in GROUP_SIZES:
            raise UnsupportedQuantizationError(
                f"group_size {group} is not supported (supported: {', '.join(map(str, GROUP_SIZES))})")
        packed = _required(get, f"{prefix}.weight")
        n, k = packed.shape[0], packed.shape[-1] * 2
        if packed.dtype != torch.int8 or packed.dim() != 2 or k % group:
            raise UnsupportedQuantizationError(
                f"{prefix}.weight is {packed.dtype} {tuple(packed.shape)}; a W4A16 engine stores int8 [out, in/2] "
                f"with in a multiple of group_size {group}")
        scales = _checked(get, f"{prefix}.{SCALE}", (k // group, n))
        zeros = _checked(get, f"{prefix}.{ZERO}", (k // group, n)) if quant.get("has_zero_point") else None
        prequant = _checked(get, f"{prefix}.{PREQUANT}", (1, k)) if quant.get("pre_quant_scale") else None
        if prequant is not None and bool((prequant == 1).all()):
            prequant = None  # an identity scale (the builder folded this linear's): skip the multiply
        return cls(ctx, packed, scales, zeros, prequant, group)

    @classmethod
    def concat(cls, parts: Sequence[LinearMethod]) -> Int4Linear:
        int4_parts: list[Int4Linear] = list(parts)  # type: ignore[arg-type]
        first = int4_parts[0]
        pre = [p.prequant for p in int4_parts]
        if any((a is None) != (pre[0] is None) or (a is not None and not torch.equal(a, pre[0])) for a in pre):
            raise UnsupportedQuantizationError("linears fused into one GEMM have different prequant_scaling_factor")
        zeros = None if first.zeros is None else torch.cat([p.zeros for p in int4_parts], dim=1)
        out_dim = 1 if first.int4.repack is not None else 0  # the kernel layout is [K/8, N], the engine's [N, K/2]
        mma = None
        if all(p.mma is not None for p in int4_parts):  # 16-output tiles outermost; scales side by side
            mma = (torch.cat([p.mma[0] for p in int4_parts]), torch.cat([p.mma[1] for p in int4_parts], dim=1))
        return cls(first.ctx, torch.cat([p.weight for p in int4_parts], dim=out_dim),
                   torch.cat([p.scales for p in int4_parts], dim=1),
                   zeros, pre[0], first.group_size, repacked=True,
                   tinygemm=TinygemmWeight.concat([p.tinygemm for p in int4_parts]), mma=mma)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.prequant is None else prescale(x, self.prequant)

    def _tinygemm_rows(self, rows: int) -> bool:
        """Whether a product of ``rows`` rows belongs to tinygemm (given a tinygemm weight)."""
        return self.int4.gemv_up_to_rows < rows < self.int4.tinygemm_below_rows

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        ops, rows = self.int4, x.shape[0]
        if ops.dequantize is None:
            y = ops.linear(x, self.weight, self.scales, self.zeros, self.group_size)
        elif self.mma is not None and 0 < rows <= ops.mma_max_rows:
            y = self._mma(x)
        elif self.tinygemm is not None and self._tinygemm_rows(rows):
            y = self.tinygemm(x)
        elif rows <= ops.max_small_rows:
            y = ops.small(x, self.weight, self.scales, self.zeros, self.group_size)
        else:
            y = F.linear(x, ops.dequantize(self.weight, self.scales, self.zeros, self.group_size))
        return y if bias is None else y + bias

    @property
    def has_small(self) -> bool:
        return self.int4.fused_layers

    def small(self, x: torch.Tensor, **fused: Any) -> torch.Tensor:
        rows = x.shape[0]
        if self.mma is not None and 0 < rows <= self.int4.mma_max_rows:
            return self._unfused_small(x, self._mma, **fused)
        if self.tinygemm is not None and self._tinygemm_rows(rows):
            return self._unfused_small(x, self._tinygemm_product, **fused)
        return self.int4.small(x, self.weight, self.scales, self.zeros, self.group_size, prequant=self.prequant, **fused)

    def _mma(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor-core kernel (the residual add fused into its epilogue)."""
        from kiln.runtime.kernels.int4_mma import w4a16_mma

        assert self.mma is not None
        return w4a16_mma(x, self.mma[0], self.mma[1], self.group_size, residual=residual)

    def _tinygemm_product(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """tinygemm, then the residual add (a bf16 add rounds once)."""
        assert self.tinygemm is not None
        y = self.tinygemm(x)
        return y if residual is None else y.add_(residual)

    def _unfused_small(self, x: torch.Tensor, product: Callable[..., torch.Tensor], *,
                       norm_weight: torch.Tensor | None = None, eps: float = 1e-5, silu_mul: bool = False,
                       residual: torch.Tensor | None = None) -> torch.Tensor:
        """``small`` around a product that fuses only the residual (tinygemm, the tensor-core
        kernel), rounding where ``fused_linear_int4`` does: Kiln's norm (no residual: one fp32
        pass, one rounding) or SiLU-and-mul kernel, the prequant scale, the product, then the
        residual add (in fp32, rounded once)."""
        if norm_weight is not None:
            x, _ = self.ops.fused_add_rms_norm(x, None, norm_weight, eps)
        elif silu_mul:
            x = self.ops.silu_and_mul(x)
        return product(self.prepare(x), residual=residual)


class Int4RtnLinear(Int4Linear):
    """Round-to-nearest INT4 (``W4A16``): the same layout and products as AWQ's."""

    quant_algo = "W4A16"


assert {Int4Linear.quant_algo, Int4RtnLinear.quant_algo} == set(INT4_ALGOS)


def _mma_takes(n: int, k: int, group_size: int, ctx: LinearContext) -> bool:
    from kiln.runtime.kernels import int4_mma

    return (int4_mma.supported(n, k, group_size, ctx.dtype, ctx.device)
            and int4_mma.available(ctx.dtype, ctx.device.index or 0))


def _checked(get: TensorGetter, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    tensor = _required(get, name)
    if tuple(tensor.shape) != shape or not tensor.dtype.is_floating_point:
        raise UnsupportedQuantizationError(f"{name} is {tensor.dtype} {tuple(tensor.shape)}; expected a float {shape}")
    return tensor
