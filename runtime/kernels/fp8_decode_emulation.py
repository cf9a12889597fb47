"""The FP8 decode-attention kernel (kernels/fp8_decode.py) replayed lane by lane in float64 on the
CPU: the byte-to-fragment maps (``kdim``, the V interleave), the P transposition and the warp and
split merges, with PTX's m16n8k16 fragment layouts (lane = 4 r + c) written out independently of
the kernel. CI checks it against plain float64 attention; the GPU tests check the kernel."""

from __future__ import annotations

import numpy as np
import torch


def kdim(c: int, i: int) -> int:
    """Dim of byte i of lane group c's K (and Q) bytes: 64 j + 16 c + (i % 16), j = i // 16."""
    return 64 * (i >> 4) + 16 * c + (i & 15)


def _frag_a(regs: list) -> np.ndarray:
    """A fragment -> 16x16: regs[j][lane] = (low, high) of register j (a0a1, a2a3, a4a5, a6a7)."""
    a = np.zeros((16, 16))
    for lane in range(32):
        r, c = lane // 4, lane % 4
        for j, (row, col) in enumerate(((r, 2 * c), (r + 8, 2 * c), (r, 2 * c + 8), (r + 8, 2 * c + 8))):
            a[row, col], a[row, col + 1] = regs[j][lane]
    return a


def _frag_b(regs: list) -> np.ndarray:
    """B fragment -> 16x8 (k rows, n columns): b0b1 at k = 2c, 2c+1 and b2b3 at 2c+8, 2c+9; n = r."""
    b = np.zeros((16, 8))
    for lane in range(32):
        r, c = lane // 4, lane % 4
        for j in range(2):
            b[2 * c + 8 * j, r], b[2 * c + 8 * j + 1, r] = regs[j][lane]
    return b


def _frag_c(cmat: np.ndarray) -> np.ndarray:
    """16x8 C -> [32 lanes, 4]: (row r, cols 2c, 2c+1), (row r + 8, cols 2c, 2c+1)."""
    lane = np.arange(32)
    r, c = lane // 4, lane % 4
    return np.stack([cmat[r, 2 * c], cmat[r, 2 * c + 1], cmat[r + 8, 2 * c], cmat[r + 8, 2 * c + 1]], axis=1)


