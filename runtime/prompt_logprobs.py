"""Prompt logprobs (``SamplingParams(prompt_logprobs=K)``, vLLM's meaning): for every prompt token
after the first, its logprob given the tokens before it, plus the K most likely tokens there.

The logits at position p predict the token at p + 1, so a prefill chunk covering positions
[start, start + n) of a request yields the prompt logprobs of positions start + 1 .. up to the
last prompt token (the logits of the last prompt position predict the first output token: that
one is sampled, not a prompt logprob). Chunked prefill therefore needs nothing special; prefix
caching would skip tokens, so the scheduler gives such requests no prefix hits (as vLLM does).
A request recomputed after a preemption reports positions again; the output side keeps the first.

The extra logits rows ride along with the sampled ones (one lm_head call); the step then waits
for them on the host (one extra sync, only in steps that compute prompt logprobs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Per request: (position of the prompt token, its logprob, [(token id, logprob)] top-K).
PromptLogprobEntry = tuple[int, float, list[tuple[int, float]]]


@dataclass
class PromptLogprobsBatch:
    """The prompt-logprob rows of one step. Row i scores prompt token ``targets[i]`` at
    ``positions[i]`` of request ``request_ids[owner[i]]`` from the logits of flattened batch
    token ``token_index[i]`` (a device tensor)."""

    request_ids: list[str]
    top_k: list[int]  # per request
    owner: np.ndarray  # [P] index into request_ids
    positions: np.ndarray  # [P]
    targets: np.ndarray  # [P] token ids
    token_index: torch.Tensor  # [P] int64, on the model's device

    @property
    def num_rows(self) -> int:
        return len(self.positions)

    def collect(self, logits: torch.Tensor) -> dict[str, list[PromptLogprobEntry]]:
        """Logprobs of the targets and the top-K from float32 logits [P, V]; host lists per request."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.as_tensor(self.targets, device=logprobs.device)
        chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        k = max(self.top_k)
        top_lps, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
        top_lps, top_ids = top_lps.tolist(), top_ids.tolist()
        out: dict[str, list[PromptLogprobEntry]] = {r: [] for r in self.request_ids}
        for i, owner in enumerate(self.owner.tolist()):
            request_k = self.top_k[owner]
            top = list(zip(top_ids[i][:request_k], top_lps[i][:request_k]))
            out[self.request_ids[owner]].append((int(self.positions[i]), chosen[i], top))
        return out


def plan_prompt_logprobs(request_ids: list[str], rows: np.ndarray, top_k: np.ndarray, starts: np.ndarray,
                         counts: np.ndarray, num_prompt: np.ndarray, token_ids: np.ndarray,
                         device: torch.device) -> PromptLogprobsBatch | None:
    """The step's prompt-logprob rows for the scheduled requests (batch order; per request its
    row of ``token_ids``, ``top_k`` < 0 when it wants none), or None when there are none."""
    query_start = np.concatenate(([0], np.cumsum(counts)[:-1]))
    # Positions p in [start, min(start + n, num_prompt - 1)) predict prompt tokens p + 1.
    ends = np.minimum(starts + counts, num_prompt - 1)
    wanted = np.flatnonzero((top_k >= 0) & (ends > starts))
    if not len(wanted):
        return None
    lengths = ends[wanted] - starts[wanted]
    owner = np.repeat(np.arange(len(wanted)), lengths)
    offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    positions = starts[wanted][owner] + offsets + 1
    targets = token_ids[rows[wanted][owner], positions].astype(np.int64)
    token_index = query_start[wanted][owner] + offsets
    return PromptLogprobsBatch(
        request_ids=[request_ids[b] for b in wanted], top_k=[int(top_k[b]) for b in wanted], owner=owner,
        positions=positions, targets=targets,
        token_index=torch.as_tensor(token_index, dtype=torch.int64).to(device, non_blocking=True))
