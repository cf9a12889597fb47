"""Sampler tests: each behaviour is checked against a direct naive computation or exact support."""

from __future__ import annotations

import collections
import pytest
import torch

from kiln.runtime.sampler import Sampler, SamplingMetadata, apply_penalties
from kiln.scheduler.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def build(params, vocab, device="cpu", generators=None, prompts=None, outputs=None):
    n = len(params)
    return SamplingMetadata.build(
        params,
        generators or [None] * n,
        prompts or [[] for _ in range(n)],
        outputs or [[] for _ in range(n)],
        vocab,
        device,
    )


def seeded(seed: int, device: str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def sample_rows(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """Sample n times from one distribution by batching n copies of the row."""
    torch.manual_seed(seed)
    logits = logits_row.unsqueeze(0).repeat(n, 1)
    return Sampler()(logits, build([params] * n, logits.shape[1])).sampled_token_ids


def support(tokens: torch.Tensor) -> set[int]:
    return set(tokens.tolist())


PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def test_metadata_flags_and_greedy_normalisation():
    params = [SamplingParams(temperature=0.0, top_k=5, top_p=0.5),
              SamplingParams(top_k=1, temperature=0.8),
              SamplingParams(temperature=0.7, top_p=0.9, logprobs=3),
              SamplingParams(min_p=0.1, logprobs=1)]
    md = build(params, 10)
    assert md.temperature.tolist()[:2] == [0.0, 0.0]
    assert md.top_k.tolist() == [0, 0, 0, 0]
    assert md.top_p.tolist()[:2] == [1.0, 1.0]
    assert not md.all_greedy and not md.all_random
    assert md.no_top_k and not md.no_top_p and not md.no_min_p
    assert md.no_penalties and md.prompt_token_ids is None and md.output_token_ids is None
    assert md.max_num_logprobs == 3
    assert build([SamplingParams()], 10).max_num_logprobs is None
    assert md.max_top_k is None
    ks = build([SamplingParams(top_k=5), SamplingParams(top_k=9), SamplingParams(temperature=0.0)], 10)
    assert ks.max_top_k == 9 and not ks.no_top_k


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_rows_take_argmax_in_mixed_batch(device):
    torch.manual_seed(1)
    logits = torch.randn(6, 40, device=device)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
              SamplingParams(top_k=1), SamplingParams(temperature=1.5, top_p=0.5),
              SamplingParams(top_k=1, temperature=2.0), SamplingParams(temperature=0.0, top_p=0.1)]
    out = Sampler()(logits, build(params, 40, device)).sampled_token_ids
    expected = logits.argmax(dim=-1)
    for row in (0, 2, 4, 5):
        assert out[row] == expected[row]
    all_greedy = Sampler()(logits, build([SamplingParams(temperature=0.0)] * 6, 40, device))
    assert torch.equal(all_greedy.sampled_token_ids, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_row_does_not_depend_on_batch(device):
    vocab = 50
    torch.manual_seed(2)
    row_logits = torch.randn(vocab, device=device)
    params = SamplingParams(temperature=1.3, top_p=0.95, seed=7)

    def run(position: int, batch: int, steps: int = 8) -> list[int]:
        gen = seeded(1234, device)
        tokens = []
        for _ in range(steps):
            logits = torch.randn(batch, vocab, device=device)
            logits[position] = row_logits
            plist = [SamplingParams(temperature=0.9)] * batch
            plist[position] = params
            gens = [None] * batch
            gens[position] = gen
            out = Sampler()(logits, build(plist, vocab, device, generators=gens))
            tokens.append(int(out.sampled_token_ids[position]))
        return tokens

    first = run(0, 1)
    assert first == run(2, 5) == run(3, 4)
    assert len(set(first)) > 1  # really random, not accidentally greedy


def test_top_k_keeps_exactly_k_most_likely():
    assert support(sample_rows(LOGITS, SamplingParams(top_k=2), 4000)) == {0, 1}
    assert support(sample_rows(LOGITS, SamplingParams(top_k=3), 4000)) == {0, 1, 2}
    assert support(sample_rows(LOGITS, SamplingParams(top_k=-1), 4000)) == {0, 1, 2, 3}


def test_top_p_keeps_smallest_prefix_reaching_p():
    assert support(sample_rows(LOGITS, SamplingParams(top_p=0.3), 4000)) == {0}
    assert support(sample_rows(LOGITS, SamplingParams(top_p=0.75), 4000)) == {0, 1}
    assert support(sample_rows(LOGITS, SamplingParams(top_p=0.85), 4000)) == {0, 1, 2}
    # After top_k=3 the kept mass renormalises to [.526, .316, .158]: 0.842 >= 0.83, so the
    # third token goes (it would stay if top-p ignored the top-k renormalisation).
    assert support(sample_rows(LOGITS, SamplingParams(top_k=3, top_p=0.83), 4000)) == {0, 1}


def test_min_p_drops_tokens_below_fraction_of_max():
    assert support(sample_rows(LOGITS, SamplingParams(min_p=0.25), 4000)) == {0, 1, 2}
    assert support(sample_rows(LOGITS, SamplingParams(min_p=0.5), 4000)) == {0, 1}
    assert support(sample_rows(LOGITS, SamplingParams(min_p=0.0), 4000)) == {0, 1, 2, 3}


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    n = tokens.numel()
    counts = torch.bincount(tokens.cpu(), minlength=probs.numel()).double()
    expected = probs.double() * n
    keep = expected > 0
    assert counts[~keep].sum() == 0, "sampled a token of probability 0"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# 99.9% quantile of chi-square with 5 degrees of freedom is 20.5; seeds are fixed.
CHI2_LIMIT_DF5 = 20.5


def test_temperature_sampling_matches_softmax():
    torch.manual_seed(3)
    logits = torch.randn(6) * 2
    for temp in (0.5, 1.0, 1.7):
        tokens = sample_rows(logits, SamplingParams(temperature=temp), 20000, seed=int(temp * 10))
        assert chi_square(tokens, torch.softmax(logits / temp, dim=-1)) < CHI2_LIMIT_DF5


def test_seeded_rows_follow_the_distribution_too():
    torch.manual_seed(4)
    logits = torch.randn(6)
    n = 4000
    gens = [seeded(i, "cpu") for i in range(n)]
    params = [SamplingParams(temperature=0.8, seed=i) for i in range(n)]
    md = build(params, 6, generators=gens)
    tokens = Sampler()(logits.unsqueeze(0).repeat(n, 1), md).sampled_token_ids
    assert chi_square(tokens, torch.softmax(logits / 0.8, dim=-1)) < CHI2_LIMIT_DF5


def test_top_k_top_p_frequencies_renormalise():
    tokens = sample_rows(LOGITS, SamplingParams(top_k=3, temperature=1.0), 20000, seed=5)
    kept = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    # Only 3 tokens kept: df=2, 99.9% quantile 13.8.
    assert chi_square(tokens, kept) < 13.8


def naive_penalties(logits, prompt, output, params):
    out = logits.clone()
    for r, p in enumerate(params):
        for tok in set(prompt[r]) | set(output[r]):
            v = out[r, tok]
            out[r, tok] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
        for tok, count in collections.Counter(output[r]).items():
            out[r, tok] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_match_naive(device):
    vocab = 30
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(5, vocab, generator=gen) * 3
    params = [SamplingParams(repetition_penalty=1.3),
              SamplingParams(presence_penalty=0.7, frequency_penalty=0.4),
              SamplingParams(),  # neutral row in a penalised batch
              SamplingParams(repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=1.1),
              SamplingParams(frequency_penalty=-1.0)]
    prompts = [torch.randint(0, vocab, (int(n),), generator=gen).tolist() for n in (7, 3, 9, 1, 0)]
    outputs = [torch.randint(0, vocab, (int(n),), generator=gen).tolist() for n in (4, 12, 2, 6, 9)]
    md = build(params, vocab, device, prompts=prompts, outputs=outputs)
    got = apply_penalties(logits.to(device), md).cpu()
    assert torch.allclose(got, naive_penalties(logits, prompts, outputs, params), atol=1e-5)

    greedy = [SamplingParams(temperature=0.0, repetition_penalty=p.repetition_penalty,
                             presence_penalty=p.presence_penalty,
                             frequency_penalty=p.frequency_penalty) for p in params]
    md = build(greedy, vocab, device, prompts=prompts, outputs=outputs)
    sampled = Sampler()(logits.to(device), md).sampled_token_ids.cpu()
    assert torch.equal(sampled, naive_penalties(logits, prompts, outputs, params).argmax(-1))


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(1, 25, generator=gen) * 2
    prompt, output = [1, 4, 4, 9], [9, 17, 3]
    md = build([SamplingParams(repetition_penalty=1.7)], 25, prompts=[prompt], outputs=[output])
    expected = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + output]), logits.clone())
    assert torch.allclose(apply_penalties(logits, md), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_raw_log_softmax(device):
    torch.manual_seed(9)
    vocab = 64
    logits = torch.randn(4, vocab, device=device) * 2
    params = [SamplingParams(temperature=0.6, logprobs=5, presence_penalty=1.5),
              SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=2.0),
              SamplingParams(top_k=3),
              SamplingParams(temperature=1.2, top_p=0.5, logprobs=0)]
    outputs = [[1, 2, 3], [int(logits[1].argmax())], [], [5]]
    md = build(params, vocab, device, prompts=[[0]] * 4, outputs=outputs)
    out = Sampler()(logits, md)
    ref = torch.log_softmax(logits.double(), dim=-1).float()
    lp = out.logprobs
    assert lp is not None and lp.top_ids.shape == (4, 5) and lp.top_logprobs.shape == (4, 5)
    chosen_ref = ref.gather(1, out.sampled_token_ids.unsqueeze(1)).squeeze(1)
    assert torch.allclose(lp.chosen, chosen_ref, atol=1e-5)
    order = ref.argsort(dim=-1, descending=True)[:, :5]
    assert torch.equal(lp.top_ids, order)
    assert torch.allclose(lp.top_logprobs, ref.gather(1, order), atol=1e-5)
    assert bool((lp.top_logprobs[:, :-1] >= lp.top_logprobs[:, 1:]).all())
    assert Sampler()(logits, build([SamplingParams()] * 4, vocab, device)).logprobs is None


