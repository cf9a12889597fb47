#!/usr/bin/env python3
"""Check Kiln's Triton kernels on a CUDA GPU over the full shape grid, then time them.

Correctness: every kernel against a torch reference in fp32 on upcast inputs (TF32 off), fresh
random inputs per case, outputs poisoned with NaN (so unwritten elements fail). Timing:
triton.testing.do_bench medians (it flushes L2 before every call, so small caches are not
measured from L2) for Llama-3.1-8B shapes, against the measured device copy ceiling.

    PYTHONUNBUFFERED=1 python scripts/check_kernels_gpu.py [--sweep] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
import triton

from kiln.runtime.kernels import (AttentionConfig, apply_rotary, default_config, fused_add_rms_norm,
                                  paged_attention, rotary_and_write_kv, silu_and_mul, write_kv_cache)

DEV = "cuda"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
H100_COPY_CEILING = 2.93e12  # bytes/s, read + write, as given for the H100 of this workplace


@contextlib.contextmanager
def poisoned():
    """torch.empty returns NaN inside: outputs a kernel leaves unwritten fail every comparison."""
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def paged_batch(q_lens, ctx_lens, hq, hkv, d, bs, dtype):
    """Random mixed batch over a shuffled paged cache; k/v caches are views of one kv tensor."""
    nblk = [-(-c // bs) for c in ctx_lens]
    total = sum(nblk) + 2
    perm = torch.randperm(total, device=DEV).to(torch.int32)
    tables = torch.full((len(ctx_lens), max(nblk) + 1), int(perm[-1]), dtype=torch.int32, device=DEV)
    start = 0
    for b, n in enumerate(nblk):
        tables[b, :n] = perm[start:start + n]
        start += n
    kv = torch.randn(2, total, bs, hkv, d, device=DEV, dtype=dtype)
    q = torch.randn(sum(q_lens), hq, d, device=DEV, dtype=dtype)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    seq = torch.tensor(ctx_lens, dtype=torch.int32, device=DEV)
    return dict(q=q, k_cache=kv[0], v_cache=kv[1], block_tables=tables, query_start_loc=qsl, seq_lens=seq)


def attention_ref(batch, q_lens, ctx_lens, scale):
    q, kc, vc, tables = batch["q"].float(), batch["k_cache"], batch["v_cache"], batch["block_tables"]
    bs, gqa = kc.shape[1], q.shape[1] // kc.shape[2]
    out, start = torch.empty_like(q), 0
    for b, (ql, ctx) in enumerate(zip(q_lens, ctx_lens)):
        pos = torch.arange(ctx, device=DEV)
        blk = tables[b, pos // bs].long()
        k = kc[blk, pos % bs].float().repeat_interleave(gqa, 1)
        v = vc[blk, pos % bs].float().repeat_interleave(gqa, 1)
        s = torch.einsum("thd,nhd->htn", q[start:start + ql], k) * scale
        qpos = ctx - ql + torch.arange(ql, device=DEV)
        s.masked_fill_(pos[None, :] > qpos[:, None], float("-inf"))
        out[start:start + ql] = torch.einsum("htn,nhd->thd", s.softmax(-1), v)
        start += ql
    return out


def check_attention_case(dtype, d, gqa, bs, q_lens, ctx_lens, num_splits=None) -> float:
    hkv = 4
    batch = paged_batch(q_lens, ctx_lens, hkv * gqa, hkv, d, bs, dtype)
    scale = d ** -0.5
    with poisoned():
        out = paged_attention(**batch, scale=scale, max_query_len=max(q_lens), max_seq_len=max(ctx_lens),
                              num_splits=num_splits)
    if DEV == "cuda":
        torch.cuda.synchronize()
    return rel_err(out, attention_ref(batch, q_lens, ctx_lens, scale))


MIXED = ([1, 1, 1, 1, 300, 3, 1, 64, 0], [1, 17, 1000, 32768, 4000, 40, 9000, 64, 0])
DECODE = ([1, 1, 1], [32768, 5, 2047])


def check_attention_grid(failures: list) -> int:
    """dtypes x head dims x GQA ratios, block sizes rotated through; three batches each."""
    cases = 0
    for i, (dtype, d, gqa) in enumerate((dt, d, g) for dt in TOL for d in (64, 128) for g in (1, 2, 4, 8)):
        bs = (16, 32, 64, 128)[(i + i // 4) % 4]
        for name, (ql, cl), splits in (("mixed", MIXED, None), ("decode", DECODE, None),
                                       ("decode-nosplit", DECODE, 1)):
            err = check_attention_case(dtype, d, gqa, bs, ql, cl, splits)
            cases += 1
            ok = err < TOL[dtype]
            print(f"  attn {str(dtype)[6:]:8s} D={d:3d} G={gqa} BS={bs:3d} {name:14s} err={err:.2e} "
                  f"{'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(f"attention {dtype} D={d} G={gqa} BS={bs} {name}: {err:.3g}")
    return cases


def check_elementwise(failures: list) -> int:
    cases = 0
    for dtype in TOL:
        for t, h in ((1, 4096), (300, 4096), (7, 8192), (33, 576)):
            x, r = (torch.randn(t, h, device=DEV, dtype=dtype) for _ in range(2))
            w = torch.rand(h, device=DEV, dtype=dtype) + 0.5
            with poisoned():
                normed, new_res = fused_add_rms_norm(x, r, w, 1e-5)
            s = x.float() + r.float()
            sr = s.to(dtype).float()
            ref = sr * torch.rsqrt(sr.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()
            errs = (rel_err(normed, ref), rel_err(new_res, s))
            inter = h if h != 576 else 1536
            xx = torch.randn(t, 2 * inter, device=DEV, dtype=dtype)
            with poisoned():
                act = silu_and_mul(xx)
            errs += (rel_err(act, F.silu(xx[:, :inter].float()) * xx[:, inter:].float()),)
            cases += 3
            if max(errs) >= TOL[dtype]:
                failures.append(f"norm/silu {dtype} T={t} H={h}: {errs}")
    return cases


def rope_cache(max_pos: int, d: int) -> torch.Tensor:
    inv = 500000.0 ** (-torch.arange(0, d, 2, device=DEV, dtype=torch.float64) / d)
    f = torch.arange(max_pos, device=DEV, dtype=torch.float64)[:, None] * inv
    return torch.cat([f.cos(), f.sin()], -1).float()


def rope_ref(x, pos, cache):
    half = x.shape[-1] // 2
    cos, sin = cache[pos].split(half, -1)
    cos, sin = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
    x = x.float()
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def check_rotary(failures: list) -> int:
    cases = 0
    for dtype in TOL:
        for hq, hkv, d, bs in ((32, 8, 128, 32), (8, 8, 64, 16), (28, 4, 128, 128), (16, 2, 64, 64)):
            t = 257
            qkv = torch.randn(t, (hq + 2 * hkv) * d, device=DEV, dtype=dtype)
            q, k, v = (x.view(t, -1, d) for x in qkv.split([hq * d, hkv * d, hkv * d], -1))
            cache = rope_cache(32768, d)
            pos = torch.randint(0, 32768, (t,), device=DEV)
            kv = torch.randn(2, t // bs + 3, bs, hkv, d, device=DEV, dtype=dtype)
            slots = torch.randperm(kv.shape[1] * bs, device=DEV)[:t]
            slots[::7] = -1
            want_q, want_k = rope_ref(q, pos, cache), rope_ref(k, pos, cache)
            want_kv = kv.float().clone().view(2, -1, hkv, d)
            keep = slots >= 0
            want_kv[0, slots[keep]], want_kv[1, slots[keep]] = want_k[keep], v[keep].float()
            kv_before = kv.clone()
            rotary_and_write_kv(q, k, v, pos, cache, kv[0], kv[1], slots)
            errs = [rel_err(q, want_q), rel_err(kv.view(2, -1, hkv, d), want_kv)]
            apply_rotary(q.clone(), k, pos, cache)
            errs.append(rel_err(k, want_k))
            kv2 = kv_before
            write_kv_cache(k, v, kv2[0], kv2[1], slots)
            errs.append(rel_err(kv2.view(2, -1, hkv, d), want_kv))
            cases += 4
            if max(errs) >= TOL[dtype] or not all(math.isfinite(e) for e in errs):
                failures.append(f"rotary/kv {dtype} Hq={hq} Hkv={hkv} D={d} BS={bs}: {errs}")
    return cases


def bench(fn) -> float:
    """Median milliseconds of fn (do_bench flushes L2 before each call)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def host_us(fn, n: int = 50) -> float:
    """Wall microseconds per back-to-back call: max(host launch cost, device time)."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def graph_ms(fns: list) -> float:
    """Device milliseconds per call from one CUDA graph replaying fns (distinct input sets, so
    each call reads its inputs from DRAM even when one set would fit in L2); no launch gaps."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=60, return_mode="median") / len(fns)


