#!/usr/bin/env python3
"""FP8 KV cache kernels on a CUDA GPU (sm_89+): correctness over the full shape grid, then decode
attention timed in bytes actually read against the copy ceiling.

Correctness (fresh random inputs per case, outputs poisoned with NaN, TF32 off):
  * paged attention over an FP8 cache: query dtypes fp32/fp16/bf16 x head dims 64/128 x GQA
    1/2/4/8, block sizes 16..128 rotated through, three batches each (mixed, decode split, decode
    unsplit), against float32 attention over the dequantized cache;
  * write_kv_cache into FP8: bit for bit against runtime/fp8_kv.quantize;
  * rotary_and_write_kv into FP8: v bit for bit, rotated k within one E4M3 step of quantize(rope(k))
    (the float32 rotation may differ from torch's in its last bit), q as in check_kernels_gpu.
Timing: decode attention, Llama-3.1-8B heads (32 q / 8 kv, head dim 128, bf16 queries, block
size 32), batch 64/128/256 x context 1k-8k, FP8 cache vs bf16 cache, graph-timed over distinct
input sets; GB/s count the bytes each call reads (FP8: 1 byte per K/V element). The default
configuration is timed, so FP8 decode is the tensor-core kernel (kernels/fp8_decode.py) where it
applies; the correctness grid covers both it (fp16/bf16 queries) and the Triton kernel (fp32).

    PYTHONUNBUFFERED=1 python scripts/check_fp8_kv_gpu.py [--no-check] [--sweep] [--json PATH]

Logs and the JSON go to $OUT when it is set. Exit status 1 when a correctness case fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_kernels_gpu as ck  # noqa: E402  (paged batches, references, graph timing)

from kiln.runtime import fp8_kv  # noqa: E402
from kiln.runtime.kernels import (AttentionConfig, default_config, paged_attention, rotary_and_write_kv,  # noqa: E402
                                  write_kv_cache)

FP8 = torch.float8_e4m3fn
H200_COPY_CEILING = 4.16e12  # bytes/s, read + write, measured on the H200 (shared REFERENCE.md section 5)
SCALES = {"k_scale": 4.5 / 448, "v_scale": 3.5 / 448}  # N(0, 1) caches: the largest K values saturate


def to_fp8(batch: dict) -> dict:
    """The paged batch with its caches quantized to FP8 (SCALES)."""
    return dict(batch, k_cache=fp8_kv.quantize(batch["k_cache"], SCALES["k_scale"]),
                v_cache=fp8_kv.quantize(batch["v_cache"], SCALES["v_scale"]))


def check_attention_case(dtype, d, gqa, bs, q_lens, ctx_lens, num_splits=None) -> float:
    hkv = 4
    batch = to_fp8(ck.paged_batch(q_lens, ctx_lens, hkv * gqa, hkv, d, bs, dtype))
    dequantized = dict(batch, k_cache=fp8_kv.dequantize(batch["k_cache"], SCALES["k_scale"]),
                       v_cache=fp8_kv.dequantize(batch["v_cache"], SCALES["v_scale"]))
    scale = d ** -0.5
    with ck.poisoned():
        out = paged_attention(**batch, scale=scale, max_query_len=max(q_lens), max_seq_len=max(ctx_lens),
                              num_splits=num_splits, **SCALES)
    torch.cuda.synchronize()
    return ck.rel_err(out, ck.attention_ref(dequantized, q_lens, ctx_lens, scale))


def check_attention_grid(failures: list) -> int:
    cases = 0
    for i, (dtype, d, gqa) in enumerate((dt, d, g) for dt in ck.TOL for d in (64, 128) for g in (1, 2, 4, 8)):
        bs = (16, 32, 64, 128)[(i + i // 4) % 4]
        for name, (ql, cl), splits in (("mixed", ck.MIXED, None), ("decode", ck.DECODE, None),
                                       ("decode-nosplit", ck.DECODE, 1)):
            err = check_attention_case(dtype, d, gqa, bs, ql, cl, splits)
            cases += 1
            ok = err < ck.TOL[dtype]
            print(f"  fp8 attn q={str(dtype)[6:]:8s} D={d:3d} G={gqa} BS={bs:3d} {name:14s} err={err:.2e} "
                  f"{'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(f"fp8 attention q={dtype} D={d} G={gqa} BS={bs} {name}: {err:.3g}")
    return cases


def _ordered(codes: torch.Tensor) -> torch.Tensor:
    mag = (codes & 0x7F).long()
    return torch.where(codes >= 0x80, -mag, mag)


def check_writes(failures: list) -> int:
    cases = 0
    for dtype in ck.TOL:
        for hq, hkv, d, bs in ((32, 8, 128, 32), (8, 8, 64, 16), (28, 4, 128, 128), (16, 2, 64, 64)):
            t = 257
            qkv = torch.randn(t, (hq + 2 * hkv) * d, device=ck.DEV, dtype=dtype)
            qkv *= torch.exp2(torch.empty_like(qkv, dtype=torch.float32).uniform_(-6, 6)).to(dtype)
            q, k, v = (x.view(t, -1, d) for x in qkv.split([hq * d, hkv * d, hkv * d], -1))
            ks, vs = 0.37, 0.011
            pos = torch.randint(0, 32768, (t,), device=ck.DEV)
            kv = torch.zeros(2, t // bs + 3, bs, hkv, d, device=ck.DEV, dtype=FP8)
            slots = torch.randperm(kv.shape[1] * bs, device=ck.DEV)[:t]
            slots[::7] = -1
            keep = slots >= 0
            codes = kv.view(torch.uint8).view(2, -1, hkv, d)
            write_kv_cache(k, v, kv[0], kv[1], slots, k_scale=ks, v_scale=vs)
            exact = [torch.equal(codes[0, slots[keep]], fp8_kv.quantize(k[keep], ks).view(torch.uint8)),
                     torch.equal(codes[1, slots[keep]], fp8_kv.quantize(v[keep], vs).view(torch.uint8))]
            kv.zero_()
            rope = ck.rope_cache(32768, d)
            want_k = ck.rope_ref(k, pos, rope)
            q_before = q.clone()
            rotary_and_write_kv(q, k, v, pos, rope, kv[0], kv[1], slots, k_scale=ks, v_scale=vs)
            step = (_ordered(codes[0, slots[keep]]) - _ordered(fp8_kv.quantize(want_k[keep], ks).view(torch.uint8)))
            exact.append(torch.equal(codes[1, slots[keep]], fp8_kv.quantize(v[keep], vs).view(torch.uint8)))
            q_err = ck.rel_err(q, ck.rope_ref(q_before, pos, rope))
            cases += 4
            ok = all(exact) and step.abs().max().item() <= 1 and q_err < ck.TOL[dtype]
            print(f"  fp8 write {str(dtype)[6:]:8s} Hq={hq} Hkv={hkv} D={d} BS={bs}: exact={exact} "
                  f"k off-by-one {(step != 0).float().mean().item():.1e} q err {q_err:.1e} {'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(f"fp8 writes {dtype} Hq={hq} Hkv={hkv} D={d} BS={bs}: exact={exact} "
                                f"max step {step.abs().max().item()} q err {q_err:.3g}")
    return cases


def decode_fns(batch: int, ctx: int, fp8: bool, config: AttentionConfig | None = None) -> tuple[list, float]:
    """Graph-timing callables over distinct input sets, and the bytes one call reads."""
    m = ck.LLAMA8B
    kv_item = 1 if fp8 else 2
    nbytes = batch * ctx * m["hkv"] * m["d"] * 2 * kv_item + 2 * batch * m["hq"] * m["d"] * 2
    fns = []
    for _ in range(ck.copies_for(nbytes)):
        b = ck.paged_batch([1] * batch, [ctx] * batch, m["hq"], m["hkv"], m["d"], m["bs"], m["dtype"])
        scales = SCALES if fp8 else {}
        if fp8:
            b = to_fp8(b)
        fns.append(lambda b=b, s=scales: paged_attention(**b, scale=0.088, max_query_len=1, max_seq_len=ctx,
                                                         config=config, **s))
    return fns, nbytes


def timings(rows: list) -> None:
    for batch in (64, 128, 256):
        for ctx in (1024, 2048, 4096, 8192):
            fns8, nb8 = decode_fns(batch, ctx, True)
            ms8 = ck.graph_ms(fns8)
            del fns8
            fns16, nb16 = decode_fns(batch, ctx, False)
            ms16 = ck.graph_ms(fns16)
            del fns16
            torch.cuda.empty_cache()
            rows.append((f"decode B={batch} ctx={ctx}", ms8, nb8, ms16, nb16))
            print(format_row(rows[-1]))


def sweep(deadline: float) -> None:
    """The Triton kernel's FP8 decode tiles at two shapes (tuning aid; the tensor-core kernel's
    launch shapes: sweep_decode_attention.py --mma-only); fastest per shape last."""
    base = default_config(128, torch.bfloat16)
    results = []
    for batch, ctx in ((64, 4096), (256, 2048)):
        for bn in (32, 64, 128):
            for warps, stages in ((2, 2), (4, 2), (4, 3), (4, 4), (8, 3)):
                if time.time() > deadline:
                    break
                cfg = AttentionConfig(**{**base.__dict__, "decode_block_n": bn, "decode_warps": warps,
                                         "decode_stages": stages, "fp8_decode_mma": False})
                try:
                    fns, nb = decode_fns(batch, ctx, True, cfg)
                    ms = ck.graph_ms(fns)
                except Exception as exc:  # a config that does not fit (shared memory, registers) is skipped
                    print(f"  sweep skip bn={bn} w={warps} s={stages}: {type(exc).__name__}")
                    continue
                results.append((f"B={batch} ctx={ctx}", f"bn={bn} warps={warps} stages={stages}", ms, nb))
    best: dict = {}
    for shape, what, ms, nb in sorted(results, key=lambda r: -r[2]):
        print(f"  sweep fp8 decode (triton) {shape:16s} {what:28s} {ms:8.4f} ms {nb / (ms * 1e-3) / 1e9:7.0f} GB/s")
        best[shape] = (what, ms, nb)
    for shape, (what, ms, nb) in best.items():
        print(f"best fp8 decode {shape}: {what} {ms:.4f} ms {nb / (ms * 1e-3) / 1e9:.0f} GB/s "
              f"(default bn={base.decode_block_n} warps={base.decode_warps} stages={base.decode_stages})")


def format_row(row) -> str:
    name, ms8, nb8, ms16, nb16 = row
    bw8, bw16 = nb8 / (ms8 * 1e-3), nb16 / (ms16 * 1e-3)
    return (f"{name:24s} {ms8:8.4f} {bw8 / 1e9:7.0f} {100 * bw8 / H200_COPY_CEILING:5.0f}% "
            f"{ms16:8.4f} {bw16 / 1e9:7.0f} {100 * bw16 / H200_COPY_CEILING:5.0f}% {ms16 / ms8:6.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-check", action="store_true", help="skip the correctness grid (timing only)")
    parser.add_argument("--sweep", action="store_true", help="also time FP8 decode tile configurations")
    parser.add_argument("--sweep-seconds", type=float, default=120.0)
    parser.add_argument("--json", default=None, help="write all results here (default $OUT/check_fp8_kv.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("check_fp8_kv_gpu: no CUDA device; run the CPU tests (pytest tests/kernels/test_fp8_kv.py) instead")
        return 2
    if torch.cuda.get_device_capability() < (8, 9):
        print(f"check_fp8_kv_gpu: {torch.cuda.get_device_name()} has no FP8 (needs sm_89+)")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    t0, failures = time.time(), []
    cases = 0 if args.no_check else check_attention_grid(failures) + check_writes(failures)
    print(f"correctness: {cases} cases, {len(failures)} failures, {time.time() - t0:.0f} s")
    for f in failures:
        print("  FAIL", f)
    ceiling = ck.copy_ceiling()
    header = (f"{'decode attention':24s} {'fp8 ms':>8s} {'GB/s':>7s} {'%ceil':>6s} "
              f"{'bf16 ms':>8s} {'GB/s':>7s} {'%ceil':>6s} {'speedup':>7s}")
    print(header)
    rows: list = []
    timings(rows)
    if args.sweep:
        sweep(time.time() + args.sweep_seconds)
    json_path = args.json or (os.path.join(os.environ["OUT"], "check_fp8_kv.json") if os.environ.get("OUT") else None)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({"ceiling": ceiling, "failures": failures, "cases": cases, "rows": rows}, fh, indent=1)
    print(f"\nmeasured copy ceiling {ceiling / 1e12:.2f} TB/s; %ceil of {H200_COPY_CEILING / 1e12:.2f} TB/s; "
          "GB/s = bytes read per call (FP8 K/V 1 byte, bf16 2) / graph time")
    print(header)
    for row in rows:
        print(format_row(row))
    print(f"RESULT: {cases} correctness cases, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
