"""Decode-attention tile sweep at the 1000/1000 benchmark's shape (tuning aid, on a GPU); with
--prefill, the prefill tiles at the 2048/128 benchmark's prefill (--seqs prompts of --q-len).

    python scripts/sweep_decode_attention.py [--batch 222] [--ctx-lo 1000] [--ctx-hi 2000] [--kv-dtype fp8] [--mma-only]
    python scripts/sweep_decode_attention.py --prefill [--seqs 16] [--q-len 2048] [--kv-dtype fp8] [--backends]
    python scripts/sweep_decode_attention.py --mixed --seqs 4 --q-len 2048 --batch 508 [--kv-dtype fp8]

Llama-3.1-8B heads (32 q / 8 kv, head dim 128, bf16 queries, block size 32; the cache bf16 or
FP8 with scales), one decode token per sequence with contexts drawn uniformly from
[ctx-lo, ctx-hi]; every configuration is graph-timed over distinct input sets
(scripts/check_kernels_gpu.py helpers), checked against the default configuration's output, and
reported in GB/s of KV read (prefill: TFLOP/s of the causal products, next to torch's SDPA on
the same unpaged shape: its default choice, cuDNN's and FlashAttention-2's variable-length
entries (cuDNN's also checked on ragged lengths; timed eagerly when a graph cannot capture it),
then the FlashAttention and cuDNN SDPA backends forced; ``--backends`` times only the default
tiles against those). Fastest last. (On an H200 with torch 2.11 cuDNN's variable-length entry
was correct but did not capture in a graph and then took 66-73 ms eagerly for 16 x 2,048 tokens,
against 1.09 ms for its dense SDPA backend: not a route for ragged prefill chunks there.)
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
    p.add_argument("--prefill", action="store_true", help="sweep the prefill tiles instead")
    p.add_argument("--mma-only", action="store_true",
                   help="FP8: only the tensor-core kernel's launch shapes, against the Triton default")
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--q-len", type=int, default=2048)
    p.add_argument("--backends", action="store_true",
                   help="with --prefill: the default tiles against torch's attention backends only (no sweep)")
    p.add_argument("--mixed", action="store_true",
                   help="a mixed step (--seqs prompts of --q-len tokens, --batch decode rows of --ctx-lo to "
                        "--ctx-hi tokens): the prefill launch over every row against the listed prefill rows")
    args = p.parse_args()
    if args.mixed:
        mixed(args.seqs, args.q_len, args.batch, args.ctx_lo, args.ctx_hi, args.kv_dtype == "fp8")
        return
    if args.prefill:
        sweep_prefill(args.seqs, args.q_len, args.kv_dtype == "fp8", args.backends)
        return
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
    if fp8 and args.mma_only:
        triton_shapes = [(64, 2, 2)]  # the Triton default, for comparison
    else:
        triton_shapes = [(bn, w, st) for bn in (16, 32, 64, 128)
                         for w, st in ((2, 2), (2, 3), (4, 2), (4, 3), (4, 4), (8, 3), (8, 4))]
    for bn, warps, stages in triton_shapes:
        for splits in (None, 2):
            cfg = AttentionConfig(**{**base.__dict__, "decode_block_n": bn, "decode_warps": warps,
                                     "decode_stages": stages, "fp8_decode_mma": False})
            _time(results, lambda c=cfg, n=splits: fns(c, n), reference,
                  f"triton bn={bn} warps={warps} stages={stages} splits={splits or 1}")
    if fp8:  # the tensor-core kernel (kernels/fp8_decode.py)
        for warps in (2, 4, 8):
            for depth in (1, 2, 3, 4):
                for splits in (None, 2):
                    cfg = AttentionConfig(**{**base.__dict__, "fp8_decode_warps": warps, "fp8_decode_depth": depth})
                    _time(results, lambda c=cfg, n=splits: fns(c, n), reference,
                          f"mma warps={warps} depth={depth} splits={splits or 1}")
    results.sort(reverse=True)
    for ms, what, err in results:
        print(f"{what:44s} {ms:8.4f} ms {nbytes / (ms * 1e-3) / 1e9:8.0f} GB/s  max|diff| {err:.2e}")
    print(f"default: triton bn={base.decode_block_n} warps={base.decode_warps} stages={base.decode_stages}"
          f"{f'; mma warps={base.fp8_decode_warps} depth={base.fp8_decode_depth}' if fp8 else ''}; "
          f"{args.kv_dtype} KV read per call {nbytes / 1e9:.2f} GB; max|diff| against the default")


def _time(results: list, make_calls, reference: torch.Tensor, what: str) -> None:
    """Append (graph ms, what, max |diff| against the default's output) for one configuration."""
    try:
        calls = make_calls()
        err = (calls[0]() - reference).abs().max().item()
        ms = ck.graph_ms(calls)
    except Exception as exc:  # a config that does not fit (shared memory) is skipped
        print(f"skip {what}: {type(exc).__name__}")
        return
    results.append((ms, what, err))


def mixed(seqs: int, q_len: int, decode_rows: int, ctx_lo: int, ctx_hi: int, fp8: bool) -> None:
    """One layer's attention of a mixed step as the engine runs it at 2048/128 (prompt chunks
    next to hundreds of decode rows), with and without ``prefill_rows``; also the two parts
    alone, so the cost of the prefill launch's idle programs shows."""
    m = ck.LLAMA8B
    rng = random.Random(0)
    q_lens = [q_len] * seqs + [1] * decode_rows
    ctx = [q_len] * seqs + [rng.randint(ctx_lo, ctx_hi) for _ in range(decode_rows)]
    sets = [ck.paged_batch(q_lens, ctx, m["hq"], m["hkv"], m["d"], m["bs"], m["dtype"]) for _ in range(2)]
    scales = {"k_scale": 0.01, "v_scale": 0.01} if fp8 else {}
    if fp8:
        sets = [dict(b, k_cache=fp8_kv.quantize(b["k_cache"], 0.01), v_cache=fp8_kv.quantize(b["v_cache"], 0.01))
                for b in sets]
    rows = torch.arange(seqs, dtype=torch.int32, device="cuda")

    def fns(listed: bool, part: str = "all") -> list:
        out = []
        for b in sets:
            if part == "prefill":
                b = dict(b, block_tables=b["block_tables"][:seqs], query_start_loc=b["query_start_loc"][: seqs + 1],
                         seq_lens=b["seq_lens"][:seqs])
            elif part == "decode":
                qsl = b["query_start_loc"][seqs:] - seqs * q_len
                b = dict(b, q=b["q"][seqs * q_len:], block_tables=b["block_tables"][seqs:], query_start_loc=qsl,
                         seq_lens=b["seq_lens"][seqs:])
            out.append(lambda b=b, mq=(1 if part == "decode" else q_len): paged_attention(
                **b, scale=0.088, max_query_len=mq, max_seq_len=131072,
                prefill_rows=rows if listed else None, **scales))
        return out

    def own_kv(b: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts' k / v [T, Hkv, D] as the step computed them: read back from the cache
        (dequantized), zeros for the decode rows (dense prefill never reads those)."""
        pos = torch.arange(q_len, device="cuda")
        out = []
        for cache in (b["k_cache"], b["v_cache"]):
            parts = [cache[b["block_tables"][s, pos // m["bs"]].long(), pos % m["bs"]] for s in range(seqs)]
            x = torch.cat(parts + [cache.new_zeros(decode_rows, *cache.shape[2:])])
            out.append((x.float() * 0.01).to(m["dtype"]) if fp8 else x)
        return out[0], out[1]

    dense_inputs = [own_kv(b) for b in sets]
    no_rows = rows[:0]

    def dense_fns() -> list:
        out = []
        for b, (k, v) in zip(sets, dense_inputs):
            def call(b=b, k=k, v=v):
                o = paged_attention(**b, scale=0.088, max_query_len=q_len, max_seq_len=131072, prefill_rows=no_rows,
                                    **scales)
                return _dense_prompts(b["q"], k, v, o, seqs, q_len)
            out.append(call)
        return out

    reference = fns(False)[0]()
    results: list = []
    _time(results, lambda: fns(False), reference, "prefill launch over every row")
    _time(results, lambda: fns(True), reference, "prefill launch over the listed rows")
    _time(results, dense_fns, reference, "prompts by torch SDPA from own k/v, decode rows paged")
    prefill_ms, decode_ms = ck.graph_ms(fns(False, "prefill")), ck.graph_ms(fns(False, "decode"))
    for ms, what, err in sorted(results, reverse=True):
        print(f"{what:40s} {ms:8.3f} ms  max|diff| {err:.2e}")
    print(f"the parts alone: prompts {prefill_ms:.3f} ms + decode rows {decode_ms:.3f} ms = "
          f"{prefill_ms + decode_ms:.3f} ms ({seqs} x {q_len} prompt tokens, {decode_rows} decode rows of "
          f"{ctx_lo}-{ctx_hi} tokens, {'fp8' if fp8 else 'bf16'} cache, Llama-3.1-8B heads, one layer)")


def _dense_prompts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, seqs: int,
                   q_len: int) -> torch.Tensor:
    """The first seqs x q_len rows (fresh prompts) by torch's dense causal SDPA over their own
    k / v, written into out: what a dense route for fresh chunks would run (not in the engine:
    torch 2.11's default cuDNN backend builds a plan for every new length, 36-500 ms each;
    BENCHMARKS.md, ninth session)."""
    n = seqs * q_len
    view = lambda x: x[:n].unflatten(0, (seqs, q_len)).transpose(1, 2)  # noqa: E731
    o = torch.nn.functional.scaled_dot_product_attention(view(q), view(k), view(v), is_causal=True, scale=0.088,
                                                         enable_gqa=True)
    out[:n].unflatten(0, (seqs, q_len)).copy_(o.transpose(1, 2))
    return out


def sweep_prefill(seqs: int, q_len: int, fp8: bool, backends_only: bool = False) -> None:
    m = ck.LLAMA8B
    sets = [ck.paged_batch([q_len] * seqs, [q_len] * seqs, m["hq"], m["hkv"], m["d"], m["bs"], m["dtype"])
            for _ in range(2)]
    scales = {"k_scale": 0.01, "v_scale": 0.01} if fp8 else {}
    if fp8:
        sets = [dict(b, k_cache=fp8_kv.quantize(b["k_cache"], 0.01), v_cache=fp8_kv.quantize(b["v_cache"], 0.01))
                for b in sets]
    base = default_config(128, torch.bfloat16, torch.float8_e4m3fn if fp8 else None)
    flops = ck.prefill_flops(q_len, q_len, seqs)

    def fns(cfg: AttentionConfig) -> list:
        return [lambda b=b: paged_attention(**b, scale=0.088, max_query_len=q_len, max_seq_len=131072, config=cfg,
                                            **scales) for b in sets]

    reference = fns(base)[0]()
    results = []
    _time(results, lambda: fns(base), reference, "default tiles")
    for bm in (64, 128) if not backends_only else ():
        for bn in (32, 64, 128):
            for warps, stages in ((4, 2), (4, 3), (8, 2), (8, 3), (8, 4)):
                cfg = AttentionConfig(**{**base.__dict__, "prefill_block_m": bm, "prefill_block_n": bn,
                                         "prefill_warps": warps, "prefill_stages": stages})
                _time(results, lambda c=cfg: fns(c), reference, f"bm={bm} bn={bn} warps={warps} stages={stages}")
    q = torch.randn(seqs, m["hq"], q_len, m["d"], device="cuda", dtype=m["dtype"])
    k, v = (torch.randn(seqs, m["hkv"], q_len, m["d"], device="cuda", dtype=m["dtype"]) for _ in range(2))
    sdpa = ck.graph_ms([lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                  enable_gqa=True)])
    results.sort(reverse=True)
    for ms, what, err in results:
        print(f"{what:40s} {ms:8.3f} ms {flops / (ms * 1e-3) / 1e12:6.0f} TFLOP/s  max|diff| {err:.2e}")
    print(f"torch SDPA (unpaged, bf16) {sdpa:.3f} ms {flops / (sdpa * 1e-3) / 1e12:.0f} TFLOP/s")
    _torch_backends(q, k, v, flops)
    print(f"default: bm={base.prefill_block_m} bn={base.prefill_block_n} warps={base.prefill_warps} "
          f"stages={base.prefill_stages}; {'fp8' if fp8 else 'bf16'} cache, {seqs} x {q_len}")


def _torch_backends(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flops: float) -> None:
    """torch's attention kernels on the same unpaged shape: cuDNN's and FlashAttention-2's
    variable-length entries (what a prefill of fresh chunks of different lengths would call; cuDNN
    first: an SDPA backend that fails inside a graph capture can poison later captures), then SDPA
    per backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    seqs, _, q_len, d = q.shape
    qf, kf, vf = (t.transpose(1, 2).reshape(seqs * q_len, t.shape[1], d).contiguous() for t in (q, k, v))
    qsl = torch.arange(0, seqs * q_len + 1, q_len, device=q.device, dtype=torch.int32)
    _cudnn_varlen(qf, kf, vf, qsl, q_len, flops)
    ms = ck.graph_ms([lambda: torch.ops.aten._flash_attention_forward(qf, kf, vf, qsl, qsl, q_len, q_len, 0.0, True,
                                                                        False, scale=0.088)[0]])
    print(f"FlashAttention-2 varlen             {ms:.3f} ms {flops / (ms * 1e-3) / 1e12:.0f} TFLOP/s")
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel(backend):
                ms = ck.graph_ms([lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                            enable_gqa=True)])
            print(f"torch SDPA {backend.name:24s} {ms:.3f} ms {flops / (ms * 1e-3) / 1e12:.0f} TFLOP/s")
        except RuntimeError as exc:
            print(f"torch SDPA {backend.name:24s} unavailable: {str(exc).splitlines()[0][:100]}")


def _cudnn_call(qf, k, v, cu_q, max_q):
    return torch.ops.aten._cudnn_attention_forward(qf, k, v, None, cu_q, cu_q, max_q, max_q, False, 0.0, True,
                                                   False, scale=0.088)[0]


def _cudnn_varlen(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, qsl: torch.Tensor, q_len: int,
                  flops: float) -> None:
    """cuDNN's variable-length entry (what fresh prefill chunks of different lengths could call),
    checked against FlashAttention-2's output; K/V heads as they are, else repeated to q's heads.
    Also checked on ragged lengths; timed in a CUDA graph, else eagerly (check_kernels_gpu.bench)."""
    want = torch.ops.aten._flash_attention_forward(qf, kf, vf, qsl, qsl, q_len, q_len, 0.0, True, False,
                                                   scale=0.088)[0]
    lens = torch.tensor([q_len, q_len // 2 + 17, 1, q_len // 4 - 3, 300], dtype=torch.int32)
    rsl = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).to(torch.int32)]).to(qf.device)
    total = int(rsl[-1])
    rq, rk, rv = qf[:total].contiguous(), kf[:total].contiguous(), vf[:total].contiguous()
    rwant = torch.ops.aten._flash_attention_forward(rq, rk, rv, rsl, rsl, q_len, q_len, 0.0, True, False,
                                                    scale=0.088)[0]
    group = qf.shape[1] // kf.shape[1]
    for label, k, v, r_k, r_v in (
            ("GQA", kf, vf, rk, rv),
            ("heads repeated", kf.repeat_interleave(group, 1).contiguous(), vf.repeat_interleave(group, 1).contiguous(),
             rk.repeat_interleave(group, 1).contiguous(), rv.repeat_interleave(group, 1).contiguous())):
        try:
            err = (_cudnn_call(qf, k, v, qsl, q_len).float() - want.float()).abs().max().item()
            rerr = (_cudnn_call(rq, r_k, r_v, rsl, q_len).float() - rwant.float()).abs().max().item()
        except Exception as exc:  # noqa: BLE001 - report and try the next form
            print(f"cuDNN varlen ({label}) unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
            continue
        try:
            ms, how = ck.graph_ms([lambda k=k, v=v: _cudnn_call(qf, k, v, qsl, q_len)]), "graph"
        except Exception as exc:  # noqa: BLE001
            print(f"cuDNN varlen ({label}) not graph-capturable: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
            ms, how = ck.bench(lambda k=k, v=v: _cudnn_call(qf, k, v, qsl, q_len)), "eager"
        print(f"cuDNN varlen ({label:14s})       {ms:.3f} ms {flops / (ms * 1e-3) / 1e12:.0f} TFLOP/s ({how})  "
              f"max|diff| vs FA2 {err:.2e}, ragged {rerr:.2e}")


if __name__ == "__main__":
    main()
