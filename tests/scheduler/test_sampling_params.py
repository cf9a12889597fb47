"""SamplingParams validation: every integer that later reaches a tensor is an int (not a bool)
inside the range of the tensor that holds it, and a bad one names its field."""

from __future__ import annotations

import pytest

from kiln.scheduler.sampling_params import INT64_MAX, INT64_MIN, SamplingParams, SamplingParamsError


@pytest.mark.parametrize("fields, param", [
    ({"seed": 2**64}, "seed"),  # torch.Generator.manual_seed refuses it inside an engine step
    ({"seed": INT64_MAX + 1}, "seed"),
    ({"seed": INT64_MIN - 1}, "seed"),
    ({"seed": INT64_MAX, "n": 2}, "seed"),  # choice 1 is seeded with seed + 1
    ({"seed": True}, "seed"),
    ({"top_k": INT64_MAX + 1}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"n": True}, "n"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 2**64}, "max_tokens"),
    ({"min_tokens": False}, "min_tokens"),
    ({"logprobs": True}, "logprobs"),
    ({"stop_token_ids": [2**64]}, "stop_token_ids"),
    ({"stop_token_ids": [True]}, "stop_token_ids"),
])
def test_integers_out_of_range_or_bools_name_their_field(fields, param):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**fields)
    assert info.value.param == param


def test_the_extremes_that_fit_are_accepted():
    SamplingParams(seed=INT64_MAX)
    SamplingParams(seed=INT64_MIN, n=3)
    SamplingParams(seed=INT64_MAX - 2, n=3)
    SamplingParams(top_k=INT64_MAX)  # wider than any vocabulary: the sampler keeps every token
    SamplingParams(max_tokens=INT64_MAX, min_tokens=INT64_MAX)
