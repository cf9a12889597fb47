"""Speculative decoding on a GPU at a controlled acceptance (BENCHMARK TOOL; random weights).

    python scripts/bench_spec_gpu.py --target /dev/shm/kiln-rand8b --draft /dev/shm/kiln-rand1b \
        --acceptance-length 2.5 --k 4

No real model can be had on the GPU machine, so the target is a random-weight engine and
acceptance is set, not earned: the runs use ``AcceptanceControlledProposer`` (runtime/bench.py)
proposing the target's own greedy continuation recorded by a plain run, and, because a
random-weight model's top logits are nearly tied (bf16 flips them between a 1-token and a
(1+K)-token forward, after which the recording no longer matches), acceptance is FORCED: each
draft is accepted with probability p (p solved from --acceptance-length for K), the rest of
verification is the real one (same forward, same device work, the target's token after the
accepted drafts). Output tokens are therefore not the model's; only the speed means anything.

Cases (a table is printed last):
  * batch 1, decode tok/s: off; speculation at p (the cost of n-gram lookup, which proposes in
    microseconds); speculation at p with the random draft engine run each step for its cost;
  * batch 64 and 256, offline throughput (128/128, all at t=0): off vs speculation configured
    (it switches itself off above --speculative-max-batch-size).
Targets (issue 13): batch-1 >= 2x off at the code-edit acceptance; 64 and 256 within 3% of off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def keep_for(acceptance_length: float, k: int) -> float:
    """p with 1 + p + ... + p^k == acceptance_length (a draft accepted with probability p
    after accepted ones: the expected tokens of a verify step)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(mid**i for i in range(k + 1)) < acceptance_length:
            lo = mid
        else:
            hi = mid
    return lo


def force_acceptance(keep: float) -> None:
    """Replace the runner's verification by the real one plus an i.i.d. accept(p) of each draft."""
    import torch

    from kiln.runtime import model_runner
    from kiln.runtime.verify import VerifyOutput, verify

    def forced(logits, batch, metadata):
        real = verify(logits, batch, metadata)
        num, k = batch.drafts.shape
        accept = torch.rand(num, k, device=logits.device) < keep
        accept &= torch.arange(k, device=logits.device) < batch.num_drafts_t.unsqueeze(1)
        accepted = accept.long().cumprod(dim=1).sum(dim=1)
        final = logits.argmax(dim=-1)[batch.index.gather(1, accepted.unsqueeze(1)).squeeze(1)]
        tokens = torch.cat((batch.drafts, torch.zeros_like(batch.drafts[:, :1])), dim=1)
        tokens.scatter_(1, accepted.unsqueeze(1), final.unsqueeze(1))
        return VerifyOutput(tokens, accepted + 1, real.logprobs)

    model_runner.verify = forced


def prompts(num: int, isl: int, vocab: int, seed: int) -> list[list[int]]:
    import numpy as np

    return np.random.default_rng(seed).integers(1000, vocab, size=(num, isl)).tolist()


def run(engine, batch: list[list[int]], osl: int, prefix: str) -> tuple[dict[str, list[int]], float, float]:
    """All requests at t=0; returns (outputs by id, output tok/s, decode tok/s after the first token)."""
    from kiln.runtime import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=osl, ignore_eos=True)
    for i, p in enumerate(batch):
        engine.add_request(f"{prefix}{i}", p, params)
    outputs: dict[str, list[int]] = {}
    tokens, first = 0, None
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += sum(len(c.delta_token_ids) for c in out.outputs)
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        if first is None and tokens:
            first, at_first = time.perf_counter(), tokens
    end = time.perf_counter()
    return outputs, tokens / (end - start), (tokens - at_first) / (end - first)


