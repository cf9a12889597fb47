"""Rotary embedding (NeoX rotate-half) and paged KV-cache writes, separately or fused.

One program per token handles all of its heads. The fused form (`rotary_and_write_kv`) reads q,
k and v once, rotates q in place and writes the rotated k and the v straight into the cache, so
the rotated k never makes a round trip through device memory.

An FP8 cache (float8_e4m3fn) stores k and v quantized with their scales (runtime/fp8_kv.py): the
rotated k is first rounded to the activation dtype, as the unfused rotary -> write path does, so
both paths store the same bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.runtime.fp8_kv import inverse_scale

from ._common import (FP8_KV_DTYPE, SUPPORTED_DTYPES, KernelInputError, check, check_dtype,
                      check_last_dim_contiguous, fp8_e4m3_round, next_pow2)


@triton.jit
def _rotate(ptr, row_off, heads, stride_h, offs_d, cos, sin, num_heads, HALF: tl.constexpr, STORE: tl.constexpr):
    """Rotate the [heads, 2*HALF] rows at ptr + row_off; optionally in place. Returns both halves."""
    mask = (heads < num_heads)[:, None] & (offs_d < HALF)[None, :]
    addr = ptr + row_off + heads[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(addr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(addr + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    if STORE:
        tl.store(addr, o1.to(ptr.dtype.element_ty), mask=mask)
        tl.store(addr + HALF, o2.to(ptr.dtype.element_ty), mask=mask)
    return o1, o2


@triton.jit
def _rotary_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, kc_ptr, vc_ptr, slot_ptr,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
                      stride_cb, stride_cslot, stride_ch, num_q_heads, num_kv_heads, inv_k_scale, inv_v_scale,
                      HQ_PAD: tl.constexpr, HKV_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr, ROTATE: tl.constexpr, STORE_K: tl.constexpr,
                      WRITE_KV: tl.constexpr, QUANT: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, HALF_PAD)
    kv_heads = tl.arange(0, HKV_PAD)
    if ROTATE:
        pos = tl.load(pos_ptr + t).to(tl.int64)
        cos = tl.load(cs_ptr + pos * stride_cs + offs_d, mask=offs_d < HALF, other=0.0)
        sin = tl.load(cs_ptr + pos * stride_cs + HALF + offs_d, mask=offs_d < HALF, other=0.0)
        _rotate(q_ptr, t * stride_qt, tl.arange(0, HQ_PAD), stride_qh, offs_d, cos, sin, num_q_heads, HALF, True)
        k1, k2 = _rotate(k_ptr, t * stride_kt, kv_heads, stride_kh, offs_d, cos, sin, num_kv_heads, HALF,
                         STORE_K)
    else:
        # cos = 1, sin = 0: a plain read of k (the multiply is free next to the memory traffic).
        one = tl.full([HALF_PAD], 1.0, tl.float32)
        k1, k2 = _rotate(k_ptr, t * stride_kt, kv_heads, stride_kh, offs_d, one, one * 0.0, num_kv_heads, HALF,
                         False)
    if WRITE_KV:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            mask = (kv_heads < num_kv_heads)[:, None] & (offs_d < HALF)[None, :]
            cache_off = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cslot
            dst = cache_off + kv_heads[:, None] * stride_ch + offs_d[None, :]
            src = v_ptr + t * stride_vt + kv_heads[:, None] * stride_vh + offs_d[None, :]
            v1 = tl.load(src, mask=mask, other=0.0)
            v2 = tl.load(src + HALF, mask=mask, other=0.0)
            if QUANT:
                k1 = fp8_e4m3_round(k1.to(k_ptr.dtype.element_ty).to(tl.float32), inv_k_scale)
                k2 = fp8_e4m3_round(k2.to(k_ptr.dtype.element_ty).to(tl.float32), inv_k_scale)
                v1 = fp8_e4m3_round(v1.to(tl.float32), inv_v_scale)
                v2 = fp8_e4m3_round(v2.to(tl.float32), inv_v_scale)
            tl.store(kc_ptr + dst, k1.to(kc_ptr.dtype.element_ty), mask=mask)
            tl.store(kc_ptr + dst + HALF, k2.to(kc_ptr.dtype.element_ty), mask=mask)
            tl.store(vc_ptr + dst, v1.to(vc_ptr.dtype.element_ty), mask=mask)
            tl.store(vc_ptr + dst + HALF, v2.to(vc_ptr.dtype.element_ty), mask=mask)


def _heads_ok(t: torch.Tensor | None, head_dim: int, dtype: torch.dtype) -> bool:
    return t is None or (t.dim() == 3 and t.shape[2] == head_dim and t.dtype == dtype and t.stride(2) == 1)


def _inputs_ok(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, scaled: bool) -> bool:
    """The hot-path validity test: plain comparisons, no message building (see _explain)."""
    if not (k.dim() == 3 and k.dtype in SUPPORTED_DTYPES and k.shape[2] % 2 == 0):
        return False
    tokens, head_dim = k.shape[0], k.shape[2]
    if not (_heads_ok(k, head_dim, k.dtype) and _heads_ok(q, head_dim, k.dtype) and _heads_ok(v, head_dim, k.dtype)):
        return False
    if cos_sin_cache is not None and not (
            cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == head_dim and cos_sin_cache.stride(1) == 1
            and cos_sin_cache.dtype == torch.float32 and positions.shape == (tokens,)):
        return False
    if k_cache is None:
        return not scaled
    fp8 = k_cache.dtype == FP8_KV_DTYPE
    return (k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
            and k_cache.shape[2:] == k.shape[1:] and (k_cache.dtype == k.dtype or fp8) and (fp8 or not scaled)
            and k_cache.stride(3) == 1 and slot_mapping.dim() == 1 and slot_mapping.shape[0] == tokens)


def _explain(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, scaled: bool) -> None:
    """Raise KernelInputError naming the first problem (only called once _inputs_ok said no)."""
    for name, t in (("k", k), ("q", q), ("v", v)):
        if t is not None:
            check(t.dim() == 3 and t.shape[2] == k.shape[-1],
                  f"{name} must be [tokens, heads, {k.shape[-1]}], got shape {tuple(t.shape)}")
            check_dtype(name, t)
            check(t.dtype == k.dtype, f"{name} has dtype {t.dtype}, k has {k.dtype}")
            check_last_dim_contiguous(name, t)
    check(k.shape[2] % 2 == 0, f"head_dim must be even, got {k.shape[2]}")
    if cos_sin_cache is not None:
        check(cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == k.shape[2] and cos_sin_cache.stride(1) == 1,
              f"cos_sin_cache must be [max_pos, {k.shape[2]}] with unit last stride, got {tuple(cos_sin_cache.shape)}")
        check(cos_sin_cache.dtype == torch.float32, f"cos_sin_cache must be fp32, got {cos_sin_cache.dtype}")
        check(positions.shape == (k.shape[0],), f"positions must be [{k.shape[0]}], got {tuple(positions.shape)}")
    if k_cache is not None:
        check(k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(),
              f"k_cache/v_cache must be alike [blocks, block_size, kv_heads, head_dim], got "
              f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
        check(k_cache.shape[2:] == k.shape[1:], f"cache heads/dim {tuple(k_cache.shape[2:])} != k {tuple(k.shape[1:])}")
        fp8 = k_cache.dtype == FP8_KV_DTYPE
        check(k_cache.dtype == k.dtype or fp8, f"cache dtype {k_cache.dtype} is neither k's ({k.dtype}) nor fp8")
        check(fp8 or not scaled, f"KV scales apply to an FP8 cache only; this cache is {k_cache.dtype}")
        check_last_dim_contiguous("k_cache", k_cache)
        check(slot_mapping.dim() == 1 and slot_mapping.shape[0] == k.shape[0],
              f"slot_mapping must be [{k.shape[0]}], got {tuple(slot_mapping.shape)}")
    raise KernelInputError("rotary/kv-cache kernel: inputs rejected")


def _launch(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, store_k: bool,
            k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """rotate = a cos/sin table was given; write_kv = a cache was given; quantize = it is FP8."""
    scaled = k_scale != 1.0 or v_scale != 1.0
    if not _inputs_ok(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, scaled):
        _explain(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, scaled)
    tokens, kv_heads, head_dim = k.shape
    if tokens == 0:
        return
    rotate, write_kv = cos_sin_cache is not None, k_cache is not None
    num_q_heads = q.shape[1] if q is not None else 1
    q = q if q is not None else k
    # Unused pointer arguments get k (never dereferenced: their branches are compiled out).
    cs = cos_sin_cache if rotate else k
    kc, vc, vv = (k_cache, v_cache, v) if write_kv else (k, k, k)
    cache_strides = (kc.stride(0), kc.stride(1), kc.stride(2)) if write_kv else (0, 0, 0)
    half = head_dim // 2
    quant = write_kv and k_cache.dtype == FP8_KV_DTYPE
    inv_scales = (inverse_scale(k_scale), inverse_scale(v_scale)) if quant else (1.0, 1.0)
    _rotary_kv_kernel[(tokens,)](
        q, k, vv, positions if rotate else k, cs, kc, vc, slot_mapping if write_kv else k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), vv.stride(0), vv.stride(1), cs.stride(0),
        *cache_strides, num_q_heads, kv_heads, *inv_scales, HQ_PAD=next_pow2(num_q_heads),
        HKV_PAD=next_pow2(kv_heads), HALF=half, HALF_PAD=next_pow2(half),
        BLOCK_SIZE=k_cache.shape[1] if write_kv else 1, ROTATE=rotate, STORE_K=store_k, WRITE_KV=write_kv,
        QUANT=quant, num_warps=4)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX rotary on q[T, Hq, D] and k[T, Hkv, D] IN PLACE; returns (q, k).
    cos_sin_cache[pos] holds D/2 cosines then D/2 sines (fp32)."""
    _launch(q, k, None, positions, cos_sin_cache, None, None, None, store_k=True)
    return q, k


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, *, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Copy token t's k/v [Hkv, D] into cache slot slot_mapping[t]; slots < 0 are skipped. An FP8
    cache gets them quantized with the (dequantization) scales, bit for bit as fp8_kv.quantize."""
    _launch(None, k, v, None, None, k_cache, v_cache, slot_mapping, False, k_scale, v_scale)


def rotary_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, *, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Rotate q in place and write the rotated k (k itself is left as it was) and v into the cache
    at slot_mapping (slots < 0 skipped; an FP8 cache quantizes with the scales). Returns q."""
    _launch(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, False, k_scale, v_scale)
    return q
