"""min_tokens: the sampler never picks EOS / stop_token_ids before a row has min_tokens
outputs. Checked on the sampler rows directly, and end to end against transformers'
``min_new_tokens`` (MinNewTokensLengthLogitsProcessor) on a tiny random Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_e2e_helpers import TinyEngine, drain, make_tiny_engine, random_prompts

from kiln.runtime import SamplingParams
from kiln.runtime.sampler import Sampler, SamplingRows

VOCAB = 12


def metadata_for(params: list[SamplingParams], eos: frozenset[int], num_outputs: list[int]):
    rows = SamplingRows(len(params), VOCAB)
    for i, p in enumerate(params):
        rows.set(i, p, eos)
    n = len(params)
    return rows.metadata(np.arange(n), [None] * n, [[]] * n, [[]] * n, VOCAB, "cpu", np.asarray(num_outputs))


def test_rows_under_min_tokens_never_sample_their_stop_ids() -> None:
    logits = torch.zeros(4, VOCAB)
    logits[:, 3] = 10.0  # EOS is by far the most likely token of every row
    logits[:, 7] = 9.0  # a stop token id, next most likely
    params = [
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[7]),  # 1 output: both banned
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[7]),  # 2 outputs: free again
        SamplingParams(temperature=0.0, min_tokens=5, ignore_eos=True, stop_token_ids=[7, 99]),  # EOS allowed
        SamplingParams(temperature=1.0, min_tokens=3, logprobs=2),  # random row: EOS banned
    ]
    md = metadata_for(params, frozenset({3}), [1, 2, 0, 0])
    out = Sampler()(logits, md)
    ids = out.sampled_token_ids.tolist()
    assert ids[0] not in (3, 7) and ids[1] == 3 and ids[2] == 3 and ids[3] != 3
    # Logprobs stay those of the raw logits: EOS is still reported as the most likely.
    assert out.logprobs.top_ids[3].tolist() == [3, 7]
    for _ in range(20):  # random draws of the banned row never hit EOS
        assert Sampler()(logits[3:], metadata_for(params[3:], frozenset({3}), [0])).sampled_token_ids.item() != 3


def test_no_ban_without_min_tokens_or_stop_ids() -> None:
    md = metadata_for([SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True)],
                      frozenset({3}), [0, 0])
    assert md.banned is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyEngine:
    return make_tiny_engine("llama", tmp_path_factory.mktemp("engine"))


def hf_generate(tiny: TinyEngine, prompt: list[int], eos: int, min_new: int, max_new: int) -> list[int]:
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        out = tiny.hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                     max_new_tokens=max_new, min_new_tokens=min_new, eos_token_id=eos,
                                     pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_min_tokens_matches_transformers_min_new_tokens(tiny: TinyEngine) -> None:
    engine = tiny.engine()
    (prompt,) = random_prompts(21, [7], tiny.vocab_size)
    plain = tiny.hf_greedy(prompt, 12)
    eos = plain[1]  # greedy would emit this "EOS" as its 2nd token
    engine.eos_token_ids = frozenset({eos})
    engine.add_request("plain", prompt, SamplingParams(temperature=0.0, max_tokens=12))
    engine.add_request("min", prompt, SamplingParams(temperature=0.0, max_tokens=12, min_tokens=6))
    engine.add_request("stop", prompt, SamplingParams(temperature=0.0, max_tokens=12, min_tokens=6, ignore_eos=True,
                                                     stop_token_ids=[eos]))
    engine.add_request("ignore", prompt, SamplingParams(temperature=0.0, max_tokens=12, min_tokens=6, ignore_eos=True))
    results = drain(engine)
    assert results["plain"].outputs[0].token_ids == plain[:2]  # stops at once without min_tokens
    expected = hf_generate(tiny, prompt, eos, 6, 12)
    assert eos not in expected[:6]
    for rid in ("min", "stop"):
        choice = results[rid].outputs[0]
        assert choice.token_ids == expected
        assert eos not in choice.token_ids[:6]
    assert results["ignore"].outputs[0].token_ids == plain  # ignore_eos: EOS is not banned at all
