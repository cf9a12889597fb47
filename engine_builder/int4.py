"""THE INT4 weight layout of Kiln engines (W4A16, TensorRT-LLM's names) and group quantization.

A quantized linear ``{p}`` of this rank (in_features K, out_features N, group size g, K % g == 0)
is stored as

    {p}.weight                   int8 [N, K/2]   two int4 values q in [-8, 7] per byte, low nibble first:
                                                 byte[n, j] = (q[n, 2j] & 0xF) | (q[n, 2j+1] & 0xF) << 4
                                                 (two's-complement nibbles; row-major [out, in] like
                                                 every linear, so a TP split is a plain row or column slice)
    {p}.weights_scaling_factor   [K/g, N] model dtype   s
    {p}.zero                     [K/g, N] model dtype   z   (only when has_zero_point; otherwise z = 0)
    {p}.prequant_scaling_factor  [1, K]   model dtype   p   (only when pre_quant_scale)

and computes, with every product in float32 and the result rounded to the model dtype,

    W[n, k] = q[n, k] * s[k // g, n] + z[k // g, n]          y = x' @ W^T,  x' = dtype(x * p) (or x)

The layout is the same on every device (the runtime repacks at load if a kernel wants another).
Symmetric groups: s = max|w| / 7, q = clamp(round(w / s), -8, 7). Asymmetric (zero points):
s = (max - min) / 15 and z = min + 8 s, so q = -8 is the group's minimum and q = 7 its maximum;
z is a real number in the model dtype (TensorRT-LLM's ``zero``), not an integer offset. s and z
are rounded to the model dtype before q is computed, so the stored values reproduce exactly the
weights the quantizer chose.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.engine_builder.options import INT4_GROUP_SIZES

QMIN, QMAX = -8, 7
WEIGHT, SCALE, ZERO, PREQUANT = "weight", "weights_scaling_factor", "zero", "prequant_scaling_factor"
GROUP_SIZES = INT4_GROUP_SIZES
"""Group sizes the runtime's kernels take (a group's bytes split into two halves of >= 16)."""
INT4_ALGOS = ("W4A16_AWQ", "W4A16")
EXCLUDED_MODULES = ["lm_head", "transformer.vocab_embedding"]


def int4_quantization(algo: str, group_size: int, zero_point: bool, pre_quant_scale: bool) -> dict:
    """config.json ``quantization`` of an INT4 engine (TensorRT-LLM's fields)."""
    return {"quant_algo": algo, "kv_cache_quant_algo": None, "group_size": group_size,
            "has_zero_point": zero_point, "pre_quant_scale": pre_quant_scale,
            "exclude_modules": list(EXCLUDED_MODULES)}


def int4_piece(name: str, rank: int, tp: int) -> str:
    """The plan's source name for engine tensor ``name`` of rank ``rank`` of ``tp``, a quantized
    linear's: the quantizing source assembles the whole tensor (int4_quantize.Int4Source)."""
    return f"{name}@rank{rank}/{tp}"


def parse_int4_piece(source: str) -> tuple[str, int, int] | None:
    """(engine tensor name, rank, tp) of an ``int4_piece`` name, else None."""
    name, sep, where = source.rpartition("@rank")
    rank, _, tp = where.partition("/")
    return (name, int(rank), int(tp)) if sep and rank.isdigit() and tp.isdigit() else None


def plan_int4_linear(weight_name: str, shape: tuple[int, int], rank: int, tp: int, quantization: dict) -> list:
    """format.OutputTensor entries of one quantized linear of rank ``rank`` (``shape`` = its
    unquantized [N, K]): the packed weight, the scales and, per the engine's flags, the zero points
    and the pre-quantization scale, each one ``int4_piece``."""
    from kiln.engine_builder.format import OutputTensor, Piece

    n, k = shape
    group = int(quantization["group_size"])
    prefix = weight_name.removesuffix(f".{WEIGHT}")
    out = [OutputTensor(weight_name, (n, k // 2), (Piece(int4_piece(weight_name, rank, tp)),), torch.int8)]
    extra = [(SCALE, (k // group, n)), (ZERO, (k // group, n)), (PREQUANT, (1, k))]
    flags = {SCALE: True, ZERO: quantization.get("has_zero_point"), PREQUANT: quantization.get("pre_quant_scale")}
    for kind, kind_shape in extra:
        if flags[kind]:
            name = f"{prefix}.{kind}"
            out.append(OutputTensor(name, kind_shape, (Piece(int4_piece(name, rank, tp)),)))
    return out


@dataclass
class QuantizedWeight:
    """One linear in the layout above, unpacked: ``q`` int8 [N, K] in [-8, 7], ``scales`` and
    ``zeros`` (None when symmetric) [K/g, N] in the model dtype."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.scales, self.zeros, self.group_size)

    def packed(self) -> torch.Tensor:
        return pack_int4(self.q)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] with values in [-8, 7] -> int8 [N, K/2], low nibble = even column."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of columns, got {tuple(q.shape)}")
    lo = q[..., 0::2].to(torch.int16) & 0xF
    hi = q[..., 1::2].to(torch.int16) & 0xF
    return (lo | (hi << 4)).to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: int8 [N, K/2] -> int8 [N, 2 * K/2] in [-8, 7]."""
    b = packed.view(torch.uint8).to(torch.int16)
    nibbles = torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)
    return (nibbles - ((nibbles & 0x8) << 1)).to(torch.int8)


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """float32 W [N, K] = q * s + z, group by group along K (the definition above)."""
    s = scales.float().t().repeat_interleave(group_size, dim=1)
    w = q.float() * s
    if zeros is not None:
        w = w + zeros.float().t().repeat_interleave(group_size, dim=1)
    return w


def check_group_size(group_size: int, in_features: int, what: str) -> None:
    """One line when ``group_size`` is unsupported or does not divide ``in_features``."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size {group_size} is not supported (choose from {', '.join(map(str, GROUP_SIZES))})")
    if in_features % group_size:
        raise ValueError(f"{what}: input width {in_features} is not a multiple of the group size {group_size} "
                         f"(groups are not padded; pick a group size that divides it)")


def quantize_rtn(w: torch.Tensor, group_size: int, zero_point: bool, dtype: torch.dtype,
                 clip: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest INT4 of ``w`` [N, K] (any float dtype; computed in float32) in groups of
    ``group_size`` along K. ``clip`` [N, K/g] (optional, in (0, 1]) shrinks each group's range
    before the scale is taken (AWQ's clipping): symmetric max|w| * clip, asymmetric the range
    around its midpoint. Values outside the clipped range saturate."""
    n, k = w.shape
    check_group_size(group_size, k, "quantize_rtn")
    groups = w.float().reshape(n, k // group_size, group_size)
    ratio = None if clip is None else clip.float().reshape(n, k // group_size, 1)
    if zero_point:
        lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        if ratio is not None:
            mid, half = (hi + lo) / 2, (hi - lo) / 2 * ratio
            lo, hi = mid - half, mid + half
        scale = ((hi - lo) / (QMAX - QMIN)).to(dtype).float()
        zero = (lo - QMIN * scale).to(dtype).float()
    else:
        amax = groups.abs().amax(-1, keepdim=True)
        if ratio is not None:
            amax = amax * ratio
        scale = (amax / QMAX).to(dtype).float()
        zero = torch.zeros_like(scale)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((groups - zero) / safe).clamp_(QMIN, QMAX).to(torch.int8).reshape(n, k)
    scales = scale.reshape(n, -1).t().to(dtype).contiguous()
    zeros = zero.reshape(n, -1).t().to(dtype).contiguous() if zero_point else None
    return QuantizedWeight(q, scales, zeros, group_size)


def fake_quantize(w: torch.Tensor, group_size: int, zero_point: bool, dtype: torch.dtype,
                  clip: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``dequantize(quantize_rtn(w))``: what the engine will compute with instead of w."""
    return quantize_rtn(w, group_size, zero_point, dtype, clip).dequantize()


def quantize_gptq(w: torch.Tensor, gram: torch.Tensor, grid: QuantizedWeight) -> QuantizedWeight:
    """``w`` [N, K] rounded by GPTQ (engine_builder/gptq.py) onto ``grid``'s group scales and zero
    points, which stay as they are: y = x @ W^T stays closer to the source on inputs with Gram
    matrix ``gram`` [K, K] than round-to-nearest on the same grid."""
    from kiln.engine_builder.gptq import gptq

    g = grid.group_size
    scales = grid.scales.float().t().to(w.device)  # [N, K/g]
    zeros = torch.zeros_like(scales) if grid.zeros is None else grid.zeros.float().t().to(w.device)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))

    def on_grid(values: torch.Tensor, column: int) -> torch.Tensor:
        s, z = safe[:, column // g], zeros[:, column // g]
        return torch.round((values - z) / s).clamp_(QMIN, QMAX) * s + z

    rounded = gptq(w, gram, on_grid)
    s_full, z_full = safe.repeat_interleave(g, dim=1), zeros.repeat_interleave(g, dim=1)
    q = torch.round((rounded - z_full) / s_full).clamp_(QMIN, QMAX).to(torch.int8)
    return QuantizedWeight(q.cpu(), grid.scales, grid.zeros, g)
