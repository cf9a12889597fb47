#!/usr/bin/env python3
"""Kiln's W4A16 kernels against PyTorch's built-in INT4 kernel (tinygemm,
``torch._weight_int4pack_mm``, the one gpt-fast and torchao use) on Llama-3.1-8B shapes, one GPU.

Both compute y = x @ (q * s + z)^T with q in [-8, 7] and per-group scales and zero points
(tinygemm's (u - 8) * s + z with u = q + 8 is the same number), so the same quantized weight
goes to both: the outputs are compared and timed (CUDA-graph timing, L2 flushed) at 1-32 rows.
Prints a table last: us per call and GB/s of INT4 weight bytes for each kernel.

    PYTHONUNBUFFERED=1 python3 scripts/bench_int4_tinygemm_gpu.py [--group 128] [--inner-k-tiles 8]
"""

from __future__ import annotations

import argparse

import torch
import triton

from kiln.engine_builder.int4 import pack_int4
from kiln.runtime.kernels.int4 import gemm_int4, gemv_int4, repack

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head-like": (16384, 4096)}


def tinygemm_operands(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, inner_k_tiles: int):
    """(packed weight, scales_and_zeros) for torch._weight_int4pack_mm from q [N, K] in [-8, 7]."""
    u = (q.to(torch.int32) + 8)
    u8 = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)  # even column in the high nibble (torch >= 2.5)
    packed = torch._convert_weight_to_int4pack(u8, inner_k_tiles)
    return packed, torch.stack((s, z), dim=-1).contiguous()  # [K/g, N, 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--inner-k-tiles", type=int, default=8)
    args = parser.parse_args()
    g, dev = args.group, "cuda"
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    rows = []
    for name, (n, k) in SHAPES.items():
        torch.manual_seed(0)
        q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=dev)
        s = (torch.rand(k // g, n, device=dev) * 0.02 + 0.001).to(torch.bfloat16)
        z = (torch.randn(k // g, n, device=dev) * 0.01).to(torch.bfloat16)
        w_kiln = repack(pack_int4(q), g)
        try:
            w_tg, sz = tinygemm_operands(q, s, z, args.inner_k_tiles)
        except Exception as exc:  # noqa: BLE001 - the table still shows Kiln's figures
            print(f"{name}: tinygemm unavailable: {type(exc).__name__}: {exc}")
            w_tg = sz = None
        nbytes = n * k // 2 + 2 * 2 * n * (k // g)
        for m in (1, 2, 4, 8, 16, 32):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            kiln = (lambda: gemv_int4(x, w_kiln, s, z, g)) if m <= 8 else (lambda: gemm_int4(x, w_kiln, s, z, g))
            ref = (x.double() @ ((q.double() * s.double().repeat_interleave(g, 0).T)
                                 + z.double().repeat_interleave(g, 0).T).T)
            err_k = float((kiln().double() - ref).abs().max() / ref.abs().max())
            t_k = triton.testing.do_bench_cudagraph(kiln, rep=50) * 1e3
            t_t = err_t = float("nan")
            if w_tg is not None:
                tg = lambda: torch._weight_int4pack_mm(x, w_tg, g, sz)  # noqa: E731
                try:
                    err_t = float((tg().double() - ref).abs().max() / ref.abs().max())
                    t_t = triton.testing.do_bench_cudagraph(tg, rep=50) * 1e3
                except Exception as exc:  # noqa: BLE001
                    print(f"{name} M={m}: tinygemm failed: {type(exc).__name__}: {exc}")
            rows.append((name, n, k, m, t_k, nbytes / t_k / 1e3, err_k, t_t, nbytes / t_t / 1e3, err_t))
            print(rows[-1], flush=True)
    print("\n| shape | N x K | M | Kiln us | Kiln GB/s | Kiln rel err | tinygemm us | tinygemm GB/s | tinygemm rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n, k, m, tk, bk, ek, tt, bt, et in rows:
        print(f"| {name} | {n}x{k} | {m} | {tk:.1f} | {bk:.0f} | {ek:.1e} | {tt:.1f} | {bt:.0f} | {et:.1e} |")


if __name__ == "__main__":
    main()