def test_only_finite_token_is_ever_sampled():
    vocab = 16
    logits = torch.full((vocab, vocab), float("-inf"))
    logits[torch.arange(vocab), torch.arange(vocab).flip(0)] = 0.0
    params = [SamplingParams(temperature=1.0 + i / vocab, top_p=0.9, min_p=0.1) for i in range(vocab)]
    out = Sampler()(logits, build(params, vocab)).sampled_token_ids
    assert out.dtype == torch.int64
    assert out.tolist() == list(range(vocab))[::-1]


def naive_top_k_top_p_support(row: torch.Tensor, k: int, p: float) -> set[int]:
    order = sorted(range(row.numel()), key=lambda i: -float(row[i]))
    kept = order[:k] if k > 0 else order
    probs = torch.softmax(row[kept].double(), dim=0).tolist()
    support, mass = set(), 0.0
    for tok, prob in zip(kept, probs):
        if support and (p < 1.0 and mass >= p):
            break
        support.add(tok)
        mass += prob
    return support


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_top_p_mask_matches_naive_on_both_paths(device):
    from kiln.runtime.sampler import apply_top_k_top_p

    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(8, 300, generator=gen) * 3
    ks = [0, 1, 5, 40, 300, 7, 0, 2]
    ps = [1.0, 0.5, 0.9, 0.6, 0.95, 1.0, 0.3, 0.99]
    top_k = torch.tensor(ks, dtype=torch.int32, device=device)
    top_p = torch.tensor(ps, device=device)
    full = apply_top_k_top_p(logits.to(device), top_k, top_p).cpu()
    for r in range(8):
        kept = set(torch.isfinite(full[r]).nonzero().flatten().tolist())
        assert kept == naive_top_k_top_p_support(logits[r], ks[r], ps[r]), r
    # The topk-width path (every row has top-k) gives the same masked logits.
    rows = [r for r in range(8) if ks[r] > 0]
    sub_k, sub_p = top_k[rows], top_p[rows]
    fast = apply_top_k_top_p(logits[rows].to(device), sub_k, sub_p, max_top_k=max(ks)).cpu()
    assert torch.equal(fast, full[rows])
    assert torch.equal(apply_top_k_top_p(logits[rows].to(device), sub_k, None, max(ks)).cpu(),
                       apply_top_k_top_p(logits[rows].to(device), sub_k, None).cpu())
