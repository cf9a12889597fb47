"""Two half-batches on two CUDA streams: can the decode attention (memory-bound) of one half run
under the FP8 GEMMs (compute-bound) of the other? A tuning aid for the decode step, on a GPU.

    python scripts/bench_overlap_gpu.py [--batch 512] [--ctx 1000-2000,128-256] [--layers 32]
                                        [--carveouts 0,16,32,48]

A stand-in for the FP8 Llama-3.1-8B decode step (random weights, FP8 KV cache, Llama-3.1-8B
heads): per layer the qkv product, paged decode attention over contexts drawn uniformly from
each --ctx range, the o product, gate_up, SiLU-and-mul, down (the norms stand in as plain
quantizes). Everything is captured in one CUDA graph per variant and timed by replaying it:

- ``one``: the whole batch on one stream (what the engine does today);
- ``halves``: two half-batches, one stream (what splitting costs: weights read twice);
- ``overlap``: the same halves on two streams, one for the attention of both halves and one
  for the products of both (cross-stream events keep each half's order), so half A's attention
  runs while half B's products do; with ``--carveouts`` SMs left free by cuBLASLt (PyTorch's
  ``_set_sm_carveout_experimental``) and the product stream at high priority or not.

Also reported: attention alone and products alone per half, i.e. the bound an ideal overlap
would reach (max of the two streams' work) against their sum. Prints a table, fastest last.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_kernels_gpu as ck  # noqa: E402  (graph timing and the paged-batch helper)

from kiln.runtime import fp8_kv  # noqa: E402
from kiln.runtime.kernels import paged_attention, quantize_fp8, silu_and_mul_fp8  # noqa: E402

FP8 = torch.float8_e4m3fn
H, I, QKV, HQ, HKV, D = 4096, 14336, 6144, 32, 8, 128


class Setup:
    def __init__(self, batch: int, ctx_lo: int, ctx_hi: int, copies: int, seed: int = 0) -> None:
        dev = "cuda"
        g = torch.Generator(device=dev).manual_seed(seed)

        def w(n: int, k: int) -> torch.Tensor:
            return (torch.randn(n, k, device=dev, generator=g) * 0.05).to(FP8)

        self.weights = [dict(qkv=w(QKV, H), o=w(H, H), gate_up=w(2 * I, H), down=w(H, I)) for _ in range(copies)]
        self.one = torch.ones((), device=dev, dtype=torch.float32)
        self.inv = torch.full((), 1 / 8, device=dev, dtype=torch.float32)
        rng = random.Random(seed)
        ctx = [rng.randint(ctx_lo, ctx_hi) for _ in range(batch)]
        self.kv_bytes = sum(ctx) * HKV * D * 2  # FP8: one byte per element, K and V
        self.caches = []
        for _ in range(copies):
            b = ck.paged_batch([1] * batch, ctx, HQ, HKV, D, 32, torch.bfloat16)
            self.caches.append(dict(b, k_cache=fp8_kv.quantize(b["k_cache"], 0.01),
                                    v_cache=fp8_kv.quantize(b["v_cache"], 0.01)))
        self.max_ctx = max(ctx)
        self.batch, self.half = batch, batch // 2
        self.x = {"one": self.act(batch), "A": self.act(self.half), "B": self.act(batch - self.half)}

    def act(self, rows: int) -> torch.Tensor:
        return (torch.randn(rows, H, device="cuda") * 2).to(FP8)

    def rows(self, part: str) -> slice:
        return {"one": slice(0, self.batch), "A": slice(0, self.half), "B": slice(self.half, self.batch)}[part]

    def mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch._scaled_mm(x, w.t(), scale_a=self.one, scale_b=self.one, out_dtype=torch.bfloat16,
                                use_fast_accum=True)

    def qkv(self, part: str, layer: int, x8: torch.Tensor) -> torch.Tensor:
        return self.mm(x8, self.weights[layer % len(self.weights)]["qkv"])

    def attention(self, part: str, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        c = self.caches[layer % len(self.caches)]
        r = self.rows(part)
        n = r.stop - r.start
        q = qkv[:, : HQ * D].reshape(n, HQ, D).contiguous()
        qsl = c["query_start_loc"][r.start: r.stop + 1] - r.start
        out = paged_attention(q, c["k_cache"], c["v_cache"], c["block_tables"][r], qsl, c["seq_lens"][r],
                              0.088, 1, self.max_ctx, k_scale=0.01, v_scale=0.01)
        return quantize_fp8(out.reshape(n, HQ * D), self.inv)

    def products(self, part: str, layer: int, a8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """o, gate_up, SiLU, down of this layer and the next layer's qkv: the step between two
        attentions. Returns (next qkv, next x8)."""
        wt = self.weights[layer % len(self.weights)]
        y8 = quantize_fp8(self.mm(a8, wt["o"]), self.inv)
        act = silu_and_mul_fp8(self.mm(y8, wt["gate_up"]), self.inv)
        x8 = quantize_fp8(self.mm(act, wt["down"]), self.inv)
        return self.qkv(part, layer + 1, x8), x8


def chain(s: Setup, part: str, layers: int, what: str = "all") -> None:
    """One half (or the whole batch) through ``layers`` layers on the current stream."""
    qkv = s.qkv(part, 0, s.x[part])
    a8 = None
    for layer in range(layers):
        if what in ("all", "attention"):
            a8 = s.attention(part, layer, qkv)
        if what in ("all", "products"):
            qkv, _ = s.products(part, layer, a8 if a8 is not None else s.x[part])


def overlapped(s: Setup, layers: int, gemm_stream: torch.cuda.Stream, attn_stream: torch.cuda.Stream) -> None:
    """Halves A and B: attention of both on attn_stream, products of both on gemm_stream; events
    keep each half's own order (its attention after its qkv, its products after its attention)."""
    main = torch.cuda.current_stream()
    gemm_stream.wait_stream(main)
    attn_stream.wait_stream(main)
    qkv, ready = {}, {}
    with torch.cuda.stream(gemm_stream):
        for part in ("A", "B"):
            qkv[part] = s.qkv(part, 0, s.x[part])
            ready[part] = torch.cuda.Event()
            ready[part].record()
    for layer in range(layers):
        a8, done = {}, {}
        with torch.cuda.stream(attn_stream):
            for part in ("A", "B"):
                attn_stream.wait_event(ready[part])
                a8[part] = s.attention(part, layer, qkv[part])
                done[part] = torch.cuda.Event()
                done[part].record()
        with torch.cuda.stream(gemm_stream):
            for part in ("A", "B"):
                gemm_stream.wait_event(done[part])
                qkv[part], _ = s.products(part, layer, a8[part])
                ready[part] = torch.cuda.Event()
                ready[part].record()
    main.wait_stream(gemm_stream)
    main.wait_stream(attn_stream)


