"""FP8 (E4M3) linears: per-tensor weight and static activation scales, TensorRT-LLM's layout.

Numerics (the one definition every path follows; ``s`` are the engine's dequantization
scales, ``q(v, s) = fp8(clamp(v * (1/s), -448, 448))`` rounds to nearest even):

    x' = the activation as the unquantized chain stores it (model dtype: the RMSNorm output,
         silu(gate) * up, the attention output)
    y  = dtype((q(x', s_x) @ W8^T) * (s_x * s_w))  (+ bias)      W8 = the stored fp8 weight

with the product accumulated in fp32 (on sm_89+ ``_scaled_mm`` uses cuBLASLt's fast accumulation
by default: the tensor cores' own accumulator, not promoted to full fp32 every few k-steps; on
an H200 1.02-1.11x faster on most shapes and row counts (0.90-0.94x at a few), its error against
float64 2.1-4.7e-3 norm-wise instead of 1.7e-3, far below the activations' own fp8 rounding;
``KILN_FP8_FAST_ACCUM``: ``auto``, the default, also checks each shape at start-up
(``tune_accumulation``), ``1`` skips that, ``0`` is off; the GEMV and the CPU reference
accumulate in fp32). The reciprocal 1/s_x is computed once at load, so the kernels and
references multiply by the same fp32 number. The quantization of x' is fused into the kernel
that produces it (add + RMSNorm, SiLU-and-mul; a quantize kernel for attention's output), so no
separate pass reads it back. On sm_89+ GPUs the product is ``torch._scaled_mm`` (cuBLASLt FP8)
and, for 1-8 rows, the Triton GEMV reading fp8 weights with the same prologue rounding;
elsewhere (CPU, older GPUs) it is emulated exactly: fp8 values are exact in the model dtype, so
``F.linear`` on them followed by the scale computes the same function.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kiln.runtime.attention import KernelSet
from kiln.runtime.linear import (LinearContext, LinearMethod, TensorGetter, UnsupportedQuantizationError,
                                 _required)

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (sm_89) and Hopper (sm_90) on


# ----------------------------------------------------------------------------- reference ops
# Same signatures as the Triton kernels that replace them (kiln.runtime.kernels *_fp8).


def quantize_fp8(x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """fp8(clamp(x * inv_scale, -448, 448)), computed in fp32; inv_scale is fp32 of one element."""
    return (x.float() * inv_scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fused_add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                           inv_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q(rms_norm(x + residual)), x + residual). The norm rounds as the Triton kernel (and the
    small-batch GEMV's prologue) does: x * rstd * weight in fp32, rounded once to x's dtype."""
    if residual is not None:
        x = x + residual
    return quantize_fp8(_rms_normed(x, weight, eps), inv_scale), x


