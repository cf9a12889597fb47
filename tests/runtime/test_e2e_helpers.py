"""Shared helpers of the engine end-to-end tests (no tests here).

Tiny random HF models of every architecture are saved as checkpoints, built into engine
directories with the real builder, and run through LLMEngine; transformers' greedy
``generate`` on the same weights is the reference.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tiny_models import make_tiny_hf_checkpoint

from kiln.engine_builder import build_engine
from kiln.runtime import LLMEngine, RequestOutput, SamplingParams

EOS_ID = 2  # make_tiny_hf_checkpoint's EOS (in generation_config.json)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# kind -> (architecture, make_tiny_hf_checkpoint options)
TINY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama3_scaled_tied": ("llama", {"tie": True, "rope_scaling": LLAMA3_SCALING}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {"num_kv_heads": 1}),  # GQA 4 and qkv bias
    "qwen3": ("qwen3", {"head_dim": 32, "num_kv_heads": 4}),  # q/k norm
}
TINY_KINDS = list(TINY_MODELS)


@dataclass
class TinyEngine:
    """A tiny HF model and the Kiln engine directory built from its checkpoint."""

    kind: str
    hf_model: torch.nn.Module
    engine_dir: Path
    vocab_size: int
    _greedy_cache: dict[tuple[tuple[int, ...], int], list[int]] = field(default_factory=dict)

    def engine(self, **options: Any) -> LLMEngine:
        options = {"device": "cpu", "block_size": 4, "max_model_len": 128, **options}
        return LLMEngine.from_engine_dir(self.engine_dir, **options)

    def hf_greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """transformers' greedy continuation, EOS ignored (memoised: prompts repeat across tests)."""
        key = (tuple(prompt), max_new_tokens)
        if key not in self._greedy_cache:
            self._greedy_cache[key] = hf_greedy(self.hf_model, prompt, max_new_tokens, eos_token_id=None)
        return self._greedy_cache[key]


def make_tiny_engine(kind: str, root: Path, **options: Any) -> TinyEngine:
    """Save a tiny random checkpoint of ``kind``, build it, load it back in transformers."""
    from transformers import AutoModelForCausalLM

    arch, defaults = TINY_MODELS[kind]
    hf_dir = make_tiny_hf_checkpoint(root / f"{kind}-hf", arch, **{**defaults, **options})
    engine_dir = root / f"{kind}-engine"
    build_engine(hf_dir, engine_dir, dtype="float32", progress=False)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return TinyEngine(kind, model, engine_dir, model.config.vocab_size)


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """New tokens of ``model.generate(do_sample=False)``; it stops after EOS when one is given."""
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id if eos_token_id is not None else 0,
        )
    return out[0, len(prompt):].tolist()


def random_prompts(seed: int, lengths: list[int], vocab_size: int, prefix: list[int] = ()) -> list[list[int]]:
    """Prompts of the given lengths (after ``prefix``), avoiding ids 0-2 (pad/bos/eos)."""
    rng = random.Random(seed)
    return [list(prefix) + [rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


class OutputCollector:
    """Merges step outputs into each request's final output, checking the step contract:
    nothing after a request finished, and the deltas add up to the cumulative fields."""

    def __init__(self) -> None:
        self.final: dict[str, RequestOutput] = {}
        self._choices: dict[str, dict[int, Any]] = {}
        self._joined: dict[tuple[str, int], tuple[list[int], str]] = {}

    def step(self, engine: LLMEngine) -> None:
        for out in engine.step():
            previous = self.final.get(out.request_id)
            assert previous is None or not previous.finished, f"output for {out.request_id} after it finished"
            self.final[out.request_id] = out
            for c in out.outputs:
                ids, text = self._joined.get((out.request_id, c.index), ([], ""))
                self._joined[(out.request_id, c.index)] = (ids + c.delta_token_ids, text + c.delta_text)
                assert self._joined[(out.request_id, c.index)] == (c.token_ids, c.text)
                self._choices.setdefault(out.request_id, {})[c.index] = c

    def forget(self, request_id: str) -> None:
        """Drop what was seen of a request (it was aborted; its id may come back)."""
        self.final.pop(request_id, None)
        self._choices.pop(request_id, None)
        for key in [k for k in self._joined if k[0] == request_id]:
            del self._joined[key]

    def results(self) -> dict[str, RequestOutput]:
        for rid, out in self.final.items():
            out.outputs = [self._choices[rid][i] for i in sorted(self._choices[rid])]
        return self.final


def drain(engine: LLMEngine, collector: OutputCollector | None = None, max_steps: int = 10_000) -> dict[str, RequestOutput]:
    """Step until idle; return each request's final output with all its choices merged."""
    collector = collector or OutputCollector()
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return collector.results()
        collector.step(engine)
    raise AssertionError("engine did not finish")