def copies_for(nbytes: float) -> int:
    """Input sets to rotate through so that one graph replay touches >= 200 MB (4x L2)."""
    return max(1, min(16, math.ceil(2e8 / max(nbytes, 1))))


def copy_ceiling() -> float:
    src = torch.randn(512 * 2**20, device=DEV)  # 2 GiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


LLAMA8B = dict(hq=32, hkv=8, d=128, bs=32, dtype=torch.bfloat16)


def attention_fns(q_lens, ctx_lens, nbytes, config=None, num_splits=None, copies=None) -> list:
    m = LLAMA8B
    fns = []
    for _ in range(copies or copies_for(nbytes)):
        b = paged_batch(q_lens, ctx_lens, m["hq"], m["hkv"], m["d"], m["bs"], m["dtype"])
        fns.append(lambda b=b: paged_attention(**b, scale=0.088, max_query_len=max(q_lens),
                                               max_seq_len=max(ctx_lens), config=config, num_splits=num_splits))
    return fns


def decode_bytes(batch: int, ctx: int) -> float:
    m = LLAMA8B
    return batch * ctx * m["hkv"] * m["d"] * 2 * 2 + 2 * batch * m["hq"] * m["d"] * 2


def prefill_flops(q_len: int, ctx: int, seqs: int) -> float:
    pairs = seqs * sum(ctx - q_len + i + 1 for i in range(q_len))
    return 4 * LLAMA8B["hq"] * LLAMA8B["d"] * pairs


