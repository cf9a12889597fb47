"""The torch paged-attention reference against naive dense causal attention per sequence."""

from __future__ import annotations

import pytest
import torch

from kiln.runtime import attention
from kiln.runtime.attention import paged_attention, write_kv_cache

HEAD_SIZE = 8
NUM_KV_HEADS = 2
# (context before this step, query tokens this step): decode rows, a whole prompt,
# prefill chunks on top of existing context, a one-token prompt.
SEQUENCES = [(0, 1), (16, 1), (0, 9), (21, 7), (5, 1), (3, 13)]


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Lq, Hq, D] are the last Lq of L positions; k, v [L, Hkv, D]. Dense, one sequence."""
    lq, hq, _ = q.shape
    length, hkv, _ = k.shape
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    q_pos = torch.arange(length - lq, length).unsqueeze(1)
    scores = scores.masked_fill(torch.arange(length).unsqueeze(0) > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).float()


def build_case(block_size: int, gqa: int, seed: int = 0):
    """Random KV written to a shuffled paged cache, plus the flattened query batch."""
    gen = torch.Generator().manual_seed(seed)
    num_heads = NUM_KV_HEADS * gqa
    blocks_per_seq = [-(-(c + q) // block_size) for c, q in SEQUENCES]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    k_cache = torch.randn(num_blocks, block_size, NUM_KV_HEADS, HEAD_SIZE, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, NUM_KV_HEADS, HEAD_SIZE, generator=gen)
    max_blocks = max(blocks_per_seq) + 1
    block_tables = torch.zeros(len(SEQUENCES), max_blocks, dtype=torch.int32)
    seqs, qs, slots = [], [], []
    used = 0
    for b, ((ctx, qlen), nb) in enumerate(zip(SEQUENCES, blocks_per_seq)):
        blocks = perm[used : used + nb]
        used += nb
        block_tables[b, :nb] = blocks.int()
        length = ctx + qlen
        pos = torch.arange(length)
        seq_slots = blocks[pos // block_size] * block_size + pos % block_size
        k = torch.randn(length, NUM_KV_HEADS, HEAD_SIZE, generator=gen)
        v = torch.randn(length, NUM_KV_HEADS, HEAD_SIZE, generator=gen)
        # The context is already in the cache; this step's tokens are written by write_kv_cache.
        k_cache.view(-1, NUM_KV_HEADS, HEAD_SIZE)[seq_slots[:ctx]] = k[:ctx]
        v_cache.view(-1, NUM_KV_HEADS, HEAD_SIZE)[seq_slots[:ctx]] = v[:ctx]
        q = torch.randn(qlen, num_heads, HEAD_SIZE, generator=gen)
        seqs.append((q, k, v))
        qs.append(q)
        slots.append(seq_slots[ctx:])
    q_lens = torch.tensor([q for _, q in SEQUENCES])
    meta = dict(
        block_tables=block_tables,
        query_start_loc=torch.cat((torch.zeros(1), q_lens.cumsum(0))).int(),
        seq_lens=torch.tensor([c + q for c, q in SEQUENCES], dtype=torch.int32),
        max_query_len=int(q_lens.max()),
        max_seq_len=max(c + q for c, q in SEQUENCES),
    )
    return seqs, torch.cat(qs), torch.cat(slots).long(), k_cache, v_cache, meta


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("gqa", [1, 2, 4])
def test_paged_attention_matches_naive(block_size: int, gqa: int) -> None:
    seqs, q, slots, k_cache, v_cache, meta = build_case(block_size, gqa)
    new_k = torch.cat([k[c:] for (_, k, _), (c, _) in zip(seqs, SEQUENCES)])
    new_v = torch.cat([v[c:] for (_, _, v), (c, _) in zip(seqs, SEQUENCES)])
    write_kv_cache(new_k, new_v, k_cache, v_cache, slots)
    scale = HEAD_SIZE**-0.5
    out = paged_attention(q, k_cache, v_cache, scale=scale, **meta)
    expected = torch.cat([naive_attention(sq, k, v, scale) for sq, k, v in seqs])
    assert out.shape == q.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_paged_attention_grouped_fallback_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory-bounded path (batch split into groups of sequences) gives the same result."""
    seqs, q, slots, k_cache, v_cache, meta = build_case(block_size=4, gqa=2, seed=1)
    new_k = torch.cat([k[c:] for (_, k, _), (c, _) in zip(seqs, SEQUENCES)])
    new_v = torch.cat([v[c:] for (_, _, v), (c, _) in zip(seqs, SEQUENCES)])
    write_kv_cache(new_k, new_v, k_cache, v_cache, slots)
    whole = paged_attention(q, k_cache, v_cache, scale=0.3, **meta)
    monkeypatch.setattr(attention, "_MAX_SCORE_ELEMENTS", 4 * meta["max_query_len"] * meta["max_seq_len"] * 2)
    grouped = paged_attention(q, k_cache, v_cache, scale=0.3, **meta)
    torch.testing.assert_close(grouped, whole, atol=1e-6, rtol=1e-6)
    expected = torch.cat([naive_attention(sq, k, v, 0.3) for sq, k, v in seqs])
    torch.testing.assert_close(grouped, expected, atol=1e-5, rtol=1e-5)


