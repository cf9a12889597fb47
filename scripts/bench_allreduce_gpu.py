"""NCCL all-reduce cost per decode step, as the tensor-parallel model pays it.

    python scripts/bench_allreduce_gpu.py [--world 2] [--hidden 4096] [--layers 32]

One process per GPU. For each batch size, 2 * layers all-reduces of [batch, hidden] bf16
(attention dense + MLP proj per layer) are captured in one CUDA graph, as in a decode step,
and the graph's replay is timed (median of 50). Prints microseconds per all-reduce and per
step. Keep NVLink multicast off in the environment (NCCL_NVLS_ENABLE=0).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, args: argparse.Namespace, port: int) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world)
    rows = []
    for batch in (1, 8, 64, 256):
        bufs = [torch.randn(batch, args.hidden, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
        for b in bufs:
            dist.all_reduce(b)  # warm-up, outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(2 * args.layers):
                dist.all_reduce(bufs[i % 2])
        times = []
        for _ in range(50):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000)
        step = statistics.median(times)
        rows.append((batch, step / (2 * args.layers), step))
    if rank == 0:
        print(f"| batch | us per all-reduce [batch, {args.hidden}] bf16 | us per step ({2 * args.layers} all-reduces) |")
        print("|---|---|---|")
        for batch, one, step in rows:
            print(f"| {batch} | {one:.1f} | {step:.0f} |", flush=True)
    dist.barrier()
    os._exit(0)  # tearing NCCL down after graph capture can hang; nothing is left to release


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    args = p.parse_args()
    if torch.cuda.device_count() < args.world:
        print(f"needs {args.world} GPUs, found {torch.cuda.device_count()}")
        return 1
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args, port), nprocs=args.world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