def make(args, spec: bool, recorded: dict[str, list[int]], with_draft: bool = False):
    from kiln.runtime import LLMEngine
    from kiln.runtime.bench import AcceptanceControlledProposer

    options = {"max_batch_size": 256, "max_num_tokens": 8192}
    if not spec:
        return LLMEngine.from_engine_dir(args.target, **options)
    inner = None
    if with_draft:  # built first: its memory is taken before the target's KV cache
        from kiln.engine_builder.format import load_engine
        from kiln.runtime.config import EngineConfig
        from kiln.runtime.draft_proposer import DraftModelProposer

        draft_config = EngineConfig(engine_dir=args.target, speculative="draft", draft_engine=str(args.draft),
                                    num_speculative_tokens=args.k, **options)
        from kiln.runtime.engine import load_tokenizer

        inner = DraftModelProposer(draft_config, load_tokenizer(args.target), load_engine(args.target).model_config)
    proposer = AcceptanceControlledProposer(recorded, 1.0, args.vocab, inner=inner)
    return LLMEngine.from_engine_dir(args.target, proposer=proposer, speculative="external",
                                     num_speculative_tokens=args.k,
                                     speculative_max_batch_size=args.speculative_max_batch_size, **options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--draft", type=Path, help="draft engine for the draft-model cost (same vocabulary)")
    parser.add_argument("--acceptance-length", type=float, default=2.5, help="tokens per verify step to emulate")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--speculative-max-batch-size", type=int, default=8)
    parser.add_argument("--osl", type=int, default=256, help="batch-1 output tokens (default 256)")
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    from kiln.engine_builder.format import load_engine

    args.vocab = int(load_engine(args.target).model_config.vocab_size)
    keep = keep_for(args.acceptance_length, args.k)
    force_acceptance(keep)
    single = prompts(3, 128, args.vocab, 1)
    batches = [int(b) for b in args.batches.split(",") if b]
    figures: dict[str, float] = {}

    engine = make(args, False, {})
    run(engine, single[:1], 16, "warm")
    recorded, rates = {}, []
    for i, p in enumerate(single):
        out, _, rate = run(engine, [p], args.osl, f"s{i}-")
        recorded.update(out)
        rates.append(rate)
    figures["b1_off"] = statistics.median(rates)
    for b in batches:
        out, figures[f"b{b}_off"], _ = run(engine, prompts(b, 128, args.vocab, b), 128, f"t{b}-")
        recorded.update(out)
    engine.shutdown()

    cases = [("spec", False)] + ([("spec_draft", True)] if args.draft else [])
    for name, with_draft in cases:
        engine = make(args, True, recorded, with_draft)
        run(engine, single[:1], 16, "warm")
        rates = [run(engine, [p], args.osl, f"s{i}-")[2] for i, p in enumerate(single)]
        figures[f"b1_{name}"] = statistics.median(rates)
        figures[f"b1_{name}_acceptance_length"] = engine.get_stats().spec_decode.mean_acceptance_length
        if not with_draft:
            for b in batches:
                figures[f"b{b}_{name}"] = run(engine, prompts(b, 128, args.vocab, b), 128, f"t{b}-")[1]
        engine.shutdown()

    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    print(f"\nK={args.k}, emulated acceptance length {args.acceptance_length} (p={keep:.3f}), "
          f"speculation off above batch {args.speculative_max_batch_size}")
    print("| case | off tok/s | spec tok/s | ratio | target |")
    print("|---|---|---|---|---|")
    for name, _ in cases:
        ratio = figures[f"b1_{name}"] / figures["b1_off"]
        print(f"| batch 1 decode, {name} (acceptance {figures[f'b1_{name}_acceptance_length']:.2f}) | "
              f"{figures['b1_off']:.1f} | {figures[f'b1_{name}']:.1f} | {ratio:.2f}x | >= 2x |")
    for b in batches:
        ratio = figures[f"b{b}_spec"] / figures[f"b{b}_off"]
        print(f"| batch {b} throughput 128/128 | {figures[f'b{b}_off']:.0f} | {figures[f'b{b}_spec']:.0f} | "
              f"{ratio:.3f}x | >= 0.97x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
