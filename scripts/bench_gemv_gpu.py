#!/usr/bin/env python3
"""Fused small-batch GEMV (kiln.runtime.kernels.gemv) against the current decode chain on a GPU.

Llama-3.1-8B shapes, bf16, M = 1, 2, 4, 8 rows:
  (a) correctness of every fusion at the real shapes against the torch/Kiln chain and float64;
  (b) a tile sweep per shape (best printed) and per-shape timing, GEMV vs F.linear (cuBLAS),
      graph-timed over 32 distinct weight copies (lm_head: 8 passes over its 1 GB) so nothing is
      served from the 50 MB L2;
  (c) one CUDA graph of 32 layers (distinct weights; attention replaced by a copy of q) plus the
      final norm and lm_head: current chain vs fused GEMV chain, ms per forward.

    PYTHONUNBUFFERED=1 python scripts/bench_gemv_gpu.py [--json PATH] [--no-sweep]
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import multiprocessing
import statistics
import time
import traceback

import torch
import torch.nn.functional as F

from kiln.runtime.kernels import fused_add_rms_norm, silu_and_mul
from kiln.runtime.kernels.gemv import GemvConfig, gemv, m_class, pick_config

DEV, DT, EPS = "cuda", torch.bfloat16, 1e-5
LAYERS, HIDDEN, INTER, VOCAB = 32, 4096, 14336, 128256
MS = (1, 2, 4, 8)
SHAPES = {  # name: (N, K, fusion)
    "qkv": (6144, HIDDEN, "norm"), "o": (HIDDEN, HIDDEN, "residual"), "gate_up": (2 * INTER, HIDDEN, "norm"),
    "down": (HIDDEN, INTER, "silu_residual"), "lm_head": (VOCAB, HIDDEN, "norm"),
}
WEIGHT_KEY = {"qkv": "wqkv", "o": "wo", "gate_up": "wgu", "down": "wd"}
START = time.time()
SWEEP_BUDGET_S = 150.0  # the sweep stops starting new configs past this point of the run


SWEEP_MS = (1, 2, 8)  # one M per table class


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def make_model() -> dict:
    """Random bf16 weights, distinct per layer (about 15 GB), scaled so activations stay O(1)."""
    def w(n: int, k: int) -> torch.Tensor:
        return torch.randn(n, k, device=DEV, dtype=DT).mul_(k ** -0.5)

    def ln() -> torch.Tensor:
        return (1 + 0.1 * torch.randn(HIDDEN, device=DEV)).to(DT)

    model = {key: [] for key in ("wqkv", "wo", "wgu", "wd", "ln1", "ln2")}
    for _ in range(LAYERS):
        for key, (n, k, _) in (("wqkv", SHAPES["qkv"]), ("wo", SHAPES["o"]), ("wgu", SHAPES["gate_up"]),
                               ("wd", SHAPES["down"])):
            model[key].append(w(n, k))
        model["ln1"].append(ln())
        model["ln2"].append(ln())
    model["final"], model["lm_head"] = ln(), w(VOCAB, HIDDEN)
    return model


def shape_weights(model: dict, name: str) -> list[torch.Tensor]:
    return [model["lm_head"]] * 8 if name == "lm_head" else model[WEIGHT_KEY[name]]


def make_inputs(name: str, m: int) -> dict:
    n, k, fusion = SHAPES[name]
    x = torch.randn(m, 2 * k if fusion == "silu_residual" else k, device=DEV).to(DT)
    return {"x": x, "norm": (1 + 0.1 * torch.randn(k, device=DEV)).to(DT),
            "residual": torch.randn(m, n, device=DEV).to(DT), "out": torch.empty(m, n, device=DEV, dtype=DT)}


def run_fused(name: str, w: torch.Tensor, inp: dict, cfg: GemvConfig | None = None,
              fusion: str | None = None) -> torch.Tensor:
    """The shape's fused GEMV; fusion="plain" multiplies the chain's GEMM input with no fusion."""
    fusion = fusion or SHAPES[name][2]
    if fusion in ("plain", "plain_residual"):
        residual = inp["residual"] if fusion == "plain_residual" else None
        return gemv(inp["x_gemm"], w, residual=residual, out=inp["out"], config=cfg)
    return gemv(inp["x"], w, norm_weight=inp["norm"] if fusion == "norm" else None, eps=EPS,
                silu_mul=fusion == "silu_residual", residual=inp["residual"] if fusion != "norm" else None,
                out=inp["out"], config=cfg)


def gemm_input(name: str, inp: dict) -> torch.Tensor:
    """What cuBLAS multiplies in the current chain (the element-wise kernel's output)."""
    fusion = SHAPES[name][2]
    if fusion == "norm":
        return fused_add_rms_norm(inp["x"], None, inp["norm"], EPS)[0]
    return silu_and_mul(inp["x"]) if fusion == "silu_residual" else inp["x"]


def run_chain(name: str, w: torch.Tensor, inp: dict) -> torch.Tensor:
    y = F.linear(gemm_input(name, inp), w)
    return y if SHAPES[name][2] == "norm" else inp["residual"] + y


def run_float64(name: str, w: torch.Tensor, inp: dict) -> torch.Tensor:
    y = (gemm_input(name, inp).double() @ w.double().T)
    return y if SHAPES[name][2] == "norm" else inp["residual"].double() + y.to(DT).double()


def graph_ms(fn, calls: int, reps: int = 10, trials: int = 5) -> tuple[float, float]:
    """(median, spread) ms per call of fn, which enqueues `calls` calls, from CUDA graph replays."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps / calls)
    del graph
    return statistics.median(times), max(times) - min(times)


def check_correctness(model: dict, results: dict) -> None:
    print("(a) correctness, bf16, default configs: rel err (gemv vs chain | gemv vs f64 | chain vs f64)")
    for name in SHAPES:
        w = shape_weights(model, name)[0]
        for m in MS:
            inp = make_inputs(name, m)
            inp["out"] = torch.full_like(inp["out"], float("nan"))  # unwritten elements stay NaN
            got, chain, f64 = run_fused(name, w, inp), run_chain(name, w, inp), run_float64(name, w, inp)
            errs = (rel_err(got, chain), rel_err(got, f64), rel_err(chain, f64))
            bad = not bool(torch.isfinite(got).all()) or errs[1] > 2 * errs[2] + 1e-3
            results.setdefault("correctness", []).append([name, m, *errs, bad])
            print(f"  {name:8s} M={m}  {errs[0]:.2e} | {errs[1]:.2e} | {errs[2]:.2e}{'  FAIL' if bad else ''}")


def sweep_candidates(mc: str) -> list[GemvConfig]:
    cands = [GemvConfig(bn, bk, warps, stages, True) for bn in (16, 32, 64, 128) for bk in (128, 256, 512)
             for warps, stages in ((4, 2), (4, 3), (4, 4), (8, 3)) if bn * bk * 2 * stages <= 160 * 1024]
    if mc == "m1":
        return cands + [GemvConfig(bn, bk, warps, stages, False) for bn in (4, 8, 16) for bk in (1024, 2048)
                        for warps in (4, 8) for stages in (2, 3)]
    bks = (512, 1024) if mc == "m2" else (256, 512)  # the CUDA-core tile grows with the rows
    return cands + [GemvConfig(bn, bk, warps, 2, False) for bn in (4, 8) for bk in bks for warps in (4, 8)]


def _compile_task(task: tuple) -> str:
    """Worker: launch one (shape, fusion, M, config) once so its binary lands in Triton's disk cache."""
    name, fusion, m, cfg_tuple = task
    n, k, _ = SHAPES[name]
    try:
        inp = make_inputs(name, m)
        inp["x_gemm"] = gemm_input(name, inp)
        run_fused(name, torch.empty(n, k, device=DEV, dtype=DT), inp, GemvConfig(*cfg_tuple), fusion)
        torch.cuda.synchronize()
        return ""
    except Exception as exc:  # noqa: BLE001 - a config that fails to build is reported, not fatal
        return f"{type(exc).__name__}: {str(exc)[:300]}"


def sweep_tasks() -> list[tuple]:
    """Every sweep config plus the table's, once per binary: qkv/gate_up/lm_head share binaries
    (same fusion, K and specialisation), so compiling them for qkv suffices."""
    seen, tasks = set(), []
    for name, (n, k, fusion) in SHAPES.items():
        for m in MS:
            cands = sweep_candidates(m_class(m)) if m in SWEEP_MS else []
            for cfg in cands + [pick_config(n, k, m)]:
                if (fusion, k, m, cfg) not in seen:
                    seen.add((fusion, k, m, cfg))
                    tasks.append((name, fusion, m, tuple(vars(cfg).values())))
    return tasks


def precompile(tasks: list[tuple], workers: int = 14) -> None:
    """Compile in parallel processes into Triton's disk cache: compiling, not timing, is the slow part."""
    t0 = time.time()
    try:
        ctx = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            errors = [e for e in pool.map(_compile_task, tasks) if e]
    except Exception as exc:  # noqa: BLE001 - the sweep then compiles lazily, within its time budget
        print(f"precompile failed ({type(exc).__name__}: {exc}); compiling on first use")
        return
    print(f"precompiled {len(tasks)} kernels in {time.time() - t0:.0f} s ({len(errors)} failed)"
          + (f", e.g. {errors[0]}" if errors else ""))
    for error in sorted(set(errors))[:3]:
        print("   ", error)


def sweep(model: dict, results: dict) -> dict:
    """Best config per (shape, M class), each candidate checked against the chain before timing."""
    best = {}
    print("(b1) tile sweep: us per call, 32 weight copies per graph (best first)")
    groups = [(name, m) for name in SHAPES for m in SWEEP_MS]
    for i, (name, m) in enumerate(groups):
        # What is left of the budget, shared evenly by the groups still to sweep.
        deadline = time.time() + (START + SWEEP_BUDGET_S - time.time()) / (len(groups) - i)
        timed = _sweep_group(model, name, m, deadline)
        results.setdefault("sweep", {})[f"{name}/{m}"] = [(t, vars(c)) for t, c in timed]
        if timed:
            best[(name, m_class(m))] = timed[0][1]
            print(f"  {name:8s} M={m}: " + "; ".join(f"{t:.1f} {_short(c)}" for t, c in timed[:3])
                  + f" ... worst {timed[-1][0]:.1f} ({len(timed)} configs)")
    return best


def _sweep_group(model: dict, name: str, m: int, deadline: float) -> list[tuple[float, GemvConfig]]:
    weights = shape_weights(model, name)
    inp = make_inputs(name, m)
    ref = run_chain(name, weights[0], inp)
    timed = []
    for cfg in sweep_candidates(m_class(m)):
        if time.time() > deadline:
            print(f"  {name} M={m}: sweep budget spent after {len(timed)} configs")
            break
        try:
            err = rel_err(run_fused(name, weights[0], inp, cfg), ref)
            if not err < 2e-2:
                print(f"  {name} M={m} {_short(cfg)}: wrong result (rel err {err:.2e}), skipped")
                continue
            t, _ = graph_ms(lambda: [run_fused(name, w, inp, cfg) for w in weights], len(weights), 5, 3)
            timed.append((t * 1e3, cfg))
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
            print(f"  {name} M={m} {_short(cfg)}: {type(exc).__name__}: {str(exc)[:200]}")
    return sorted(timed, key=lambda tc: tc[0])


def _short(c: GemvConfig) -> str:
    return f"{'dot' if c.use_dot else 'fma'} n{c.block_n} k{c.block_k} w{c.num_warps} s{c.num_stages}"


def per_shape(model: dict, best: dict, results: dict) -> list[str]:
    rows = []
    print("(b2) per shape: us per call (GB/s)   cuBLAS F.linear | chain (norm/silu + F.linear [+ add]) | "
          "gemv fused | gemv unfused (same config, on the chain's GEMM input)")
    precompile([(name, fusion, m, tuple(vars(best[(name, m_class(m))]).values())) for name in SHAPES for m in MS
                for fusion in (SHAPES[name][2], "plain") + (("plain_residual",) if name == "down" else ())])
    for name, (n, k, fusion) in SHAPES.items():
        weights = shape_weights(model, name)
        for m in MS:
            inp = make_inputs(name, m)
            cfg = best.get((name, m_class(m)))
            gbytes = (n * k + m * inp["x"].shape[1] + m * n * (1 if fusion == "norm" else 2)) * 2 / 1e9
            inp["x_gemm"] = x_gemm = gemm_input(name, inp)
            t_cublas = graph_ms(lambda: [F.linear(x_gemm, w) for w in weights], len(weights))[0]
            t_chain = graph_ms(lambda: [run_chain(name, w, inp) for w in weights], len(weights))[0]
            t_gemv, spread = graph_ms(lambda: [run_fused(name, w, inp, cfg) for w in weights], len(weights))
            t_plain = graph_ms(lambda: [run_fused(name, w, inp, cfg, "plain") for w in weights], len(weights))[0]
            line = (f"  {name:8s} M={m}  {t_cublas * 1e3:7.1f} ({gbytes / t_cublas * 1e3:5.0f}) | "
                    f"{t_chain * 1e3:7.1f} | {t_gemv * 1e3:7.1f} ({gbytes / t_gemv * 1e3:5.0f}) +-{spread * 1e3:.1f}"
                    f" | {t_plain * 1e3:7.1f}")
            print(line)
            rows.append(line)
            results.setdefault("per_shape", []).append([name, m, t_cublas, t_chain, t_gemv, t_plain])
    return rows


def chain_forward(model: dict, h0: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    x, res = h0, None
    for layer in range(LAYERS):
        xn, res = fused_add_rms_norm(x, res, model["ln1"][layer], EPS)
        qkv = F.linear(xn, model["wqkv"][layer])
        attn.copy_(qkv[:, :HIDDEN])  # stands in for rotary + paged attention (excluded from both)
        x = F.linear(attn, model["wo"][layer])
        xn, res = fused_add_rms_norm(x, res, model["ln2"][layer], EPS)
        x = F.linear(silu_and_mul(F.linear(xn, model["wgu"][layer])), model["wd"][layer])
    xn, _ = fused_add_rms_norm(x, res, model["final"], EPS)
    return F.linear(xn, model["lm_head"])


def fused_forward(model: dict, h0: torch.Tensor, attn: torch.Tensor, h: torch.Tensor, best: dict) -> torch.Tensor:
    mc = m_class(h0.shape[0])
    cfg = {name: best.get((name, mc)) for name in SHAPES}
    res_in = h0  # layer 0 reads the input residual; every later add is in place in h
    for layer in range(LAYERS):
        qkv = gemv(res_in, model["wqkv"][layer], norm_weight=model["ln1"][layer], eps=EPS, config=cfg["qkv"])
        attn.copy_(qkv[:, :HIDDEN])
        gemv(attn, model["wo"][layer], residual=res_in, out=h, config=cfg["o"])
        gu = gemv(h, model["wgu"][layer], norm_weight=model["ln2"][layer], eps=EPS, config=cfg["gate_up"])
        gemv(gu, model["wd"][layer], silu_mul=True, residual=h, out=h, config=cfg["down"])
        res_in = h
    return gemv(h, model["lm_head"], norm_weight=model["final"], eps=EPS, config=cfg["lm_head"])


def hybrid_forward(model: dict, h0: torch.Tensor, attn: torch.Tensor, h: torch.Tensor, best: dict) -> torch.Tensor:
    """GEMV where it paid at M >= 2 in the first sweep (qkv, o, lm_head, down's residual add);
    gate_up stays norm kernel + cuBLAS and down's SiLU a separate kernel."""
    mc = m_class(h0.shape[0])
    cfg = {name: best.get((name, mc)) for name in SHAPES}
    res_in = h0
    for layer in range(LAYERS):
        qkv = gemv(res_in, model["wqkv"][layer], norm_weight=model["ln1"][layer], eps=EPS, config=cfg["qkv"])
        attn.copy_(qkv[:, :HIDDEN])
        gemv(attn, model["wo"][layer], residual=res_in, out=h, config=cfg["o"])
        xn, _ = fused_add_rms_norm(h, None, model["ln2"][layer], EPS)
        act = silu_and_mul(F.linear(xn, model["wgu"][layer]))
        gemv(act, model["wd"][layer], residual=h, out=h, config=cfg["down"])
        res_in = h
    return gemv(h, model["lm_head"], norm_weight=model["final"], eps=EPS, config=cfg["lm_head"])


def end_to_end(model: dict, best: dict, results: dict) -> list[str]:
    rows = []
    print("(c) 32 layers + final norm + lm_head, one graph: ms per forward")
    for m in MS:
        h0 = torch.randn(m, HIDDEN, device=DEV).to(DT)
        attn, h = torch.empty(m, HIDDEN, device=DEV, dtype=DT), torch.empty(m, HIDDEN, device=DEV, dtype=DT)
        ref = chain_forward(model, h0, attn)
        err = rel_err(fused_forward(model, h0, attn, h, best), ref)
        err_h = rel_err(hybrid_forward(model, h0, attn, h, best), ref)
        runs = {"chain": [], "fused": [], "fused_table": [], "hybrid": []}
        for _ in range(2):  # alternate, twice: the spread between repeats is the noise floor
            runs["chain"].append(graph_ms(lambda: chain_forward(model, h0, attn), 1, 10, 3)[0])
            runs["fused"].append(graph_ms(lambda: fused_forward(model, h0, attn, h, best), 1, 10, 3)[0])
        runs["fused_table"].append(graph_ms(lambda: fused_forward(model, h0, attn, h, {}), 1, 10, 3)[0])
        runs["hybrid"].append(graph_ms(lambda: hybrid_forward(model, h0, attn, h, best), 1, 10, 3)[0])
        c, f = statistics.mean(runs["chain"]), statistics.mean(runs["fused"])
        line = (f"  M={m}  chain {c:.3f} ms ({'/'.join(f'{t:.3f}' for t in runs['chain'])})  fused {f:.3f} ms "
                f"({'/'.join(f'{t:.3f}' for t in runs['fused'])})  diff {c - f:+.3f} ms ({(c - f) / c:+.1%})  "
                f"table-configs {runs['fused_table'][0]:.3f}  hybrid {runs['hybrid'][0]:.3f}  "
                f"logits rel err {err:.1e} (hybrid {err_h:.1e})")
        print(line)
        rows.append(line)
        results.setdefault("e2e", []).append([m, runs, err, err_h])
    return rows


def copy_ceiling() -> float:
    a = torch.randn(1 << 29, device=DEV, dtype=DT)  # 1 GiB
    b = torch.empty_like(a)
    t, _ = graph_ms(lambda: b.copy_(a), 1, 5, 3)
    return 2 * a.numel() * 2 / t / 1e6  # GB/s, read + write


def _guarded(fn, *args) -> list[str]:
    """Run one phase; a failure is printed and the later phases still run."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return [f"{fn.__name__} failed"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-sweep", action="store_true")
    args = parser.parse_args()
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if not args.no_sweep:
        precompile(sweep_tasks())
    model = make_model()
    gbytes = sum(t.numel() * 2 for v in model.values() for t in (v if isinstance(v, list) else [v])) / 1e9
    print(f"{results['device']}; weights {gbytes:.1f} GB; copy ceiling {copy_ceiling():.0f} GB/s (read+write); "
          f"t={time.time() - START:.0f}s")
    check_correctness(model, results)
    best = {} if args.no_sweep else sweep(model, results)
    best = {(name, m_class(m)): best.get((name, m_class(m))) or pick_config(SHAPES[name][0], SHAPES[name][1], m)
            for name in SHAPES for m in SWEEP_MS}
    print(f"t={time.time() - START:.0f}s")
    shape_rows, e2e_rows = _guarded(per_shape, model, best, results), _guarded(end_to_end, model, best, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    print("\n==== summary (H100, bf16) ====\nconfigs used (best of sweep, else table):")
    for (name, mc), cfg in best.items():
        print(f"  ({SHAPES[name][0]}, {SHAPES[name][1]}, {mc!r}): GemvConfig({cfg.block_n}, {cfg.block_k}, "
              f"{cfg.num_warps}, {cfg.num_stages}, {cfg.use_dot}),  # {name}")
    print("per shape, us: cuBLAS (GB/s) | chain | gemv fused (GB/s) | gemv unfused")
    print("\n".join(shape_rows))
    print("\n".join(e2e_rows))
    print(f"total {time.time() - START:.0f} s")


if __name__ == "__main__":
    main()
