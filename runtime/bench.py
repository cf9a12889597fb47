"""`bench-llm`: offline throughput, batch-1 latency, and load against a running server.

    bench-llm throughput ENGINE --isl 128 --osl 128 --num-requests 3000
    bench-llm latency ENGINE --isl 128 --osl 128 [--batch 8]
    bench-llm serve URL --num-requests 256 --concurrency 32

Throughput follows trtllm-bench: synthetic random-token prompts of a fixed length,
ignore_eos, every request submitted at t=0, output tokens counted. `--record` appends a row
to BENCHMARKS.md (GPU, date, commit, command, figures) so the table keeps the project's
performance history.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import platform
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.scheduler.config import CAPACITY_POLICIES

logger = logging.getLogger(__name__)

HISTORY_HEADER = "## Performance history (bench-llm --record)"
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class BenchResult:
    mode: str
    figures: dict[str, float]
    device: str
    engine: str
    settings: dict[str, object] = field(default_factory=dict)  # what it ran with (see run_settings)

    def summary(self) -> str:
        return ", ".join(f"{k} {_fmt(v)}" for k, v in self.figures.items())


def _fmt(v: float) -> str:
    if isinstance(v, int) or abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()})"


def _synthetic_prompts(num: int, isl: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Random token prompts, avoiding the lowest ids where tokenizers keep special tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    low = min(1000, vocab_size // 4)
    return rng.integers(low, vocab_size, size=(num, isl)).tolist()


def _make_engine(args: argparse.Namespace):
    from kiln.runtime import LLMEngine
    from kiln.runtime.config import SPECULATIVE_OPTIONS

    options = {k: v for k, v in {
        "max_batch_size": args.max_batch_size,
        "max_num_tokens": args.max_num_tokens,
        "kv_cache_fraction": args.kv_cache_fraction,
        "num_kv_cache_tokens": args.num_kv_cache_tokens,
        "max_model_len": args.max_model_len,
        "kv_cache_dtype": args.kv_cache_dtype,
        "capacity_policy": args.capacity_policy,
        "enforce_eager": args.enforce_eager or None,
        "device": args.device,
        **{name: getattr(args, name) for name in SPECULATIVE_OPTIONS},
    }.items() if v is not None}
    return LLMEngine.from_engine_dir(args.engine, **options)


def _spec_figures(engine) -> dict[str, float]:
    """Mean acceptance length (tokens per verify step) when the engine speculates."""
    if not engine.config.spec_tokens:
        return {}
    spec = engine.get_stats().spec_decode
    return {"mean_acceptance_length": spec.mean_acceptance_length, "draft_tokens": spec.num_draft_tokens,
            "accepted_tokens": spec.num_accepted_tokens}


_WORKLOAD_ARGS = ("isl", "osl", "num_requests", "batch", "iterations", "warmup", "seed")
_ENGINE_FIELDS = ("max_batch_size", "max_num_tokens", "capacity_policy", "enable_prefix_caching", "enforce_eager",
                  "kernel_backend", "kv_cache_fraction", "speculative")


def run_settings(args: argparse.Namespace, engine) -> dict[str, object]:
    """The workload and the engine settings in effect (defaults resolved), to print with figures."""
    settings: dict[str, object] = {k: getattr(args, k) for k in _WORKLOAD_ARGS if hasattr(args, k)}
    settings["device"] = str(engine.config.torch_device)
    settings["dtype"] = str(engine.config.compute_dtype(engine.model_config.dtype)).removeprefix("torch.")
    settings.update({k: getattr(engine.config, k) for k in _ENGINE_FIELDS})
    if engine.config.speculative:
        settings["num_speculative_tokens"] = engine.config.num_speculative_tokens
    runner = getattr(engine, "runner", None)
    if runner is not None:
        settings["kv_cache_tokens"] = runner.num_blocks * runner.block_size
    return settings


def _peak_gpu_gib() -> float:
    import torch

    if not torch.cuda.is_available():
        return 0.0
    return torch.cuda.max_memory_allocated() / 2**30


def run_throughput(args: argparse.Namespace) -> BenchResult:
    from kiln.runtime import SamplingParams

    engine = _make_engine(args)
    vocab = engine.model_config.vocab_size
    prompts = _synthetic_prompts(args.num_requests, args.isl, vocab, args.seed)
    params = SamplingParams(max_tokens=args.osl, ignore_eos=True, temperature=0.0)
    if args.warmup:
        _drain(engine, _synthetic_prompts(min(8, args.num_requests), args.isl, vocab, args.seed + 1), params, "warm")
    start = time.perf_counter()
    out_tokens, steps = _drain(engine, prompts, params, "req")
    elapsed = time.perf_counter() - start
    figures = {
        "output_tok_s": out_tokens / elapsed,
        "requests_s": args.num_requests / elapsed,
        "total_s": elapsed,
        "steps": steps,
        "peak_gpu_gib": _peak_gpu_gib(),
        **_spec_figures(engine),
    }
    return BenchResult("throughput", figures, _device_name(), args.engine, run_settings(args, engine))


def _drain(engine, prompts: list[list[int]], params, prefix: str) -> tuple[int, int]:
    for i, p in enumerate(prompts):
        engine.add_request(f"{prefix}-{i}", p, params)
    out_tokens = steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            for c in out.outputs:
                out_tokens += len(c.delta_token_ids)
        steps += 1
    return out_tokens, steps


def run_latency(args: argparse.Namespace) -> BenchResult:
    from kiln.runtime import SamplingParams

    engine = _make_engine(args)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=args.osl, ignore_eos=True, temperature=0.0)
    batch = args.batch
    ttfts, decode_rates = [], []
    for it in range(args.warmup + args.iterations):
        for b, prompt in enumerate(_synthetic_prompts(batch, args.isl, vocab, args.seed + it * batch)):
            engine.add_request(f"lat-{it}-{b}", prompt, params)
        t0 = time.perf_counter()
        t_first = None
        n, started = 0, set()
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens = sum(len(c.delta_token_ids) for c in out.outputs)
                n += tokens
                if tokens:
                    started.add(out.request_id)
            if t_first is None and len(started) == batch:  # every sequence has its first token
                t_first = time.perf_counter()
        t_end = time.perf_counter()
        if it >= args.warmup:
            ttfts.append(t_first - t0)
            decode_rates.append((n - batch) / (t_end - t_first))
    ttfts.sort()
    decode_rates.sort()
    figures = {
        "ttft_ms_p50": 1000 * ttfts[len(ttfts) // 2],
        "decode_tok_s_p50": decode_rates[len(decode_rates) // 2],
        "decode_tok_s_best": decode_rates[-1],
        **_spec_figures(engine),
    }
    return BenchResult("latency", figures, _device_name(), args.engine, run_settings(args, engine))


class AcceptanceControlledProposer:
    """A BENCHMARK TOOL, never used for serving: drafts with a chosen acceptance rate.

    It proposes the target's own greedy continuation, recorded by a plain run first
    (``continuations[request_id]`` = that request's whole output), keeping each draft token
    with probability ``keep`` and replacing it by another token otherwise, so a greedy
    request accepts ``keep``-geometric runs of drafts. With ``inner`` (a real proposer, e.g.
    a draft model) that proposer runs first, for its cost only: its tokens are discarded.
    """

    def __init__(self, continuations: dict[str, list[int]], keep: float, vocab_size: int, seed: int = 0,
                 inner: Any = None) -> None:
        import numpy as np

        self.continuations, self.keep, self.vocab_size, self.inner = continuations, keep, vocab_size, inner
        self._rng = np.random.default_rng(seed)
        self._batch = None

    def bind(self, input_batch: Any) -> None:
        self._batch = input_batch
        if self.inner is not None:
            self.inner.bind(input_batch)

    def propose(self, wanted: dict[str, int]) -> dict[str, list[int]]:
        if self.inner is not None:
            self.inner.propose(wanted)
        batch, drafts = self._batch, {}
        for request_id, k in wanted.items():
            state = batch.requests.get(request_id)
            recorded = self.continuations.get(request_id)
            if state is None or recorded is None:
                continue
            done = int(batch.num_tokens[state.row] - batch.num_prompt[state.row])
            tokens = list(recorded[done: done + k])
            wrong = self._rng.random(len(tokens)) >= self.keep
            shift = self._rng.integers(1, self.vocab_size, size=len(tokens))
            drafts[request_id] = [(t + int(s)) % self.vocab_size if w else t for t, w, s in zip(tokens, wrong, shift)]
        return {r: d for r, d in drafts.items() if d}

    def shutdown(self) -> None:
        if self.inner is not None:
            self.inner.shutdown()


def _commit() -> str:
    """The checked-out commit; KILN_COMMIT overrides it (copies of the tree without .git)."""
    if os.environ.get("KILN_COMMIT"):
        return os.environ["KILN_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record(result: BenchResult, command: str, path: Path) -> None:
    """Append one row to the performance-history table of BENCHMARKS.md (never rewrite old rows)."""
    text = path.read_text() if path.exists() else "# Kiln benchmarks\n"
    if HISTORY_HEADER not in text:
        text = text.rstrip("\n") + (
            f"\n\n{HISTORY_HEADER}\n\n| date | device | commit | command | figures |\n|---|---|---|---|---|\n"
        )
    row = (f"| {_dt.date.today().isoformat()} | {result.device} | {_commit()} | `{command}` | "
           f"{result.summary()} |\n")
    head, sep, tail = text.partition(HISTORY_HEADER)
    # Insert after the last row of the history table (rows start with '|').
    lines = tail.split("\n")
    last = max(i for i, line in enumerate(lines) if line.startswith("|"))
    lines.insert(last + 1, row.rstrip("\n"))
    path.write_text(head + sep + "\n".join(lines))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("engine", help="engine directory made by build-llm")
    p.add_argument("--isl", type=int, default=128, help="input (prompt) length in tokens (default 128)")
    p.add_argument("--osl", type=int, default=128, help="output length in tokens, EOS ignored (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed for the synthetic prompts")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs before timing (default 1)")
    p.add_argument("--max-batch-size", type=int, help="scheduler: max sequences per step")
    p.add_argument("--max-num-tokens", type=int, help="scheduler: token budget per step")
    p.add_argument("--kv-cache-fraction", type=float, help="fraction of free GPU memory for the KV cache")
    p.add_argument("--num-kv-cache-tokens", type=int, help="KV cache size in tokens (overrides the fraction)")
    p.add_argument("--max-model-len", type=int, help="longest prompt + output (default: the model's)")
    p.add_argument("--kv-cache-dtype", choices=("auto", "model", "fp8"),
                   help="auto (default): FP8 when the engine has KV scales; model: the model dtype; fp8: always")
    p.add_argument("--capacity-policy", choices=CAPACITY_POLICIES,
                   help="scheduler: reserve every request's prompt + max_tokens up front (default), or admit "
                        "while blocks last and preempt when they run out")
    p.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    from kiln.runtime.config import add_speculative_arguments

    add_speculative_arguments(p.add_argument_group("speculative decoding (off by default)"))
    p.add_argument("--record", nargs="?", const=str(REPO_ROOT / "BENCHMARKS.md"), metavar="FILE",
                   help="append a row to the performance history in BENCHMARKS.md (or FILE)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench-llm",
        description="Benchmark a Kiln engine: offline throughput, batch-1 latency, or a live server.",
        epilog="Examples:\n  bench-llm throughput engines/llama8b --isl 128 --osl 128 --num-requests 3000 --record\n"
               "  bench-llm latency engines/llama8b\n"
               "  bench-llm serve http://127.0.0.1:8000 --num-requests 256 --concurrency 32",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    tp = sub.add_parser("throughput", help="offline throughput, all requests at t=0 (like trtllm-bench)")
    _add_engine_options(tp)
    tp.add_argument("--num-requests", type=int, default=1000, help="number of requests (default 1000)")
    lat = sub.add_parser("latency", help="time to first token and decode tokens/s at batch 1 (or --batch N)")
    _add_engine_options(lat)
    lat.add_argument("--iterations", type=int, default=3, help="timed runs (default 3)")
    lat.add_argument("--batch", type=_positive_int, default=1, metavar="N",
                     help="sequences decoded together, started at once (default 1); decode tok/s counts all of them")
    sub.add_parser("serve", help="load against a running server (see `bench-llm serve --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        from kiln.server.bench_serve import main as serve_main

        return serve_main(argv[1:])
    from kiln.engine_builder.errors import EngineBuilderError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run_throughput(args) if args.mode == "throughput" else run_latency(args)
    except (FileNotFoundError, ValueError, EngineBuilderError) as exc:
        print(f"bench-llm: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(result)))
    print("settings: " + ", ".join(f"{k}={v}" for k, v in result.settings.items()))
    print(f"{result.mode} on {result.device}: {result.summary()}")
    if args.record:
        record(result, "bench-llm " + " ".join(shlex.quote(a) for a in argv), Path(args.record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
