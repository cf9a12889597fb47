"""W4A16 on tensor cores for small batches (1-32 rows): a CUDA kernel compiled at first use with
NVRTC (``torch.cuda._compile_kernel``: no nvcc needed), run on the current stream (CUDA graphs
capture it like any kernel).

Why: the CUDA-core GEMV (kernels/int4.py) spends ~5 instructions per weight and streams INT4 bytes
at 1.7 TB/s, far from the 4.2 TB/s the memory gives. Here the multiply-adds go to ``mma.sync``
(m16n8k16, fp32 accumulation) and a weight costs ~1 instruction: one ``lop3`` turns two nibbles
into two bf16 (or fp16) values at once, Marlin's trick (arXiv 2408.11743), and nothing else
touches the weight.

Operands (roles swapped, as for any small-M product: the weights are the 16-row A operand, the
activations the 8-column B operand, so 1-8 rows fill one B tile):

  * A = 16 outputs x 16 inputs of W as the values MAGIC + u (u = q + 8 in [0, 15]; MAGIC = 128 in
    bf16, 1024 in fp16: both exact, since the format's unit in the last place there is 1).
    ``lop3(word >> 4j, 0x000F000F, MAGIC|MAGIC)`` builds register j of the fragment from nibbles
    j and j+4 of one int32 word, so one word is one thread's whole A fragment of one mma.
  * B = x^T, 16 inputs x 8 rows (rows past M read as zero); C = fp32 16 outputs x 8 rows.

Per group of g inputs the kernel forms P = sum x (MAGIC + u) with the weight mmas and X = sum x
with one mma of an all-ones A (shared by every output tile of the warp), and adds

    s * P + (z - (MAGIC + 8) s) * X  =  sum_k x_k (q_k s + z)

to the output's fp32 accumulator: exactly x @ (q s + z)^T in fp32 up to summation order (the
products are exact; the cancellation of the MAGIC terms costs ~2^-24 * MAGIC/8 relative).

Inputs are reordered inside each mma (any order works when A and B agree): in mma step t of a
64-input block the thread with lane%4 == c holds inputs p .. p+3, p = 32 (t >> 1) + 8 c + 4 (t & 1),
so steps 2s and 2s+1 take a 16-byte run of x: one load serves a thread's B registers of two
steps. Layout (``repack``):

    words int32 [N/16, K/64, 32 lanes, 4 steps]: for lane = 4 r + c (r = 0..7) and step t of block
    b, p = 64 b + 32 (t >> 1) + 8 c + 4 (t & 1), rows n0 = 16 T + r and n1 = n0 + 8, nibble positions
        0: u[n0, p]  4: u[n0, p+1]  1: u[n1, p]  5: u[n1, p+1]
        2: u[n0, p+2] 6: u[n0, p+3] 3: u[n1, p+2] 7: u[n1, p+3]
    (PTX's m16n8k16 A fragment: a0,a1 = A[r, 2c..2c+1], a2,a3 = A[r+8, ..], a4..a7 = the same at
    inputs 2c+8, 2c+9, which this kernel maps to p+2, p+3).

A warp reads its tile's 64-input block as one coalesced 512-byte row (16 bytes a lane). ``sz``
packs the group's scale (low half) and zero (high half) of each output in one int32 [K/g, N].

Grid: one CTA per ``NT`` 16-output tiles; its ``WARPS`` warps split K by groups (units of
max(g, 64) inputs round robin) and meet in shared memory at the end; a unit's weights, packed
(scale, zero) pairs and x are loaded ``depth - 1`` units ahead, into registers, or (``stages``)
the weights go through a per-warp ring in shared memory with ``cp.async``, ``stages - 1`` units
ahead, each lane reading back only what it copied (no barrier). The ring wins only at 17-32 rows
(qkv 16.7 -> 15.8 us, gate_up 50.6 -> 46.8 us on an H200); at 1-8 rows the register path is faster.
Output = dtype(acc) (+ residual, added in fp32 and rounded once: ``fused_linear_int4``'s rounding
points).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from kiln.engine_builder.int4 import unpack_int4

from ._cuda import mma_m16n8k16

logger = logging.getLogger(__name__)

MAX_ROWS = 32  # 4 B tiles of 8 rows
MMA_UP_TO_ROWS = 32
"""``Int4Linear`` runs bf16/fp16 products of 1 to this many rows here (where ``supported``); bigger
ones dequantize for cuBLAS. On an H200 (scripts/check_int4_mma_gpu.py, Llama-3.1-8B shapes, group
128, 2026-12-01) this kernel beat tinygemm at every M of 1-16 (1.3-4.5x; qkv at one row 6.9 vs
9.5 us) and dequantize + cuBLAS at 32 rows (qkv 16.5 vs 37.5 us, gate_up 50.7 vs 161.2)."""
MMA_GROUP_SIZES = (32, 64, 128, 256)
_MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}
_ONES = {torch.bfloat16: 0x3F803F80, torch.float16: 0x3C003C00}

_SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;

#define WARPS @WARPS@
#define MT @MT@
#define NT @NT@
#define GROUP @GROUP@
#define UNIT (GROUP > 64 ? GROUP : 64)
#define U4 (UNIT / 64)
#define STEPS (UNIT / 16)
#define GSTEPS (GROUP / 16)
#define GPERU (STEPS / GSTEPS)
#define DEPTH @DEPTH@
#define STAGES @STAGES@

__device__ __forceinline__ u32 dq(u32 q) {
  u32 r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(q), "n"(0x000F000F), "n"(@MAGIC2@));
  return r;
}

@MMA@
__device__ __forceinline__ float tof(u16 h) {
@TOF@
}

__device__ __forceinline__ u16 fromf(float f) {
  u16 h;
  asm("cvt.rn.@AB@.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

__device__ __forceinline__ void cp16(void* smem, const void* gmem) {  // async global -> shared, 16 bytes
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"((u32)__cvta_generic_to_shared(smem)), "l"(gmem));
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
kiln_w4a16_mma(const uint4* __restrict__ wq, const u32* __restrict__ sz, const u16* __restrict__ x,
               const u16* __restrict__ res, u16* __restrict__ out, int M, int N, int K, int has_res) {
  __shared__ float red[WARPS][NT][4][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r = lane >> 2, c = lane & 3;
  const int tile0 = blockIdx.x * NT;
  const int kblocks = K >> 6, units = K / UNIT;
  const int mine = warp < units ? (units - warp + WARPS - 1) / WARPS : 0;  // units of this warp
  float acc[NT][MT][4];
#pragma unroll
  for (int i = 0; i < NT; i++)
#pragma unroll
    for (int j = 0; j < MT; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) acc[i][j][e] = 0.f;

  // DEPTH stages in registers: a unit's weights, scales/zeros and x, loaded DEPTH - 1 units ahead;
  // with STAGES, the weights instead stream through a per-warp ring in shared memory (cp.async,
  // STAGES - 1 units ahead: more bytes in flight than registers can hold), each lane reading back
  // only the 16-byte pieces it copied itself (so no barrier is needed)
#if STAGES
  extern __shared__ uint4 ring_[];  // [WARPS][STAGES][NT * U4][32], dynamic (may pass 48 KB)
#define RING(slot, j) ring_[((warp * STAGES + (slot)) * (NT * U4) + (j)) * 32 + lane]
  uint4 wcur[NT][U4];
#define WREG(d, i, b) wcur[i][b]
#define ISSUE(it)                                                                                      \
  {                                                                                                    \
    if ((it) < mine) {                                                                                 \
      const int u_ = warp + (it) * WARPS;                                                              \
      _Pragma("unroll") for (int i = 0; i < NT; i++)                                                   \
        _Pragma("unroll") for (int b = 0; b < U4; b++)                                                 \
          cp16(&RING((it) % STAGES, i * U4 + b),                                                       \
               wq + ((size_t)(tile0 + i) * kblocks + u_ * U4 + b) * 32 + lane);                        \
    }                                                                                                  \
    asm volatile("cp.async.commit_group;");                                                           \
  }
#pragma unroll
  for (int s = 0; s < STAGES - 1; s++) ISSUE(s)
#else
  uint4 w[DEPTH][NT][U4];
#define WREG(d, i, b) w[d][i][b]
#endif
  u32 szv[DEPTH][NT][GPERU][2];
  uint4 xv[DEPTH][STEPS / 2][MT];
#define LOAD(d, u)                                                                                     \
  {                                                                                                    \
    const int k0_ = (u) * UNIT;                                                                        \
    _Pragma("unroll") for (int i = 0; i < NT; i++) {                                                   \
      if (!STAGES) {                                                                                   \
        _Pragma("unroll") for (int b = 0; b < U4; b++)                                                 \
          WREG(d, i, b) = wq[((size_t)(tile0 + i) * kblocks + (u) * U4 + b) * 32 + lane];              \
      }                                                                                                \
      _Pragma("unroll") for (int gg = 0; gg < GPERU; gg++) {                                           \
        const size_t row_ = (size_t)(k0_ / GROUP + gg) * N + (tile0 + i) * 16 + r;                     \
        szv[d][i][gg][0] = sz[row_];                                                                   \
        szv[d][i][gg][1] = sz[row_ + 8];                                                               \
      }                                                                                                \
    }                                                                                                  \
    _Pragma("unroll") for (int t2 = 0; t2 < STEPS / 2; t2++) {                                         \
      _Pragma("unroll") for (int j = 0; j < MT; j++) {                                                 \
        const int m_ = 8 * j + r;                                                                      \
        xv[d][t2][j] = m_ < M ? *(const uint4*)(x + (size_t)m_ * K + k0_ + 32 * t2 + 8 * c)            \
                              : make_uint4(0u, 0u, 0u, 0u);                                            \
      }                                                                                                \
    }                                                                                                  \
  }
#pragma unroll
  for (int d = 0; d < DEPTH; d++)
    if (d < mine) LOAD(d, warp + d * WARPS)
  for (int base = 0; base < mine; base += DEPTH) {
#pragma unroll
    for (int d = 0; d < DEPTH; d++) {
      const int it = base + d;
      if (it >= mine) break;
#if STAGES
      ISSUE(it + STAGES - 1)
      asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 1));  // unit it's group has landed
#pragma unroll
      for (int i = 0; i < NT; i++)
#pragma unroll
        for (int b = 0; b < U4; b++) wcur[i][b] = RING(it % STAGES, i * U4 + b);
#endif
#pragma unroll
      for (int gs = 0; gs < GPERU; gs++) {  // groups in this unit
        float px[MT][4], pw[2][NT][MT][4];  // two chains of mmas (even / odd steps)
#pragma unroll
        for (int j = 0; j < MT; j++)
#pragma unroll
          for (int e = 0; e < 4; e++) {
            px[j][e] = 0.f;
#pragma unroll
            for (int i = 0; i < NT; i++) pw[0][i][j][e] = pw[1][i][j][e] = 0.f;
          }
#pragma unroll
        for (int tt = 0; tt < GSTEPS; tt++) {
          const int t = gs * GSTEPS + tt;
#pragma unroll
          for (int j = 0; j < MT; j++) {
            const uint4 xq = xv[d][t >> 1][j];
            const u32 b0 = (t & 1) ? xq.z : xq.x, b1 = (t & 1) ? xq.w : xq.y;
            mma(px[j], @ONES@, @ONES@, @ONES@, @ONES@, b0, b1);
          }
#pragma unroll
          for (int i = 0; i < NT; i++) {
            const uint4 v = WREG(d, i, t >> 2);
            const u32 q = (t & 3) == 0 ? v.x : (t & 3) == 1 ? v.y : (t & 3) == 2 ? v.z : v.w;
            const u32 a0 = dq(q), a1 = dq(q >> 4), a2 = dq(q >> 8), a3 = dq(q >> 12);
#pragma unroll
            for (int j = 0; j < MT; j++) {
              const uint4 xq = xv[d][t >> 1][j];
              const u32 b0 = (t & 1) ? xq.z : xq.x, b1 = (t & 1) ? xq.w : xq.y;
              mma(pw[t & 1][i][j], a0, a1, a2, a3, b0, b1);
            }
          }
        }
#pragma unroll
        for (int i = 0; i < NT; i++) {
          const u32 p0 = szv[d][i][gs][0], p1 = szv[d][i][gs][1];
          const float s0 = tof((u16)(p0 & 0xFFFF)), s1 = tof((u16)(p1 & 0xFFFF));
          const float z0 = tof((u16)(p0 >> 16)) - @OFFSET@f * s0, z1 = tof((u16)(p1 >> 16)) - @OFFSET@f * s1;
#pragma unroll
          for (int j = 0; j < MT; j++) {
            acc[i][j][0] += s0 * (pw[0][i][j][0] + pw[1][i][j][0]) + z0 * px[j][0];
            acc[i][j][1] += s0 * (pw[0][i][j][1] + pw[1][i][j][1]) + z0 * px[j][1];
            acc[i][j][2] += s1 * (pw[0][i][j][2] + pw[1][i][j][2]) + z1 * px[j][2];
            acc[i][j][3] += s1 * (pw[0][i][j][3] + pw[1][i][j][3]) + z1 * px[j][3];
          }
        }
      }
      if (it + DEPTH < mine) LOAD(d, warp + (it + DEPTH) * WARPS)
    }
  }
  // one B tile at a time through shared memory: output (i, row n of 16, column m of 8) of tile j sits
  // in lane 4 (n % 8) + m / 2, register 2 (n / 8) + m % 2
#pragma unroll
  for (int j = 0; j < MT; j++) {
    if (8 * j >= M) break;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < NT; i++)
#pragma unroll
      for (int e = 0; e < 4; e++) red[warp][i][e][lane] = acc[i][j][e];
    __syncthreads();
    for (int idx = threadIdx.x; idx < NT * 16 * 8; idx += WARPS * 32) {
      const int nn = idx % (NT * 16), mm = idx / (NT * 16), m = 8 * j + mm;
      if (m >= M) continue;
      const int i = nn >> 4, n = nn & 15;
      const int ln = 4 * (n & 7) + (mm >> 1), e = 2 * (n >> 3) + (mm & 1);
      float v = 0.f;
#pragma unroll
      for (int ww = 0; ww < WARPS; ww++) v += red[ww][i][e][ln];
      const size_t o = (size_t)m * N + (size_t)tile0 * 16 + nn;
      u16 y = fromf(v);
      if (has_res) y = fromf(tof(res[o]) + tof(y));
      out[o] = y;
    }
  }
}
"""