def _movmatrix_trans(pairs: np.ndarray) -> list:
    """movmatrix.m8n8.trans.b16: lane l holds (M[l/4, 2(l%4)], M[l/4, 2(l%4)+1]); returns M^T's."""
    m = np.zeros((8, 8))
    for lane in range(32):
        m[lane // 4, 2 * (lane % 4)], m[lane // 4, 2 * (lane % 4) + 1] = pairs[lane]
    t = m.T
    return [(t[lane // 4, 2 * (lane % 4)], t[lane // 4, 2 * (lane % 4) + 1]) for lane in range(32)]


class _Tile:
    """Lane-level loads of one 16-token tile from the sequence's cache rows (codes -> values)."""

    def __init__(self, k: np.ndarray, v: np.ndarray, n0: int, n_hi: int, head_dim: int) -> None:
        self.k, self.v, self.n0, self.n_hi, self.d = k, v, n0, n_hi, head_dim

    def kval(self, tok: int, lane: int, i: int) -> float:
        n = self.n0 + tok  # past the context the kernel reads whatever the block holds: masked later
        return self.k[n, kdim(lane % 4, i)] if n < self.k.shape[0] else 0.0

    def vval(self, tok: int, lane: int, byte: int) -> float:
        n = self.n0 + tok  # past the split's end the kernel zeroes V
        return self.v[n, (self.d // 8) * (lane // 4) + byte] if n < self.n_hi else 0.0


def _scores(tile: _Tile, qf: list, steps: int, scale_log2: float) -> np.ndarray:
    """S^T = K Q^T over the tile (A = K rows r, r + 8), scaled; -inf past the split's end."""
    sc = np.zeros((16, 8))
    for s in range(steps):
        regs = [[(tile.kval(lane // 4 + 8 * (j % 2), lane, 4 * s + 2 * (j // 2)),
                  tile.kval(lane // 4 + 8 * (j % 2), lane, 4 * s + 2 * (j // 2) + 1)) for lane in range(32)]
                for j in range(4)]
        sc += _frag_a(regs) @ _frag_b(qf[s])
    frag = _frag_c(sc) * scale_log2
    tokens = np.arange(32)[:, None] // 4 + 8 * (np.arange(4)[None, :] // 2)
    return np.where(tile.n0 + tokens < tile.n_hi, frag, -np.inf)


def _pv(tile: _Tile, p: np.ndarray, acc: np.ndarray, f16) -> None:
    """acc[i] += V^T P^T for every m-tile i (A = V^T: dims 2i / 2i + 1 of tokens 2c, 2c+1 | +8, +9)."""
    bmat = _frag_b([_movmatrix_trans([(f16(a), f16(b)) for a, b in p[:, 0:2]]),
                    _movmatrix_trans([(f16(a), f16(b)) for a, b in p[:, 2:4]])])
    for i in range(acc.shape[0]):
        regs = [[(tile.vval(2 * (lane % 4) + 8 * (j // 2), lane, 2 * i + j % 2),
                  tile.vval(2 * (lane % 4) + 8 * (j // 2) + 1, lane, 2 * i + j % 2)) for lane in range(32)]
                for j in range(4)]
        acc[i] += _frag_c(_frag_a(regs) @ bmat)


def _warp(tiles: range, k: np.ndarray, v: np.ndarray, qf: list, n_hi: int, head_dim: int, scale_log2: float,
          f16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One warp's online softmax over its tiles -> (max [8], sum [8], unnormalised out [8, D])."""
    heads = np.tile(np.array([0, 1, 0, 1]), (32, 1)) + 2 * (np.arange(32)[:, None] % 4)  # [lane, register]
    m, l_lane = np.full(8, -np.inf), np.zeros((32, 8))
    acc = np.zeros((head_dim // 16, 32, 4))
    for t in tiles:
        tile = _Tile(k, v, 16 * t, n_hi, head_dim)
        s = _scores(tile, qf, head_dim // 16, scale_log2)
        mx = np.full(8, -np.inf)
        np.maximum.at(mx, heads.ravel(), s.ravel())
        mn = np.maximum(m, mx)
        alpha = np.exp2(m - mn)
        p = np.exp2(s - mn[heads])
        lane_c = np.arange(32) % 4
        l_lane[np.arange(32), 2 * lane_c] = l_lane[np.arange(32), 2 * lane_c] * alpha[2 * lane_c] + p[:, 0] + p[:, 2]
        l_lane[np.arange(32), 2 * lane_c + 1] = (l_lane[np.arange(32), 2 * lane_c + 1] * alpha[2 * lane_c + 1]
                                                 + p[:, 1] + p[:, 3])
        m = mn
        acc *= alpha[heads][None]
        _pv(tile, p, acc, f16)
    out = np.zeros((8, head_dim))
    for i in range(head_dim // 16):
        for lane in range(32):
            r, c = lane // 4, lane % 4
            dd = (head_dim // 8) * r + 2 * i
            out[2 * c, dd], out[2 * c + 1, dd] = acc[i, lane, 0], acc[i, lane, 1]
            out[2 * c, dd + 1], out[2 * c + 1, dd + 1] = acc[i, lane, 2], acc[i, lane, 3]
    return m, l_lane.sum(0), out


def _merge(states: list, v_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's end: warps (max, sum, out) -> (log2-sum-exp [8], out [8, D]) of the split."""
    mm = np.max([st[0] for st in states], axis=0)
    safe_mm = np.where(np.isneginf(mm), 0.0, mm)  # -inf only where every warp is empty
    w = [np.where(np.isneginf(st[0]), 0.0, np.exp2(np.where(np.isneginf(st[0]), 0.0, st[0] - safe_mm)))
         for st in states]
    ll = sum(st[1] * wi for st, wi in zip(states, w))
    oo = sum(st[2] * wi[:, None] for st, wi in zip(states, w))
    has = ll > 0
    safe_ll = np.where(has, ll, 1.0)
    return np.where(has, mm + np.log2(safe_ll), -np.inf), np.where(has[:, None], oo * v_scale / safe_ll[:, None], 0.0)


def emulate(q: torch.Tensor, k_codes: torch.Tensor, v_codes: torch.Tensor, scale_log2: float, v_scale: float,
            num_splits: int = 1, warps: int = 4) -> torch.Tensor:
    """One (sequence, KV head): q [GQA, D] (bf16/fp16), the sequence's cache rows k_codes / v_codes
    uint8 [ctx, D] (E4M3 codes) -> float64 [GQA, D], splits merged as ``reduce_kernel`` does."""
    gqa, d = q.shape
    ctx = k_codes.shape[0]

    def f16(x: float) -> float:  # round to fp16 (q is saturated first, P is <= 1)
        return float(np.float16(x))

    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double().numpy()
    k, v = e4m3[k_codes.numpy()], e4m3[v_codes.numpy()]
    qv = q.double().clamp(-65504, 65504).numpy()
    # B operand of step s: lane (r, c) holds head r's dims kdim(c, 4s .. 4s + 3) (zeros past the group)
    qf = [[[(f16(qv[lane // 4, kdim(lane % 4, 4 * s + 2 * j)]), f16(qv[lane // 4, kdim(lane % 4, 4 * s + 2 * j + 1)]))
            if lane // 4 < gqa else (0.0, 0.0) for lane in range(32)] for j in range(2)] for s in range(d // 16)]
    tiles = -(-ctx // 16)
    per_split = -(-tiles // num_splits)
    parts = []
    for split in range(num_splits):
        t_lo, t_hi = split * per_split, min(tiles, split * per_split + per_split)
        n_hi = min(ctx, t_hi * 16)
        states = [_warp(range(t_lo + w, t_hi, warps), k, v, qf, n_hi, d, scale_log2, f16) for w in range(warps)]
        parts.append(_merge(states, v_scale))
    lse = np.stack([p[0] for p in parts])  # [splits, 8]
    weights = np.exp2(lse - lse.max(0))
    merged = (weights[:, :, None] * np.stack([p[1] for p in parts])).sum(0) / weights.sum(0)[:, None]
    return torch.from_numpy(merged[:gqa])
