"""Vectorised sampling over a batch: penalties, greedy, temperature, top-k/top-p/min-p, logprobs.

Everything runs as whole-batch tensor ops on the logits' device. The only Python loop is over
rows that carry their own seeded ``torch.Generator`` (so a seeded request draws the same noise
whatever batch it runs in). No ``.item()`` or other host syncs happen here; the flags in
``SamplingMetadata`` are plain Python bools computed once on the CPU when the batch is built.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kiln.scheduler.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_NEG_INF = float("-inf")
_INT32_MAX = 2**31 - 1


@dataclass
class SamplingMetadata:
    """Per-row sampling settings of one step, as tensors on the logits' device.

    Invariants kept by ``build``: greedy rows (temperature 0 or top_k 1) have temperature 0
    and their top_k/top_p/min_p switched off, so the flags describe the random rows only;
    token-id tensors are padded with ``vocab_size`` (one past the last real id) and are None
    when ``no_penalties``; ``generators`` maps row index -> generator for seeded random rows.
    """

    temperature: torch.Tensor  # [S] float32, 0 = greedy row
    top_p: torch.Tensor  # [S] float32, 1 = off
    top_k: torch.Tensor  # [S] int32, 0 or -1 = off
    min_p: torch.Tensor  # [S] float32, 0 = off
    repetition_penalty: torch.Tensor  # [S] float32, 1 = off
    presence_penalty: torch.Tensor  # [S] float32
    frequency_penalty: torch.Tensor  # [S] float32
    generators: dict[int, torch.Generator]
    prompt_token_ids: torch.Tensor | None  # [S, Lp] int64, padded with vocab_size
    output_token_ids: torch.Tensor | None  # [S, Lo] int64, padded with vocab_size
    max_num_logprobs: int | None
    all_greedy: bool
    all_random: bool
    no_penalties: bool
    no_top_k: bool
    no_top_p: bool
    no_min_p: bool
    # Largest top_k over random rows when every random row uses top-k (else None): lets the
    # sampler take torch.topk of that width instead of sorting the whole vocabulary.
    max_top_k: int | None = None
    # (row indices, token ids) whose logits are -inf before sampling: EOS / stop ids of rows
    # that have fewer than min_tokens outputs. None when no row needs it.
    banned: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingMetadata:
        """Turn one step's per-request settings into batch tensors (one copy per tensor)."""
        rows = SamplingRows(len(params), vocab_size)
        for i, p in enumerate(params):
            rows.set(i, p)
        return rows.metadata(np.arange(len(params)), generators, prompt_ids, output_ids, vocab_size, device)