def test_write_kv_cache_writes_slots_and_skips_negative() -> None:
    gen = torch.Generator().manual_seed(2)
    k_cache = torch.zeros(5, 4, 2, 3)
    v_cache = torch.zeros(5, 4, 2, 3)
    k = torch.randn(6, 2, 3, generator=gen)
    v = torch.randn(6, 2, 3, generator=gen)
    slots = torch.tensor([7, -1, 0, 19, -1, 12])
    write_kv_cache(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(20, 2, 3), v_cache.view(20, 2, 3)
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot], k[i]) and torch.equal(flat_v[slot], v[i])
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert not flat_k[untouched].any() and not flat_v[untouched].any()


def test_paged_attention_bf16_close_to_fp32() -> None:
    seqs, q, slots, k_cache, v_cache, meta = build_case(block_size=16, gqa=2, seed=3)
    new_k = torch.cat([k[c:] for (_, k, _), (c, _) in zip(seqs, SEQUENCES)])
    new_v = torch.cat([v[c:] for (_, _, v), (c, _) in zip(seqs, SEQUENCES)])
    write_kv_cache(new_k, new_v, k_cache, v_cache, slots)
    ref = paged_attention(q, k_cache, v_cache, scale=0.35, **meta)
    out = paged_attention(q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), scale=0.35, **meta)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_prompts_metadata_by_hand() -> None:
    """Two prompts of 5 and 3 tokens in blocks of 4: both start at position 0 in blocks 0, 1."""
    attn = attention.AttentionMetadata.prompts([5, 3], block_size=4)
    assert attn.slot_mapping.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert attn.block_tables.tolist() == [[0, 1], [0, 1]] and attn.block_tables.dtype == torch.int32
    assert attn.seq_lens.tolist() == [5, 3] and attn.query_start_loc.tolist() == [0, 5, 8]
    assert (attn.max_query_len, attn.max_seq_len) == (5, 5)


def test_prompts_metadata_runs_one_prompt_like_dense_attention() -> None:
    n, block_size = 11, 4
    attn = attention.AttentionMetadata.prompts([n], block_size)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, h, HEAD_SIZE, generator=gen) for h in (2 * NUM_KV_HEADS, NUM_KV_HEADS, NUM_KV_HEADS))
    cache = [torch.zeros(attn.block_tables.shape[1], block_size, NUM_KV_HEADS, HEAD_SIZE) for _ in range(2)]
    write_kv_cache(k, v, *cache, attn.slot_mapping)
    out = paged_attention(q, *cache, block_tables=attn.block_tables, query_start_loc=attn.query_start_loc,
                          seq_lens=attn.seq_lens, max_query_len=attn.max_query_len, max_seq_len=attn.max_seq_len,
                          scale=HEAD_SIZE**-0.5)
    torch.testing.assert_close(out, naive_attention(q, k, v, HEAD_SIZE**-0.5), rtol=1e-5, atol=1e-5)


def test_padding_metadata_fills_the_given_buffers() -> None:
    slots, table, lens = torch.arange(6), torch.ones((2, 5), dtype=torch.int32), torch.full((2,), 9, dtype=torch.int32)
    qsl = torch.arange(3, dtype=torch.int32) * 3
    attn = attention.AttentionMetadata.padding(slots, table, lens, qsl, query_len=3, max_seq_len=64)
    assert attn.slot_mapping is slots and attn.block_tables is table and attn.seq_lens is lens
    assert slots.tolist() == [-1] * 6 and not table.any() and lens.tolist() == [3, 3]
    assert (attn.max_query_len, attn.max_seq_len) == (3, 64)
