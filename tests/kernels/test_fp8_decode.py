"""The tensor-core FP8 decode-attention kernel (runtime/kernels/fp8_decode.py).

CPU: its lane-level emulation (the byte-to-fragment maps, the P transposition, the warp and split
merges) against float64 attention over the dequantized cache. GPU: the kernel itself against the
same reference and against the Triton decode kernel, over head dims, group sizes, block sizes,
splits, launch shapes and NaN codes in unwritten cache slots."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from kiln.runtime import fp8_kv
from kiln.runtime.kernels import AttentionConfig, paged_attention
from kiln.runtime.kernels import fp8_decode
from kiln.runtime.kernels.fp8_decode_emulation import emulate

from .reference import TOL, attention_reference, make_paged_batch, rel_err

FP8 = torch.float8_e4m3fn
LOG2E = 1.4426950408889634
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("gqa,head_dim,ctx,splits,warps", [
    (4, 128, 70, 1, 4),   # Llama-3 8B group, a partial last tile, four warps
    (3, 64, 37, 2, 2),    # SmolLM2's group: heads past the group are padding columns; two splits
    (8, 128, 16, 1, 2),   # a full group, one tile (the other warp has none)
    (1, 64, 5, 3, 4),     # MHA; splits with no tiles at all
])
def test_emulation_matches_float64_attention(gqa, head_dim, ctx, splits, warps):
    gen = torch.Generator().manual_seed(1000 * gqa + ctx)
    q = torch.randn(gqa, head_dim, generator=gen).to(torch.bfloat16)
    k8 = (torch.randn(ctx, head_dim, generator=gen) * 3).to(FP8)
    v8 = torch.randn(ctx, head_dim, generator=gen).to(FP8)
    k_scale, v_scale, scale = 0.7, 1.3, 1.0 / math.sqrt(head_dim)
    got = emulate(q, k8.view(torch.uint8), v8.view(torch.uint8), scale * k_scale * LOG2E, v_scale,
                  num_splits=splits, warps=warps)
    probs = torch.softmax(q.double() @ (k8.double() * k_scale).T * scale, dim=-1)
    ref = probs @ (v8.double() * v_scale)
    # q and P rounded to fp16 are the only roundings: ~1e-4 relative
    assert rel_err(got, ref) < 1e-3


def test_supported_shapes():
    q = torch.zeros(2, 8, 128, dtype=torch.bfloat16)
    cache = torch.zeros(4, 32, 2, 128, dtype=FP8)
    assert not fp8_decode.supported(q, cache, 4)  # a CPU tensor is never served
    if torch.cuda.is_available():
        assert fp8_decode.supported(q.cuda(), cache.cuda(), 4) == (torch.cuda.get_device_capability() >= (8, 9))
        assert not fp8_decode.supported(q.cuda(), cache.cuda().to(torch.bfloat16), 4)  # not an FP8 cache
        assert not fp8_decode.supported(q.cuda().float(), cache.cuda(), 4)  # fp32 queries
        assert not fp8_decode.supported(q.cuda(), torch.zeros(4, 8, 2, 128, dtype=FP8, device="cuda"), 4)  # block 8
        assert not fp8_decode.supported(torch.zeros(2, 18, 128, dtype=torch.bfloat16, device="cuda"), cache.cuda(), 9)


def _fp8(batch):
    k_scale, v_scale = 4.5 / 448, 3.0 / 448
    k8, v8 = fp8_kv.quantize(batch.k_cache, k_scale), fp8_kv.quantize(batch.v_cache, v_scale)
    deq = dataclasses.replace(batch, k_cache=k8.cpu().double() * k_scale, v_cache=v8.cpu().double() * v_scale)
    return dataclasses.replace(batch, k_cache=k8, v_cache=v8), deq, k_scale, v_scale


def _run(batch, k_scale, v_scale, cfg, splits=None):
    scale = 1.0 / math.sqrt(batch.q.shape[2])
    return paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.query_start_loc,
                           batch.seq_lens, scale, max(batch.q_lens), max(batch.ctx_lens), config=cfg,
                           num_splits=splits, k_scale=k_scale, v_scale=v_scale)


GPU_CASES = [  # (heads, kv_heads, head_dim, block_size, dtype)
    (32, 8, 128, 32, torch.bfloat16),  # Llama-3.1-8B
    (9, 3, 64, 32, torch.bfloat16),    # SmolLM2-135M
    (8, 1, 128, 16, torch.float16),
    (4, 4, 64, 64, torch.bfloat16),
    (16, 2, 128, 128, torch.bfloat16),
]


@needs_gpu
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,dtype", GPU_CASES)
@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("warps,depth", [(4, 2), (2, 1), (8, 3)])
def test_kernel_against_reference_and_triton(heads, kv_heads, head_dim, block_size, dtype, splits, warps, depth, gen):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 conversions need sm_89+")
    # decodes of every length class (one token, a partial tile, long), a prefill row the kernel skips
    batch, deq, ks, vs = _fp8(make_paged_batch([1, 1, 7, 1, 1, 1], [1, 13, 40, 300, 1029, 64], heads, kv_heads,
                                                head_dim, block_size, dtype, "cuda", gen))
    mma = AttentionConfig(fp8_decode_warps=warps, fp8_decode_depth=depth)
    got = _run(batch, ks, vs, mma, splits)
    ref = attention_reference(deq, 1.0 / math.sqrt(head_dim))
    assert got.dtype == dtype
    assert rel_err(got, ref) < TOL[dtype]
    triton = _run(batch, ks, vs, dataclasses.replace(mma, fp8_decode_mma=False), splits)
    starts = batch.query_start_loc.tolist()
    decode_rows = [starts[b] for b, n in enumerate(batch.q_lens) if n == 1]  # the kernel's rows
    assert rel_err(got[decode_rows], triton[decode_rows]) < 2e-3  # same numerics up to summation order


@needs_gpu
def test_nan_codes_in_unwritten_slots_do_not_leak(gen):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 conversions need sm_89+")
    batch, deq, ks, vs = _fp8(make_paged_batch([1, 1], [20, 33], 32, 8, 128, 32, torch.bfloat16, "cuda", gen))
    codes = batch.v_cache.view(torch.uint8)
    for b, ctx in enumerate(batch.ctx_lens):  # every slot past each context: E4M3 NaN
        last = batch.block_tables[b, (ctx - 1) // 32]
        codes[last, ctx % 32:] = 0x7F
        batch.k_cache.view(torch.uint8)[last, ctx % 32:] = 0xFF
    got = _run(batch, ks, vs, AttentionConfig())
    assert torch.isfinite(got).all()
    assert rel_err(got, attention_reference(deq, 1.0 / math.sqrt(128))) < TOL[torch.bfloat16]
