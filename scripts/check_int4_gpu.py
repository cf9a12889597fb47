#!/usr/bin/env python3
"""W4A16 kernels (kiln.runtime.kernels.int4) on a GPU: correctness over the Llama-3.1-8B and 70B
shape grid, timings in GB/s of weight bytes against the device copy ceiling, an optional tile
sweep, and one CUDA graph of 32 INT4 layers + the bf16 lm_head (the batch-1 decode bound).

  (a) correctness, bf16 (and fp32 on one shape): gemv_int4 (M = 1, 2, 4, 8, each shape with its
      decode fusion: qkv/gate_up RMSNorm prologue, dense residual, down SiLU + residual) and
      dequantize_int4 + cuBLAS (M = 16, 64, 256, 1024) against the exact reference
      (runtime/quant/int4.py: W = q * s + z in fp32, product in fp32), outputs poisoned with NaN;
  (b) per shape (8B, group 128, zero points): us per call and GB/s of the bytes read (packed
      weights + scales + zeros), graph-timed over enough weight copies to leave the 50 MB L2,
      against bf16 (Kiln's gemv for M <= 8, cuBLAS above) and tinygemm (up to 32 rows);
  (c) --sweep: gemv_int4 launch shapes per (shape, M class), best first, printed as TUNED_GEMV
      lines for runtime/kernels/int4.py (time-budgeted);
  (d) 32 layers (distinct weights) + final norm + bf16 lm_head in one graph at M = 1 and 2, the
      fused small-batch chain: ms per step and the tok/s it allows (attention excluded).

    PYTHONUNBUFFERED=1 python scripts/check_int4_gpu.py [--sweep] [--json PATH]     (< 10 min)
Logs: $OUT/check_int4_gpu.json when OUT is set. The last lines are a short table.
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

from kiln.engine_builder.int4 import pack_int4  # noqa: E402
from kiln.runtime.kernels.gemv import gemv  # noqa: E402
from kiln.runtime.kernels.int4 import Int4GemvConfig, _m_class, dequantize_int4, gemv_int4, repack  # noqa: E402
from kiln.runtime.quant.int4 import fused_linear_int4  # noqa: E402
from kiln.runtime.quant.tinygemm import TinygemmWeight  # noqa: E402

DEV, DT, EPS, GROUP = "cuda", torch.bfloat16, 1e-5, 128
H200_COPY_CEILING = 4.16e12  # bytes/s, read + write (shared REFERENCE.md section 5)
SHAPES = {  # name: (N, K, decode fusion)
    "8b.qkv": (6144, 4096, "norm"), "8b.dense": (4096, 4096, "residual"), "8b.gate_up": (28672, 4096, "norm"),
    "8b.down": (4096, 14336, "silu_residual"),
    "70b.qkv": (10240, 8192, "norm"), "70b.dense": (8192, 8192, "residual"), "70b.gate_up": (57344, 8192, "norm"),
    "70b.down": (8192, 28672, "silu_residual"),
}
GEMV_MS, GEMM_MS = (1, 2, 4, 8), (16, 64, 256, 1024)
START, SWEEP_BUDGET_S = time.time(), 330.0  # the timing part of --sweep stops starting configs past this


class Weights:
    """One random INT4 linear: kernel-layout packed weight, engine-packed weight, scales, zeros."""

    def __init__(self, n: int, k: int, zero: bool = True, dtype: torch.dtype = DT) -> None:
        q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=DEV)
        self.packed = pack_int4(q)
        self.kernel = repack(self.packed, GROUP)
        self.scales = (torch.rand(k // GROUP, n, device=DEV) * 0.02 / k ** 0.5 + 1e-3).to(dtype)
        self.zeros = (torch.randn(k // GROUP, n, device=DEV) * 0.02 / k ** 0.5).to(dtype) if zero else None
        self.nbytes = self.packed.numel() + self.scales.numel() * 2 * (2 if zero else 1)

    def args(self) -> tuple:
        return self.kernel, self.scales, self.zeros, GROUP


def fused_kwargs(fusion: str, m: int, n: int, k: int, dtype: torch.dtype = DT) -> tuple[torch.Tensor, dict]:
    x = torch.randn(m, 2 * k if fusion == "silu_residual" else k, device=DEV).to(dtype)
    kw: dict = {"eps": EPS}
    if fusion == "norm":
        kw["norm_weight"] = (1 + 0.1 * torch.randn(k, device=DEV)).to(dtype)
    if fusion == "silu_residual":
        kw["silu_mul"] = True
    if fusion in ("residual", "silu_residual"):
        kw["residual"] = torch.randn(m, n, device=DEV).to(dtype)
    return x, kw


def check_correctness(results: dict) -> list[str]:
    bad = []
    print("(a) correctness vs the fp32 reference (rel err), default launch shapes")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.use_deterministic_algorithms(True)  # torch.empty gives NaN: unwritten outputs fail
    cases = [(name, DT, True) for name in SHAPES] + [("8b.dense", torch.float32, True), ("8b.qkv", DT, False)]
    for name, dtype, zero in cases:
        try:
            check_case(results, bad, name, dtype, zero)
        except Exception as exc:  # noqa: BLE001 - e.g. a launch shape that does not compile: reported
            bad.append(f"{name} {dtype} zero={zero}: {type(exc).__name__}: {str(exc)[:300]}")
            print("  " + bad[-1])
    torch.use_deterministic_algorithms(False)
    print("  " + ("FAIL: " + "; ".join(bad) if bad else "all cases within tolerance"))
    return bad


def check_case(results: dict, bad: list[str], name: str, dtype: torch.dtype, zero: bool) -> None:
    n, k, fusion = SHAPES[name]
    w = Weights(n, k, zero, dtype)
    errs = []
    for m in GEMV_MS + GEMM_MS:
        if m in GEMV_MS:
            x, kw = fused_kwargs(fusion, m, n, k, dtype)
            got = gemv_int4(x, *w.args(), **kw)
        else:
            x, kw = torch.randn(m, k, device=DEV).to(dtype), {}
            got = F.linear(x, dequantize_int4(*w.args()))
        want = fused_linear_int4(x, w.packed, w.scales, w.zeros, GROUP, **kw)
        err = rel_err(got, want) if bool(torch.isfinite(got).all()) else float("nan")
        errs.append(err)
        if not err < (1e-4 if dtype == torch.float32 else 1e-2):
            bad.append(f"{name} {dtype} zero={zero} M={m}: rel err {err:.2e}")
    line = f"  {name:12s} {str(dtype)[6:]:8s} {'asym' if zero else 'sym '}  max rel err {max(errs):.2e}"
    print(line)
    results.setdefault("correctness", []).append([name, str(dtype), zero, errs])


def copies_for(nbytes: int) -> int:
    return max(4, min(64, (400 << 20) // max(1, nbytes)))


def time_gemv(weights: list[Weights], x: torch.Tensor, kw: dict, cfg: Int4GemvConfig | None) -> float:
    return graph_ms(lambda: [gemv_int4(x, *w.args(), config=cfg, **kw) for w in weights], len(weights), 5, 3)[0]


def per_shape(results: dict, best: dict) -> list[str]:
    rows = ["shape         M   int4 us (GB/s, % of copy)   bf16 us   speed-up   tinygemm us"]
    print("(b) per shape, group 128 with zero points; int4 = gemv_int4 (M <= 8) or dequantize_int4 + cuBLAS "
          "(what Int4Linear runs above GEMV_UP_TO_ROWS); bf16 = Kiln's gemv (M <= 8) or cuBLAS")
    for name in [s for s in SHAPES if s.startswith("8b.")]:
        n, k, fusion = SHAPES[name]
        weights = [Weights(n, k) for _ in range(copies_for(n * k // 2))]
        tiny = [TinygemmWeight.from_engine(w.packed, w.scales, w.zeros, GROUP) for w in weights]
        bf16 = [torch.randn(n, k, device=DEV, dtype=DT) * k ** -0.5 for _ in range(max(2, len(weights) // 4))]
        for m in GEMV_MS + GEMM_MS:
            t_tg = float("nan")
            if m <= 32:
                xt = torch.randn(m, k, device=DEV).to(DT)
                t_tg = graph_ms(lambda: [tg(xt) for tg in tiny], len(tiny), 5, 3)[0]
            if m in GEMV_MS:
                x, kw = fused_kwargs(fusion, m, n, k)
                t = time_gemv(weights, x, kw, best.get((name, _m_class(m))))
                t16 = graph_ms(lambda: [gemv(x, b, **kw) for b in bf16], len(bf16), 5, 3)[0]
            else:
                x = torch.randn(m, k, device=DEV).to(DT)
                t = graph_ms(lambda: [F.linear(x, dequantize_int4(*w.args())) for w in weights], len(weights), 5, 3)[0]
                t16 = graph_ms(lambda: [F.linear(x, b) for b in bf16], len(bf16), 5, 3)[0]
            gbs = weights[0].nbytes / t / 1e6
            line = (f"{name:12s} {m:4d}   {t * 1e3:8.1f} ({gbs:5.0f}, {gbs * 1e9 / H200_COPY_CEILING:4.0%})"
                    f"        {t16 * 1e3:8.1f}   {t16 / t:5.2f}x   {t_tg * 1e3:8.1f}")
            print("  " + line)
            rows.append(line)
            results.setdefault("per_shape", []).append([name, m, t, gbs, t16, t_tg])
        del weights, bf16, tiny
        torch.cuda.empty_cache()
    return rows


SWEEP_MS = (1, 2)  # what Int4Linear runs on gemv_int4 in bf16 (GEMV_UP_TO_ROWS); 3-8 rows share "m8"


def sweep_candidates(m: int) -> list[Int4GemvConfig]:
    """Launch shapes: at most ~64 fp32 partial sums per thread per tile (STEP x BLOCK_N over the
    threads; STEP = 16 word rows per group of 128) and no thread without a column of its own."""
    return [Int4GemvConfig(bn, g, w, s) for bn in (8, 16, 32, 64, 128) for g in (1, 2, 4, 8) for w in (2, 4, 8)
            for s in (2, 3, 4) if 2 * w <= g * bn <= 128 * w]


def _compile_task(task: tuple) -> str:
    """Worker: launch one (shape, M, config) once on a narrow weight (same binary: N, K and
    strides keep their divisibility) so its binary lands in Triton's disk cache."""
    name, m, cfg = task
    n, k, fusion = SHAPES[name]
    try:
        w = Weights(256, k)
        x, kw = fused_kwargs(fusion, m, 256, k)
        gemv_int4(x, *w.args(), config=cfg, **kw)
        torch.cuda.synchronize()
        return ""
    except Exception as exc:  # noqa: BLE001 - a config that fails to build is reported, not fatal
        return f"{type(exc).__name__}: {str(exc)[:200]}"