def _rms_normed(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def silu_and_mul_fp8(x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """q(silu(x[:, :I]) * x[:, I:]) for x [T, 2I], the product taken in fp32 and rounded once to
    x's dtype before the quantization, as the Triton kernel and the small-batch GEMV's prologue
    do (``layers.silu_and_mul`` rounds twice in a 16-bit dtype: on an H200 that moved ~1.6% of
    the fp8 codes by one step, and every such flip is a whole E4M3 step of the activation)."""
    gate, up = x.float().chunk(2, dim=-1)
    return quantize_fp8((F.silu(gate) * up).to(x.dtype), inv_scale)


def fused_linear_fp8(x: torch.Tensor, weight: torch.Tensor, inv_scale: torch.Tensor, out_scale: torch.Tensor, *,
                     norm_weight: torch.Tensor | None = None, eps: float = 1e-5, silu_mul: bool = False,
                     residual: torch.Tensor | None = None) -> torch.Tensor:
    """The small-batch FP8 GEMV's reference: the prologue of ``layers.fused_linear`` (norm or
    SiLU, rounded to x's dtype), quantized with ``inv_scale``, times the fp8 ``weight`` [N, K]
    in fp32, scaled by ``out_scale`` (= s_x * s_w), rounded, then the fp32 residual add."""
    if norm_weight is not None:
        x = _rms_normed(x, norm_weight, eps)
    elif silu_mul:
        gate, up = x.float().chunk(2, dim=-1)
        x = (F.silu(gate) * up).to(x.dtype)
    out = (F.linear(quantize_fp8(x, inv_scale).float(), weight.float()) * out_scale.float()).to(x.dtype)
    if residual is not None:
        out = (residual.float() + out.float()).to(x.dtype)
    return out


def emulated_scaled_mm(x8: torch.Tensor, weight: torch.Tensor, out_scale: torch.Tensor,
                       bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """(x8 @ weight^T) * out_scale (+ bias) without FP8 hardware: ``weight`` holds the fp8
    values in a wider dtype (exact), the product is taken there and scaled in fp32."""
    y = (F.linear(x8.to(weight.dtype), weight).float() * out_scale).to(out_dtype)
    return y if bias is None else y + bias


# ----------------------------------------------------------------------------- op selection


@dataclass(frozen=True)
class Fp8Ops:
    """The FP8 ops a model uses, chosen once from its KernelSet and device.

    ``native_gemm``: ``torch._scaled_mm`` (sm_89+), else ``emulated_scaled_mm``. ``small``:
    the FP8 GEMV for few rows, or None (the fused small-batch layers are then off).
    """

    quantize: Callable[..., torch.Tensor] = quantize_fp8
    norm_quant: Callable[..., tuple[torch.Tensor, torch.Tensor]] = fused_add_rms_norm_fp8
    silu_quant: Callable[..., torch.Tensor] = silu_and_mul_fp8
    small: Callable[..., torch.Tensor] | None = None
    native_gemm: bool = False
    fast_accum: bool = False
    tune_accum: bool = False  # fast accumulation checked per shape at start-up (KILN_FP8_FAST_ACCUM=auto)
    name: str = "torch"


FAST_ACCUM_ENV = "KILN_FP8_FAST_ACCUM"


def fast_accum_mode() -> str:
    """``KILN_FP8_FAST_ACCUM``: ``auto`` (the default: ``_scaled_mm``'s ``use_fast_accum``, except
    where ``tune_accumulation`` measures it slower), ``1`` (everywhere) or ``0`` (never)."""
    value = os.environ.get(FAST_ACCUM_ENV, "auto")
    if value not in ("auto", "0", "1"):
        raise ValueError(f"{FAST_ACCUM_ENV}={value!r}: expected auto, 0 or 1")
    return value


def has_native_fp8(device: torch.device) -> bool:
    """True on a CUDA device of compute capability 8.9 or newer (FP8 tensor cores)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


_WARNED_EMULATION: set[str] = set()


def select_fp8_ops(ops: KernelSet, device: torch.device) -> Fp8Ops:
    """Triton FP8 kernels when the model runs the Triton kernel set and the device converts to
    fp8 (sm_89+, or the CPU interpreter in tests); ``_scaled_mm`` on sm_89+; else references."""
    native = has_native_fp8(device)
    if device.type == "cuda" and not native:
        key = str(device)
        if key not in _WARNED_EMULATION:
            _WARNED_EMULATION.add(key)
            logger.warning("%s has no FP8 tensor cores (compute capability %s < 8.9): FP8 linears are emulated "
                           "in the model dtype (same results, no speed-up)", device,
                           torch.cuda.get_device_capability(device))
    mode = fast_accum_mode()
    fast = native and mode != "0"
    tune = fast and mode == "auto"
    if ops.name != "triton" or (device.type == "cuda" and not native):
        return Fp8Ops(native_gemm=native, fast_accum=fast, tune_accum=tune)
    from kiln.runtime import kernels

    return Fp8Ops(quantize=kernels.quantize_fp8, norm_quant=kernels.fused_add_rms_norm_fp8,
                  silu_quant=kernels.silu_and_mul_fp8, small=kernels.gemv_fp8, native_gemm=native, fast_accum=fast,
                  tune_accum=tune, name="triton")


# ----------------------------------------------------------------------------- the method


class Fp8Linear(LinearMethod):
    """An FP8 linear: fp8 weight [N, K] (row-major, as stored), weight scale s_w and static input
    scale s_x (fp32, one element each; TensorRT-LLM's ``weights_scaling_factor`` /
    ``activation_scaling_factor``, dequantization scales).

    Invariants: ``norm_input``/``act_input``/``prepare`` return fp8 [T, K] quantized with this
    linear's s_x, which ``apply`` takes; ``out_scale`` = s_x * s_w; a method made by ``concat``
    shares one s_w and one s_x across its parts.
    """

    quant_algo = "FP8"

    def __init__(self, ctx: LinearContext, weight: torch.Tensor, weight_scale: torch.Tensor,
                 input_scale: torch.Tensor) -> None:
        super().__init__(ctx, weight.shape[1], weight.shape[0])
        device = ctx.device
        self.fp8 = select_fp8_ops(ctx.ops, device)
        self.weight = weight.to(device).contiguous()
        self.weight_scale = weight_scale.reshape(1).to(device=device, dtype=torch.float32)
        self.input_scale = input_scale.reshape(1).to(device=device, dtype=torch.float32)
        self.input_inv_scale = 1.0 / self.input_scale
        self.out_scale = self.input_scale * self.weight_scale
        # cuBLASLt FP8 wants K and N multiples of 16; other shapes are emulated (exact, slower).
        self.native = self.fp8.native_gemm and self.in_features % 16 == 0 and self.out_features % 16 == 0
        # Emulation multiplies the fp8 values held exactly in the compute dtype.
        self._weight_compute = None if self.native else self.weight.to(ctx.dtype)
        # Row counts at which the fast accumulation measured slower (tune_accumulation).
        self.exact_accum_rows: frozenset[int] = frozenset()

    @classmethod
    def load(cls, ctx: LinearContext, get: TensorGetter, prefix: str) -> Fp8Linear:
        weight = _required(get, f"{prefix}.weight")
        if weight.dtype != FP8_DTYPE:
            raise UnsupportedQuantizationError(
                f"{prefix}.weight is {weight.dtype}; an FP8 engine stores linear weights as {FP8_DTYPE}")
        scales = [_required(get, f"{prefix}.{name}") for name in ("weights_scaling_factor", "activation_scaling_factor")]
        for name, scale in zip(("weights_scaling_factor", "activation_scaling_factor"), scales):
            if scale.numel() != 1 or not bool(torch.isfinite(scale).all()) or float(scale.reshape(())) <= 0:
                raise UnsupportedQuantizationError(f"{prefix}.{name} must hold one positive finite number (per-tensor FP8)")
        return cls(ctx, weight, *scales)

    @classmethod
    def concat(cls, parts: Sequence[LinearMethod]) -> Fp8Linear:
        """Parts side by side (gate and up): one weight scale (the largest; parts with a smaller
        one are re-quantized to it, exact when the builder wrote them equal, as Kiln's does) and
        one input scale (the largest: the parts read the same activation)."""
        fp8_parts: list[Fp8Linear] = list(parts)  # type: ignore[arg-type]
        w_scale = torch.stack([p.weight_scale for p in fp8_parts]).amax(0)
        x_scale = torch.stack([p.input_scale for p in fp8_parts]).amax(0)
        weights = [p.weight if torch.equal(p.weight_scale, w_scale)
                   else quantize_fp8(p.weight.float() * p.weight_scale, 1.0 / w_scale) for p in fp8_parts]
        return cls(fp8_parts[0].ctx, torch.cat(weights), w_scale, x_scale)

    # ----- inputs: quantized inside the kernel that makes them
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return self.fp8.quantize(x, self.input_inv_scale)

    def norm_input(self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fp8.norm_quant(x, residual, norm_weight, eps, self.input_inv_scale)

    def act_input(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.fp8.silu_quant(gate_up, self.input_inv_scale)

    # ----- products
    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self._weight_compute is not None:
            return emulated_scaled_mm(x, self._weight_compute, self.out_scale, bias, self.ctx.dtype)
        if x.shape[0] == 0:
            out = x.new_empty((0, self.out_features), dtype=self.ctx.dtype)
            return out if bias is None else out + bias
        fast = self.fp8.fast_accum and x.shape[0] not in self.exact_accum_rows
        return torch._scaled_mm(x, self.weight.t(), scale_a=self.input_scale, scale_b=self.weight_scale,
                                bias=bias, out_dtype=self.ctx.dtype, use_fast_accum=fast)

    @property
    def has_small(self) -> bool:
        return self.fp8.small is not None and self.in_features % self.ops.small_linear_k_multiple == 0

    def small(self, x: torch.Tensor, **fused: Any) -> torch.Tensor:
        return self.fp8.small(x, self.weight, self.input_inv_scale, self.out_scale, **fused)


# ----------------------------------------------------------------------------- start-up tuning


def _cuda_timer(fn: Callable[[], Any], calls: int = 5, repeats: int = 3) -> float:
    """Seconds per call of ``fn`` on the current CUDA stream: the best of ``repeats`` runs of
    ``calls`` calls, after a warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / calls)
    return best


def tune_accumulation(methods: Iterable[Any], rows: int, agree: Callable[[int], int] = lambda v: v,
                      timer: Callable[[Callable[[], Any]], float] = _cuda_timer,
                      slower: float = 1.03) -> list[tuple[int, int, float, float]]:
    """Where cuBLASLt's fast accumulation is slower, use the default one (both are valid FP8
    products; only speed differs).

    For each distinct weight shape among the native FP8 linears with fast accumulation on and
    tuned (``KILN_FP8_FAST_ACCUM=auto``),
    times ``_scaled_mm`` at ``rows`` rows (the step's token budget: every full prefill step has
    exactly that many) both ways; where fast is more than ``slower`` times slower, the linears
    of that shape add ``rows`` to ``exact_accum_rows``. On an H200 (torch 2.11) the 8B gate_up
    at 8,192 rows took 1.47 ms fast against 1.33 ms, the 70B down at 8,192 and the 8B down at
    12,288 were 6-8% slower, while most shapes and row counts gained 2-11% (BENCHMARKS.md,
    eighth session). ``agree`` is the tensor-parallel
    group's ``min_int`` (every rank takes the same choice: the default only where all ranks
    measured it faster). Returns (out_features, in_features, fast s, default s) per shape timed.
    """
    shapes: dict[tuple[int, int], list[Fp8Linear]] = {}
    for method in methods:
        if isinstance(method, Fp8Linear) and method.native and method.fp8.fast_accum and method.fp8.tune_accum:
            shapes.setdefault((method.out_features, method.in_features), []).append(method)
    timed = []
    for (n, k), group in sorted(shapes.items()):
        lin = group[0]
        x8 = torch.randn(rows, k, device=lin.weight.device, dtype=torch.bfloat16).to(FP8_DTYPE)

        def product(fast: bool) -> Callable[[], Any]:
            return lambda: torch._scaled_mm(x8, lin.weight.t(), scale_a=lin.input_scale, scale_b=lin.weight_scale,
                                            out_dtype=lin.ctx.dtype, use_fast_accum=fast)

        t_fast, t_default = float("inf"), float("inf")
        for _ in range(2):  # alternated, so neither mode always runs on a warmer GPU
            t_fast, t_default = min(t_fast, timer(product(True))), min(t_default, timer(product(False)))
        del x8
        timed.append((n, k, t_fast, t_default))
        if agree(int(t_fast > slower * t_default)):
            for method in group:
                method.exact_accum_rows = method.exact_accum_rows | {rows}
            logger.info("FP8 GEMM %dx%d at %d rows: default accumulation (fast %.3f ms vs %.3f ms)",
                        n, k, rows, t_fast * 1e3, t_default * 1e3)
    return timed
