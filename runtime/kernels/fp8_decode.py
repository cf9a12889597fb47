"""Decode attention over an FP8 (E4M3) KV cache on tensor cores: a CUDA kernel compiled at first
use with NVRTC (``torch.cuda._compile_kernel``, as kernels/int4_mma.py), run on the current stream.

Why: the Triton decode kernel (attention_kernels.decode_kernel) converts each E4M3 tile to fp16
in a blocked layout and hands it to ``tl.dot`` through shared memory; on an H200 it reads the
cache at ~2.7 TB/s against the 4.16 TB/s the memory gives (BENCHMARKS.md, seventh session). Here
every cache byte goes from one 16-byte global load straight into an ``mma.sync`` fragment: one
``cvt.rn.f16x2.e4m3x2`` per two values, no shared memory, no layout conversion.

One CTA per (sequence, KV head, split) of ``WARPS`` warps; the split's context is cut into tiles
of 16 tokens (a tile never straddles a cache block: the block size is a multiple of 16), dealt to
the warps round robin, each warp keeping its own online softmax and meeting the others in shared
memory at the end. Operands (PTX m16n8k16, f16 inputs, f32 accumulators; lane = 4 r + c):

* scores, transposed: S^T[16 tokens, 8 heads] = K[16 tokens, D] Q^T[D, 8 heads] over D/16 steps.
  A = K (rows = tokens r and r + 8), B = Q^T (column r = query head r of the group; heads past
  the group are zeros). The reduction order inside a step is free when A and B agree, so lane c
  owns dims 64 j + 16 c + i (i < 16, j < D/64): its K bytes of a token are one or two 16-byte
  loads, step s takes bytes 4 s .. 4 s + 3 of them (``kdim``).
* the probabilities: the C fragment of S^T (token r, heads 2c, 2c+1) rounded to fp16 is an 8x8
  tile in the fragment layout; ``movmatrix.trans`` turns it into the B fragment of P^T (tokens 2c,
  2c+1 of head r), so softmax values never leave registers. A lane's softmax state is that of
  heads 2c and 2c+1, which is also what its output accumulators hold.
* output, transposed: O^T[D, 8 heads] += V^T[D, 16 tokens] P^T[16 tokens, 8 heads], D/16 m-tiles.
  A = V^T: lane r owns dims (D/8) r .. (D/8) r + D/8 - 1 (one load per token), m-tile i its dims
  2i (row r) and 2i + 1 (row r + 8) of tokens 2c, 2c + 1, 2c + 8, 2c + 9; ``prmt`` interleaves two
  tokens' bytes so one conversion yields a (token 2c, token 2c+1) pair.

Numerics are the Triton kernel's (``FP16_DOTS``): q rounded to fp16 (saturating), E4M3 values exact
in fp16, scores and softmax in fp32 with exp2 (the scale pre-multiplied by log2 e, the K scale
folded in), P rounded to fp16 for the second product, the V scale applied to the output. Tokens
past the split's end score -inf and their V bytes are zeroed (an unwritten cache slot may hold a
NaN code). Partial results of a split context use the Triton kernel's layout, so its
``reduce_kernel`` merges them. Cache loads run ``DEPTH - 1`` tiles ahead in registers.
kernels/fp8_decode_emulation.py replays all of this lane by lane in float64 (the CPU test).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from ._cuda import mma_m16n8k16

logger = logging.getLogger(__name__)

HEAD_DIMS = (64, 128)
MAX_GQA = 8  # query heads per KV head: the 8 columns of the B operand
TILE = 16  # tokens per mma tile

_SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define D @HEAD_DIM@
#define GQA @GQA@
#define BS @BLOCK_SIZE@
#define WARPS @WARPS@
#define DEPTH @DEPTH@
#define KS (D / 16)   /* k-steps of Q K^T, m-tiles of V^T P^T */
#define KW (D / 16)   /* u32 words of K a lane holds per token (D / 4 bytes) */
#define VW (D / 32)   /* u32 words of V a lane holds per token (D / 8 bytes) */
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ u32 e4m3x2(u32 v) {  // low 16 bits: two E4M3 codes -> f16x2 (low code low)
  u32 r;
  asm("{ .reg .b16 t; cvt.u16.u32 t, %1; cvt.rn.f16x2.e4m3x2 %0, t; }" : "=r"(r) : "r"(v));
  return r;
}

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
  u32 r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

__device__ __forceinline__ u32 trans8x8(u32 a) {
  u32 r;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(a));
  return r;
}

@MMA@
__device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float q_to_f32(u16 h) {
#if @Q_BF16@
  return __uint_as_float(((u32)h) << 16);
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#endif
}

__device__ __forceinline__ u16 out_from_f32(float f) {
  u16 h;
#if @Q_BF16@
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
  return h;
}

__device__ __forceinline__ float sat16(float f) {  // fp16 saturates instead of overflowing
  return fminf(fmaxf(f, -65504.f), 65504.f);
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
kiln_fp8_decode(const u16* __restrict__ q, const u8* __restrict__ kc, const u8* __restrict__ vc,
                u16* __restrict__ out, float* __restrict__ part_out, float* __restrict__ part_lse,
                const int* __restrict__ bt, const int* __restrict__ qsl, const int* __restrict__ seq_lens,
                double scale_log2_d, double v_scale_d, int num_splits,
                int stride_qt, int stride_qh, int stride_ot, int stride_oh,
                int stride_cb, int stride_cs, int stride_ch, int stride_bt) {
  __shared__ float sm_m[WARPS][8], sm_l[WARPS][8];
  __shared__ float sm_acc[WARPS][GQA][D];
  const int seq = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
  const int q_start = qsl[seq];
  if (qsl[seq + 1] - q_start != 1) return;  // not a decode row
  const float scale_log2 = (float)scale_log2_d, v_scale = (float)v_scale_d;
  const int ctx = seq_lens[seq];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r = lane >> 2, c = lane & 3;
  const int tiles = (ctx + 15) >> 4;
  const int per_split = (tiles + num_splits - 1) / num_splits;
  const int t_lo = split * per_split;
  const int t_hi = min(tiles, t_lo + per_split);
  const int n_hi = min(ctx, t_hi * 16);
  const int first = t_lo + warp;
  const int mine = first < t_hi ? (t_hi - first + WARPS - 1) / WARPS : 0;  // tiles of this warp

  // Q^T as the B operand: lane (r, c) holds head r's dims kdim(c, 4s .. 4s + 3) for every step s
  u32 qf[KS][2];
  {
    const u16* qp = q + (long long)q_start * stride_qt + (long long)(kvh * GQA + r) * stride_qh;
#pragma unroll
    for (int s = 0; s < KS; s++) {
      const int d0 = 64 * (s >> 2) + 16 * c + 4 * (s & 3);  // kdim(c, 4s)
      if (r < GQA) {
        const uint2 raw = *(const uint2*)(qp + d0);
        qf[s][0] = pack_f16x2(sat16(q_to_f32((u16)(raw.x & 0xFFFF))), sat16(q_to_f32((u16)(raw.x >> 16))));
        qf[s][1] = pack_f16x2(sat16(q_to_f32((u16)(raw.y & 0xFFFF))), sat16(q_to_f32((u16)(raw.y >> 16))));
      } else {
        qf[s][0] = qf[s][1] = 0u;
      }
    }
  }

  // DEPTH tiles of K and V in registers, loaded DEPTH - 1 tiles ahead
  u32 kr[DEPTH][2][KW];  // tokens r and r + 8: K bytes 64 j + 16 c + (0..15), j < D / 64
  u32 vr[DEPTH][4][VW];  // tokens 2c, 2c + 1, 2c + 8, 2c + 9: V bytes (D / 8) r + (0 .. D / 8 - 1)
#define LOAD(d, it)                                                                                    \
  {                                                                                                    \
    const int n0_ = (first + (it) * WARPS) * 16;                                                       \
    const long long page_ = bt[(long long)seq * stride_bt + n0_ / BS];                                 \
    const long long base_ = page_ * stride_cb + (long long)(n0_ % BS) * stride_cs + (long long)kvh * stride_ch; \
    _Pragma("unroll") for (int h_ = 0; h_ < 2; h_++) {                                                 \
      const u8* kp_ = kc + base_ + (long long)(r + 8 * h_) * stride_cs + 16 * c;                        \
      _Pragma("unroll") for (int j_ = 0; j_ < D / 64; j_++) {                                          \
        const uint4 t_ = *(const uint4*)(kp_ + 64 * j_);                                               \
        kr[d][h_][4 * j_] = t_.x; kr[d][h_][4 * j_ + 1] = t_.y;                                        \
        kr[d][h_][4 * j_ + 2] = t_.z; kr[d][h_][4 * j_ + 3] = t_.w;                                    \
      }                                                                                                \
    }                                                                                                  \
    _Pragma("unroll") for (int e_ = 0; e_ < 4; e_++) {                                                 \
      const int tok_ = 2 * c + (e_ & 1) + 8 * (e_ >> 1);                                               \
      const u8* vp_ = vc + base_ + (long long)tok_ * stride_cs + (D / 8) * r;                           \
      const bool ok_ = n0_ + tok_ < n_hi;                                                              \
      if (VW == 4) {                                                                                   \
        const uint4 t_ = ok_ ? *(const uint4*)vp_ : make_uint4(0u, 0u, 0u, 0u);                        \
        vr[d][e_][0] = t_.x; vr[d][e_][1 % VW] = t_.y; vr[d][e_][2 % VW] = t_.z; vr[d][e_][3 % VW] = t_.w; \
      } else {                                                                                         \
        const uint2 t_ = ok_ ? *(const uint2*)vp_ : make_uint2(0u, 0u);                                \
        vr[d][e_][0] = t_.x; vr[d][e_][1 % VW] = t_.y;                                                 \
      }                                                                                                \
    }                                                                                                  \
  }

  float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;  // heads 2c and 2c + 1
  float acc[KS][4];  // O^T m-tile i: (dim 2i of row r, heads 2c, 2c+1), (dim 2i + 1, heads 2c, 2c+1)
#pragma unroll
  for (int i = 0; i < KS; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

#pragma unroll
  for (int d = 0; d < DEPTH - 1; d++)
    if (d < mine) LOAD(d, d)
  for (int base = 0; base < mine; base += DEPTH) {
#pragma unroll
    for (int d = 0; d < DEPTH; d++) {
      const int it = base + d;
      if (it >= mine) break;
      if (it + DEPTH - 1 < mine) LOAD((d + DEPTH - 1) % DEPTH, it + DEPTH - 1)
      const int n0 = (first + it * WARPS) * 16;
      float sc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int s = 0; s < KS; s++) {
        const u32 w0 = kr[d][0][s], w1 = kr[d][1][s];
        mma(sc, e4m3x2(w0), e4m3x2(w1), e4m3x2(w0 >> 16), e4m3x2(w1 >> 16), qf[s][0], qf[s][1]);
      }
      const bool ok0 = n0 + r < n_hi, ok1 = n0 + r + 8 < n_hi;
      const float s00 = ok0 ? sc[0] * scale_log2 : NEG_INF, s01 = ok0 ? sc[1] * scale_log2 : NEG_INF;
      const float s10 = ok1 ? sc[2] * scale_log2 : NEG_INF, s11 = ok1 ? sc[3] * scale_log2 : NEG_INF;
      float mx0 = fmaxf(s00, s10), mx1 = fmaxf(s01, s11);
#pragma unroll
      for (int o = 4; o < 32; o <<= 1) {
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o));
      }
      const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);  // finite: token n0 is valid
      const float al0 = ex2(m0 - mn0), al1 = ex2(m1 - mn1);
      const float p00 = ex2(s00 - mn0), p10 = ex2(s10 - mn0), p01 = ex2(s01 - mn1), p11 = ex2(s11 - mn1);
      l0 = l0 * al0 + p00 + p10;
      l1 = l1 * al1 + p01 + p11;
      m0 = mn0;
      m1 = mn1;
      const u32 pb0 = trans8x8(pack_f16x2(p00, p01)), pb1 = trans8x8(pack_f16x2(p10, p11));
#pragma unroll
      for (int i = 0; i < KS; i++) {
        acc[i][0] *= al0; acc[i][1] *= al1; acc[i][2] *= al0; acc[i][3] *= al1;
        const int w = i >> 1;
        const u32 sel = (i & 1) ? 0x7362u : 0x5140u;  // bytes 2i, 2i + 1 of two tokens, interleaved
        const u32 x = prmt(vr[d][0][w], vr[d][1][w], sel), y = prmt(vr[d][2][w], vr[d][3][w], sel);
        mma(acc[i], e4m3x2(x), e4m3x2(x >> 16), e4m3x2(y), e4m3x2(y >> 16), pb0, pb1);
      }
    }
  }
#pragma unroll
  for (int o = 4; o < 32; o <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, o);
    l1 += __shfl_xor_sync(0xffffffffu, l1, o);
  }
  if (r == 0) {
    sm_m[warp][2 * c] = m0; sm_m[warp][2 * c + 1] = m1;
    sm_l[warp][2 * c] = l0; sm_l[warp][2 * c + 1] = l1;
  }
#pragma unroll
  for (int i = 0; i < KS; i++) {
    const int dd = (D / 8) * r + 2 * i;
    if (2 * c < GQA) { sm_acc[warp][2 * c][dd] = acc[i][0]; sm_acc[warp][2 * c][dd + 1] = acc[i][2]; }
    if (2 * c + 1 < GQA) { sm_acc[warp][2 * c + 1][dd] = acc[i][1]; sm_acc[warp][2 * c + 1][dd + 1] = acc[i][3]; }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < GQA * D; idx += WARPS * 32) {
    const int h = idx / D, dd = idx % D;
    float mm = NEG_INF;
#pragma unroll
    for (int w = 0; w < WARPS; w++) mm = fmaxf(mm, sm_m[w][h]);
    float ll = 0.f, oo = 0.f;
    if (mm != NEG_INF) {
#pragma unroll
      for (int w = 0; w < WARPS; w++) {
        const float f = sm_m[w][h] == NEG_INF ? 0.f : ex2(sm_m[w][h] - mm);
        ll += sm_l[w][h] * f;
        oo += sm_acc[w][h][dd] * f;
      }
    }
    const int head = kvh * GQA + h;
    if (num_splits == 1) {
      out[(long long)q_start * stride_ot + (long long)head * stride_oh + dd] = out_from_f32(oo * v_scale / ll);
    } else {
      const long long row = ((long long)seq * gridDim.y * GQA + head) * num_splits + split;
      const bool has = ll > 0.f;
      part_out[row * D + dd] = has ? oo * v_scale / ll : 0.f;
      if (dd == 0) part_lse[row] = has ? mm + __log2f(ll) : NEG_INF;
    }
  }
}
"""


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape: ``warps`` warps a CTA (each takes every ``warps``-th 16-token tile), ``depth``
    tiles of K and V per warp in registers (loaded ``depth - 1`` ahead)."""

    warps: int = 2  # AttentionConfig.fp8_decode_warps / _depth carry the engine's choice
    depth: int = 2


def source(head_dim: int, gqa: int, block_size: int, q_dtype: torch.dtype, config: DecodeConfig) -> str:
    subs = {"HEAD_DIM": head_dim, "GQA": gqa, "BLOCK_SIZE": block_size, "WARPS": config.warps,
            "DEPTH": config.depth, "Q_BF16": int(q_dtype == torch.bfloat16), "MMA": mma_m16n8k16("f16")}
    src = _SOURCE
    for key, value in subs.items():
        src = src.replace(f"@{key}@", str(value))
    return src


@functools.cache
def _kernel(head_dim: int, gqa: int, block_size: int, q_dtype: torch.dtype, config: DecodeConfig, device_index: int):
    with torch.cuda.device(device_index):
        return torch.cuda._compile_kernel(source(head_dim, gqa, block_size, q_dtype, config), "kiln_fp8_decode")


def supported(q: torch.Tensor, k_cache: torch.Tensor, gqa: int) -> bool:
    """Whether this kernel serves these decode rows: an E4M3 cache on a GPU with FP8 conversions
    (sm_89+), bf16/fp16 queries, head dim 64 or 128, up to 8 query heads per KV head, cache blocks
    of a multiple of 16 tokens, and 16-byte aligned rows (the loads are 16 bytes wide)."""
    if not q.is_cuda or k_cache.dtype != torch.float8_e4m3fn or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    if q.shape[2] not in HEAD_DIMS or gqa > MAX_GQA or k_cache.shape[1] % TILE:
        return False
    qs, ks = q.stride(), k_cache.stride()
    if q.data_ptr() % 16 or qs[0] % 8 or qs[1] % 8 or k_cache.data_ptr() % 16 or ks[0] % 16 or ks[1] % 16 or ks[2] % 16:
        return False
    return max(qs[0], qs[1], ks[0]) < 2 ** 31 and _device_ok(q.device.index or 0)


@functools.cache
def _device_ok(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9) and hasattr(torch.cuda, "_compile_kernel")


@functools.cache
def available(head_dim: int, gqa: int, block_size: int, q_dtype: torch.dtype, config: DecodeConfig,
              device_index: int) -> bool:
    """Whether the kernel compiles here (NVRTC present and accepting it); logs why not, once."""
    try:
        _kernel(head_dim, gqa, block_size, q_dtype, config, device_index)
    except Exception as exc:  # noqa: BLE001 - any NVRTC / driver failure means: use the Triton kernel
        logger.warning("FP8 tensor-core decode attention unavailable (%s: %s); decode uses the Triton kernel",
                       type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        return False
    return True


def fp8_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
               part_out: torch.Tensor, part_lse: torch.Tensor, block_tables: torch.Tensor,
               query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale_log2: float, v_scale: float,
               num_splits: int, config: DecodeConfig) -> None:
    """Launch over every sequence (rows whose query is not one token exit at once): writes ``out``
    directly when ``num_splits`` is 1, else the partial results the Triton ``reduce_kernel`` merges.
    The caller checked ``supported`` and ``available``."""
    batch, kv_heads, block_size = seq_lens.shape[0], k_cache.shape[2], k_cache.shape[1]
    gqa = q.shape[1] // kv_heads
    kern = _kernel(q.shape[2], gqa, block_size, q.dtype, config, q.device.index or 0)
    kern(grid=(batch, kv_heads, num_splits), block=(32 * config.warps, 1, 1),
         args=[q, k_cache, v_cache, out, part_out, part_lse, block_tables, query_start_loc, seq_lens,
               float(scale_log2), float(v_scale), int(num_splits),
               q.stride(0), q.stride(1), out.stride(0), out.stride(1),
               k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0)])

