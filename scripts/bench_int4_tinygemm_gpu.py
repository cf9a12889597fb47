#!/usr/bin/env python3
"""Kiln's W4A16 products against PyTorch's built-in INT4 kernel (tinygemm,
``torch._weight_int4pack_mm``, the one gpt-fast and torchao use) on Llama-3.1-8B shapes, one GPU,
from 1 to 1024 rows: the data that sets ``GEMV_UP_TO_ROWS`` and ``TINYGEMM_BELOW_ROWS``
(runtime/kernels/int4.py).

Both compute y = x @ (q * s + z)^T with q in [-8, 7] and per-group scales and zero points
(tinygemm's (u - 8) * s + z with u = q + 8 is the same number). tinygemm's operands come from
Kiln's own conversion (runtime/quant/tinygemm.py ``TinygemmWeight.from_engine``), so the error
column checks it too. Per shape and row count: Kiln's GEMV (``gemv_int4``, up to 8 rows),
tinygemm, and dequantize + cuBLAS (``dequantize_int4`` then ``F.linear``, what ``Int4Linear``
runs above ``GEMV_UP_TO_ROWS`` where tinygemm does not), each checked against float64 and timed
with ``triton.testing.do_bench_cudagraph`` (one weight: shapes under the 50 MB L2 read it from L2). Prints a table last (us per call; GB/s of INT4 weight bytes up
to 32 rows; 36 lines for the default shapes), and writes it to $OUT/bench_int4_tinygemm.md when
OUT is set. About a minute.

    PYTHONUNBUFFERED=1 python3 scripts/bench_int4_tinygemm_gpu.py [--group 128] [--shapes qkv,gate_up,down]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from kiln.engine_builder.int4 import pack_int4
from kiln.runtime.kernels.int4 import dequantize_int4, gemv_int4, repack
from kiln.runtime.quant.tinygemm import TinygemmWeight, tinygemm_accepts

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head-like": (16384, 4096)}
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _timed(fn, ref: torch.Tensor, rep: int) -> tuple[float, float]:
    """(us per call, max error relative to the reference's largest value), NaN if it fails."""
    try:
        err = float((fn().double() - ref).abs().max() / ref.abs().max())
        return triton.testing.do_bench_cudagraph(fn, rep=rep) * 1e3, err
    except Exception as exc:  # noqa: BLE001 - the table still shows the other kernels
        print(f"  failed: {type(exc).__name__}: {exc}")
        return float("nan"), float("nan")


def bench_shape(name: str, n: int, k: int, g: int) -> list[tuple]:
    dev = "cuda"
    torch.manual_seed(0)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=dev)
    s = (torch.rand(k // g, n, device=dev) * 0.02 + 0.001).to(torch.bfloat16)
    z = (torch.randn(k // g, n, device=dev) * 0.01).to(torch.bfloat16)
    packed = pack_int4(q)
    w_kiln = repack(packed, g)
    tg = TinygemmWeight.from_engine(packed, s, z, g) if tinygemm_accepts(n, k, g, torch.bfloat16, q.device) else None
    w64 = q.double() * s.double().repeat_interleave(g, 0).T + z.double().repeat_interleave(g, 0).T
    del q
    nbytes = n * k // 2 + 2 * 2 * n * (k // g)
    rows = []
    for m in ROWS:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        ref = x.double() @ w64.T
        rep = 50 if m <= 32 else 25
        t_k, e_k = _timed(lambda: gemv_int4(x, w_kiln, s, z, g), ref, rep) if m <= 8 else (float("nan"), float("nan"))
        t_t, e_t = _timed(lambda: tg(x), ref, rep) if tg is not None else (float("nan"), float("nan"))
        t_d, e_d = _timed(lambda: F.linear(x, dequantize_int4(w_kiln, s, z, g)), ref, rep) if m >= 8 else (
            float("nan"), float("nan"))
        rows.append((name, n, k, m, t_k, e_k, t_t, e_t, t_d, e_d, nbytes))
        print(rows[-1], flush=True)
    return rows


def _table(rows: list[tuple]) -> str:
    lines = ["| shape | N x K | M | Kiln GEMV us | tinygemm us | deq+cuBLAS us | fastest | GB/s (Kiln / tinygemm) "
             "| max rel err (Kiln / tinygemm / deq) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, n, k, m, t_k, e_k, t_t, e_t, t_d, e_d, nbytes in rows:
        times = {"Kiln": t_k, "tinygemm": t_t, "deq+cuBLAS": t_d}
        fastest = min((t, who) for who, t in times.items() if t == t)[1] if any(t == t for t in times.values()) else "-"
        bw = f"{nbytes / t_k / 1e3:.0f} / {nbytes / t_t / 1e3:.0f}" if m <= 32 else ""
        lines.append(f"| {name} | {n}x{k} | {m} | {t_k:.1f} | {t_t:.1f} | {t_d:.1f} | {fastest} | {bw} "
                     f"| {e_k:.1e} / {e_t:.1e} / {e_d:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--shapes", default="qkv,gate_up,down", help=f"comma-separated, of {', '.join(SHAPES)}")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    rows = []
    for name in args.shapes.split(","):
        rows += bench_shape(name, *SHAPES[name], args.group)
        torch.cuda.empty_cache()
    table = _table(rows)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_int4_tinygemm.md").write_text(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
