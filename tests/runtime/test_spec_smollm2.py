"""Speculative decoding on the real SmolLM2-135M-Instruct (CPU, fp32): n-gram lookup and the
model as its own draft keep greedy outputs identical to no speculation on code-edit prompts
(scripts/data/spec_prompts.jsonl), batched, and a stop string met inside accepted drafts ends
the output where it ends without speculation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_e2e_helpers import drain

from kiln.runtime import LLMEngine, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = Path(__file__).resolve().parents[2] / "scripts" / "data" / "spec_prompts.jsonl"
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def prompts(smollm2_engine_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_engine_dir)
    items = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
    edits = [i["content"] for i in items if i["kind"] == "code_edit"][:3]
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                                           add_generation_prompt=True), add_special_tokens=False)
            for c in edits]


def engine_of(engine_dir: Path, **options) -> LLMEngine:
    return LLMEngine.from_engine_dir(engine_dir, device="cpu", block_size=16, max_model_len=512, **options)


def outputs(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict[str, tuple]:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"e{i}", prompt, params)
    return {rid: (o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
            for rid, o in drain(engine).items()}


@pytest.fixture(scope="module")
def plain(smollm2_engine_dir: Path, prompts: list[list[int]]) -> dict[str, tuple]:
    return outputs(engine_of(smollm2_engine_dir), prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_code_edits_greedy_identical_with_speculation(smollm2_engine_dir, prompts, plain, method: str) -> None:
    options = {"speculative": method, "num_speculative_tokens": 4}
    if method == "draft":
        options["draft_engine"] = str(smollm2_engine_dir)
    engine = engine_of(smollm2_engine_dir, **options)
    assert outputs(engine, prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)) == plain
    stats = engine.get_stats().spec_decode
    assert stats.num_accepted_tokens > 0 and stats.mean_acceptance_length > 1.5


def test_stop_string_inside_accepted_drafts(smollm2_engine_dir, prompts, plain) -> None:
    text = plain["e0"][1]
    stop = text.split()[len(text.split()) // 2]  # a word from the middle of the answer
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, stop=[stop])
    expected = outputs(engine_of(smollm2_engine_dir), prompts[:1], params)
    engine = engine_of(smollm2_engine_dir, speculative="draft", draft_engine=str(smollm2_engine_dir),
                       num_speculative_tokens=4)  # every draft accepted: the stop lands inside a run
    got = outputs(engine, prompts[:1], params)
    assert got == expected and got["e0"][2] == "stop" and stop not in got["e0"][1]
    assert len(got["e0"][0]) < len(plain["e0"][0])
