"""All-reduce cost per decode step, as the tensor-parallel model pays it: NCCL vs one-shot peer.

    python scripts/bench_allreduce_gpu.py [--world 2] [--hidden 4096] [--layers 32] [--batches 1,8,256]
    KILN_ALL_REDUCE=one_shot python scripts/bench_allreduce_gpu.py --hidden 8192 --layers 80 --batches 64,128,256,512

One process per GPU. For each batch size, 2 * layers all-reduces of [batch, hidden] bf16
(attention dense + MLP proj per layer) are captured in one CUDA graph, as in a decode step,
and the graph's replay is timed (median of 50), once through NCCL and once through Kiln's
``DistributedCollectives`` (one-shot over symmetric peer memory up to its size limit, NCCL
above, two-shot over peer memory up to 16 MiB unless ``KILN_ALL_REDUCE=one_shot``). First it
checks the peer paths' sums: many consecutive all-reduces of distinct inputs inside one graph
(the buffer is reused by every call) against NCCL's. Prints microseconds per
all-reduce and per step. Keep NVLink multicast off (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BATCHES = (1, 8, 32, 64, 128, 256, 512, 1024)


def _time_graph(graph: torch.cuda.CUDAGraph) -> float:
    times = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def _check_peer_sums(group, rank: int, hidden: int) -> str:
    """Distinct inputs through many captured peer all-reduces in a row vs NCCL's sums."""
    gen = torch.Generator(device="cuda").manual_seed(1234 + rank)
    inputs = [torch.randn(b, hidden, dtype=torch.bfloat16, device="cuda", generator=gen)
              for b in (1, 3, 8, 64, 1, 128, 256) * 8]  # 256 x 8192: a two-shot size
    want = []
    for x in inputs:
        y = x.clone()
        dist.all_reduce(y)
        want.append(y)
    for x in inputs:
        group.all_reduce(x.clone())  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = [group.all_reduce(x.clone()) for x in inputs]
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    worst = max((g.float() - w.float()).abs().max().item() for g, w in zip(got, want))
    eager = max((group.all_reduce(x.clone()).float() - w.float()).abs().max().item() for x, w in zip(inputs, want))
    return f"peer path vs NCCL, {len(inputs)} all-reduces: max abs diff graph {worst:.3g}, eager {eager:.3g}"


def worker(rank: int, args: argparse.Namespace, port: int) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world)
    from kiln.runtime.parallel import PEER_ALL_REDUCE_MAX_BYTES, DistributedCollectives

    group = DistributedCollectives(rank, args.world, torch.device("cuda", rank))
    peer = group._peer_buffer is not None
    check = _check_peer_sums(group, rank, args.hidden) if peer else "peer path unavailable: NCCL only"
    rows = []
    for batch in args.batches:
        step = {}
        for impl in ("nccl", "kiln"):
            bufs = [torch.randn(batch, args.hidden, dtype=torch.bfloat16, device="cuda") / 64 for _ in range(2)]
            reduce = dist.all_reduce if impl == "nccl" else group.all_reduce
            for b in bufs:
                reduce(b)  # warm-up, outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for i in range(2 * args.layers):
                    reduce(bufs[i % 2])
            step[impl] = _time_graph(graph)
        rows.append((batch, step["nccl"], step["kiln"]))
    if rank == 0:
        print(check)
        print(f"one-shot peer path up to {PEER_ALL_REDUCE_MAX_BYTES >> 10} KiB ({'on' if peer else 'off'}); "
              f"two-shot up to {group._two_shot_numel * 2 >> 10} KiB (0: off, e.g. KILN_ALL_REDUCE=one_shot)")
        n = 2 * args.layers
        print(f"| batch | KiB | NCCL us per all-reduce [batch, {args.hidden}] bf16 | Kiln us per all-reduce "
              f"| NCCL us per step ({n}) | Kiln us per step |")
        print("|---|---|---|---|---|---|")
        for batch, nccl, kiln in rows:
            print(f"| {batch} | {batch * args.hidden * 2 >> 10} | {nccl / n:.1f} | {kiln / n:.1f} | {nccl:.0f} | {kiln:.0f} |",
                  flush=True)
    dist.barrier()
    os._exit(0)  # tearing NCCL down after graph capture can hang; nothing is left to release


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",")], default=list(BATCHES),
                   help="comma-separated rows per all-reduce")
    args = p.parse_args()
    if torch.cuda.device_count() < args.world:
        print(f"needs {args.world} GPUs, found {torch.cuda.device_count()}")
        return 1
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args, port), nprocs=args.world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
