"""apply_rotary, write_kv_cache and rotary_and_write_kv against float64 references."""

from __future__ import annotations

import pytest
import torch

from kiln.runtime.kernels import KernelInputError, apply_rotary, rotary_and_write_kv, write_kv_cache

from .reference import TOL, rel_err


def _cos_sin_cache(max_pos: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).float()


def _rotary_reference(x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """HF-style x * cos + rotate_half(x) * sin, in float64."""
    half = x.shape[-1] // 2
    cos, sin = cache.cpu()[positions.cpu()].double().split(half, dim=-1)
    cos, sin = torch.cat([cos, cos], -1)[:, None, :], torch.cat([sin, sin], -1)[:, None, :]
    x = x.cpu().double()
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _qkv(tokens, heads, kv_heads, head_dim, dtype, device, gen):
    """q, k, v as strided views of one fused qkv projection output, as the model produces them."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype).to(device)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return (q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (8, 2, 128), (6, 1, 32)])
def test_apply_rotary(dtype, heads, kv_heads, head_dim, device, gen):
    q, k, _ = _qkv(7, heads, kv_heads, head_dim, dtype, device, gen)
    cache = _cos_sin_cache(4096, head_dim).to(device)
    positions = torch.randint(0, 4096, (7,), generator=gen).to(device)
    want_q, want_k = _rotary_reference(q, positions, cache), _rotary_reference(k, positions, cache)
    out_q, out_k = apply_rotary(q, k, positions, cache)
    for name, out, want in (("q", out_q, want_q), ("k", out_k, want_k)):
        err = rel_err(out, want)
        assert err < TOL[dtype], f"{name} error {err:.3g} (seed {gen.initial_seed()})"


def _cache_pair(num_blocks, block_size, kv_heads, head_dim, dtype, device, gen):
    kv = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype).to(device)
    return kv, kv[0], kv[1]


def _expected_cache(kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    want = kv.cpu().clone()
    flat = want.view(2, -1, *want.shape[3:])
    keep = slots.cpu() >= 0
    flat[0, slots.cpu()[keep]] = k.cpu()[keep].to(want.dtype)
    flat[1, slots.cpu()[keep]] = v.cpu()[keep].to(want.dtype)
    return want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_write_kv_cache(dtype, block_size, device, gen):
    _, k, v = _qkv(9, 4, 2, 64, dtype, device, gen)
    kv, k_cache, v_cache = _cache_pair(6, block_size, 2, 64, dtype, device, gen)
    slots = torch.randperm(6 * block_size, generator=gen)[:9]
    slots[[2, 5]] = -1  # padding tokens: must leave the cache untouched
    want = _expected_cache(kv, k, v, slots)
    write_kv_cache(k, v, k_cache, v_cache, slots.to(device))
    assert torch.equal(kv.cpu(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_and_write_kv(dtype, device, gen):
    q, k, v = _qkv(5, 8, 2, 64, dtype, device, gen)
    kv, k_cache, v_cache = _cache_pair(4, 16, 2, 64, dtype, device, gen)
    cache = _cos_sin_cache(512, 64).to(device)
    positions = torch.randint(0, 512, (5,), generator=gen).to(device)
    slots = torch.randperm(64, generator=gen)[:5]
    slots[3] = -1
    k_before = k.clone()
    want_q, want_k = _rotary_reference(q, positions, cache), _rotary_reference(k, positions, cache)
    want = _expected_cache(kv, want_k, v, slots)
    out_q = rotary_and_write_kv(q, k, v, positions, cache, k_cache, v_cache, slots.to(device))
    assert rel_err(out_q, want_q) < TOL[dtype]
    assert rel_err(kv.cpu(), want) < TOL[dtype]
    written = kv.cpu().view(2, -1, 2, 64)[0, slots[slots >= 0]]
    assert rel_err(written, want_k[slots >= 0]) < TOL[dtype]
    assert torch.equal(k, k_before)  # the fused form leaves k itself unrotated


def test_rotary_rejects_half_precision_table(device):
    q, k = torch.randn(2, 2, 8, device=device), torch.randn(2, 1, 8, device=device)
    with pytest.raises(KernelInputError, match="fp32"):
        apply_rotary(q, k, torch.zeros(2, dtype=torch.long, device=device), torch.ones(4, 8, device=device).half())
