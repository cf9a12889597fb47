"""Structured-output overhead (issue 15): decode tokens/s with and without a JSON schema, offline.

Runs SmolLM2-135M (float32, CPU by default) at batch 1 and 64: every request generates exactly
``--tokens`` tokens (ignore_eos; the schema allows long strings so no row finishes early), once
unconstrained and once with every row constrained by the same JSON schema (one compile, cached).
Prints a short table last; writes it to $OUT/bench_structured.txt when OUT is set.

    python scripts/bench_structured_cpu.py [--device cpu] [--batches 1 64] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from kiln.engine_builder import build_engine, resolve_source
from kiln.runtime import LLM
from kiln.scheduler.sampling_params import SamplingParams, StructuredOutput

SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "notes": {"type": "array", "items": {
    "type": "string"}}}, "required": ["title", "notes"]}


def run(llm: LLM, batch: int, tokens: int, structured: bool) -> float:
    so = StructuredOutput("json", json.dumps(SCHEMA)) if structured else None
    params = SamplingParams(temperature=0.8, seed=0, max_tokens=tokens, ignore_eos=True, structured_output=so)
    prompts = [f"Write a note about city number {i} as JSON." for i in range(batch)]
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, structured_output=so), use_tqdm=False)  # warm: compile
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = Path(tmp) / "engine"
        build_engine(resolve_source("smollm2-135m"), engine, tp=1, dtype="float32" if args.device == "cpu"
                     else "bfloat16", progress=False)
        with LLM(engine, device=args.device, max_model_len=256, num_kv_cache_tokens=max(256, 96 * max(args.batches))) as llm:
            rows = []
            for batch in args.batches:
                plain = run(llm, batch, args.tokens, False)
                schema = run(llm, batch, args.tokens, True)
                rows.append(f"{args.device:6} batch {batch:3}  plain {plain:9.1f} tok/s  json schema {schema:9.1f} "
                            f"tok/s  overhead {100 * (plain / schema - 1):6.1f}%")
    table = "\n".join(rows)
    print(table)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_structured.txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
