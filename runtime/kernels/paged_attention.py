"""Paged attention for mixed prefill/decode batches (host side: checks, launch sizes, dispatch).

A batch is served by at most three launches and no host synchronisation:
* when max_query_len > 1, `prefill_kernel` over every sequence (sequences with q_len < 2 exit at once)
  or over the given prefill rows only;
* `decode_kernel` over every sequence (sequences with q_len != 1 exit at once), split along the
  context when there are too few (sequence, KV head) programs to fill the GPU; over an FP8 cache,
  where it applies, the tensor-core kernel of kernels/fp8_decode.py instead (same grid, same
  split results; `AttentionConfig.fp8_decode_mma`);
* `reduce_kernel`, only when the context was split.
Which rows are decode rows is decided inside the kernels from query_start_loc, so the caller only
passes the two maxima it already knows from its CPU plan. The cache is in q's dtype or FP8
(float8_e4m3fn, with its dequantization scales k_scale / v_scale: runtime/fp8_kv.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ._common import (FP8_KV_DTYPE, SUPPORTED_DTYPES, KernelInputError, check, check_dtype, check_last_dim_contiguous,
                      device_sms, dot_precision, next_pow2, upcast_dots)
from . import fp8_decode
from .attention_kernels import decode_kernel, prefill_kernel, reduce_kernel

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttentionConfig:
    """Tile sizes and launch options; every field is a power of two except the warps/stages counts.

    min_tokens_per_split keeps each decode split long enough that its partial result (written in
    fp32) stays small next to the KV bytes it reads.
    """

    prefill_block_m: int = 64
    prefill_block_n: int = 64
    prefill_warps: int = 4
    prefill_stages: int = 2
    decode_block_n: int = 64
    decode_warps: int = 4
    decode_stages: int = 2
    max_splits: int = 64
    min_tokens_per_split: int = 256
    # FP8 cache: decode rows on kernels/fp8_decode.py where it runs, with this launch shape (H200,
    # 512 sequences, scripts/sweep_decode_attention.py --mma-only: 2 warps / 2 tiles in registers
    # was the best of 12 shapes at 128-256 tokens of context, 1.5% off the best at 1,000-2,000)
    fp8_decode_mma: bool = True
    fp8_decode_warps: int = 2
    fp8_decode_depth: int = 2


def default_config(head_dim: int, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> AttentionConfig:
    """Tuned on an H100 for head dims 64/128; fp32 gets smaller tiles to fit shared memory.

    An FP8 cache decodes with 2 warps and 2 stages: the E4M3 -> fp16 conversion makes the tile
    loop heavier per byte, and two warps hide it better (H200, scripts/sweep_decode_attention.py
    --kv-dtype fp8, Llama-3.1-8B heads: 0.064 -> 0.049 ms at batch 256 x 128-256 tokens, 0.024
    -> 0.017 ms at batch 64, 0.368 -> 0.291 ms at batch 256 x 1,000-2,000 tokens; the bf16 cache
    gained <= 4% from any variant and keeps its tiles). Its prefill takes 128-query tiles: 1.91 vs
    2.25 ms for 16 x 2,048 causal tokens (scripts/sweep_decode_attention.py --prefill --kv-dtype
    fp8, H200, 2026-12-01; the bf16 cache was not swept)."""
    if dtype == torch.float32:
        return AttentionConfig(prefill_block_m=32, prefill_block_n=32, decode_block_n=32)
    if kv_dtype == FP8_KV_DTYPE:
        return AttentionConfig(prefill_block_m=128, prefill_block_n=64, prefill_stages=2, decode_warps=2,
                               decode_stages=2)
    return AttentionConfig(prefill_block_m=64, prefill_block_n=64, prefill_stages=2, decode_stages=3)


def choose_num_splits(batch: int, kv_heads: int, max_seq_len: int, cfg: AttentionConfig, sms: int) -> int:
    """How many programs share one sequence's context in decode: enough for about two waves of
    programs on the GPU, never splits shorter than cfg.min_tokens_per_split; a power of two."""
    programs = max(batch * kv_heads, 1)
    want = triton.cdiv(2 * sms, programs)
    by_length = max(max_seq_len // cfg.min_tokens_per_split, 1)
    splits = max(min(want, by_length, cfg.max_splits), 1)
    return 1 << (splits.bit_length() - 1)


def _check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scaled: bool) -> None:
    """One cheap boolean on the hot path (this runs once per layer per step; building the error
    messages eagerly cost ~40 us); the detailed checks run only to explain a failure."""
    qs, ks = q.shape, k_cache.shape
    ok = (q.dim() == 3 and len(ks) == 4 and ks == v_cache.shape and k_cache.stride() == v_cache.stride()
          and ks[3] == qs[2] and qs[1] % ks[2] == 0 and k_cache.dtype == v_cache.dtype
          and (k_cache.dtype == q.dtype or k_cache.dtype == FP8_KV_DTYPE)
          and (k_cache.dtype == FP8_KV_DTYPE or not scaled)
          and q.dtype in SUPPORTED_DTYPES and q.stride(2) == 1 and k_cache.stride(3) == 1
          and block_tables.dtype == query_start_loc.dtype == seq_lens.dtype == torch.int32
          and block_tables.dim() == 2 and block_tables.stride(1) == 1
          and query_start_loc.shape[0] == seq_lens.shape[0] + 1 and block_tables.shape[0] >= seq_lens.shape[0])
    if not ok:
        _explain_bad_inputs(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scaled)


def _explain_bad_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scaled: bool) -> None:
    check(q.dim() == 3, f"q must be [tokens, heads, head_dim], got shape {tuple(q.shape)}")
    check(k_cache.dim() == 4 and k_cache.shape == v_cache.shape,
          f"k_cache/v_cache must both be [blocks, block_size, kv_heads, head_dim], got "
          f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    check(k_cache.stride() == v_cache.stride(), "k_cache and v_cache must have the same strides")
    check(k_cache.shape[3] == q.shape[2], f"head_dim differs: q {q.shape[2]}, cache {k_cache.shape[3]}")
    check(q.shape[1] % k_cache.shape[2] == 0,
          f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k_cache.shape[2]})")
    fp8 = k_cache.dtype == v_cache.dtype == FP8_KV_DTYPE
    check(q.dtype == k_cache.dtype == v_cache.dtype or fp8,
          f"dtypes differ: q {q.dtype}, cache {k_cache.dtype}/{v_cache.dtype} (the cache is q's dtype or fp8)")
    check(fp8 or not scaled, f"KV scales apply to an FP8 cache only; this cache is {k_cache.dtype}")
    check_dtype("q", q)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_last_dim_contiguous(name, t)
    for name, t in (("block_tables", block_tables), ("query_start_loc", query_start_loc), ("seq_lens", seq_lens)):
        check(t.dtype == torch.int32, f"{name} must be int32, got {t.dtype}")
    check(block_tables.dim() == 2 and block_tables.stride(1) == 1, "block_tables must be [batch, max_blocks], row-major")
    batch = seq_lens.shape[0]
    check(query_start_loc.shape[0] == batch + 1 and block_tables.shape[0] >= batch,
          f"batch sizes disagree: seq_lens {batch}, query_start_loc {query_start_loc.shape[0]}, "
          f"block_tables {block_tables.shape[0]}")
    raise KernelInputError("paged_attention: inputs rejected")  # unreachable unless the two checks drift


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float, max_query_len: int,
                    max_seq_len: int, *, config: AttentionConfig | None = None, num_splits: int | None = None,
                    k_scale: float = 1.0, v_scale: float = 1.0,
                    prefill_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of q[T, Hq, D] over each sequence's paged context; returns out[T, Hq, D].

    Query token i of sequence b sits at position seq_lens[b] - q_len_b + i and sees positions
    <= that. max_query_len must be >= every q_len (it sizes the prefill grid); max_seq_len only
    tunes the decode split count. `config` and `num_splits` override the defaults (tuning, tests).
    An FP8 cache holds K/V divided by k_scale/v_scale: k_scale joins the softmax scale and v_scale
    multiplies the output. ``prefill_rows`` (int32 [P]), when given, lists the sequences with
    q_len > 1 (every one of them: a row missing from it gets no output), and the prefill launch
    covers only those: in a mixed step of 4 prompts and 508 decode rows the grid is otherwise
    128x larger, almost all of it programs that exit at once.
    """
    scaled = k_scale != 1.0 or v_scale != 1.0
    _check_inputs(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scaled)
    if prefill_rows is not None and (prefill_rows.dtype != torch.int32 or prefill_rows.dim() != 1):
        raise KernelInputError(f"prefill_rows must be a 1-D int32 tensor, got {prefill_rows.dtype} "
                               f"of shape {tuple(prefill_rows.shape)}")
    out = torch.empty_like(q)
    batch = seq_lens.shape[0]
    if q.shape[0] == 0 or batch == 0:
        return out
    cfg = config or default_config(q.shape[2], q.dtype, k_cache.dtype)
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    fp16_dots = k_cache.dtype == FP8_KV_DTYPE and q.dtype != torch.float32  # attention_kernels docstring
    common = dict(HEAD_DIM=head_dim, D_PAD=next_pow2(head_dim), BLOCK_SIZE=k_cache.shape[1],
                  UPCAST=upcast_dots(q) and not fp16_dots, PREC=dot_precision(q.dtype), SCALE_V=v_scale != 1.0,
                  FP16_DOTS=fp16_dots)
    strides = (q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
               k_cache.stride(2), block_tables.stride(0))
    scales = (float(scale) * k_scale * LOG2E, float(v_scale))  # (scale_log2, v_scale) of the kernels
    rows = batch if prefill_rows is None else prefill_rows.shape[0]
    if max_query_len > 1 and rows:
        m_blocks = triton.cdiv(max_query_len, cfg.prefill_block_m)
        prefill_kernel[(rows * m_blocks, num_heads)](
            q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
            seq_lens if prefill_rows is None else prefill_rows, *scales, m_blocks, rows, *strides,
            GQA=num_heads // kv_heads, BLOCK_M=cfg.prefill_block_m, BLOCK_N=cfg.prefill_block_n, MIN_Q_LEN=2,
            num_warps=cfg.prefill_warps, num_stages=cfg.prefill_stages, HAS_ROWS=prefill_rows is not None, **common)
    _decode(q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, scales, max_seq_len,
            strides, common, cfg, num_splits)
    return out


