"""Decode-attention tile sweep at the 1000/1000 benchmark's shape (tuning aid, on a GPU).

    python scripts/sweep_decode_attention.py [--batch 222] [--ctx-lo 1000] [--ctx-hi 2000] [--kv-dtype fp8]

Llama-3.1-8B heads (32 q / 8 kv, head dim 128, bf16 queries, block size 32; the cache bf16 or
FP8 with scales), one decode token per sequence with contexts drawn uniformly from
[ctx-lo, ctx-hi]; every configuration is graph-timed over distinct input sets
(scripts/check_kernels_gpu.py helpers), checked against the default configuration's output, and
reported in GB/s of KV read. Fastest last.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_kernels_gpu as ck  # noqa: E402  (the graph timing and paged-batch helpers)

from kiln.runtime import fp8_kv  # noqa: E402
from kiln.runtime.kernels import AttentionConfig, default_config, paged_attention  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=222)
    p.add_argument("--ctx-lo", type=int, default=1000)
    p.add_argument("--ctx-hi", type=int, default=2000)
    p.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16")
    args = p.parse_args()
    fp8 = args.kv_dtype == "fp8"
    rng = random.Random(0)
    ctx = [rng.randint(args.ctx_lo, args.ctx_hi) for _ in range(args.batch)]
    m = ck.LLAMA8B
    nbytes = sum(c * m["hkv"] * m["d"] * 2 * (1 if fp8 else 2) for c in ctx)
    sets = [ck.paged_batch([1] * args.batch, ctx, m["hq"], m["hkv"], m["d"], m["bs"], m["dtype"])
            for _ in range(ck.copies_for(nbytes))]
    scales = {"k_scale": 0.01, "v_scale": 0.01} if fp8 else {}
    if fp8:
        sets = [dict(b, k_cache=fp8_kv.quantize(b["k_cache"], 0.01), v_cache=fp8_kv.quantize(b["v_cache"], 0.01))
                for b in sets]
    base = default_config(128, torch.bfloat16, torch.float8_e4m3fn if fp8 else None)

    def fns(cfg: AttentionConfig, splits: int | None) -> list:
        return [lambda b=b: paged_attention(**b, scale=0.088, max_query_len=1, max_seq_len=131072,
                                            config=cfg, num_splits=splits, **scales) for b in sets]

    reference = fns(base, None)[0]()
    results = []
    for bn in (16, 32, 64, 128):
        for warps, stages in ((2, 2), (2, 3), (4, 2), (4, 3), (4, 4), (8, 3), (8, 4)):
            for splits in (None, 2):
                cfg = AttentionConfig(**{**base.__dict__, "decode_block_n": bn, "decode_warps": warps,
                                         "decode_stages": stages})
                try:
                    calls = fns(cfg, splits)
                    err = (calls[0]() - reference).abs().max().item()
                    ms = ck.graph_ms(calls)
                except Exception as exc:  # a config that does not fit (shared memory) is skipped
                    print(f"skip bn={bn} w={warps} s={stages} splits={splits}: {type(exc).__name__}")
                    continue
                results.append((ms, f"bn={bn} warps={warps} stages={stages} splits={splits or 1}", err))
    results.sort(reverse=True)
    for ms, what, err in results:
        print(f"{what:44s} {ms:8.4f} ms {nbytes / (ms * 1e-3) / 1e9:8.0f} GB/s  max|diff| {err:.2e}")
    print(f"default: bn={base.decode_block_n} warps={base.decode_warps} stages={base.decode_stages}; "
          f"{args.kv_dtype} KV read per call {nbytes / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