class SamplingRows:
    """Per-row sampling settings kept as numpy arrays, so a step gathers them by row index
    instead of rebuilding them from SamplingParams objects.

    Invariants: row r holds the settings last ``set`` for it, already normalised the way
    SamplingMetadata wants them (greedy rows: temperature 0, top_k 0, top_p 1, min_p 0; a
    top_k of at least the vocabulary, or beyond int32 when it is unknown, is stored as 0: off);
    ``logprobs[r]`` is -1 when the row asked for none; ``min_tokens[r]`` is 0 unless the row
    has ids to ban (``stop_ids[r]``: its EOS unless ignore_eos, and its stop_token_ids, all
    inside the vocabulary) while it has fewer than that many outputs.
    """

    def __init__(self, num_rows: int, vocab_size: int | None = None) -> None:
        self.floats = np.zeros((6, num_rows), dtype=np.float32)  # temperature, top_p, min_p, rep, pres, freq
        self.top_k = np.zeros(num_rows, dtype=np.int32)
        self.greedy = np.ones(num_rows, dtype=bool)
        self.penalties = np.zeros(num_rows, dtype=bool)
        self.logprobs = np.full(num_rows, -1, dtype=np.int32)
        self.min_tokens = np.zeros(num_rows, dtype=np.int64)
        self.stop_ids: list[tuple[int, ...]] = [()] * num_rows
        self.vocab_size = vocab_size

    def set(self, row: int, p: SamplingParams, eos_token_ids: frozenset[int] = frozenset()) -> None:
        greedy = p.greedy
        self.floats[:, row] = (0.0 if greedy else p.temperature, 1.0 if greedy else p.top_p,
                               0.0 if greedy else p.min_p, p.repetition_penalty, p.presence_penalty,
                               p.frequency_penalty)
        # A top_k as wide as the vocabulary keeps every token: off (and it fits the int32 row).
        wide = p.top_k >= (self.vocab_size or _INT32_MAX)
        self.top_k[row] = 0 if greedy or p.top_k <= 0 or wide else p.top_k
        self.greedy[row] = greedy
        self.penalties[row] = p.needs_penalties
        self.logprobs[row] = -1 if p.logprobs is None else p.logprobs
        stops: set[int] = set(p.stop_token_ids) if p.min_tokens else set()
        if p.min_tokens and not p.ignore_eos:
            stops |= eos_token_ids
        if self.vocab_size is not None:
            stops = {t for t in stops if t < self.vocab_size}  # ids past the vocab can never be sampled
        self.stop_ids[row] = tuple(sorted(stops))
        self.min_tokens[row] = p.min_tokens if stops else 0

    def banning_rows(self, rows: np.ndarray, num_outputs: np.ndarray) -> np.ndarray:
        """Positions i (into ``rows``) whose row must not sample a stop id yet: it has fewer
        than min_tokens outputs (the scheduler ignores stops there, see scheduler/stopping.py)."""
        return np.flatnonzero(self.min_tokens[rows] > num_outputs)

    def banned(self, rows: np.ndarray, positions: np.ndarray, device: torch.device | str
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(batch row, token id) index tensors of the ids banned at ``positions``."""
        if not len(positions):
            return None
        stop_ids = self.stop_ids
        pos_list, ids = [], []
        for i in positions.tolist():  # only rows still under min_tokens, usually few
            row_ids = stop_ids[int(rows[i])]
            pos_list.extend([i] * len(row_ids))
            ids.extend(row_ids)
        pairs = torch.tensor([pos_list, ids], dtype=torch.int64)
        pairs = _to_device(pairs, device)
        return pairs[0], pairs[1]

    def plain_greedy(self, rows: np.ndarray) -> bool:
        """True when every row is greedy without penalties, logprobs or a min_tokens ban:
        a bare argmax (the caller checks the ban, see ``banning_rows``)."""
        return bool(self.greedy[rows].all() and not self.penalties[rows].any() and (self.logprobs[rows] < 0).all())

    def metadata(
        self,
        rows: np.ndarray,
        generators: Sequence[torch.Generator | None],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str,
        num_outputs: np.ndarray | None = None,
    ) -> SamplingMetadata:
        """SamplingMetadata of ``rows`` (in that order); generators and token ids are per row
        of the result; ``num_outputs`` (outputs so far per row, None = min_tokens is not
        checked) drives the min_tokens ban. Two host-to-device copies: the float settings
        and top_k (a third for the ban, when some row needs it)."""
        floats = self.floats[:, rows]
        top_k = self.top_k[rows]
        greedy = self.greedy[rows]
        uses_penalties = self.penalties[rows]
        no_penalties = not uses_penalties.any()
        prompt_t = output_t = None
        if not no_penalties:
            # Rows without penalties get empty lists: their padding is never read as a token.
            prompt_t = _padded([ids if u else [] for ids, u in zip(prompt_ids, uses_penalties)], vocab_size, device)
            output_t = _padded([ids if u else [] for ids, u in zip(output_ids, uses_penalties)], vocab_size, device)
        requested = self.logprobs[rows]
        random_ks = top_k[~greedy]
        float_t = _to_device(torch.from_numpy(np.ascontiguousarray(floats)), device)
        return SamplingMetadata(
            temperature=float_t[0], top_p=float_t[1], top_k=_to_device(torch.from_numpy(top_k), device),
            min_p=float_t[2], repetition_penalty=float_t[3], presence_penalty=float_t[4],
            frequency_penalty=float_t[5],
            # Greedy rows draw no noise, so their generators are not needed.
            generators={i: g for i, g in enumerate(generators) if g is not None and not greedy[i]},
            prompt_token_ids=prompt_t,
            output_token_ids=output_t,
            max_num_logprobs=int(requested.max()) if (requested >= 0).any() else None,
            all_greedy=bool(greedy.all()),
            all_random=not greedy.any(),
            no_penalties=bool(no_penalties),
            no_top_k=not top_k.any(),
            no_top_p=bool((floats[1] >= 1.0).all()),
            no_min_p=not floats[2].any(),
            max_top_k=int(random_ks.max()) if len(random_ks) and random_ks.min() > 0 else None,
            banned=None if num_outputs is None else self.banned(rows, self.banning_rows(rows, num_outputs), device),
        )


def _to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a CPU tensor to ``device``; pinned and non-blocking when the target is CUDA."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _padded(rows: Sequence[Sequence[int]], pad: int, device: torch.device | str) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), pad, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.as_tensor(r, dtype=torch.int64)
    return _to_device(out, device)


@dataclass
class LogprobsTensors:
    """Logprobs (log_softmax of the raw logits) of the sampled token and the k most likely.

    ``top_ids``/``top_logprobs`` rows are sorted by descending logprob.
    """

    chosen: torch.Tensor  # [S] float32
    top_ids: torch.Tensor  # [S, k] int64
    top_logprobs: torch.Tensor  # [S, k] float32


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [S] int64
    logprobs: LogprobsTensors | None


class Sampler:
    """Stateless batch sampler; see the module docstring for the order of operations."""

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)

        if not metadata.no_penalties:
            logits = apply_penalties(logits, metadata)
        if metadata.banned is not None:  # after the raw logprobs: those stay unprocessed
            logits = logits.index_put(metadata.banned, logits.new_full((), _NEG_INF))

        if metadata.all_greedy:
            sampled = logits.argmax(dim=-1)
        else:
            sampled = self._sample_random(logits, metadata)
            if not metadata.all_random:
                greedy_ids = logits.argmax(dim=-1)
                sampled = torch.where(metadata.temperature == 0.0, greedy_ids, sampled)

        logprobs = None
        if raw_logprobs is not None:
            logprobs = _gather_logprobs(raw_logprobs, sampled, metadata.max_num_logprobs or 0)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)

    @staticmethod
    def _sample_random(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        # Greedy rows divide by 1 here; their result is replaced by the argmax afterwards.
        temperature = torch.where(md.temperature == 0.0, 1.0, md.temperature)
        logits = logits / temperature.unsqueeze(1)
        if not (md.no_top_k and md.no_top_p):
            logits = apply_top_k_top_p(logits, None if md.no_top_k else md.top_k,
                                       None if md.no_top_p else md.top_p, md.max_top_k)
        if not md.no_min_p:
            logits = apply_min_p(logits, md.min_p)
        probs = torch.softmax(logits, dim=-1)
        return exponential_race(probs, md.generators)


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition penalty over prompt+output tokens, then OpenAI presence/frequency over output.

    Returns a new tensor. Rows whose penalties are neutral come out unchanged.
    """
    num_rows, vocab = logits.shape
    # One extra column absorbs the padding id (== vocab), then is dropped.
    counts = torch.zeros(num_rows, vocab + 1, dtype=logits.dtype, device=logits.device)
    if md.output_token_ids is not None and md.output_token_ids.shape[1] > 0:
        out_ids = md.output_token_ids
        counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=logits.dtype))
    counts = counts[:, :vocab]
    seen = counts > 0
    if md.prompt_token_ids is not None and md.prompt_token_ids.shape[1] > 0:
        in_prompt = torch.zeros(num_rows, vocab + 1, dtype=torch.bool, device=logits.device)
        in_prompt.scatter_(1, md.prompt_token_ids, True)
        seen = seen | in_prompt[:, :vocab]

    rep = md.repetition_penalty.unsqueeze(1)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - md.frequency_penalty.unsqueeze(1) * counts
    return logits - md.presence_penalty.unsqueeze(1) * (counts > 0).to(logits.dtype)


