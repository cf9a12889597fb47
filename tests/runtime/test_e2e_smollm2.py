"""The real SmolLM2-135M-Instruct through the whole engine against transformers (CPU, fp32).

Greedy tokens must match HF's ``generate`` (which stops at EOS) alone, batched with chunked
prefill and prefix-cache hits on the shared chat system prompt, and under preemption; the
offline chat API must give HF's text.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_e2e_helpers import OutputCollector, drain, hf_greedy

from kiln.runtime import LLM, LLMEngine, SamplingParams

pytestmark = pytest.mark.slow

NEW_TOKENS = 16
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colours, separated by commas, and explain in one sentence why they are called primary.",
    "2+2=",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_hf_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_hf_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    def ids(question: str) -> list[int]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)

    return [ids(q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def hf_model(smollm2_hf_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def references(hf_model, prompts: list[list[int]], tokenizer) -> list[list[int]]:
    """HF greedy continuations; generation stops after EOS like the engine's."""
    return [hf_greedy(hf_model, p, NEW_TOKENS, eos_token_id=tokenizer.eos_token_id) for p in prompts]


def engine_of(engine_dir: Path, **options) -> LLMEngine:
    return LLMEngine.from_engine_dir(engine_dir, **{"device": "cpu", "block_size": 16, "max_model_len": 512, **options})


def check(outputs: dict, references: list[list[int]], eos: int) -> None:
    for i, expected in enumerate(references):
        (choice,) = outputs[f"q{i}"].outputs
        assert choice.token_ids == expected, f"question {i}: {QUESTIONS[i]!r}"
        assert choice.finish_reason == ("stop" if expected[-1] == eos else "length")


def test_greedy_alone_then_batched_with_chunks_and_prefix_hits(smollm2_engine_dir, prompts, references, tokenizer):
    engine = engine_of(smollm2_engine_dir, max_num_tokens=32)  # prompts of ~40 tokens: chunked
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    engine.add_request("q0", prompts[0], params)
    check(drain(engine), references[:1], tokenizer.eos_token_id)
    assert engine.eos_token_ids >= {tokenizer.eos_token_id}
    hits = engine.get_stats().prefix_cache_hits
    collector = OutputCollector()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"q{i}", prompt, params)
        collector.step(engine)  # later ones arrive while earlier ones run
    check(drain(engine, collector), references, tokenizer.eos_token_id)
    assert engine.get_stats().prefix_cache_hits - hits >= 4 * 16  # the system prompt's full blocks


def test_sixteen_plain_prompts_of_different_lengths(smollm2_engine_dir, hf_model, tokenizer):
    words = "the history of the river town began with a mill , a bridge and a market that grew".split()
    texts = [" ".join(words[: 1 + (i * 7) % len(words)]).capitalize() for i in range(16)]
    prompts = [tokenizer.encode(t) for t in texts]
    assert len({len(p) for p in prompts}) > 8
    expected = [hf_greedy(hf_model, p, 4, eos_token_id=tokenizer.eos_token_id) for p in prompts]
    engine = engine_of(smollm2_engine_dir)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"p{i}", prompt, SamplingParams(temperature=0.0, max_tokens=4))
    outputs = drain(engine)
    assert [outputs[f"p{i}"].outputs[0].token_ids for i in range(16)] == expected


def test_greedy_under_preemption(smollm2_engine_dir, prompts, references, tokenizer):
    engine = engine_of(smollm2_engine_dir, capacity_policy="max_utilization", num_kv_cache_tokens=160,
                       max_model_len=160, enable_prefix_caching=False)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"q{i}", prompt, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
    check(drain(engine), references, tokenizer.eos_token_id)
    stats = engine.get_stats()
    assert stats.num_preemptions > 0 and stats.kv_cache_usage == 0.0


def test_chat_text_matches_transformers(smollm2_engine_dir, references, tokenizer):
    llm = LLM(smollm2_engine_dir, device="cpu", max_model_len=512)
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS[:2]]
    outputs = llm.chat(conversations, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS), use_tqdm=False)
    for out, expected in zip(outputs, references):
        (choice,) = out.outputs
        assert choice.token_ids == expected
        assert choice.text == tokenizer.decode(expected, skip_special_tokens=True)
        assert choice.text and "<|im_end|>" not in choice.text
    # A stop string taken from the real answer cuts it by hand's measure.
    text = outputs[1].outputs[0].text
    stop = text.split()[2]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, stop=[stop])
    (cut,) = llm.chat(conversations[1], params, use_tqdm=False)[0].outputs
    assert (cut.text, cut.finish_reason, cut.stop_reason) == (text[: text.index(stop)], "stop", stop)
