"""The prompt-length pre-check's bound (server/tokenizing.py) against real tokenization: a text
never has fewer tokens than ``PromptBound.min_tokens`` says, for the SmolLM2 tokenizer and a
SentencePiece-style one, on hostile text (long whitespace runs, characters the vocabulary
cannot spell, astral planes); and tokenizers whose pipeline may drop or merge input get no
bound at all."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

from kiln.server.tokenizing import prompt_bound

# Whitespace runs (the longest tokens), control characters SmolLM2 cannot spell, astral ones.
_PIECES = st.sampled_from([" ", "\n", "\t", " " * 16, "\n" + " " * 80, "\x04", "\x1d", "a", "the", "<|im_start|>",
                           "\U000e0041", "\U000f0000", "😀", "日本"])
HOSTILE_TEXT = st.lists(st.one_of(_PIECES, st.text(max_size=8)), max_size=200).map("".join)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_hf_dir))


@pytest.fixture(scope="module")
def smollm2_bound(smollm2_tokenizer):
    return prompt_bound(smollm2_tokenizer)


def test_smollm2_bound_is_tight_on_its_longest_token(smollm2_tokenizer, smollm2_bound):
    bound = smollm2_bound
    assert bound is not None and bound.bytes_per_token == 81  # "\n" + 80 spaces is one token
    text = ("\n" + " " * 80) * 10
    assert len(smollm2_tokenizer(text)["input_ids"]) == bound.min_tokens(text) == 10
    assert bound.min_tokens("\x04" * 1000) == 0  # SmolLM2 drops the bytes it cannot spell


@settings(max_examples=300, deadline=None)
@given(text=HOSTILE_TEXT)
def test_smollm2_never_has_fewer_tokens_than_the_bound(smollm2_tokenizer, smollm2_bound, text):
    assert len(smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]) >= smollm2_bound.min_tokens(text)


def _sentencepiece_style(**changes) -> Tokenizer:
    """A Llama-2-like BPE: "▁" for spaces, byte fallback, runs of "▁" as long tokens."""
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    pieces = ["▁", "a", "b", "▁▁", "▁▁▁▁", "▁▁▁▁▁▁▁▁", "ab", "▁ab"]
    vocab.update({p: 257 + i for i, p in enumerate(pieces)})
    merges = [("▁", "▁"), ("▁▁", "▁▁"), ("▁▁▁▁", "▁▁▁▁"), ("a", "b"), ("▁", "ab")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = changes.get("normalizer", normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]))
    if "pre_tokenizer" in changes:
        tok.pre_tokenizer = changes["pre_tokenizer"]
    return tok


_SENTENCEPIECE = _sentencepiece_style()


@settings(max_examples=300, deadline=None)
@given(text=HOSTILE_TEXT)
def test_a_sentencepiece_style_tokenizer_never_beats_its_bound(text):
    tok = _SENTENCEPIECE
    bound = prompt_bound(SimpleNamespace(backend_tokenizer=tok))
    assert bound is not None and bound.bytes_per_token == 24  # 8 x "▁" (3 bytes each)
    assert len(tok.encode(text).ids) >= bound.min_tokens(text)


@pytest.mark.parametrize("why, make", [
    ("a normalizer that composes characters", lambda: _sentencepiece_style(normalizer=normalizers.NFC())),
    ("a pre-tokenizer that drops whitespace", lambda: _sentencepiece_style(pre_tokenizer=pre_tokenizers.Whitespace())),
    ("an added token that swallows whitespace", lambda: _with_added(AddedToken("<x>", lstrip=True))),
    ("unknown characters fused into one token", lambda: Tokenizer(models.BPE(
        vocab={"<unk>": 0, "a": 1}, merges=[], unk_token="<unk>", fuse_unk=True))),
])
def test_no_bound_when_the_pipeline_may_drop_or_merge_input(why, make):
    assert prompt_bound(SimpleNamespace(backend_tokenizer=make())) is None, why


def _with_added(token: AddedToken) -> Tokenizer:
    tok = _sentencepiece_style()
    tok.add_special_tokens([token])
    return tok


def test_no_bound_without_a_fast_tokenizer():
    assert prompt_bound(None) is None and prompt_bound(object()) is None