def _decode(q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, scales: tuple[float, float],
            max_seq_len: int, strides: tuple, common: dict, cfg: AttentionConfig, num_splits: int | None) -> None:
    """Launch the split-KV decode kernel (and its reduction when the context is split);
    scales = (softmax scale * k_scale * log2(e), v_scale)."""
    batch, num_heads, kv_heads = seq_lens.shape[0], q.shape[1], k_cache.shape[2]
    gqa = num_heads // kv_heads
    splits = num_splits or choose_num_splits(batch, kv_heads, max_seq_len, cfg, device_sms(q))
    if splits > 1:
        part_out = torch.empty((batch, num_heads, splits, q.shape[2]), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_heads, splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused: the kernel writes the output directly
    mma = _fp8_mma_config(q, k_cache, gqa, cfg)
    if mma is not None:
        fp8_decode.fp8_decode(q, k_cache, v_cache, out, part_out, part_lse, block_tables, query_start_loc, seq_lens,
                              scales[0], scales[1], splits, mma)
    else:
        decode_kernel[(batch, kv_heads, splits)](
            q, k_cache, v_cache, out, part_out, part_lse, block_tables, query_start_loc, seq_lens, *scales,
            splits, *strides, GQA=gqa, G_PAD=max(16, next_pow2(gqa)), BLOCK_N=cfg.decode_block_n,
            DIRECT_OUT=splits == 1, num_warps=cfg.decode_warps, num_stages=cfg.decode_stages, **common)
    if splits > 1:
        reduce_kernel[(batch, num_heads)](
            out, part_out, part_lse, query_start_loc, splits, out.stride(0), out.stride(1),
            HEAD_DIM=common["HEAD_DIM"], D_PAD=common["D_PAD"], S_PAD=next_pow2(splits), num_warps=4)


def _fp8_mma_config(q: torch.Tensor, k_cache: torch.Tensor, gqa: int,
                    cfg: AttentionConfig) -> fp8_decode.DecodeConfig | None:
    """The launch shape when decode rows over an FP8 cache go to the tensor-core kernel
    (kernels/fp8_decode.py): where it runs (its shapes, an sm_89+ GPU) and NVRTC compiles it
    (checked once per shape); else None (the Triton kernel)."""
    if not (cfg.fp8_decode_mma and fp8_decode.supported(q, k_cache, gqa)):
        return None
    mma = fp8_decode.DecodeConfig(cfg.fp8_decode_warps, cfg.fp8_decode_depth)
    return mma if fp8_decode.available(q.shape[2], gqa, k_cache.shape[1], q.dtype, mma, q.device.index or 0) else None