def precompile(tasks: list[tuple], workers: int = 14) -> None:
    """Compile in parallel processes into Triton's disk cache: compiling, not timing, is the slow part."""
    import concurrent.futures as futures
    import multiprocessing

    t0 = time.time()
    try:
        with futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            errors = [e for e in pool.map(_compile_task, tasks) if e]
    except Exception as exc:  # noqa: BLE001 - the sweep then compiles lazily, within its time budget
        print(f"precompile failed ({type(exc).__name__}: {exc}); compiling on first use")
        return
    print(f"precompiled {len(tasks)} kernels in {time.time() - t0:.0f} s ({len(errors)} failed)")
    for error in sorted(set(errors))[:3]:
        print("   ", error)


def sweep(results: dict) -> dict:
    """Best launch shape per (8B shape, M class), each candidate checked before it is timed."""
    groups = [(name, m) for name in SHAPES if name.startswith("8b.") for m in SWEEP_MS]
    # qkv and gate_up share their binaries (same fusion, K and specialisation).
    precompile([(name, m, cfg) for name, m in groups if name != "8b.gate_up" for cfg in sweep_candidates(m)])
    best = {}
    print("(c) sweep: us per call, best first")
    for i, (name, m) in enumerate(groups):
        deadline = time.time() + (START + SWEEP_BUDGET_S - time.time()) / (len(groups) - i)
        n, k, fusion = SHAPES[name]
        weights = [Weights(n, k) for _ in range(min(16, copies_for(n * k // 2)))]
        x, kw = fused_kwargs(fusion, m, n, k)
        want = fused_linear_int4(x, weights[0].packed, weights[0].scales, weights[0].zeros, GROUP, **kw)
        timed = []
        for cfg in sweep_candidates(m):
            if time.time() > deadline:
                print(f"  {name} M={m}: sweep budget spent after {len(timed)} configs")
                break
            try:
                if not rel_err(gemv_int4(x, *weights[0].args(), config=cfg, **kw), want) < 1e-2:
                    print(f"  {name} M={m} {cfg}: wrong result, skipped")
                    continue
                t = time_gemv(weights, x, kw, cfg)
                timed.append((t * 1e3, cfg))
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory or registers
                print(f"  {name} M={m} {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
        timed.sort(key=lambda tc: tc[0])
        if timed:
            best[(name, _m_class(m))] = timed[0][1]
            print(f"  {name:12s} M={m:3d}: " + "; ".join(f"{t:.1f} {c}" for t, c in timed[:2]) + f" ({len(timed)} timed)")
        results.setdefault("sweep", {})[f"{name}/{m}"] = [(t, vars(c)) for t, c in timed]
        del weights
    return best


def whole_model(results: dict, best: dict) -> list[str]:
    """32 distinct INT4 layers of the 8B shapes + final norm + bf16 lm_head, fused small-batch chain."""
    rows = []
    print("(d) 32 layers + lm_head, one graph (attention replaced by a copy of q): ms per step")
    hidden, vocab = 4096, 128256
    names = ("8b.qkv", "8b.dense", "8b.gate_up", "8b.down")
    layers = [{nm: Weights(*SHAPES[nm][:2]) for nm in names} for _ in range(32)]
    norms = [(1 + 0.1 * torch.randn(hidden, device=DEV)).to(DT) for _ in range(65)]
    lm_head = torch.randn(vocab, hidden, device=DEV, dtype=DT) * hidden ** -0.5
    for m in (1, 2):
        cfg = {nm: best.get((nm, _m_class(m))) for nm in names}
        h0 = torch.randn(m, hidden, device=DEV).to(DT)
        h, attn = torch.empty_like(h0), torch.empty_like(h0)

        def step():
            res = h0
            for i, layer in enumerate(layers):
                qkv = gemv_int4(res, *layer["8b.qkv"].args(), norm_weight=norms[2 * i], config=cfg["8b.qkv"])
                attn.copy_(qkv[:, :hidden])
                gemv_int4(attn, *layer["8b.dense"].args(), residual=res, out=h, config=cfg["8b.dense"])
                gu = gemv_int4(h, *layer["8b.gate_up"].args(), norm_weight=norms[2 * i + 1], config=cfg["8b.gate_up"])
                gemv_int4(gu, *layer["8b.down"].args(), silu_mul=True, residual=h, out=h, config=cfg["8b.down"])
                res = h
            return gemv(h, lm_head, norm_weight=norms[-1], eps=EPS)

        t = graph_ms(step, 1, 10, 3)[0]
        nbytes = sum(w.nbytes for layer in layers for w in layer.values()) + lm_head.numel() * 2
        line = (f"M={m}: {t:.3f} ms per step, {nbytes / t / 1e6:.0f} GB/s of weights "
                f"({nbytes / t / 1e6 / (H200_COPY_CEILING / 1e9):.0%} of copy), <= {m * 1e3 / t:,.0f} tok/s")
        print("  " + line)
        rows.append(line)
        results.setdefault("whole_model", []).append([m, t, nbytes])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="store_true", help="tile sweep before timing (about 5 minutes)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(f"{results['device']}, torch {torch.__version__}")
    bad = check_correctness(results)
    best = sweep(results) if args.sweep else {}
    shape_rows = per_shape(results, best)
    model_rows = whole_model(results, best)
    path = args.json or (os.path.join(os.environ["OUT"], "check_int4_gpu.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)
    print("\n==== summary (W4A16, group 128, zero points) ====")
    if best:
        print("tuned launch shapes (paste into runtime/kernels/int4.py):")
        for (name, mc), cfg in sorted(best.items()):
            n, k, _ = SHAPES[name]
            print(f"  ({n}, {k}, {GROUP}, {mc!r}): {cfg},")
    print("correctness: " + ("FAIL " + "; ".join(bad) if bad else "ok"))
    print("\n".join(shape_rows + model_rows))
    print(f"total {time.time() - START:.0f} s")


if __name__ == "__main__":
    main()
