"""The FP8 KV-cache kernels: quantizing writes bit for bit against the reference quantization
(runtime/fp8_kv.py, itself checked against a float64 E4M3 grid in tests/runtime/test_fp8_kv.py),
and paged attention over an FP8 cache against float64 attention over the dequantized cache."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from kiln.runtime import fp8_kv
from kiln.runtime.kernels import AttentionConfig, KernelInputError, paged_attention, rotary_and_write_kv, write_kv_cache

from .reference import TOL, attention_reference, make_paged_batch, rel_err
from .test_rotary_kv import _cos_sin_cache, _qkv, _rotary_reference

FP8 = torch.float8_e4m3fn
SMALL = AttentionConfig(prefill_block_m=16, prefill_block_n=16, decode_block_n=16, min_tokens_per_split=16)


def _random_fp8_cache(num_blocks, block_size, kv_heads, head_dim, device, gen):
    """Random bytes (NaN codes excluded), so a skipped slot that gets written shows up."""
    codes = torch.randint(0, 0x7F, (2, num_blocks, block_size, kv_heads, head_dim), generator=gen, dtype=torch.uint8)
    codes |= torch.randint(0, 2, codes.shape, generator=gen, dtype=torch.uint8) << 7
    kv = codes.view(FP8).to(device)
    return kv, kv[0], kv[1]


def _codes(x: torch.Tensor) -> torch.Tensor:
    return x.cpu().view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_write_kv_cache_quantizes_like_the_reference(dtype, block_size, device, gen):
    tokens, kv_heads, head_dim = 24, 2, 64
    _, k, v = _qkv(tokens, 4, kv_heads, head_dim, dtype, device, gen)
    # Spread magnitudes over E4M3's whole range (subnormals, saturation) after scaling.
    k = (k.float() * torch.exp2(torch.empty(k.shape).uniform_(-8, 8, generator=gen)).to(device)).to(dtype)
    kv, k_cache, v_cache = _random_fp8_cache(5, block_size, kv_heads, head_dim, device, gen)
    slots = torch.randperm(5 * block_size, generator=gen)[:tokens]
    slots[[1, 7, 20]] = -1
    want = _codes(kv).clone().view(2, -1, kv_heads, head_dim)
    keep = slots >= 0
    k_scale, v_scale = 0.0173, 0.0049
    want[0, slots[keep]] = _codes(fp8_kv.quantize(k.cpu()[keep], k_scale))
    want[1, slots[keep]] = _codes(fp8_kv.quantize(v.cpu()[keep], v_scale))
    write_kv_cache(k, v, k_cache, v_cache, slots.to(device), k_scale=k_scale, v_scale=v_scale)
    got = _codes(kv).view(want.shape)
    bad = (got != want).nonzero().tolist()
    src = {0: (k.cpu(), k_scale), 1: (v.cpu(), v_scale)}
    where = {int(s): i for i, s in enumerate(slots.tolist()) if s >= 0}
    detail = [(kv_, slot, h, d, where.get(slot), float(src[kv_][0][where[slot], h, d]) if slot in where else None,
               hex(int(want[kv_, slot, h, d])), hex(int(got[kv_, slot, h, d]))) for kv_, slot, h, d in bad[:8]]
    assert not bad, f"{len(bad)} codes differ (kv, slot, head, dim, token, x, want, got): {detail}"


def _ordered(codes: torch.Tensor) -> torch.Tensor:
    """E4M3 codes as integers in value order (sign-magnitude -> two's complement)."""
    mag = (codes & 0x7F).long()
    return torch.where(codes >= 0x80, -mag, mag)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_and_write_kv_into_fp8(dtype, device, gen):
    tokens, heads, kv_heads, head_dim, block_size = 9, 8, 2, 64, 16
    q, k, v = _qkv(tokens, heads, kv_heads, head_dim, dtype, device, gen)
    kv, k_cache, v_cache = _random_fp8_cache(4, block_size, kv_heads, head_dim, device, gen)
    cache = _cos_sin_cache(512, head_dim).to(device)
    positions = torch.randint(0, 512, (tokens,), generator=gen).to(device)
    slots = torch.randperm(4 * block_size, generator=gen)[:tokens]
    slots[4] = -1
    keep = slots >= 0
    want_q, want_k = _rotary_reference(q, positions, cache), _rotary_reference(k, positions, cache)
    before = _codes(kv).clone().view(2, -1, kv_heads, head_dim)
    k_scale, v_scale = 0.011, 0.007
    rotary_and_write_kv(q, k, v, positions, cache, k_cache, v_cache, slots.to(device), k_scale=k_scale, v_scale=v_scale)
    assert rel_err(q, want_q) < TOL[dtype]
    after = _codes(kv).view(2, -1, kv_heads, head_dim)
    assert torch.equal(after[1, slots[keep]], _codes(fp8_kv.quantize(v.cpu()[keep], v_scale)))
    # The rotated k is rounded to the activation dtype, then to E4M3 (the reference rounds at the
    # same two points), from a float32 rotation whose last bit may differ from the float64 one (FMA
    # on the GPU): a code may sit one step away. Triton's CPU interpreter truncates float32 -> bf16
    # instead of rounding to nearest, which moves ~3.5% of the codes (up to ~6% on some seeds).
    exact_k = fp8_kv.quantize(want_k[keep].to(dtype).float(), k_scale)
    got, exact = _ordered(after[0, slots[keep]]), _ordered(_codes(exact_k))
    limit = 0.1 if device.type == "cpu" and dtype == torch.bfloat16 else 0.05
    assert (got - exact).abs().max() <= 1 and (got != exact).float().mean() < limit
    untouched = torch.ones(after.shape[1], dtype=torch.bool)
    untouched[slots[keep]] = False
    assert torch.equal(after[:, untouched], before[:, untouched])


def _fp8_batch(q_lens, ctx_lens, heads, kv_heads, head_dim, block_size, q_dtype, device, gen):
    """A random paged batch with its caches quantized to FP8, and the batch of their float64
    dequantized values (what the reference attends over)."""
    batch = make_paged_batch(q_lens, ctx_lens, heads, kv_heads, head_dim, block_size, q_dtype, device, gen)
    k_scale, v_scale = 4.5 / 448, 3.0 / 448  # N(0, 1) entries: the largest K values saturate
    k8, v8 = fp8_kv.quantize(batch.k_cache, k_scale), fp8_kv.quantize(batch.v_cache, v_scale)
    dequantized = dataclasses.replace(batch, k_cache=k8.cpu().double() * k_scale, v_cache=v8.cpu().double() * v_scale)
    return dataclasses.replace(batch, k_cache=k8, v_cache=v8), dequantized, k_scale, v_scale


def _check(batch, dequantized, k_scale, v_scale, gen, cfg=SMALL, num_splits=None):
    scale = 1.0 / math.sqrt(batch.q.shape[2])
    out = paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.query_start_loc,
                          batch.seq_lens, scale, max(batch.q_lens), max(batch.ctx_lens), config=cfg,
                          num_splits=num_splits, k_scale=k_scale, v_scale=v_scale)
    err = rel_err(out, attention_reference(dequantized, scale))
    assert out.dtype == batch.q.dtype
    assert err < TOL[batch.q.dtype], f"relative error {err:.3g} (seed {gen.initial_seed()})"


