"""Naive float64 references and random-input builders for the kernel tests (independent of the
runtime's own torch references, so the kernel tests do not depend on them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in out gives NaN (which fails every bound)."""
    out64, ref64 = out.detach().cpu().double(), ref.detach().cpu().double()
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@dataclass
class PagedBatch:
    """A random mixed batch over a shuffled paged cache (every slot holds random data)."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    q_lens: list[int]
    ctx_lens: list[int]


def make_paged_batch(q_lens: list[int], ctx_lens: list[int], num_heads: int, kv_heads: int, head_dim: int,
                     block_size: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator,
                     spare_blocks: int = 3) -> PagedBatch:
    """ctx_lens[b] counts the sequence's tokens after this step (q_lens[b] of them are queries)."""
    blocks_per_seq = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    max_blocks = max(blocks_per_seq + [1])
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    # Unused table entries point at a real block: kernels must mask by length, not by table value.
    tables = torch.full((len(ctx_lens), max_blocks + 1), int(perm[-1]), dtype=torch.int32)
    start = 0
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = perm[start:start + n]
        start += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    kv = torch.randn((2, *shape), generator=gen).to(dtype)
    q = torch.randn((sum(q_lens), num_heads, head_dim), generator=gen).to(dtype)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    return PagedBatch(q.to(device), kv[0].to(device), kv[1].to(device), tables.to(device), qsl.to(device),
                      torch.tensor(ctx_lens, dtype=torch.int32, device=device), list(q_lens), list(ctx_lens))


def gather_context(cache: torch.Tensor, table: torch.Tensor, ctx: int) -> torch.Tensor:
    """[ctx, H, D] tokens of one sequence read through its block-table row."""
    block_size = cache.shape[1]
    pos = torch.arange(ctx)
    return cache[table[pos // block_size].long(), pos % block_size]


def attention_reference(batch: PagedBatch, scale: float) -> torch.Tensor:
    """Float64 causal attention of every query token over its sequence's paged context."""
    q = batch.q.cpu().double()
    k_cache, v_cache, tables = batch.k_cache.cpu().double(), batch.v_cache.cpu().double(), batch.block_tables.cpu()
    out = torch.empty_like(q)
    gqa = q.shape[1] // k_cache.shape[2]
    start = 0
    for b, (q_len, ctx) in enumerate(zip(batch.q_lens, batch.ctx_lens)):
        k = gather_context(k_cache, tables[b], ctx).repeat_interleave(gqa, dim=1)
        v = gather_context(v_cache, tables[b], ctx).repeat_interleave(gqa, dim=1)
        qb = q[start:start + q_len]
        s = torch.einsum("thd,nhd->htn", qb, k) * scale
        q_pos = ctx - q_len + torch.arange(q_len)
        s = s.masked_fill(torch.arange(ctx)[None, :] > q_pos[:, None], float("-inf"))
        out[start:start + q_len] = torch.einsum("htn,nhd->thd", s.softmax(-1), v)
        start += q_len
    return out
