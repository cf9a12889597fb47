"""logit_bias and grammar token masks in the sampler, against references computed on the same
logits in float64 / from xgrammar's own bitmask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.runtime.sampler import Sampler, SamplingMetadata, SamplingRows, apply_token_bitmask
from kiln.scheduler.sampling_params import SamplingParams, SamplingParamsError, StructuredOutput

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
VOCAB = 100


def _metadata(params: list[SamplingParams], device: str, vocab: int = VOCAB) -> SamplingMetadata:
    rows = SamplingRows(len(params), vocab)
    for i, p in enumerate(params):
        rows.set(i, p)
    n = len(params)
    return rows.metadata(np.arange(n), [None] * n, [[]] * n, [[]] * n, vocab, device)


@pytest.mark.parametrize("device", DEVICES)
def test_logit_bias_matches_float64_reference(device):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, VOCAB, generator=gen)
    biases = [{3: 100.0}, {int(logits[1].argmax()): -100.0}, {5: 2.5, 7: -1.25, 9: 0.0}, None]
    params = [SamplingParams(temperature=0.0, logit_bias=b) for b in biases]
    md = _metadata(params, device)
    out = Sampler()(logits.to(device), md)
    reference = logits.double().clone()
    for i, b in enumerate(biases):
        for token, value in (b or {}).items():
            reference[i, token] += value
    assert out.sampled_token_ids.tolist() == reference.argmax(-1).tolist()
    assert out.sampled_token_ids[0] == 3  # +100 forces the token
    assert out.sampled_token_ids[1] == logits[1].topk(2).indices[1]  # -100 bans the argmax
    assert md.logit_bias[0].tolist() == [0, 1, 2, 2, 2]  # only biased rows carry entries


def test_logit_bias_random_rows_follow_the_biased_distribution():
    logits = torch.tensor([0.0, 0.0, 0.0, 0.0]).log_softmax(-1)
    params = SamplingParams(temperature=1.0, logit_bias={0: float(np.log(3.0))})  # p = (3, 1, 1, 1) / 6
    n = 20_000
    torch.manual_seed(0)
    draws = Sampler()(logits.repeat(n, 1), _metadata([params] * n, "cpu", vocab=4)).sampled_token_ids
    freq = torch.bincount(draws, minlength=4).double() / n
    assert freq.tolist() == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6], abs=0.015)


def test_logprobs_stay_the_models_own_under_bias():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.0, logprobs=2, logit_bias={11: 100.0})
    out = Sampler()(logits, _metadata([params], "cpu"))
    assert out.sampled_token_ids.item() == 11
    assert out.logprobs.chosen.item() == pytest.approx(float(logits.log_softmax(-1)[0, 11]), abs=1e-6)


def test_bad_logit_bias_is_refused():
    for bias, param in (({1: 101.0}, "logit_bias"), ({-1: 1.0}, "logit_bias"), ({1: float("nan")}, "logit_bias")):
        with pytest.raises(SamplingParamsError) as e:
            SamplingParams(logit_bias=bias)
        assert e.value.param == param
    with pytest.raises(ValueError, match="outside the vocabulary"):
        SamplingRows(1, VOCAB).set(0, SamplingParams(logit_bias={VOCAB: 1.0}))
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(min_tokens=2, structured_output=StructuredOutput("json_object"))
    assert e.value.param == "min_tokens"


@pytest.mark.parametrize("device", DEVICES)
def test_token_bitmask_matches_xgrammar(device):
    import xgrammar as xgr  # a runtime dependency (pyproject): missing it is a failure, not a skip
    vocab = 70  # not a multiple of 32: the last word is partly padding
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, vocab, generator=gen)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (2, -(-vocab // 32)), dtype=torch.int32, generator=gen)
    positions = torch.tensor([2, 0])
    got = apply_token_bitmask(logits.to(device), positions.to(device), bitmask.to(device)).cpu()
    want = logits.clone()
    full = torch.full((3, bitmask.shape[1]), -1, dtype=torch.int32)  # row 1: every token allowed
    full[positions] = bitmask
    xgr.apply_token_bitmask_inplace(want, full, vocab_size=vocab, backend="cpu")
    assert torch.equal(got, want)


def test_only_allowed_tokens_are_sampled():
    vocab = 40
    allowed = [3, 17, 33]
    bits = np.zeros(64, dtype=bool)
    bits[allowed] = True
    mask = torch.from_numpy(np.packbits(bits.reshape(-1, 32), axis=1, bitorder="little").view(np.int32).copy())
    n = 2000
    md = _metadata([SamplingParams(temperature=1.5)] * n, "cpu", vocab=vocab)
    md.allowed_tokens = (torch.arange(n), mask.reshape(1, -1).repeat(n, 1))
    torch.manual_seed(3)
    draws = Sampler()(torch.randn(n, vocab), md).sampled_token_ids
    assert set(draws.tolist()) == set(allowed)
