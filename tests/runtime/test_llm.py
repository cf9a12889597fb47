"""The offline LLM API on a tiny random Llama that carries the SmolLM2 tokenizer: prompt
forms, seeded sampling, greedy equivalences, n, stop strings and the chat template."""

from __future__ import annotations

import weakref

import pytest
from test_e2e_helpers import TinyEngine, make_tiny_engine

from kiln.runtime import LLM, SamplingParams
from kiln.runtime.model_runner import EngineShutDownError

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away,", "1, 2, 3,"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyEngine:
    return make_tiny_engine("llama", tmp_path_factory.mktemp("llm"), with_tokenizer=True)


@pytest.fixture(scope="module")
def llm(tiny: TinyEngine) -> LLM:
    return LLM(tiny.engine_dir, device="cpu", block_size=8, max_model_len=256)


def sampled(seed: int | None, max_tokens: int = 10, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_generate_accepts_every_prompt_form_and_keeps_order(llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    by_text = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.prompt for o in by_text] == PROMPTS
    assert [o.prompt_token_ids for o in by_text] == [tokenizer.encode(p) for p in PROMPTS]
    by_ids = llm.generate([{"prompt_token_ids": o.prompt_token_ids} for o in by_text], params, use_tqdm=False)
    (single,) = llm.generate(PROMPTS[1], params)
    (single_ids,) = llm.generate({"prompt_token_ids": by_text[1].prompt_token_ids}, params, use_tqdm=False)
    texts = [o.outputs[0].text for o in by_text]
    assert [o.outputs[0].text for o in by_ids] == texts
    assert single.outputs[0].token_ids == single_ids.outputs[0].token_ids == by_text[1].outputs[0].token_ids
    for out in by_text:
        (choice,) = out.outputs
        assert choice.text == tokenizer.decode(choice.token_ids, skip_special_tokens=True)


def test_one_sampling_params_per_prompt(llm: LLM) -> None:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (1, 3, 5)]
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1, 3, 5]
    with pytest.raises(ValueError, match="3 prompts"):
        llm.generate(PROMPTS, params[:2], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_temperature_zero_is_greedy(tiny: TinyEngine, llm: LLM) -> None:
    ids = llm.get_tokenizer().encode(PROMPTS[0])
    by_temperature = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    by_top_k = llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, top_k=1, max_tokens=8, ignore_eos=True))
    expected = tiny.hf_greedy(ids, 8)
    assert by_temperature[0].outputs[0].token_ids == expected
    assert by_top_k[0].outputs[0].token_ids == expected


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(llm: LLM) -> None:
    first = llm.generate(PROMPTS[0], sampled(7), use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate(PROMPTS[0], sampled(7), use_tqdm=False)[0].outputs[0].token_ids
    batch = llm.generate(PROMPTS, [sampled(1), sampled(7), sampled(None)], use_tqdm=False)
    assert first == again
    # In a batch, other requests' random draws must not disturb a seeded one.
    assert llm.generate(PROMPTS[0], sampled(7), use_tqdm=False)[0].outputs[0].token_ids == first
    rebatched = llm.generate([PROMPTS[2], PROMPTS[0]], [sampled(None), sampled(7)], use_tqdm=False)
    assert rebatched[1].outputs[0].token_ids == first
    assert batch[0].outputs[0].token_ids != batch[1].outputs[0].token_ids


def test_n_gives_n_choices(llm: LLM) -> None:
    (out,) = llm.generate(PROMPTS[1], sampled(3, n=2), use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1]
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in out.outputs)
    assert out.outputs[0].token_ids != out.outputs[1].token_ids


def _greedy_text(llm: LLM, prompt: str, max_tokens: int) -> tuple[str, list[int]]:
    (out,) = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return out.outputs[0].text, out.outputs[0].token_ids


def _stop_candidate(text: str) -> str:
    """A 2-character stop string from the middle of ``text`` (no partial characters)."""
    for start in range(len(text) // 3, len(text) - 2):
        candidate = text[start : start + 2]
        if "\ufffd" not in candidate and candidate.strip():
            return candidate
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_cut_the_text(llm: LLM, include: bool) -> None:
    full_text, full_ids = _greedy_text(llm, PROMPTS[0], 24)
    stop = _stop_candidate(full_text)
    cut = full_text.index(stop) + (len(stop) if include else 0)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop, "never-seen-stop"],
                            include_stop_str_in_output=include)
    (choice,) = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs
    assert choice.text == full_text[:cut]
    assert (choice.finish_reason, choice.stop_reason) == ("stop", stop)
    assert choice.token_ids == full_ids[: len(choice.token_ids)] and len(choice.token_ids) < len(full_ids)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.get_stats().kv_cache_usage == 0.0


def test_stop_string_never_seen_leaves_text_whole(llm: LLM) -> None:
    full_text, _ = _greedy_text(llm, PROMPTS[2], 12)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=["\u2603\u2603"])
    (choice,) = llm.generate(PROMPTS[2], params, use_tqdm=False)[0].outputs
    assert (choice.text, choice.finish_reason) == (full_text, "length")


def test_chat_applies_the_chat_template(llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    conversations = [
        [{"role": "user", "content": "What is 2 + 2?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    ]
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    outputs = llm.chat(conversations, params, use_tqdm=False)
    (single,) = llm.chat(conversations[0], params, use_tqdm=False)
    for conversation, out in zip(conversations, outputs):
        expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if not isinstance(expected, list) else expected
        assert out.prompt_token_ids == list(expected)
    assert single.outputs[0].token_ids == outputs[0].outputs[0].token_ids
    (no_prompt,) = llm.chat(conversations[0], params, use_tqdm=False, add_generation_prompt=False)
    assert len(no_prompt.prompt_token_ids) < len(single.prompt_token_ids)


def test_text_prompt_without_tokenizer_is_a_clear_error(tmp_path) -> None:
    tiny = make_tiny_engine("qwen2", tmp_path)
    llm = LLM(tiny.engine_dir, device="cpu")
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello", use_tqdm=False)
    (out,) = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=3), use_tqdm=False)
    assert out.outputs[0].text == "" and len(out.outputs[0].token_ids) <= 3
    assert not llm.engine.has_unfinished_requests()


def test_context_manager_shuts_the_engine_down(tiny: TinyEngine) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    with LLM(tiny.engine_dir, device="cpu", block_size=8, max_model_len=64) as llm:
        kv = weakref.ref(llm.engine.runner.kv_cache.kv[0])
        (out,) = llm.generate(PROMPTS[0], params, use_tqdm=False)
        assert len(out.outputs[0].token_ids) == 2
    assert kv() is None
    with pytest.raises(EngineShutDownError, match="shut down"):
        llm.generate(PROMPTS[0], params, use_tqdm=False)