def measure(rows: list, name: str, fns: list, nbytes=None, flops=None) -> None:
    """Row: eager do_bench ms, graph ms, host us/call, bytes, flops; printed as it is taken."""
    row = (name, bench(fns[0]), graph_ms(fns), host_us(fns[0]), nbytes, flops)
    rows.append(row)
    print(format_row(row))


def format_row(row) -> str:
    name, eager, graph, host, nbytes, flops = row
    bw = f"{nbytes / (graph * 1e-3) / 1e9:7.0f} {100 * nbytes / (graph * 1e-3) / H100_COPY_CEILING:5.0f}%" \
        if nbytes else " " * 14
    fl = f"{flops / (graph * 1e-3) / 1e12:8.1f}" if flops else " " * 8
    return f"{name:34s} {eager:8.4f} {graph:8.4f} {host:7.1f} {bw} {fl}"


def time_fused(rows: list) -> None:
    h, inter, hq, hkv, d = 4096, 14336, 32, 8, 128
    cache = rope_cache(131072, d)
    for t in (256, 4096):
        nb = 4 * t * h * 2
        sets = [[torch.randn(t, h, device=DEV, dtype=torch.bfloat16) for _ in range(2)] for _ in range(copies_for(nb))]
        w = torch.rand(h, device=DEV, dtype=torch.bfloat16)
        measure(rows, f"add+rmsnorm T={t} H={h}", [lambda x=x, r=r: fused_add_rms_norm(x, r, w, 1e-5)
                                                   for x, r in sets], nbytes=nb)
        nb = 3 * t * inter * 2
        xs = [torch.randn(t, 2 * inter, device=DEV, dtype=torch.bfloat16) for _ in range(copies_for(nb))]
        measure(rows, f"silu_and_mul T={t} I={inter}", [lambda x=x: silu_and_mul(x) for x in xs], nbytes=nb)
        measure(rows, f"  torch silu*mul T={t}", [lambda x=x: F.silu(x[:, :inter]) * x[:, inter:] for x in xs],
                nbytes=nb)
        nb = t * (2 * hq + 4 * hkv) * d * 2 + t * d * 4
        fns = []
        for _ in range(copies_for(nb)):
            qkv = torch.randn(t, (hq + 2 * hkv) * d, device=DEV, dtype=torch.bfloat16)
            q, k, v = (y.view(t, -1, d) for y in qkv.split([hq * d, hkv * d, hkv * d], -1))
            pos = torch.randint(0, 131072, (t,), device=DEV)
            kv = torch.empty(2, t // 32 + 1, 32, hkv, d, device=DEV, dtype=torch.bfloat16)
            slots = torch.randperm(kv.shape[1] * 32, device=DEV)[:t]
            fns.append(lambda q=q, k=k, v=v, p=pos, kv=kv, s=slots: rotary_and_write_kv(q, k, v, p, cache, kv[0],
                                                                                         kv[1], s))
        measure(rows, f"rotary+kv write T={t}", fns, nbytes=nb)


def timings(rows: list) -> None:
    for batch in (1, 64, 256):
        for ctx in (128, 1024, 4096, 8192):
            nb = decode_bytes(batch, ctx)
            measure(rows, f"decode B={batch} ctx={ctx}", attention_fns([1] * batch, [ctx] * batch, nb), nbytes=nb)
    nb = decode_bytes(1, 32768)
    measure(rows, "decode B=1 ctx=32768", attention_fns([1], [32768], nb), nbytes=nb)
    for q_len, ctx, seqs in ((2048, 2048, 1), (2048, 8192, 1), (512, 512, 4)):
        measure(rows, f"prefill {seqs}x{q_len} ctx={ctx}",
                attention_fns([q_len] * seqs, [ctx] * seqs, 0, copies=2), flops=prefill_flops(q_len, ctx, seqs))
    mixed_q, mixed_ctx = [512] + [1] * 63, [2048] + [2048] * 63
    measure(rows, "mixed 512-chunk + 63 decodes @2k", attention_fns(mixed_q, mixed_ctx, 0, copies=2),
            flops=prefill_flops(512, 2048, 1))
    q = torch.randn(1, 32, 2048, 128, device=DEV, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, 2048, 128, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    measure(rows, "  torch SDPA causal 2048 (unpaged)",
            [lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)],
            flops=prefill_flops(2048, 2048, 1))
    time_fused(rows)


def sweep(deadline: float) -> None:
    """Graph-timed tile configurations and split counts (tuning aid), fastest per shape last."""
    base = default_config(128, torch.bfloat16)
    results: list = []
    decode_shapes = ((1, 8192), (64, 128), (64, 4096))
    variants = [("decode", dict(decode_block_n=bn, decode_warps=w, decode_stages=st))
                for bn in (64, 32, 128) for w, st in ((4, 2), (4, 3), (4, 4), (8, 3))]
    variants += [("prefill", dict(prefill_block_m=bm, prefill_block_n=bn, prefill_warps=w, prefill_stages=st))
                 for bm in (128, 64) for bn in (64, 32, 128) for w, st in ((4, 2), (8, 2), (4, 3), (8, 3))]
    for splits in (4, 8, 16, 64):
        for batch, ctx in ((1, 8192), (4, 4096)):
            fns = attention_fns([1] * batch, [ctx] * batch, decode_bytes(batch, ctx), num_splits=splits)
            results.append((f"decode B={batch} ctx={ctx}", f"splits={splits}", graph_ms(fns)))
    for kind, over in variants:
        if time.time() > deadline:
            break
        cfg = AttentionConfig(**{**base.__dict__, **over})
        shapes = decode_shapes if kind == "decode" else ((2048, 2048),)
        for a, b in shapes:
            try:
                if kind == "decode":
                    fns = attention_fns([1] * a, [b] * a, decode_bytes(a, b), config=cfg)
                else:
                    fns = attention_fns([a], [b], 0, config=cfg, copies=2)
                results.append((f"{kind} {a}x{b}", str(over), graph_ms(fns)))
            except Exception as exc:  # a config that does not fit (shared memory) is just skipped
                print(f"  sweep {kind} {over}: {type(exc).__name__}")
    best: dict = {}
    for shape, what, ms in results:
        print(f"  sweep {shape:22s} {what:80s} {ms:8.4f} ms")
        if shape not in best or ms < best[shape][1]:
            best[shape] = (what, ms)
    for shape, (what, ms) in best.items():
        print(f"best {shape}: {what} {ms:.4f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time tile configurations (after the table)")
    parser.add_argument("--sweep-seconds", type=float, default=60.0)
    parser.add_argument("--json", default=None, help="write all results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("check_kernels_gpu: no CUDA device; run the CPU tests (pytest tests/kernels) instead")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    t0, failures = time.time(), []
    cases = check_attention_grid(failures) + check_elementwise(failures) + check_rotary(failures)
    print(f"correctness: {cases} cases, {len(failures)} failures, {time.time() - t0:.0f} s")
    for f in failures:
        print("  FAIL", f)
    ceiling = copy_ceiling()
    rows: list = []
    header = f"{'case':34s} {'eager ms':>8s} {'graph ms':>8s} {'host us':>7s} {'GB/s':>7s} {'%ceil':>6s} {'TFLOP/s':>8s}"
    print(header)
    timings(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"ceiling": ceiling, "failures": failures, "cases": cases, "rows": rows}, fh, indent=1)
    if args.sweep:
        sweep(time.time() + args.sweep_seconds)
    print(f"\nmeasured copy ceiling {ceiling / 1e12:.2f} TB/s; GB/s and TFLOP/s from graph ms; "
          f"%ceil of {H100_COPY_CEILING / 1e12:.2f} TB/s")
    print(header)
    for row in rows:
        print(format_row(row))
    print(f"RESULT: {cases} correctness cases, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
