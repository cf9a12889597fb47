"""paged_attention against a float64 reference on random mixed batches over a shuffled cache."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.runtime.kernels import AttentionConfig, KernelInputError, choose_num_splits, paged_attention

from .reference import TOL, attention_reference, make_paged_batch, rel_err

# Small tiles so that small contexts still span several tiles, splits and blocks.
SMALL = AttentionConfig(prefill_block_m=16, prefill_block_n=16, decode_block_n=16, min_tokens_per_split=16)


def _run(batch, cfg=SMALL, num_splits=None, prefill_rows=None):
    scale = 1.0 / math.sqrt(batch.q.shape[2])
    out = paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.query_start_loc,
                          batch.seq_lens, scale, max(batch.q_lens), max(batch.ctx_lens), config=cfg,
                          num_splits=num_splits, prefill_rows=prefill_rows)
    return out, attention_reference(batch, scale)


def _prefill_rows(q_lens, order, device):
    """The rows of more than one query token, in the given order (a permutation of them)."""
    rows = [i for i, n in enumerate(q_lens) if n > 1]
    return torch.tensor([rows[i] for i in order], dtype=torch.int32, device=device)


def _assert_close(out, ref, dtype, gen):
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.3g} (seed {gen.initial_seed()})"


# (heads, kv_heads, head_dim, block_size, dtype): every shape in bf16, fp32/fp16 on two of them
# (the interpreter is slow; the GPU script runs the full grid).
MIXED_CASES = [
    (2, 2, 64, 16, torch.bfloat16),    # MHA
    (4, 1, 64, 32, torch.bfloat16),    # GQA 4, tile smaller than a block
    (8, 1, 128, 16, torch.bfloat16),   # GQA 8, head dim 128
    (6, 2, 64, 8, torch.bfloat16),     # GQA 3 (padded group), tile spans several blocks
    (2, 2, 64, 16, torch.float32),
    (8, 1, 128, 16, torch.float32),
    (4, 1, 64, 32, torch.float16),
    (6, 2, 64, 8, torch.float16),
]


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,dtype", MIXED_CASES)
def test_mixed_batch(heads, kv_heads, head_dim, block_size, dtype, device, gen):
    # prefill with earlier context (chunk), decode, full prefill, an empty padding row, a decode
    # row on a context of one token, a two-token query (speculative-style).
    q_lens = [5, 1, 19, 0, 1, 2]
    ctx_lens = [37, 50, 19, 0, 1, 21]
    batch = make_paged_batch(q_lens, ctx_lens, heads, kv_heads, head_dim, block_size, dtype, device, gen)
    out, ref = _run(batch)
    _assert_close(out, ref, dtype, gen)


@pytest.mark.parametrize("dtype,order", [(torch.bfloat16, (0, 1, 2)), (torch.float32, (2, 0, 1))])
def test_prefill_over_listed_rows(dtype, order, device, gen):
    # The prefill launch over only the rows of more than one token (in any order) computes
    # every row the full launch does; decode rows still go to the decode kernel.
    q_lens = [5, 1, 19, 0, 1, 2]
    batch = make_paged_batch(q_lens, [37, 50, 19, 0, 1, 21], 4, 1, 64, 16, dtype, device, gen)
    out, ref = _run(batch, prefill_rows=_prefill_rows(q_lens, order, device))
    _assert_close(out, ref, dtype, gen)


@pytest.mark.parametrize("dtype,num_splits", [(torch.bfloat16, 1), (torch.bfloat16, 3), (torch.float32, 8)])
def test_decode_splits(dtype, num_splits, device, gen):
    # Short sequences leave some splits empty; the long one fills all of them.
    ctx_lens = [1, 17, 150, 64]
    batch = make_paged_batch([1] * len(ctx_lens), ctx_lens, 4, 1, 64, 16, dtype, device, gen)
    out, ref = _run(batch, num_splits=num_splits)
    _assert_close(out, ref, dtype, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_config(dtype, device, gen):
    # The production tile sizes, head dim 128, large blocks, a prefill chunk and decode rows.
    batch = make_paged_batch([70, 1, 1], [140, 300, 9], 4, 2, 128, 128, dtype, device, gen)
    out, ref = _run(batch, cfg=None)
    _assert_close(out, ref, dtype, gen)


def test_cache_as_views_of_one_kv_tensor(device, gen):
    # The runtime passes kv[layer][0] / kv[layer][1] of one [2, NB, BS, Hkv, D] tensor.
    batch = make_paged_batch([3, 1], [40, 25], 4, 2, 64, 16, torch.bfloat16, device, gen)
    kv = torch.stack([batch.k_cache, batch.v_cache])
    batch.k_cache, batch.v_cache = kv[0], kv[1]
    out, ref = _run(batch)
    _assert_close(out, ref, torch.bfloat16, gen)


def test_split_choice():
    cfg = AttentionConfig()
    assert choose_num_splits(1, 8, 8192, cfg, 132) == 32       # few programs, long context: split
    assert choose_num_splits(256, 8, 8192, cfg, 132) == 1      # the batch alone fills the GPU
    assert choose_num_splits(1, 8, 100, cfg, 132) == 1         # too short to be worth splitting
    for batch in (1, 3, 17):
        n = choose_num_splits(batch, 4, 4096, cfg, 132)
        assert n & (n - 1) == 0 and 1 <= n <= cfg.max_splits


def test_bad_inputs_raise(device, gen):
    batch = make_paged_batch([1], [4], 4, 2, 64, 16, torch.float32, device, gen)
    args = [batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.query_start_loc, batch.seq_lens]
    with pytest.raises(KernelInputError, match="block_tables must be int32"):
        paged_attention(*args[:3], batch.block_tables.long(), *args[4:], 0.1, 1, 4)
    with pytest.raises(KernelInputError, match="multiple of KV heads"):
        paged_attention(batch.q[:, :3], *args[1:], 0.1, 1, 4)
    with pytest.raises(KernelInputError, match="dtypes differ"):
        paged_attention(batch.q.half(), *args[1:], 0.1, 1, 4)
    with pytest.raises(KernelInputError, match="prefill_rows must be a 1-D int32"):
        paged_attention(*args, 0.1, 1, 4, prefill_rows=torch.zeros(1, dtype=torch.int64, device=device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (counts compiled kernels)")
def test_step_to_step_integers_compile_once(gen):
    """A served step's block-table width, prefill query blocks and rows and decode splits change
    every step; each kernel compiles once for all of them (a mid-serving compile stalls every stream)."""
    from kiln.runtime.kernels import attention_kernels as ak

    def compiled() -> int:
        return sum(len(caches[0]) for k in (ak.prefill_kernel, ak.decode_kernel, ak.reduce_kernel)
                   for caches in k.device_caches.values())

    # (q_lens, ctx_lens): table widths 1 / 3 / 16 / 19 blocks of 16, 1 / 3 / 16 query blocks of 64.
    shapes = [([5, 1], [5, 9]), ([130, 1], [130, 40]), ([1024, 1], [1024, 256]), ([1, 1, 70], [300, 7, 80])]
    counts = []
    for q_lens, ctx_lens in shapes:
        for splits in (1, 2):  # (more splits change the reduction's S_PAD tile: a constexpr)
            batch = make_paged_batch(q_lens, ctx_lens, 8, 2, 128, 16, torch.bfloat16, "cuda", gen)
            out, ref = _run(batch, cfg=None, num_splits=splits)
            _assert_close(out, ref, torch.bfloat16, gen)
            if max(q_lens) > 1:  # the launch over listed prefill rows: its row count varies too
                rows = _prefill_rows(q_lens, range(sum(n > 1 for n in q_lens)), "cuda")
                out, ref = _run(batch, cfg=None, num_splits=splits, prefill_rows=rows)
                _assert_close(out, ref, torch.bfloat16, gen)
            counts.append(compiled())
    assert counts[-1] == counts[1], f"kernels compiled per shape: {counts}"
