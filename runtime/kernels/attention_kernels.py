"""Triton kernels for attention over the paged KV cache.

Three kernels:
* `prefill_kernel`: one program per (sequence, block of BLOCK_M query tokens, query head);
  causal over the sequence's paged context. Serves every sequence with q_len >= MIN_Q_LEN; the
  launch covers every sequence, or only those of a row list (the host's prefill rows).
* `decode_kernel`: flash-decoding. One program per (sequence, KV head, split); all query heads
  of the KV head are processed together so each KV tile is read once. Serves q_len == 1 rows.
* `reduce_kernel`: merges the per-split partial results of `decode_kernel` by their
  log-sum-exp (base 2).

Every softmax runs online in fp32 with exp2 (the scale is pre-multiplied by log2(e)).
An FP8 cache (runtime/fp8_kv.py) is read as is and converted in registers to the dtype of the dots:
fp16 for bf16/fp16 queries (FP16_DOTS: E4M3 -> fp16 is one native conversion per two elements,
-> bf16 three, which would cap decode below the memory bandwidth; every E4M3 value is an fp16 value,
q is rounded to fp16, exactly within fp16's normal range, and P too, more finely than bf16 would),
fp32 for fp32 queries. Its K scale is folded into the softmax scale by the caller and its V scale
multiplies the output (SCALE_V), so no element is scaled one by one.
Cache tensors are [num_blocks, block_size, num_kv_heads, head_dim] with a unit last stride;
token n of a sequence lives in block block_tables[seq, n // BLOCK_SIZE], row n % BLOCK_SIZE.

Integer arguments that change from step to step (the block table's row stride: a step's
widest context in blocks; the prefill grid's query blocks and rows; the decode split count) are not
specialized (``do_not_specialize``): Triton would otherwise compile a variant for each of 1,
multiples of 16 and the rest, i.e. compile mid-serving (a served H200 run spent 0.66 s of 8 s
compiling prefill variants, stalling every stream).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _kv_rows(bt_row_ptr, n_start, offs_n, n_valid, stride_cb, stride_cs, BLOCK_SIZE: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """Element offsets of the cache rows holding tokens offs_n (n_start is a multiple of BLOCK_N)."""
    if BLOCK_SIZE % BLOCK_N == 0:
        # The whole tile sits in one cache block: one scalar table read, no gather.
        blk = tl.load(bt_row_ptr + n_start // BLOCK_SIZE).to(tl.int64)
    else:
        blk = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE, mask=n_valid, other=0).to(tl.int64)
    return blk * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs


@triton.jit
def _load_q(ptrs, mask, UPCAST: tl.constexpr, FP16_DOTS: tl.constexpr):
    """The query tile in the dtype of the dots (module docstring); fp16 saturates instead of overflowing."""
    q = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if FP16_DOTS:
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    return q


@triton.jit
def _softmax_step(s, m_i, l_i, acc):
    """One online-softmax update with logits s (base-2 units); returns probabilities too."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return p, m_new, l_i, acc


@triton.jit
def _prefill_tile(q, k_ptr, v_ptr, bt_row, n_start, kv_end, q_pos, head_off, offs_d, d_valid,
                  m_i, l_i, acc, scale_log2, stride_cb, stride_cs,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  EVEN_D: tl.constexpr, PREC: tl.constexpr):
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_valid = offs_n < kv_end
    rows = _kv_rows(bt_row, n_start, offs_n, n_valid, stride_cb, stride_cs, BLOCK_SIZE, BLOCK_N) + head_off
    if MASKED:
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(k_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    elif EVEN_D:
        # Interior tile of a power-of-two head: no mask at all, so loads vectorise fully.
        k = tl.load(k_ptr + rows[:, None] + offs_d[None, :])
        v = tl.load(v_ptr + rows[:, None] + offs_d[None, :])
    else:
        k = tl.load(k_ptr + rows[:, None] + offs_d[None, :], mask=d_valid[None, :], other=0.0)
        v = tl.load(v_ptr + rows[:, None] + offs_d[None, :], mask=d_valid[None, :], other=0.0)
    k = k.to(q.dtype)  # a no-op unless the cache is FP8 or q was upcast
    v = v.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
    if MASKED:
        causal = (offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :]
        s = tl.where(causal, s, float("-inf"))
    p, m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc)
    acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["num_m_blocks", "num_rows", "stride_bt"])
def prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, rows_ptr, scale_log2, v_scale,
                   num_m_blocks, num_rows,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
                   GQA: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   MIN_Q_LEN: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, SCALE_V: tl.constexpr,
                   FP16_DOTS: tl.constexpr, HAS_ROWS: tl.constexpr):
    # Program (i, head): query block num_m_blocks - 1 - i // num_rows of row i % num_rows, the
    # row being a sequence index (rows_ptr[row] when HAS_ROWS: the launch covers only the
    # sequences listed there). Later query blocks see more keys, so the heaviest programs
    # start first and the launch ends on light ones.
    row = tl.program_id(0) % num_rows
    m_block = num_m_blocks - 1 - tl.program_id(0) // num_rows
    head = tl.program_id(1)
    if HAS_ROWS:
        seq = tl.load(rows_ptr + row)
    else:
        seq = row
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if (q_len < MIN_Q_LEN) | (m_block * BLOCK_M >= q_len):
        return
    ctx = tl.load(seq_lens_ptr + seq)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    m_valid = offs_m < q_len
    d_valid = offs_d < HEAD_DIM
    tok = (q_start + offs_m).to(tl.int64)
    q = _load_q(q_ptr + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                m_valid[:, None] & d_valid[None, :], UPCAST, FP16_DOTS)
    q_pos = ctx - q_len + offs_m
    first_pos = ctx - q_len + m_block * BLOCK_M
    # Keys up to the block's last query position; the tiles wholly at or before its first query
    # position need no causal mask.
    kv_end = tl.minimum(ctx, first_pos + BLOCK_M)
    full_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    head_off = (head // GQA) * stride_ch
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for n_start in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _prefill_tile(q, k_ptr, v_ptr, bt_row, n_start, kv_end, q_pos, head_off, offs_d,
                                      d_valid, m_i, l_i, acc, scale_log2, stride_cb, stride_cs,
                                      BLOCK_SIZE, BLOCK_N, False, HEAD_DIM == D_PAD, PREC)
    for n_start in range(full_end, kv_end, BLOCK_N):
        m_i, l_i, acc = _prefill_tile(q, k_ptr, v_ptr, bt_row, n_start, kv_end, q_pos, head_off, offs_d,
                                      d_valid, m_i, l_i, acc, scale_log2, stride_cb, stride_cs,
                                      BLOCK_SIZE, BLOCK_N, True, HEAD_DIM == D_PAD, PREC)
    if SCALE_V:
        acc = acc * v_scale
    out = acc / l_i[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, part_out_ptr, part_lse_ptr, bt_ptr, qsl_ptr, seq_lens_ptr,
                  scale_log2, v_scale, num_splits,
                  stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
                  GQA: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT_OUT: tl.constexpr,
                  UPCAST: tl.constexpr, PREC: tl.constexpr, SCALE_V: tl.constexpr, FP16_DOTS: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if q_len != 1:
        return
    ctx = tl.load(seq_lens_ptr + seq)
    tiles_per_split = tl.cdiv(tl.cdiv(ctx, BLOCK_N), num_splits)
    n_lo = split * tiles_per_split * BLOCK_N
    n_hi = tl.minimum(ctx, n_lo + tiles_per_split * BLOCK_N)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    g_valid = offs_g < GQA
    d_valid = offs_d < HEAD_DIM
    heads = kv_head * GQA + offs_g
    gd_mask = g_valid[:, None] & d_valid[None, :]
    q = _load_q(q_ptr + q_start.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                gd_mask, UPCAST, FP16_DOTS)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    head_off = kv_head * stride_ch
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for n_start in range(n_lo, n_hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < n_hi
        rows = _kv_rows(bt_row, n_start, offs_n, n_valid, stride_cb, stride_cs, BLOCK_SIZE, BLOCK_N) + head_off
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(k_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        k = k.to(q.dtype)  # a no-op unless the cache is FP8 or q was upcast
        v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        s = tl.where(n_valid[None, :], s, float("-inf"))
        p, m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
    if SCALE_V:
        acc = acc * v_scale
    if DIRECT_OUT:
        tl.store(out_ptr + q_start.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=gd_mask)
    else:
        # An empty split (short sequence) leaves l_i == 0: it stores weight -inf and zeros.
        has = l_i > 0
        l_safe = tl.where(has, l_i, 1.0)
        lse = tl.where(has, m_i + tl.math.log2(l_safe), float("-inf"))
        row = (seq * tl.num_programs(1) * GQA + heads).to(tl.int64) * num_splits + split
        tl.store(part_lse_ptr + row, lse, mask=g_valid)
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None], mask=gd_mask)


@triton.jit(do_not_specialize=["num_splits"])
def reduce_kernel(out_ptr, part_out_ptr, part_lse_ptr, qsl_ptr, num_splits, stride_ot, stride_oh,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(qsl_ptr + seq)
    if tl.load(qsl_ptr + seq + 1) - q_start != 1:
        return
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_valid = offs_s < num_splits
    d_valid = offs_d < HEAD_DIM
    row = (seq * tl.num_programs(1) + head).to(tl.int64) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + row, mask=s_valid, other=float("-inf"))
    weight = tl.math.exp2(lse - tl.max(lse, 0))
    parts = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_valid[:, None] & d_valid[None, :], other=0.0)
    out = tl.sum(weight[:, None] * parts, 0) / tl.sum(weight, 0)
    tl.store(out_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=d_valid)