_TOF = {
    torch.bfloat16: "  return __uint_as_float(((u32)h) << 16);",
    torch.float16: "  float f;\n  asm(\"cvt.f32.f16 %0, %1;\" : \"=f\"(f) : \"h\"(h));\n  return f;",
}


@dataclass(frozen=True)
class MmaConfig:
    """Launch shape: ``nt`` 16-output tiles per CTA, ``warps`` warps splitting K, ``depth`` units
    of a warp's weights, scales and x in registers (loaded ``depth - 1`` units ahead); with
    ``stages`` the weights go through shared memory instead, ``stages - 1`` units ahead."""

    nt: int = 1
    warps: int = 8
    depth: int = 2
    stages: int = 0  # >= 2: weights through a shared-memory ring of this many units (cp.async); 0: registers

    def ring_bytes(self, group: int) -> int:
        """Dynamic shared memory: the weight ring (16 bytes a lane per 64 inputs of a tile)."""
        return self.warps * self.stages * self.nt * (max(group, 64) // 64) * 512


def row_tiles(m: int) -> int:
    """B tiles of 8 rows for M rows (compiled per power of two: 1, 2 or 4)."""
    return 1 if m <= 8 else 2 if m <= 16 else 4


def source(dtype: torch.dtype, mt: int, config: MmaConfig, group: int) -> str:
    magic_bits, magic = _MAGIC[dtype]
    subs = {"WARPS": config.warps, "MT": mt, "NT": config.nt, "DEPTH": config.depth, "GROUP": group,
            "STAGES": config.stages,
            "MAGIC2": f"0x{magic_bits:04X}{magic_bits:04X}", "AB": "bf16" if dtype == torch.bfloat16 else "f16",
            "TOF": _TOF[dtype], "MMA": mma_m16n8k16("bf16" if dtype == torch.bfloat16 else "f16"),
            "ONES": f"0x{_ONES[dtype]:08X}u", "OFFSET": f"{magic + 8:.1f}"}
    src = _SOURCE
    for key, value in subs.items():
        src = src.replace(f"@{key}@", str(value))
    return src


@functools.cache
def _kernel(dtype: torch.dtype, mt: int, config: MmaConfig, group: int, device_index: int):
    with torch.cuda.device(device_index):
        kern = torch.cuda._compile_kernel(source(dtype, mt, config, group), "kiln_w4a16_mma")
        ring = config.ring_bytes(group)
        if ring >= 48 * 1024:  # opt in past 48 KB (raises past the device's limit)
            if not hasattr(kern, "set_shared_memory_config"):
                raise RuntimeError(f"{config} needs {ring} bytes of shared memory; this torch cannot opt in past 48 KB")
            kern.set_shared_memory_config(ring)
        return kern


def supported(n: int, k: int, group: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``w4a16_mma`` runs an [N, K] linear with this group and activation dtype on ``device``
    (it still has to compile: ``available``)."""
    if device.type != "cuda" or dtype not in _MAGIC or group not in MMA_GROUP_SIZES:
        return False
    if n % 16 or k % 64 or k % group:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0) and hasattr(torch.cuda, "_compile_kernel")


@functools.cache
def available(dtype: torch.dtype, device_index: int) -> bool:
    """Whether the kernel compiles here (NVRTC present and accepting it); logs why not, once."""
    try:
        _kernel(dtype, 1, MmaConfig(), 128, device_index)
    except Exception as exc:  # noqa: BLE001 - any NVRTC / driver failure means: use the other kernels
        logger.warning("INT4 tensor-core kernel unavailable (%s: %s); INT4 small batches use tinygemm / Triton",
                       type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        return False
    return True


# ----------------------------------------------------------------------------- layout


def repack(packed: torch.Tensor) -> torch.Tensor:
    """The engine's packing (int8 [N, K/2], byte j = columns 2j (low nibble) and 2j+1, two's
    complement) -> this kernel's words, int32 [N/16, K/64, 32, 4] (module docstring)."""
    n, half_k = packed.shape
    k = half_k * 2
    u = unpack_int4(packed).to(torch.int64) + 8  # u = q + 8 in [0, 15], [N, K]
    # [tile, h (row n0 / n1), r, block, t1, c, t0, e]: input 64 block + 32 t1 + 8 c + 4 t0 + e
    u = u.reshape(n // 16, 2, 8, k // 64, 2, 4, 2, 4)
    h = torch.arange(2, device=u.device).view(1, 2, 1, 1, 1, 1, 1, 1)
    e = torch.arange(4, device=u.device).view(1, 1, 1, 1, 1, 1, 1, 4)
    pos = h + 2 * (e >> 1) + 4 * (e & 1)
    words = (u << (4 * pos)).sum(dim=(1, 7))  # [tile, r, block, t1, c, t0]; disjoint bits: the sum is the or
    words = words.permute(0, 2, 1, 4, 3, 5).reshape(n // 16, k // 64, 32, 4)  # lane = 4 r + c, step 2 t1 + t0
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).contiguous()


def pack_scales(scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """int32 [K/g, N]: the scale's 16 bits low, the zero's high (zero 0 when there is none)."""
    s = scales.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    z = torch.zeros_like(s) if zeros is None else zeros.to(scales.dtype).contiguous().view(torch.int16).to(torch.int32)
    return (s | (z << 16)).contiguous()


def emulate(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, group: int, magic: float = 128.0) -> torch.Tensor:
    """The kernel's arithmetic in float64 from its layout, lane by lane as PTX's m16n8k16 fragments
    place the values (the CPU check of ``repack`` and of the fold): [M, K] -> fp64 [M, N]."""
    tiles, blocks = words.shape[0], words.shape[1]
    n, k = tiles * 16, blocks * 64
    w = words.to(torch.int64) & 0xFFFFFFFF  # [T, B, lane, t]
    lane = torch.arange(32)
    r, c = lane // 4, lane % 4
    a = torch.zeros(n, k, dtype=torch.float64)
    for j in range(4):  # register j of the fragment: nibbles j (low half) and j + 4 (high half)
        lo, hi = (w >> (4 * j)) & 0xF, (w >> (4 * j + 16)) & 0xF
        row = r + 8 * (j % 2)  # a0/a1 and a4/a5: row r; a2/a3 and a6/a7: row r + 8
        col = 8 * c + 2 * (j // 2)  # inputs 2c, 2c+1 (j < 2) or 2c+8, 2c+9 -> p, p+1 or p+2, p+3
        for t in range(4):
            for tile in range(tiles):
                for blk in range(blocks):
                    p = blk * 64 + 32 * (t // 2) + 4 * (t % 2) + col
                    a[tile * 16 + row, p] = magic + lo[tile, blk, :, t].double()
                    a[tile * 16 + row, p + 1] = magic + hi[tile, blk, :, t].double()
    s16 = (sz & 0xFFFF).to(torch.int16)
    z16 = ((sz >> 16) & 0xFFFF).to(torch.int16)
    dt = torch.bfloat16 if magic == 128.0 else torch.float16
    s, z = s16.view(dt).double(), z16.view(dt).double()  # [K/g, N]
    xg = x.double().reshape(x.shape[0], k // group, group)
    p_sum = torch.einsum("mgi,ngi->mgn", xg, a.reshape(n, k // group, group))  # sum x (MAGIC + u)
    x_sum = xg.sum(-1)  # [M, K/g]
    return (p_sum * s.unsqueeze(0)).sum(1) + (x_sum.unsqueeze(-1) * (z - (magic + 8) * s).unsqueeze(0)).sum(1)


# ----------------------------------------------------------------------------- the product


def w4a16_mma(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, group: int, *,
              residual: torch.Tensor | None = None, config: MmaConfig | None = None) -> torch.Tensor:
    """y = dtype(x @ W^T) (+ residual): x [M <= 32, K] bf16/fp16 on CUDA, ``words`` from
    ``repack``, ``sz`` from ``pack_scales``."""
    m = x.shape[0]
    n, k = words.shape[0] * 16, words.shape[1] * 64
    if m == 0:
        return x.new_empty((0, n))
    if m > MAX_ROWS or x.shape[1] != k:
        raise ValueError(f"w4a16_mma takes up to {MAX_ROWS} rows of {k} inputs; got {tuple(x.shape)}")
    cfg = config or pick_config(n, k, m, group)
    x = x.contiguous()
    if x.data_ptr() % 16:
        x = x.clone()
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    res = out if residual is None else residual.contiguous()
    kern = _kernel(x.dtype, row_tiles(m), cfg, group, x.device.index or 0)
    kern(grid=(n // (16 * cfg.nt), 1, 1), block=(32 * cfg.warps, 1, 1), shared_mem=cfg.ring_bytes(group),
         args=[words, sz, x, res, out, m, n, k, int(residual is not None)])
    return out


C = MmaConfig
TUNED: dict[tuple[int, int, int], MmaConfig] = {
    # (N, K, M class) -> fastest launch shape on an H200 (scripts/check_int4_mma_gpu.py, group 128,
    # 2026-12-01; Llama-3.1-8B shapes, tp 1)
    (6144, 4096, 8): C(1, 4, 3), (6144, 4096, 16): C(2, 8, 1), (6144, 4096, 32): C(2, 4, 1, 4),
    (4096, 4096, 8): C(1, 8, 2), (4096, 4096, 16): C(2, 8, 2), (4096, 4096, 32): C(2, 8, 1),
    (28672, 4096, 8): C(2, 4, 2), (28672, 4096, 16): C(4, 4, 1), (28672, 4096, 32): C(4, 4, 1, 3),
    (4096, 14336, 8): C(1, 8, 3), (4096, 14336, 16): C(2, 8, 2), (4096, 14336, 32): C(2, 8, 1),
}


def pick_config(n: int, k: int, m: int, group: int = 128) -> MmaConfig:
    """The tuned launch shape, else the tuned table's pattern: up to 8 rows, wide outputs take two
    tiles a CTA and 4 warps, long inputs 3 stages; more rows take 2 tiles (4 when very wide) and
    fewer stages (registers). A tuned shared-memory ring (measured at group 128) is kept only for
    group 128 and where this torch can opt in to the shared memory it needs."""
    mc = 8 * row_tiles(m)  # the row class: 8, 16 or 32
    tuned = TUNED.get((n, k, mc))
    if tuned is not None:
        if tuned.stages and (group != 128 or not _ring_fits(tuned, group)):
            return MmaConfig(tuned.nt, tuned.warps, tuned.depth)
        return tuned
    tiles = n // 16
    if mc == 8:
        if tiles >= 1024 and tiles % 2 == 0:
            return C(2, 4, 2)
        return C(1, 8, 3) if k >= 8192 else C(1, 4, 3) if tiles >= 384 else C(1, 8, 2)
    nt = 4 if tiles >= 1024 and tiles % 4 == 0 else 2 if tiles % 2 == 0 else 1
    return C(nt, 4 if nt == 4 else 8, 2 if mc == 16 and nt < 4 else 1)


def _ring_fits(config: MmaConfig, group: int) -> bool:
    """Whether the ring's shared memory needs no opt-in (< 48 KB) or this torch can opt in."""
    kernel_class = getattr(getattr(torch.cuda, "_utils", None), "_CudaKernel", None)
    return config.ring_bytes(group) < 48 * 1024 or hasattr(kernel_class, "set_shared_memory_config")
