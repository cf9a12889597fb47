"""Small helpers shared by the Kiln Triton kernels (launch sizes, dtype handling)."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


class KernelInputError(ValueError):
    """A kernel was called with tensors of the wrong shape, dtype or layout."""


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_KV_DTYPE = torch.float8_e4m3fn  # a KV cache of this dtype holds K/V quantized (runtime/fp8_kv.py)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (and >= 1): Triton block shapes must be powers of two."""
    return triton.next_power_of_2(max(int(n), 1))


def check(condition: bool, message: str) -> None:
    """Raise KernelInputError(message) when condition is false."""
    if not condition:
        raise KernelInputError(message)


def check_dtype(name: str, t: torch.Tensor) -> None:
    check(t.dtype in SUPPORTED_DTYPES, f"{name} has dtype {t.dtype}; kernels take fp16, bf16 or fp32")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    check(t.stride(-1) == 1, f"{name} must be contiguous in its last dimension (stride {t.stride(-1)})")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get IEEE products (tf32 would cost ~3e-4 relative error); others are exact anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dots(t: torch.Tensor) -> bool:
    """True when a kernel on this tensor runs in Triton's CPU interpreter, whose tl.dot on bf16
    operands returns garbage (Triton 3.9 reads the raw bits as integers); upcasting the operands
    to fp32 there gives the same mathematical result. Compiled GPU kernels never upcast."""
    return not t.is_cuda


@functools.lru_cache(maxsize=8)
def num_sms(device_index: int) -> int:
    """Multiprocessor count of a CUDA device (cached: the property query is slow)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=8)
def _shared_memory_per_block(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


def device_shared_memory(t: torch.Tensor) -> int:
    """Shared memory bytes one block may use on t's CUDA device (Hopper 227 KB, Ampere 163 KB,
    Ada 99 KB); Hopper's figure elsewhere (the CPU interpreter has no limit; tests see GPU tiles)."""
    if t.is_cuda:
        return _shared_memory_per_block(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return 232448


def device_sms(t: torch.Tensor) -> int:
    """SM count for tensors on CUDA; a small fixed number elsewhere so CPU tests still split work."""
    if t.is_cuda:
        return num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return 4


@triton.jit
def fp8_e4m3_round(x, inv_scale):
    """x * inv_scale saturated to +-448 and rounded to nearest-even on the E4M3 grid, as float32.

    Done in float32 arithmetic rather than by the fp8 cast, so the result is the same under
    Triton's CPU interpreter (whose fp8 cast truncates) as on the GPU (cvt.rn.satfinite): adding
    and subtracting 2^(e + 20) for |y| in [2^e, 2^(e+1)) rounds y to a multiple of 2^(e - 3),
    E4M3's step there (3 mantissa bits); below 2^-6 the step stays 2^-9 (subnormals). The cast of
    the exactly representable result to fp8 is then exact on every backend.
    """
    y = tl.minimum(tl.abs(x * inv_scale), 448.0)
    exp_bits = tl.maximum(y.to(tl.int32, bitcast=True) & 0x7F800000, (127 - 6) << 23)
    magic = (exp_bits + (20 << 23)).to(tl.float32, bitcast=True)
    y = (y + magic) - magic
    # x's sign bit onto y >= 0 with integer ops: keeps the sign of -0.0 and of underflows to zero,
    # which a float negation (compiled on the GPU as 0 - y) would turn into +0.0.
    sign = x.to(tl.int32, bitcast=True) & -0x80000000
    return (y.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def to_fp8(y, inv_scale):
    """fp8 E4M3 of fp32 ``y * inv_scale``, saturated and rounded as ``fp8_e4m3_round`` (the
    rounding of ``torch.Tensor.to(torch.float8_e4m3fn)``, which the references use); the cast of
    the already rounded value is exact on every backend."""
    return fp8_e4m3_round(y, inv_scale).to(tl.float8e4nv)


def check_scale(name: str, scale: torch.Tensor, like: torch.Tensor) -> None:
    """An FP8 (inverse) scale: fp32, one element, on ``like``'s device."""
    check(scale.dtype == torch.float32 and scale.numel() == 1 and scale.device == like.device,
          f"{name} must be one float32 element on {like.device}, got {scale.dtype} {tuple(scale.shape)} "
          f"on {scale.device}")
