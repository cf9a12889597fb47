"""Where a decode step's time goes: perf_counter splits of LLMEngine.step at a fixed batch.

    python scripts/profile_decode.py ENGINE_DIR --batch 256 [--isl 128] [--eager] [--steps 50] [--trace]
    python scripts/profile_decode.py ENGINE_DIR --prefill --batch 16 --isl 1000   # kernels of prefill steps
    python scripts/profile_decode.py ENGINE_DIR --gaps --batch 512 --isl 1500 --steps 100   # GPU idle time
    python scripts/profile_decode.py ENGINE_DIR --gaps --mixed 1000 --isl 1000 --skip 40 --steps 20

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


def gaps(engine_dir: str, batch: int, isl: int, steps: int, mixed: int, skip: int) -> None:
    """Where the GPU sits idle: torch.profiler (CPU + CUDA) over ``steps`` engine steps, the union of
    the device's kernels and copies against the window, the idle gaps by size, and for the largest
    ones the kernels around them, how long after the gap began the next work was launched (a late
    launch means the host starved the GPU) and the engine phase the host was in. Decode steps at
    a fixed ``batch`` (as ``profile``), or with ``mixed`` requests of ``isl`` tokens added at once
    (a bench-llm throughput run) and ``skip`` steps run before profiling."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    engine = LLMEngine.from_engine_dir(engine_dir)
    rng = np.random.default_rng(0)
    if mixed:
        _add_random_requests(engine, "m", mixed, isl, isl, rng)
        for _ in range(skip):
            engine.step()
    else:
        # long enough that the first requests still decode when the last one starts
        _add_random_requests(engine, "g", batch, isl, steps + 64 + batch * isl // 4096, rng)
        while sum(len(out.outputs[0].delta_token_ids) for out in engine.step()) < batch:
            pass
        for _ in range(3):
            engine.step()

    def annotate(obj: object, name: str) -> None:
        fn = getattr(obj, name)

        def wrapper(*args, **kwargs):
            with record_function(f"kiln.{name}"):
                return fn(*args, **kwargs)

        setattr(obj, name, wrapper)

    annotate(engine.scheduler, "schedule")
    annotate(engine.scheduler, "update")
    annotate(engine, "_launch")
    annotate(engine, "_collect")
    annotate(engine, "_process_all")
    annotate(engine.runner.input_batch, "prepare")
    collections: list[tuple[int, float]] = []  # (generation, ms) of each cyclic-GC pass
    gc_start = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            collections.append((info["generation"], 1000 * (time.perf_counter() - gc_start[0])))

    torch.cuda.synchronize()
    gc.callbacks.append(on_gc)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    gc.callbacks.remove(on_gc)
    events = prof.profiler.kineto_results.events()
    # kernels, copies and memsets; not the device-side spans of the annotations below
    device = sorted((e.start_ns(), e.end_ns(), e.name(), e.linked_correlation_id()) for e in events
                    if e.device_type() == DeviceType.CUDA and e.end_ns() > e.start_ns()
                    and not e.name().startswith("kiln."))
    launches = {e.correlation_id(): e.start_ns() for e in events
                if e.device_type() == DeviceType.CPU and e.correlation_id()}
    phases = [(e.start_ns(), e.end_ns(), e.name()) for e in events
              if e.device_type() == DeviceType.CPU and e.name().startswith("kiln.")]
    holes, busy, end, last = [], 0, device[0][0], device[0]
    for ev in device:
        if ev[0] > end:
            holes.append((ev[0] - end, end, last, ev))
        if ev[1] > end:
            busy += ev[1] - max(ev[0], end)
            end, last = ev[1], ev
    window = end - device[0][0]
    idle = sum(h[0] for h in holes)
    what = f"mixed {mixed} requests" if mixed else f"decode batch {batch}"
    print(f"== {steps} steps ({what}, isl {isl}): window {window / 1e6:.2f} ms, device busy {busy / 1e6:.2f} ms, "
          f"idle {idle / 1e6:.2f} ms ({100 * idle / window:.1f}%) in {len(holes)} gaps")
    for lo, hi in ((0, 2e3), (2e3, 5e3), (5e3, 2e4), (2e4, 1e5), (1e5, 1e12)):
        sel = [h[0] for h in holes if lo <= h[0] < hi]
        print(f"   gaps {lo / 1e3:6.0f}-{min(hi, 1e9) / 1e3:<7.0f} us: {len(sel):6d}, {sum(sel) / 1e6:8.3f} ms")
    for gen in range(3):
        times = [ms for g, ms in collections if g == gen]
        if times:
            print(f"   python GC generation {gen}: {len(times)} passes, {sum(times):.1f} ms, "
                  f"longest {max(times):.1f} ms")
    print(f"   GC-tracked objects now: {len(gc.get_objects())} (and {gc.get_freeze_count()} frozen); "
          f"thresholds {gc.get_threshold()}")
    print("   largest gaps: us | before | after | next launched (us after the gap began) | host phase at gap start")
    for size, start, before, after in sorted(holes, reverse=True)[:15]:
        launched = launches.get(after[3])
        late = f"{(launched - start) / 1e3:+8.1f}" if launched is not None else "       ?"
        active = [p[2] for p in phases if p[0] <= start < p[1]]
        print(f"   {size / 1e3:8.1f} | {before[2][:34]:34s} | {after[2][:34]:34s} | {late} | {'/'.join(active) or '-'}")


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
    parser.add_argument("--gaps", action="store_true", help="GPU idle time and what the host was doing (see gaps())")
    parser.add_argument("--mixed", type=int, default=0, help="with --gaps: add this many requests at once instead")
    parser.add_argument("--skip", type=int, default=40, help="with --gaps --mixed: steps run before profiling")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.gaps:
        gaps(args.engine, args.batch, args.isl, args.steps, args.mixed, args.skip)
        return
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
