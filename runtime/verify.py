"""Verification of draft tokens on the device: greedy acceptance and rejection sampling.

A verify step runs the target on each speculating request's last token plus its k draft
tokens, so it has k + 1 logits rows per request: row i predicts the token after draft i
(row 0 the token after the last known one). Every request of the step is verified the same
way (a request without drafts has one row and simply samples it).

Acceptance (Leviathan et al., shared/REFERENCE.md section 4), all on the device, no host sync:
  * the target distribution p at each row is the request's own: penalties (with the drafts
    before that row counted as outputs), min_tokens bans, temperature, top-k/top-p/min-p;
  * greedy rows accept draft i while it equals the target's argmax at row i - 1, so their
    output is token for token what non-speculative decoding gives;
  * random rows accept draft i with probability p(d_i) / q(d_i); every proposer drafts
    deterministically (n-gram lookup, a draft model's argmax), so q is one-hot and the test
    is u < p(d_i). At the first rejection the token is drawn from normalize(max(p - q, 0)),
    which is p with the rejected draft removed; when all k pass, a bonus token is drawn from
    the last row. The output distribution is then exactly the target's.

Random draws use the request's seeded generator when it has one (uniforms for the tests,
then the exponential race of the sampler for the final token), so a seeded request is
reproducible for a given speculation setting; a request without drafts consumes its
generator exactly as the plain sampler does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kiln.runtime.sampler import LogprobsTensors, Sampler, SamplingMetadata, exponential_race


@dataclass
class VerifyBatch:
    """The draft tokens of one step, per sampled request (logits row order).

    Invariants: ``num_drafts[s] <= drafts.shape[1] == K`` (the step's largest draft count);
    ``index[s, i]`` is the flat logits row of request s at position i, clamped to its last
    row (positions past its drafts repeat it); rows past a request's drafts in ``drafts`` are 0.
    """

    num_drafts: np.ndarray  # [S] int64, host
    drafts: torch.Tensor  # [S, K] int64
    index: torch.Tensor  # [S, K + 1] int64
    num_drafts_t: torch.Tensor  # [S] int64, on the device
    generators: dict[int, torch.Generator]  # request s -> its seeded generator (random rows only)

    @staticmethod
    def pack(num_drafts: np.ndarray, drafts: np.ndarray) -> np.ndarray:
        """[S, 2K + 2] int64: ``index``, the drafts, their count (one host-to-device copy).
        ``drafts`` is [S, K]; the flat logits hold 1 + n rows per request, in order."""
        starts = np.concatenate(([0], np.cumsum(num_drafts + 1)[:-1]))
        k = drafts.shape[1]
        index = starts[:, None] + np.minimum(np.arange(k + 1)[None, :], num_drafts[:, None])
        return np.concatenate((index, drafts, num_drafts[:, None]), axis=1).astype(np.int64)

    @classmethod
    def from_packed(cls, num_drafts: np.ndarray, packed: torch.Tensor,
                    generators: dict[int, torch.Generator]) -> VerifyBatch:
        """From ``pack``'s array, already on the device."""
        k = (packed.shape[1] - 2) // 2
        return cls(num_drafts, packed[:, k + 1: 2 * k + 1], packed[:, : k + 1], packed[:, -1], generators)

    @classmethod
    def build(cls, num_drafts: np.ndarray, drafts: np.ndarray, generators: dict[int, torch.Generator],
              device: torch.device) -> VerifyBatch:
        """From host arrays (tests; the runner stages ``pack`` with the step's inputs)."""
        packed = torch.from_numpy(cls.pack(num_drafts, drafts)).to(device)
        return cls.from_packed(num_drafts, packed, generators)


@dataclass
class VerifyOutput:
    """Per request: ``token_ids[s, :num_tokens[s]]`` are the accepted drafts then the
    target's own token (1 <= num_tokens[s] <= 1 + its drafts); ``logprobs`` (the target's
    raw log-softmax) are [S, K + 1] / [S, K + 1, k] and valid up to num_tokens too."""

    token_ids: torch.Tensor  # [S, K + 1] int64
    num_tokens: torch.Tensor  # [S] int64
    logprobs: LogprobsTensors | None

    def packed(self) -> torch.Tensor:
        """[S, K + 2]: the tokens then the count (one tensor to broadcast or copy)."""
        return torch.cat((self.token_ids, self.num_tokens.unsqueeze(1)), dim=1)


def verify(logits: torch.Tensor, batch: VerifyBatch, metadata: SamplingMetadata | None) -> VerifyOutput:
    """Accept drafts and draw each request's next token from the flat logits [L, V] (rows of
    ``batch.index``); ``metadata`` covers the L rows (None: all plain greedy)."""
    logits = logits.float()
    num_reqs, k1 = batch.index.shape
    k = k1 - 1
    raw_logprobs = None
    if metadata is not None and metadata.max_num_logprobs is not None:
        raw_logprobs = torch.log_softmax(logits, dim=-1)
    processed = logits if metadata is None else Sampler.process(logits, metadata)
    greedy = processed.argmax(dim=-1)  # [L]
    target = greedy[batch.index]  # [S, K + 1]
    device = logits.device
    num_drafts = batch.num_drafts_t
    has_draft = torch.arange(k, device=device).unsqueeze(0) < num_drafts.unsqueeze(1)
    accept = batch.drafts == target[:, :k]
    probs = None
    if metadata is not None and not metadata.all_greedy:
        probs = Sampler.random_probs(processed, metadata)
        random_rows = metadata.temperature.index_select(0, batch.index[:, 0]) != 0.0
        p_draft = probs[batch.index[:, :k], batch.drafts]  # [S, K]
        accept = torch.where(random_rows.unsqueeze(1), _uniforms(num_reqs, k, batch, device) < p_draft, accept)
    accept &= has_draft
    num_accepted = accept.long().cumprod(dim=1).sum(dim=1)  # leading accepted drafts
    at = batch.index.gather(1, num_accepted.unsqueeze(1)).squeeze(1)  # flat row of the next token
    final = greedy[at]
    if probs is not None:
        final = torch.where(random_rows, _draw_next(probs[at], batch, num_accepted, num_drafts), final)
    tokens = torch.cat((batch.drafts, torch.zeros_like(batch.drafts[:, :1])), dim=1)
    tokens.scatter_(1, num_accepted.unsqueeze(1), final.unsqueeze(1))
    logprobs = None
    if raw_logprobs is not None:
        logprobs = _logprobs(raw_logprobs, batch.index, tokens, metadata.max_num_logprobs or 0)
    return VerifyOutput(tokens, num_accepted + 1, logprobs)


def _uniforms(num_reqs: int, k: int, batch: VerifyBatch, device: torch.device) -> torch.Tensor:
    """U[0, 1) per (request, draft); seeded requests with drafts draw theirs from their generator."""
    u = torch.rand(num_reqs, k, device=device)
    for s, gen in batch.generators.items():
        if batch.num_drafts[s]:
            u[s].uniform_(generator=gen)
    return u


def _draw_next(dist: torch.Tensor, batch: VerifyBatch, num_accepted: torch.Tensor,
               num_drafts: torch.Tensor) -> torch.Tensor:
    """The token after the accepted drafts: from the residual p - q (p without the rejected
    draft) after a rejection, from p itself (the bonus token) when every draft passed."""
    rejected = num_accepted < num_drafts
    if batch.drafts.shape[1]:
        draft = batch.drafts.gather(1, num_accepted.clamp(max=batch.drafts.shape[1] - 1).unsqueeze(1))
        residual = dist.scatter(1, draft, 0.0)
        # p(d) == 1 is never rejected; keep p if rounding left the residual empty anyway.
        usable = rejected & (residual.sum(dim=1) > 0)
        dist = torch.where(usable.unsqueeze(1), residual, dist)
    return exponential_race(dist, batch.generators)


def _logprobs(raw: torch.Tensor, index: torch.Tensor, tokens: torch.Tensor, k: int) -> LogprobsTensors:
    chosen = raw[index, tokens]  # [S, K + 1]
    top_logprobs, top_ids = raw.topk(k, dim=-1)
    return LogprobsTensors(chosen=chosen, top_ids=top_ids[index], top_logprobs=top_logprobs[index])