# Above this width torch.topk is no cheaper than a full sort.
_TOPK_FAST_LIMIT = 1024


def apply_top_k_top_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    max_top_k: int | None = None,
) -> torch.Tensor:
    """Mask (to -inf) everything outside each row's top-k, then outside its top-p nucleus.

    The nucleus is taken over the distribution renormalised after top-k: the smallest prefix
    (by descending probability) whose mass reaches top_p; the most likely token always stays.
    ``max_top_k`` (every row uses top-k, none above it) allows a topk of that width instead
    of a full sort.
    """
    vocab = logits.shape[-1]
    if top_k is not None and max_top_k is not None and max_top_k <= min(_TOPK_FAST_LIMIT, vocab):
        width = max_top_k
        sorted_logits, sorted_ids = logits.topk(width, dim=-1)
    else:
        width = vocab
        sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        ranks = torch.arange(width, device=logits.device).unsqueeze(0)
        k = torch.where(top_k > 0, top_k.to(torch.int64), width).clamp(max=width)
        sorted_logits = sorted_logits.masked_fill(ranks >= k.unsqueeze(1), _NEG_INF)
    if top_p is not None:
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # Rows with top_p == 1 keep all: float cumsum may reach 1.0 before the tail ends.
        drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, _NEG_INF)
    if width == vocab:
        return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)
    return torch.full_like(logits, _NEG_INF).scatter_(1, sorted_ids, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the row's top probability."""
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, _NEG_INF)


def exponential_race(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Sample one index per row: argmax(probs / E) with E ~ Exp(1) is a draw from probs.

    Seeded rows refill their noise from their own generator so their draw does not depend
    on the batch; every other row shares one batched draw.
    """
    noise = torch.empty_like(probs).exponential_()
    for row, gen in generators.items():
        noise[row].exponential_(generator=gen)
    # An exact 0 draw would make 0/0 = nan for masked tokens; clamp keeps them at 0.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def _gather_logprobs(raw_logprobs: torch.Tensor, sampled: torch.Tensor, k: int) -> LogprobsTensors:
    chosen = raw_logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1)
    top_logprobs, top_ids = raw_logprobs.topk(k, dim=-1)
    return LogprobsTensors(chosen=chosen, top_ids=top_ids, top_logprobs=top_logprobs)
