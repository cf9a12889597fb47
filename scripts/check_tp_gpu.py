"""Tensor-parallel correctness on GPUs: greedy tokens of a tp N engine against the tp 1 engine.

    python scripts/check_tp_gpu.py ENGINE_TP1 ENGINE_TPN [--prompts 16] [--isl 64] [--osl 64]

Both engines must hold the same weights (e.g. `build-llm --random-weights llama-3.1-8b` at
--tp 1 and --tp 2, same seed). Each runs the same random prompts greedily with CUDA graphs
(decode steps replayed, NCCL all-reduces captured inside them for tp > 1), with the top-5
logprobs of every step. A tp N engine sums its partial products in another order, so in bf16
a near-tie may flip; random-weight models have many (their next-token distributions are
flat). So besides each prompt's common-prefix length the script reports, over the common
prefixes, the largest difference of the chosen token's logprob, and at each divergence the
tp 1 engine's logprob gap between its token and the tp N engine's: a real error shows as
large differences, a near-tie flip as a gap of rounding size. It fails when a gap or a
difference exceeds ``--tolerance`` nats.

Two fp32 engines of one bf16 checkpoint (`build-llm CKPT --dtype float32 --tp 1` / `--tp N`;
`TP=N RUNS=tpfp32 scripts/gpu_bench.sh`) round far below the near-ties, so there the tokens
themselves must match (16 of 16 identical over 64 tokens on an H200 pair).

``--reference DIR`` settles whether tp N is further from the exact answer than tp 1: DIR is an
fp32 engine of the same (bf16-representable) weights, e.g. all three built from one bf16
checkpoint of scripts/make_random_hf_checkpoint.py with `build-llm CKPT --dtype float32` /
`--dtype bfloat16 --tp 1` / `--tp N`. The reference's greedy sequences are then scored
teacher-forced by every engine (prompt logprobs); the table gives each engine's mean and max
|logprob difference| from the reference over those tokens. tp N passes when its mean is within
``--ratio`` of tp 1's (same data, only the sums' order and partial-sum rounding differ).
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from kiln.runtime import LLMEngine, SamplingParams


def run(engine_dir: str, prompts: list[list[int]], osl: int) -> list:
    """Each prompt's greedy CompletionOutput (token ids and per-step top-5 logprobs)."""
    start = time.perf_counter()
    with LLMEngine.from_engine_dir(engine_dir) as engine:
        print(f"{engine_dir}: loaded in {time.perf_counter() - start:.1f} s", flush=True)
        outputs = generate(engine, prompts, SamplingParams(temperature=0.0, max_tokens=osl, ignore_eos=True, logprobs=5))
    return [out.outputs[0] for out in outputs]


def generate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list:
    """Each prompt's final RequestOutput, in order."""
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
    return [outputs[str(i)] for i in range(len(prompts))]


def score(engine_dir: str, sequences: list[list[int]], skip: int) -> list[list[float]]:
    """Teacher-forced logprobs of each sequence's tokens after its first ``skip`` (the prompt)."""
    with LLMEngine.from_engine_dir(engine_dir) as engine:
        outputs = generate(engine, sequences, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0))
    return [[lp.logprob for lp in out.prompt_logprobs[skip:]] for out in outputs]


def against_reference(args: argparse.Namespace, prompts: list[list[int]]) -> bool:
    """Each engine's distance from the fp32 reference on the reference's own greedy tokens."""
    ref = run(args.reference, prompts, args.osl)
    sequences = [p + list(o.token_ids) for p, o in zip(prompts, ref)]
    want = [[lp.logprob for lp in o.logprobs] for o in ref]
    means = {}
    print("| engine | mean |dlogprob| vs fp32 | max |")
    print("|---|---|---|")
    for name, path in (("tp 1", args.tp1), (f"tp N ({args.tpn})", args.tpn)):
        got = score(path, sequences, args.isl)
        diffs = [abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w)]
        means[name] = sum(diffs) / len(diffs)
        print(f"| {name} | {means[name]:.4f} | {max(diffs):.4f} |", flush=True)
    tp1, tpn = means.values()
    return tpn <= args.ratio * tp1


def compare(ref, got) -> tuple[int, float, float | None]:
    """(common-prefix length, max |chosen logprob difference| over it, gap at the divergence:
    the reference's logprob of its token minus that of the candidate's token, None if the
    candidate's token is not in the reference's top 5)."""
    n = 0
    while n < min(len(ref.token_ids), len(got.token_ids)) and ref.token_ids[n] == got.token_ids[n]:
        n += 1
    diff = max((abs(a.logprob - b.logprob) for a, b in zip(ref.logprobs[:n], got.logprobs[:n])), default=0.0)
    if n == len(ref.token_ids):
        return n, diff, 0.0
    top = dict(ref.logprobs[n].top)
    other = top.get(got.token_ids[n])
    return n, diff, None if other is None else ref.logprobs[n].logprob - other


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tp1")
    p.add_argument("tpn")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--isl", type=int, default=64)
    p.add_argument("--osl", type=int, default=64)
    p.add_argument("--max-token-id", type=int, default=100000, help="prompt ids are drawn from [1000, this)")
    p.add_argument("--tolerance", type=float, default=0.1, help="nats; bf16 rounding is ~0.01-0.05")
    p.add_argument("--reference", help="an fp32 engine of the same weights: score both engines against it")
    p.add_argument("--ratio", type=float, default=1.5,
                   help="with --reference: tp N's mean distance may be at most this times tp 1's (default 1.5)")
    args = p.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(min(1000, args.max_token_id // 2), args.max_token_id) for _ in range(args.isl)] for _ in range(args.prompts)]
    if args.reference:
        return 0 if against_reference(args, prompts) else 1
    rows = [compare(ref, got) for ref, got in zip(run(args.tp1, prompts, args.osl), run(args.tpn, prompts, args.osl))]
    prefixes = [n for n, _, _ in rows]
    diff = max(d for _, d, _ in rows)
    gaps = [g for _, _, g in rows]
    known = [g for g in gaps if g is not None]
    print("common-prefix lengths:", prefixes)
    print("logprob gaps at the divergences:", ["-" if g is None else f"{g:.4f}" for g in gaps])
    print(f"| prompts | identical ({args.osl} tokens) | first 16 agree | mean common prefix | "
          "max chosen-logprob diff | max gap at divergence |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(prompts)} | {sum(n == args.osl for n in prefixes)} | {sum(n >= 16 for n in prefixes)} | "
          f"{sum(prefixes) / len(prefixes):.1f} | {diff:.4f} | {max(known, default=0.0):.4f} |")
    ok = diff <= args.tolerance and len(known) == len(gaps) and all(g <= args.tolerance for g in known)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
