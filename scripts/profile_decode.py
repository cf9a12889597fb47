"""Where a decode step's time goes: perf_counter splits of LLMEngine.step at a fixed batch.

    python scripts/profile_decode.py ENGINE_DIR --batch 256 [--isl 128] [--eager] [--steps 50] [--trace]
    python scripts/profile_decode.py ENGINE_DIR --prefill --batch 16 --isl 1000   # kernels of prefill steps

Wraps the scheduler and runner methods of one engine with timers, fills the batch with
`--batch` requests, waits until all of them decode, then times `--steps` decode steps.
`gpu_wait` is the time the host blocks on a step's sampled ids; everything else is host
work, and since the engine queues step N+1 before waiting for step N, host work only costs
when one step() call's host work outlasts the device's step.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from collections import defaultdict

import numpy as np
import torch

from kiln.runtime import LLMEngine, SamplingParams


def _timed(obj: object, name: str, acc: dict[str, float], key: str) -> None:
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[key] += time.perf_counter() - start

    setattr(obj, name, wrapper)


def _instrument(engine: LLMEngine, acc: dict[str, float]) -> None:
    runner, batch = engine.runner, engine.runner.input_batch
    _timed(engine.scheduler, "schedule", acc, "schedule")
    _timed(engine.scheduler, "update", acc, "scheduler_update")
    for name in ("apply", "check_scheduled", "prepare"):
        _timed(batch, name, acc, f"runner_{name}")
    _timed(runner, "_forward", acc, "runner_forward_launch")
    _timed(runner, "_sample", acc, "runner_sample_launch")
    _timed(runner, "_start_copy", acc, "runner_copy_launch")
    # Output handling: most of it runs while the device computes the step (overlap).
    _timed(engine, "_process_all", acc, "engine_outputs")
    _timed(engine, "_parent_output", acc, "engine_request_outputs")
    collect = runner.collect

    def collect_with_wait(handle):
        start = time.perf_counter()
        if handle.event is not None:  # only this step: the next one is already queued behind it
            handle.event.synchronize()
        middle = time.perf_counter()
        acc["gpu_wait"] += middle - start
        try:
            return collect(handle)
        finally:
            acc["runner_collect"] += time.perf_counter() - middle

    runner.collect = collect_with_wait
    if runner.graphs is not None:
        _timed(runner.graphs, "replay", acc, "graph_replay_launch")
    gc_start = [0.0]

    def on_gc(phase: str, info: dict) -> None:  # time spent in Python's cyclic GC
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            acc["python_gc"] += time.perf_counter() - gc_start[0]

    gc.callbacks.append(on_gc)


def _add_random_requests(engine: LLMEngine, prefix: str, count: int, isl: int, max_tokens: int,
                         rng: np.random.Generator) -> None:
    """``count`` greedy requests of ``isl`` random token ids, EOS ignored."""
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    for i in range(count):
        engine.add_request(f"{prefix}{i}", rng.integers(1000, vocab, size=isl).tolist(), params)


def _print_kernels(prof: object) -> None:
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=60))


def profile(engine_dir: str, batch: int, steps: int, eager: bool, isl: int) -> dict[str, float]:
    engine = LLMEngine.from_engine_dir(engine_dir, enforce_eager=eager)
    _add_random_requests(engine, "p", batch, isl, steps + 64, np.random.default_rng(0))
    while sum(len(out.outputs[0].delta_token_ids) for out in engine.step()) < batch:
        pass
    for _ in range(3):  # a few decode steps to warm up
        engine.step()
    acc: dict[str, float] = defaultdict(float)
    _instrument(engine, acc)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    acc["step_total"] = time.perf_counter() - start
    per_step = {k: 1000 * v / steps for k, v in acc.items()}
    runner_keys = [k for k in per_step if k.startswith("runner_")]  # graph_replay is inside forward
    per_step["runner_host_total"] = sum(per_step[k] for k in runner_keys)
    per_step["host_total"] = per_step["step_total"] - per_step["gpu_wait"]
    return per_step


def trace(engine_dir: str, batch: int, eager: bool, isl: int, steps: int = 5) -> None:
    """CUDA time per kernel over a few decode steps (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    engine = LLMEngine.from_engine_dir(engine_dir, enforce_eager=eager)
    _add_random_requests(engine, "t", batch, isl, steps + 64, np.random.default_rng(0))
    for _ in range(8 + batch * isl // 8192):
        engine.step()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    _print_kernels(prof)


def trace_prefill(engine_dir: str, num_requests: int, isl: int) -> None:
    """CUDA time per kernel of the steps that prefill ``num_requests`` prompts of ``isl`` tokens
    (the token budget splits them into full steps), and their wall time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    engine = LLMEngine.from_engine_dir(engine_dir)
    rng = np.random.default_rng(1)
    _add_random_requests(engine, "warm", 1, isl, 1, rng)
    while engine.has_unfinished_requests():
        engine.step()
    _add_random_requests(engine, "f", num_requests, isl, 1, rng)
    torch.cuda.synchronize()
    start, steps = time.perf_counter(), 0
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    tokens = num_requests * isl
    print(f"== prefill of {num_requests} x {isl} tokens: {steps} steps, {wall * 1000:.1f} ms "
          f"(profiler on), {wall * 1e6 / tokens:.1f} us/token")
    _print_kernels(prof)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("engine")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--eager", action="store_true", help="profile with enforce_eager")
    parser.add_argument("--trace", action="store_true", help="per-kernel CUDA times instead of host splits")
    parser.add_argument("--prefill", action="store_true",
                        help="per-kernel CUDA times of prefilling --batch prompts of --isl tokens")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.prefill:
        trace_prefill(args.engine, args.batch, args.isl)
        return
    mode = "eager" if args.eager else "graphs"
    if args.trace:
        print(f"== kernels of 5 decode steps, batch {args.batch}, {mode}")
        trace(args.engine, args.batch, args.eager, args.isl)
        return
    per_step = profile(args.engine, args.batch, args.steps, args.eager, args.isl)
    print(f"== decode step, batch {args.batch}, {mode}: {per_step['step_total']:.3f} ms/step, "
          f"{args.batch * 1000 / per_step['step_total']:.0f} tok/s")
    for key, ms in sorted(per_step.items(), key=lambda kv: -kv[1]):
        print(f"   {key:28s} {ms:8.3f} ms")


if __name__ == "__main__":
    main()
