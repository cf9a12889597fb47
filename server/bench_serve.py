"""`bench-llm serve URL`: load a running OpenAI-compatible server and measure it.

    bench-llm serve http://127.0.0.1:8000 --num-requests 64 --concurrency 32 --isl 128 --osl 64
    bench-llm serve URL --request-rate 4 --endpoint chat --prompt "Tell me a story."

N streaming requests go out either all at once bounded by --concurrency, or as a Poisson
process at --request-rate requests/s (still capped by --concurrency). Synthetic prompts are
random token ids of exactly --isl tokens (completions; no client tokenizer needed) or
--isl random words (chat; about one token each). Reported: requests/s, output tokens/s, and
TTFT, TPOT and ITL mean / p50 / p99. ``--offline ENGINE_DIR`` also runs the same prompts
through ``kiln.runtime.LLM.generate`` in batches of --concurrency, alternating with the HTTP
rounds (--repeat), and reports the HTTP layer's cost in throughput.

One Python process driving hundreds of streams can itself be the limit (parsing every SSE
chunk costs CPU). ``--processes P`` spreads the requests and the concurrency over P client
processes that start together; their results are merged. ``client_cpu_cores`` (client CPU
seconds over the wall time) says how busy the load generator was: near P, it was the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

_WORDS = ("time person year way day thing man world life hand part child eye woman place work week "
          "case point number group problem fact river stone light paper music garden table").split()


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)
    error: str = ""


def make_prompts(args: argparse.Namespace) -> list[Any]:
    rng = random.Random(args.seed)
    if args.prompt is not None:
        return [args.prompt] * args.num_requests
    if args.endpoint == "chat":
        return [" ".join(rng.choice(_WORDS) for _ in range(args.isl)) for _ in range(args.num_requests)]
    lo, hi = args.token_range
    return [[rng.randrange(lo, hi) for _ in range(args.isl)] for _ in range(args.num_requests)]


def _body(args: argparse.Namespace, prompt: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": args.model, "max_tokens": args.osl, "temperature": args.temperature,
                            "stream": True, "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def _one(client: Any, args: argparse.Namespace, prompt: Any) -> RequestResult:
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    start = time.perf_counter()
    last = None
    result = RequestResult(ok=False)
    try:
        async with client.stream("POST", path, json=_body(args, prompt)) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = event["error"].get("message", "stream error")
                    return result
                if event.get("usage"):
                    result.output_tokens = event["usage"]["completion_tokens"]
                choices = event.get("choices", [])
                # A token event: text, or a chunk without text (an engine without a tokenizer
                # streams those; a final chunk marks the last tokens); usage-only chunks are not.
                if not choices or not any(_text(c) or c.get("text") == "" for c in choices):
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = time.perf_counter() - start
    result.ok = True
    return result


def _text(choice: dict) -> str:
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def run_load(args: argparse.Namespace, prompts: list[Any]) -> tuple[list[RequestResult], float]:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency)
    rng = random.Random(args.seed + 1)
    sem = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits, timeout=args.timeout) as client:
        async def bounded(prompt: Any) -> RequestResult:
            async with sem:
                return await _one(client, args, prompt)

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(bounded(prompt)))
            if args.request_rate > 0:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _client_process(args: argparse.Namespace, prompts: list[Any], start_at: float
                    ) -> tuple[list[RequestResult], float, float, float]:
    """One client process's share: wait for the common start, run it; (results, wall-clock
    start, wall-clock end, CPU seconds used)."""
    time.sleep(max(0.0, start_at - time.time()))
    cpu = _cpu_seconds()
    start = time.time()
    results, _ = asyncio.run(run_load(args, prompts))
    return results, start, time.time(), _cpu_seconds() - cpu


def run_load_processes(args: argparse.Namespace, prompts: list[Any]) -> tuple[list[RequestResult], float, float]:
    """The load from ``args.processes`` client processes (prompts and concurrency split between
    them, all starting together): (merged results, wall time, client CPU seconds)."""
    n = min(args.processes, len(prompts), args.concurrency)
    if n <= 1:
        cpu = _cpu_seconds()
        results, duration = asyncio.run(run_load(args, prompts))
        return results, duration, _cpu_seconds() - cpu
    shares = []
    for i in range(n):
        share = argparse.Namespace(**vars(args))
        share.concurrency = args.concurrency // n + (i < args.concurrency % n)
        share.request_rate = args.request_rate / n  # Poisson streams add up to the asked rate
        share.seed = args.seed + 7919 * i
        shares.append((share, prompts[i::n]))
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 2.0  # the processes import and connect first, then start together
    with ctx.Pool(n) as pool:
        parts = pool.starmap(_client_process, [(share, part, start_at) for share, part in shares])
    results = [r for part in parts for r in part[0]]
    duration = max(p[2] for p in parts) - min(p[1] for p in parts)
    return results, duration, sum(p[3] for p in parts)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    pos = q / 100 * (len(s) - 1)  # linear interpolation between closest ranks (numpy's default)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(results: list[RequestResult], duration: float) -> dict[str, float]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft for r in ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [x for r in ok for x in r.itls]
    figures: dict[str, float] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "request_per_s": len(ok) / duration, "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / duration,
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls)):
        figures[f"{name}_mean_ms"] = statistics.fmean(values) * 1e3 if values else 0.0
        figures[f"{name}_p50_ms"] = _pct(values, 50) * 1e3
        figures[f"{name}_p99_ms"] = _pct(values, 99) * 1e3
    return figures


class OfflineRunner:
    """The same prompts through LLM.generate, in batches of --concurrency (all at t=0 each)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from kiln.runtime import LLM
        from kiln.scheduler.sampling_params import SamplingParams

        self.llm = LLM(args.offline, **json.loads(args.offline_options))
        self.params = SamplingParams(max_tokens=args.osl, temperature=args.temperature, ignore_eos=args.ignore_eos)
        self.batch = args.concurrency

    def run(self, prompts: list[Any]) -> dict[str, float]:
        items = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in prompts]
        start = time.perf_counter()
        out_tokens = 0
        for i in range(0, len(items), self.batch):
            outs = self.llm.generate(items[i:i + self.batch], self.params, use_tqdm=False)
            out_tokens += sum(len(c.token_ids) for o in outs for c in o.outputs)
        duration = time.perf_counter() - start
        return {"offline_duration_s": duration, "offline_output_tokens": out_tokens,
                "offline_output_tokens_per_s": out_tokens / duration}