# (heads, kv_heads, head_dim, block_size, query dtype); the GPU script runs the full grid.
FP8_CASES = [
    (4, 1, 64, 32, torch.bfloat16),    # GQA 4, tile smaller than a block
    (8, 1, 128, 16, torch.bfloat16),   # GQA 8, head dim 128
    (6, 2, 64, 8, torch.float32),      # GQA 3 (padded group), tile spans several blocks
    (2, 2, 128, 16, torch.float16),    # MHA
]


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,dtype", FP8_CASES)
def test_mixed_batch_over_fp8_cache(heads, kv_heads, head_dim, block_size, dtype, device, gen):
    # A prefill chunk over earlier context, decodes (one on a one-token context), a full prefill,
    # an empty padding row and a two-token query.
    batch = _fp8_batch([5, 1, 19, 0, 1, 2], [37, 50, 19, 0, 1, 21], heads, kv_heads, head_dim, block_size,
                       dtype, device, gen)
    _check(*batch, gen)


@pytest.mark.parametrize("dtype,num_splits", [(torch.bfloat16, 3), (torch.float32, 1)])
def test_decode_over_fp8_cache(dtype, num_splits, device, gen):
    batch = _fp8_batch([1] * 4, [1, 17, 150, 64], 4, 1, 64, 16, dtype, device, gen)
    _check(*batch, gen, num_splits=num_splits)


def test_fp8_cache_with_default_config(device, gen):
    batch = _fp8_batch([70, 1, 1], [140, 300, 9], 4, 2, 128, 128, torch.bfloat16, device, gen)
    _check(*batch, gen, cfg=None)


def test_scales_need_an_fp8_cache(device, gen):
    batch = make_paged_batch([1], [4], 4, 2, 64, 16, torch.float32, device, gen)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.query_start_loc, batch.seq_lens)
    with pytest.raises(KernelInputError, match="FP8 cache only"):
        paged_attention(*args, 0.1, 1, 4, k_scale=0.5)
    k = batch.q[:, :2]
    with pytest.raises(KernelInputError, match="FP8 cache only"):
        write_kv_cache(k, k, batch.k_cache, batch.v_cache, torch.zeros(1, dtype=torch.long, device=device),
                       v_scale=2.0)
