"""Speculative decoding on a real model: acceptance length, greedy equality and tokens/s.

    python scripts/bench_spec.py                      # SmolLM2-135M (built from the bundled GGUF), CPU
    python scripts/bench_spec.py --engine DIR --device cuda --modes off,ngram

Runs every prompt of scripts/data/spec_prompts.jsonl (code edits: a function pasted in the
prompt and an edit asked for; plain chat) alone (batch 1, greedy, chat template) with
speculation off, with n-gram lookup (K, --ngram-min/--ngram-max) and with the engine itself as
its draft model (K: the machinery's upper bound, every draft accepted), then all code edits
at once (batch 6). It checks that greedy outputs are identical to speculation off and prints,
per mode and prompt kind: the mean acceptance length (tokens per verify step), decode tokens
per second (after the first token, so prefill is left out), and the host time per step
(everything but the forward passes and sampling: scheduling, input preparation, proposals,
verification bookkeeping, detokenization). Times are this process's CPU time (one torch thread
by default), not wall time, so other load on a shared machine does not skew them; the modes run
interleaved prompt by prompt. A table comes last; --json FILE writes the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PROMPTS = Path(__file__).resolve().parent / "data" / "spec_prompts.jsonl"


@dataclass
class Run:
    """One mode on one group of prompts."""

    tokens: int = 0
    seconds: float = 0.0
    decode_tokens: int = 0  # after each request's first token
    decode_seconds: float = 0.0  # from the first token to the end
    steps: int = 0
    model_s: float = 0.0  # forward passes and sampling / verification (device work on a GPU)
    draft_s: float = 0.0  # the draft model's forward passes
    verify_steps: int = 0
    accepted: int = 0
    outputs: dict[str, list[int]] = field(default_factory=dict)

    def figures(self) -> dict[str, float]:
        host = self.seconds - self.model_s - self.draft_s
        return {"tok_s": self.decode_tokens / self.decode_seconds, "acceptance_length": (
            (self.verify_steps + self.accepted) / self.verify_steps if self.verify_steps else 1.0),
            "ms_per_step": 1000 * self.seconds / self.steps, "host_ms_per_step": 1000 * host / self.steps,
            "tokens_per_step": self.tokens / self.steps}


class Timer:
    """Wraps methods to add their wall time to a counter (the CPU runs them synchronously)."""

    def __init__(self) -> None:
        self.model = self.draft = 0.0

    def wrap(self, obj, name: str, counter: str) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                setattr(self, counter, getattr(self, counter) + time.process_time() - start)

        setattr(obj, name, timed)


def load_prompts(tokenizer) -> list[tuple[str, str, list[int]]]:
    prompts = []
    for line in PROMPTS.read_text().splitlines():
        item = json.loads(line)
        text = tokenizer.apply_chat_template([{"role": "user", "content": item["content"]}], tokenize=False,
                                             add_generation_prompt=True)
        prompts.append((item["kind"], item["name"], tokenizer.encode(text, add_special_tokens=False)))
    return prompts


def make_engine(args, mode: str):
    from kiln.runtime import LLMEngine

    options = {"device": args.device, "max_model_len": args.max_model_len, "max_batch_size": 8}
    if mode == "ngram":
        options.update(speculative="ngram", num_speculative_tokens=args.k, ngram_min=args.ngram_min,
                       ngram_max=args.ngram_max)
    elif mode == "draft":
        options.update(speculative="draft", num_speculative_tokens=args.k, draft_engine=str(args.draft_engine))
    engine = LLMEngine.from_engine_dir(args.engine, **options)
    timer = Timer()
    for name in ("_forward", "_sample", "_verify"):
        timer.wrap(engine.runner, name, "model")
    if mode == "draft":
        for name in ("_forward", "_sample"):
            timer.wrap(engine.proposer.runner, name, "draft")
    return engine, timer


def run_group(engine, timer: Timer, prompts: list[tuple[str, str, list[int]]], max_tokens: int) -> Run:
    from kiln.runtime import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    before = engine.get_stats().spec_decode
    model0, draft0 = timer.model, timer.draft
    run = Run()
    start = time.process_time()
    first = None
    for kind, name, ids in prompts:
        engine.add_request(name, ids, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            for c in out.outputs:
                run.tokens += len(c.delta_token_ids)
                if out.finished:
                    run.outputs[out.request_id] = list(c.token_ids)
        run.steps += 1
        if first is None and run.tokens:
            first, tokens_at_first = time.process_time(), run.tokens
    end = time.process_time()
    run.seconds = end - start
    run.decode_tokens, run.decode_seconds = run.tokens - tokens_at_first, end - first
    run.model_s, run.draft_s = timer.model - model0, timer.draft - draft0
    after = engine.get_stats().spec_decode
    run.verify_steps = after.num_verify_steps - before.num_verify_steps
    run.accepted = after.num_accepted_tokens - before.num_accepted_tokens
    return run


def merge(runs: list[Run]) -> Run:
    total = Run()
    for r in runs:
        for name in ("tokens", "seconds", "decode_tokens", "decode_seconds", "steps", "model_s", "draft_s",
                     "verify_steps", "accepted"):
            setattr(total, name, getattr(total, name) + getattr(r, name))
        total.outputs.update(r.outputs)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, help="engine directory (default: SmolLM2-135M fp32, built now)")
    parser.add_argument("--draft-engine", type=Path, help="draft engine (default: the engine itself)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default="off,ngram,draft")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per step (default 4)")
    parser.add_argument("--ngram-min", type=int, default=2)
    parser.add_argument("--ngram-max", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine more threads contend)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    tmp = None
    if args.engine is None:
        from kiln.engine_builder import build_engine, resolve_source

        tmp = tempfile.TemporaryDirectory(prefix="bench-spec-")
        args.engine = Path(tmp.name) / "smollm2"
        build_engine(resolve_source("smollm2-135m"), args.engine, dtype="float32", progress=False)
    args.draft_engine = args.draft_engine or args.engine
    modes = args.modes.split(",")
    engines = {mode: make_engine(args, mode) for mode in modes}
    prompts = load_prompts(engines[modes[0]][0].tokenizer)
    groups: dict[str, dict[str, list[Run]]] = {mode: {} for mode in modes}
    for mode, (engine, timer) in engines.items():
        run_group(engine, timer, prompts[-1:], 8)  # warm-up
    for kind, name, ids in prompts:  # batch 1: one prompt at a time, the modes interleaved
        for mode, (engine, timer) in engines.items():
            groups[mode].setdefault(kind, []).append(run_group(engine, timer, [(kind, name, ids)], args.max_tokens))
    results = {mode: {kind: merge(runs) for kind, runs in by_kind.items()} for mode, by_kind in groups.items()}
    edits = [p for p in prompts if p[0] == "code_edit"]
    for mode, (engine, timer) in engines.items():
        results[mode]["code_edit x6"] = run_group(engine, timer, edits, args.max_tokens)
        engine.shutdown()
    report(results, modes, args)
    if tmp is not None:
        tmp.cleanup()
    return 0


def report(results: dict[str, dict[str, Run]], modes: list[str], args) -> None:
    base = results.get("off")
    rows, figures = [], {}
    for mode in modes:
        for group, run in results[mode].items():
            f = run.figures()
            same = "-" if base is None or mode == "off" else (
                "yes" if run.outputs == base[group].outputs else "NO")
            speedup = f["tok_s"] / base[group].figures()["tok_s"] if base is not None else float("nan")
            figures[f"{mode}/{group}"] = {**f, "greedy_identical": same, "speedup": speedup}
            rows.append(f"| {mode} | {group} | {f['acceptance_length']:.2f} | {f['tok_s']:.1f} | {speedup:.2f}x | "
                        f"{f['ms_per_step']:.1f} | {f['host_ms_per_step']:.2f} | {same} |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    print(f"\nK={args.k}, n-gram {args.ngram_min}..{args.ngram_max}, max_tokens {args.max_tokens}, device {args.device}")
    print("| mode | prompts | acceptance length | tok/s | vs off | ms/step | host ms/step | greedy identical |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    sys.exit(main())