def measure(args: argparse.Namespace, prompts: list[Any]) -> tuple[dict[str, float], list[str]]:
    """Warm up if asked, then --repeat rounds (server, then offline when asked, alternating so
    that both sides see the same machine conditions); the best round of each side counts."""
    offline = OfflineRunner(args) if args.offline else None
    if args.warmup:
        asyncio.run(run_load(args, prompts[: args.concurrency]))
        if offline is not None:
            offline.run(prompts[: args.concurrency])
    served, offline_runs, errors = [], [], []
    for _ in range(args.repeat):
        results, duration, client_cpu = run_load_processes(args, prompts)
        served.append(summarize(results, duration))
        served[-1].update(client_processes=min(args.processes, len(prompts), args.concurrency),
                          client_cpu_s=client_cpu, client_cpu_cores=client_cpu / duration)
        errors += [r.error for r in results if not r.ok]
        if offline is not None:
            offline_runs.append(offline.run(prompts))
    figures = max(served, key=lambda f: f["output_tokens_per_s"])
    if offline_runs:
        figures.update(max(offline_runs, key=lambda f: f["offline_output_tokens_per_s"]))
        figures["http_overhead_pct"] = 100.0 * (1 - figures["output_tokens_per_s"]
                                                / figures["offline_output_tokens_per_s"])
    if args.repeat > 1:
        figures["output_tokens_per_s_all_rounds"] = [f["output_tokens_per_s"] for f in served]  # type: ignore[assignment]
        if offline_runs:
            figures["offline_output_tokens_per_s_all_rounds"] = [  # type: ignore[assignment]
                f["offline_output_tokens_per_s"] for f in offline_runs]
    return figures, errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench-llm serve", description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--model", default=None, help="model id to send (default: none, the server's model)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-requests", "-n", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32, help="max requests in flight")
    p.add_argument("--request-rate", type=float, default=0.0, help="Poisson arrivals per second (0 = all at once)")
    p.add_argument("--processes", type=int, default=1,
                   help="client processes sharing the requests and the concurrency (a single Python client "
                        "can be the bottleneck at hundreds of streams; see client_cpu_cores)")
    p.add_argument("--isl", type=int, default=128, help="synthetic prompt length in tokens")
    p.add_argument("--osl", type=int, default=64, help="max_tokens per request")
    p.add_argument("--prompt", default=None, help="use this text as every prompt instead of synthetic ones")
    p.add_argument("--token-range", type=int, nargs=2, default=(1000, 20000), metavar=("LO", "HI"),
                   help="synthetic token ids are drawn from [LO, HI)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests stop at EOS (default: ignore_eos, fixed output length)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--warmup", action="store_true", help="one untimed round of --concurrency requests first")
    p.add_argument("--repeat", type=int, default=1, help="timed rounds; the best round is reported")
    p.add_argument("--offline", metavar="ENGINE_DIR",
                   help="also run the same prompts through LLM.generate (completions only) and compare")
    p.add_argument("--offline-options", default="{}", help='JSON EngineConfig options, e.g. \'{"device": "cpu"}\'')
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.num_requests, args.concurrency, args.isl, args.osl, args.repeat, args.processes) < 1:
        print("bench-llm serve: error: --num-requests, --concurrency, --isl, --osl, --repeat and --processes "
              "must be >= 1",
              file=sys.stderr)
        return 2
    if args.offline and args.endpoint == "chat":
        print("bench-llm serve: error: --offline compares the completions endpoint only", file=sys.stderr)
        return 2
    figures, errors = measure(args, make_prompts(args))
    if args.json:
        print(json.dumps({"config": {k: v for k, v in vars(args).items() if k != "api_key"}, "figures": figures,
                          "errors": errors[:5]}))
    else:
        print("settings: " + ", ".join(f"{k}={v}" for k, v in vars(args).items() if k not in ("api_key", "json")))
        for k, v in figures.items():
            print(f"{k:40s} {v:,.3f}" if isinstance(v, float) else f"{k:40s} {v}")
        for e in errors[:5]:
            print(f"error: {e}", file=sys.stderr)
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