def graph_ms(fn) -> float:
    return ck.graph_ms([fn])


def run(s: Setup, layers: int, carveouts: list[int]) -> list[tuple[str, float]]:
    rows = []
    rows.append(("one stream, whole batch", graph_ms(lambda: chain(s, "one", layers))))
    rows.append(("one stream, two halves", graph_ms(lambda: (chain(s, "A", layers), chain(s, "B", layers)))))
    attn = graph_ms(lambda: (chain(s, "A", layers, "attention"), chain(s, "B", layers, "attention")))
    prod = graph_ms(lambda: (chain(s, "A", layers, "products"), chain(s, "B", layers, "products")))
    rows.append((f"halves: attention alone {attn:.3f} + products alone {prod:.3f} (sum)", attn + prod))
    rows.append(("halves: ideal overlap (max)", max(attn, prod)))
    for prio in (False, True):
        hi = torch.cuda.Stream(priority=-1 if prio else 0)
        lo = torch.cuda.Stream(priority=0)
        for c in carveouts:
            torch._C._set_sm_carveout_experimental(c or None)
            try:
                if prio is False and c:
                    p = graph_ms(lambda: (chain(s, "A", layers, "products"), chain(s, "B", layers, "products")))
                    rows.append((f"products alone, carveout {c}", p))
                rows.append((f"overlap, carveout {c}, product stream priority {'high' if prio else 'normal'}",
                             graph_ms(lambda: overlapped(s, layers, hi, lo))))
            finally:
                torch._C._set_sm_carveout_experimental(None)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--ctx", default="1000-2000,128-256", help="context ranges, lo-hi, comma-separated")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--copies", type=int, default=4, help="distinct weight / cache sets rotated over the layers")
    p.add_argument("--carveouts", default="0,16,32,48")
    args = p.parse_args()
    carveouts = [int(c) for c in args.carveouts.split(",")]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for rng in args.ctx.split(","):
        lo, hi = (int(v) for v in rng.split("-"))
        s = Setup(args.batch, lo, hi, args.copies)
        with torch.inference_mode():
            rows = run(s, args.layers, carveouts)
        base = rows[0][1]
        print(f"\nbatch {args.batch}, contexts {lo}-{hi} ({s.kv_bytes / 1e9:.2f} GB of KV a layer), "
              f"{args.layers} layers, ms per step:")
        for name, ms in sorted(rows, key=lambda r: -r[1]):
            print(f"  {ms:8.3f}  {base / ms:5.2f}x  {name}")
        del s
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
