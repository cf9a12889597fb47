#!/usr/bin/env python3
"""The tensor-core W4A16 kernel (kiln.runtime.kernels.int4_mma) on a GPU: correctness, per-shape
timing against tinygemm / Kiln's Triton GEMV / dequantize + cuBLAS, launch-shape variants, and
the 32-layer batch-1 chain.

  (a) correctness against the fp32 reference (runtime/quant/int4.py ``fused_linear_int4``):
      bf16 and fp16, groups 32/64/128/256 with and without zero points, M = 1..32 (odd sizes
      included), residual fused; outputs poisoned with NaN;
  (b) per Llama-3.1-8B shape (group 128, zero points), M = 1, 2, 4, 8, 16, 32: us per call and GB/s
      of the bytes read (packed weights + scales + zeros) for each launch shape (weights staged in
      registers or streamed through a shared-memory ring), tinygemm, the
      Triton GEMV (M <= 2) and dequantize + cuBLAS (M >= 16); graph-timed over enough weight
      copies to leave the 50 MB L2;
  (c) 32 layers (distinct weights: qkv, o, gate_up, down) at M = 1 and 8 in one graph, products
      only (no norms or attention), mma vs tinygemm: ms per step.

    PYTHONUNBUFFERED=1 python3 scripts/check_int4_mma_gpu.py [--quick | --ms 1,8,16,32]   (< 5 min)
Logs: $OUT/check_int4_mma_gpu.json when OUT is set. The last lines are a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemv_gpu import graph_ms, rel_err  # noqa: E402  (shared timing helpers)
from check_int4_gpu import copies_for  # noqa: E402  (weight copies that leave the L2)

from kiln.engine_builder.int4 import pack_int4  # noqa: E402
from kiln.runtime.kernels import int4 as tk  # noqa: E402
from kiln.runtime.kernels.int4_mma import MmaConfig, pack_scales, pick_config, repack, w4a16_mma  # noqa: E402
from kiln.runtime.quant.int4 import fused_linear_int4  # noqa: E402
from kiln.runtime.quant.tinygemm import TinygemmWeight  # noqa: E402

DEV, GROUP = "cuda", 128
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
MS = (1, 2, 4, 8, 16, 32)
C = MmaConfig
SMALL = [C(1, 8, 2), C(1, 8, 3), C(1, 16, 2), C(1, 16, 3), C(1, 4, 3), C(1, 4, 2), C(2, 8, 2), C(2, 4, 2),
         C(1, 8, 2, 4), C(1, 8, 1, 4), C(1, 8, 2, 6), C(1, 8, 1, 8), C(1, 4, 2, 6), C(1, 4, 1, 8), C(2, 4, 1, 4),
         C(2, 4, 2, 6), C(1, 16, 1, 4), C(2, 8, 1, 3)]
BIG = [C(2, 8, 2), C(1, 8, 2), C(2, 4, 2), C(2, 8, 1), C(4, 4, 1), C(2, 4, 1), C(1, 8, 1), C(1, 16, 1),
       C(2, 8, 1, 3), C(2, 4, 1, 4), C(4, 4, 1, 3), C(2, 8, 1, 4), C(1, 8, 1, 6), C(2, 4, 1, 6)]


def label(cfg: MmaConfig) -> str:
    return f"nt{cfg.nt}w{cfg.warps}d{cfg.depth}" + (f"s{cfg.stages}" if cfg.stages else "")


def configs_for(m: int) -> list[MmaConfig]:
    """Launch shapes tried at M rows (register budget: 4 B tiles take depth 1)."""
    if m <= 8:
        return SMALL
    return BIG if m <= 16 else [c for c in BIG if c.depth == 1]


class W:
    def __init__(self, n: int, k: int, group: int = GROUP, zero: bool = True, dtype: torch.dtype = torch.bfloat16):
        q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=DEV)
        self.packed = pack_int4(q)
        self.scales = (torch.rand(k // group, n, device=DEV) * 0.02 / k ** 0.5 + 1e-3).to(dtype)
        self.zeros = (torch.randn(k // group, n, device=DEV) * 0.02 / k ** 0.5).to(dtype) if zero else None
        self.words, self.sz = repack(self.packed), pack_scales(self.scales, self.zeros)
        self.group = group
        self.nbytes = self.packed.numel() + self.scales.numel() * 2 * (2 if zero else 1)

    def mma(self, x, residual=None, config=None):
        return w4a16_mma(x, self.words, self.sz, self.group, residual=residual, config=config)



def correctness(results: dict) -> list[str]:
    bad, rows = [], []
    print("(a) correctness vs the fp32 reference (max rel err over M)")
    torch.use_deterministic_algorithms(True)  # torch.empty gives NaN: unwritten outputs fail
    cases = [(dt, g, z, 384, 512) for dt in (torch.bfloat16, torch.float16) for g in (32, 64, 128, 256)
             for z in (True, False)] + [(torch.bfloat16, 128, True, n, k) for n, k in SHAPES.values()]
    for dtype, g, zero, n, k in cases:
        w = W(n, k, g, zero, dtype)
        errs = []
        for m in (1, 2, 3, 5, 8, 9, 16, 17, 31, 32):
            x = torch.randn(m, k, device=DEV).to(dtype)
            res = torch.randn(m, n, device=DEV).to(dtype) if m % 2 else None
            for cfg in ((None, C(2, 4, 1), C(1, 16, 3), C(2, 4, 1, 3), C(2, 4, 1, 4), C(4, 4, 1, 3))
                        if n % 64 == 0 else (None, C(1, 8, 2, 4))):
                got = w.mma(x, res, cfg)
                want = fused_linear_int4(x, w.packed, w.scales, w.zeros, g, residual=res)
                err = rel_err(got, want) if bool(torch.isfinite(got).all()) else float("nan")
                errs.append(err)
                if not err < 4e-3:
                    bad.append(f"{dtype} g{g} zero={zero} {n}x{k} M={m} {cfg}: rel err {err:.2e}")
        line = f"  {str(dtype)[6:]:9s} g{g:<4d} {'asym' if zero else 'sym '} {n}x{k}: {max(errs):.2e}"
        print(line)
        rows.append(line.strip())
    torch.use_deterministic_algorithms(False)
    results["correctness"] = rows
    print("  " + ("FAIL: " + "; ".join(bad[:6]) if bad else "all cases within tolerance"))
    return bad


def per_shape(results: dict, ms: tuple[int, ...]) -> list[str]:
    table = ["shape    M  best mma us (cfg, GB/s) | default us | tinygemm us | triton gemv us | deq+cuBLAS us"]
    print("(b) per shape, bf16, group 128, zero points")
    for name, (n, k) in SHAPES.items():
        ws = [W(n, k) for _ in range(copies_for(n * k // 2))]
        tiny = [TinygemmWeight.from_engine(w.packed, w.scales, w.zeros, GROUP) for w in ws]
        kern = [tk.repack(w.packed, GROUP) for w in ws]
        for m in ms:
            x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
            times = {}
            for cfg in configs_for(m):
                if n % (16 * cfg.nt):
                    continue
                try:
                    times[label(cfg)] = graph_ms(lambda c=cfg: [w.mma(x, config=c) for w in ws], len(ws))[0]
                except RuntimeError as exc:  # e.g. more shared memory than the device (or torch) allows
                    print(f"  {label(cfg)}: {str(exc).splitlines()[0][:120]}")
            best = min(times, key=times.get)
            default = pick_config(n, k, m, GROUP)
            t_def = times.get(label(default), float("nan"))
            t_tg = graph_ms(lambda: [t(x) for t in tiny], len(ws))[0] if m < 32 else float("nan")
            t_gv = (graph_ms(lambda: [tk.gemv_int4(x, kw, w.scales, w.zeros, GROUP) for kw, w in zip(kern, ws)],
                             len(ws))[0] if m <= 2 else float("nan"))
            t_dq = (graph_ms(lambda: [F.linear(x, tk.dequantize_int4(kw, w.scales, w.zeros, GROUP))
                                      for kw, w in zip(kern, ws)], len(ws))[0] if m >= 16 else float("nan"))
            gbs = ws[0].nbytes / (times[best] * 1e-3) / 1e9
            line = (f"{name:8s} {m:2d}  {times[best] * 1e3:7.1f} ({best}, {gbs:5.0f}) | {t_def * 1e3:7.1f} | "
                    f"{t_tg * 1e3:7.1f} | {t_gv * 1e3:7.1f} | {t_dq * 1e3:7.1f}")
            print("  " + line + "   all: " + " ".join(f"{c}={t * 1e3:.1f}" for c, t in times.items()))
            table.append(line)
            results.setdefault("per_shape", []).append({"shape": name, "m": m, "mma_us": {c: t * 1e3 for c, t in times.items()},
                                                        "tinygemm_us": t_tg * 1e3, "gemv_us": t_gv * 1e3,
                                                        "deq_us": t_dq * 1e3})
        del ws, tiny, kern
        torch.cuda.empty_cache()
    return table


def chain(results: dict) -> list[str]:
    print("(c) 32 layers of products in one graph (no norms / attention)")
    layers = [{name: W(n, k) for name, (n, k) in SHAPES.items()} for _ in range(32)]
    tiny = [{name: TinygemmWeight.from_engine(w.packed, w.scales, w.zeros, GROUP) for name, w in layer.items()}
            for layer in layers]
    out = []
    for m in (1, 8):
        xs = {name: torch.randn(m, k, device=DEV).to(torch.bfloat16) for name, (n, k) in SHAPES.items()}
        t_mma = graph_ms(lambda: [w.mma(xs[name]) for layer in layers for name, w in layer.items()], 1, 5, 3)[0]
        t_tg = graph_ms(lambda: [t(xs[name]) for layer in tiny for name, t in layer.items()], 1, 5, 3)[0]
        line = f"chain M={m}: mma {t_mma:.3f} ms (<= {1e3 / t_mma:.0f} steps/s), tinygemm {t_tg:.3f} ms"
        print("  " + line)
        out.append(line)
        results.setdefault("chain", []).append({"m": m, "mma_ms": t_mma, "tinygemm_ms": t_tg})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="M = 1 and 8 only in (b)")
    ap.add_argument("--ms", default="", help="rows to time in (b), e.g. 1,8,16,32 (default: all of MS)")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    bad = correctness(results)
    ms = tuple(int(v) for v in args.ms.split(",")) if args.ms else (1, 8) if args.quick else MS
    table = per_shape(results, ms)
    table += chain(results)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "check_int4_mma_gpu.json").write_text(json.dumps(results, indent=1))
    print(f"---- {time.time() - t0:.0f} s; correctness: {'FAIL' if bad else 'ok'}")
    print("\n".join(table))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
