"""Draft verification (runtime/verify.py) against the target distribution it must preserve.

Rejection sampling is checked statistically: many copies of one request verified at once;
the first output token must follow p_0 (the request's processed distribution at the first
position), the token after an accepted draft must follow the next position's p, and the
bonus token after all drafts the last one's (chi-square, 99.9%). Greedy rows must accept
exactly while the argmax matches; a row without drafts must draw what the plain sampler draws.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from kiln.runtime.sampler import Sampler, SamplingMetadata
from kiln.runtime.verify import VerifyBatch, verify
from kiln.scheduler.sampling_params import SamplingParams

CPU = torch.device("cpu")


def metadata(params: list[SamplingParams], vocab: int) -> SamplingMetadata:
    n = len(params)
    return SamplingMetadata.build(params, [None] * n, [[]] * n, [[]] * n, vocab, CPU)


def chi_square_ok(tokens: torch.Tensor, probs: torch.Tensor) -> bool:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "drew a token of probability 0"
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return stat < chi2.ppf(0.999, int(keep.sum()) - 1)


def naive_probs(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    scaled = logits / temperature
    kth = scaled.topk(top_k).values[-1]
    return torch.softmax(scaled.masked_fill(scaled < kth, float("-inf")), dim=-1)


def test_rejection_sampling_preserves_the_target_distribution() -> None:
    torch.manual_seed(0)
    vocab, n = 6, 30000
    position_logits = torch.randn(3, vocab)  # rows after the last token, after d1, after d2
    params = SamplingParams(temperature=0.9, top_k=5)
    p = torch.stack([naive_probs(row, 0.9, 5) for row in position_logits])
    # The most likely tokens as drafts (probability well below 1): both outcomes happen often.
    d1, d2 = int(p[0].argmax()), int(p[1].argmax())
    assert p[0, d1] < 0.8 and p[1, d2] < 0.8
    logits = position_logits.repeat(n, 1)  # request s owns flat rows 3s, 3s+1, 3s+2
    batch = VerifyBatch.build(np.full(n, 2), np.tile([d1, d2], (n, 1)), {}, CPU)
    out = verify(logits, batch, metadata([params] * (3 * n), vocab))
    tokens, counts = out.token_ids, out.num_tokens
    assert chi_square_ok(tokens[:, 0], p[0])
    after_d1 = counts >= 2
    assert (tokens[after_d1, 0] == d1).all() and (tokens[~after_d1, 0] != d1).all()
    assert chi_square_ok(tokens[after_d1, 1], p[1])
    bonus = counts == 3
    assert (tokens[bonus, 1] == d2).all() and 1000 < int(bonus.sum()) < n
    assert chi_square_ok(tokens[bonus, 2], p[2])


def test_greedy_rows_accept_while_the_argmax_matches() -> None:
    vocab = 8
    # Request 0: argmaxes 3, 5, 1; drafts 3, 5 -> both accepted, bonus 1.
    # Request 1: argmaxes 2, 7; drafts 2, 6 -> first accepted, then the argmax 7 (1 draft only).
    # Request 2: no drafts, argmax 4.  Request 3: argmaxes 0, 6, 6; drafts 1, 6 -> none accepted, 0.
    argmax = [[3, 5, 1], [2, 7], [4], [0, 6, 6]]
    drafts = np.array([[3, 5], [2, 6], [0, 0], [1, 6]])
    num_drafts = np.array([2, 1, 0, 2])
    flat = [a for row in argmax for a in row]
    logits = torch.full((len(flat), vocab), -1.0)
    logits[torch.arange(len(flat)), torch.tensor(flat)] = 2.0
    out = verify(logits, VerifyBatch.build(num_drafts, drafts, {}, CPU), None)
    assert out.num_tokens.tolist() == [3, 2, 1, 1]
    assert [out.token_ids[s, :c].tolist() for s, c in enumerate(out.num_tokens.tolist())] == [
        [3, 5, 1], [2, 7], [4], [0]]
    # The same through the full path (metadata present, greedy params): the same tokens.
    md = metadata([SamplingParams(temperature=0.0)] * len(flat), vocab)
    again = verify(logits, VerifyBatch.build(num_drafts, drafts, {}, CPU), md)
    assert torch.equal(again.token_ids, out.token_ids) and torch.equal(again.num_tokens, out.num_tokens)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_seeded_row_without_drafts_draws_what_the_plain_sampler_draws(seed: int) -> None:
    torch.manual_seed(seed)
    vocab = 50
    logits = torch.randn(3, vocab)  # request 0: no drafts; request 1: one draft (2 rows)
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=seed)

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    plain = Sampler()(logits[:1], SamplingMetadata.build([params], [gen()], [[]], [[]], vocab, CPU))
    batch = VerifyBatch.build(np.array([0, 1]), np.array([[0], [7]]), {0: gen()}, CPU)
    out = verify(logits, batch, metadata([params] * 3, vocab))
    assert out.num_tokens[0] == 1 and out.token_ids[0, 0] == plain.sampled_token_ids[0]
