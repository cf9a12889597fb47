"""Paged attention: the pure-torch reference and the dispatch to Triton kernels.

The reference functions have the exact signatures of DESIGN.md "Kernel API" and are
vectorised over the batch: each sequence's context is gathered through its block table into
a padded [B, max_seq_len, Hkv, D] tensor and one masked batched matmul/softmax serves every
sequence. They run on CPU and CUDA (softmax in float32, so bf16 stays accurate).

``KernelSet`` picks, once at model build time, which implementation each op uses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kiln.runtime import fp8_kv, layers
from kiln.scheduler.block_manager import cdiv

logger = logging.getLogger(__name__)

# Above this many attention-score elements per call the reference splits the batch into
# groups of sequences, so a long prefill mixed with many decodes does not pad every row to
# the prefill's length in one go.
_MAX_SCORE_ELEMENTS = 1 << 28


class KernelBackendError(RuntimeError):
    """The requested attention backend cannot be used on this machine."""


@dataclass
class AttentionMetadata:
    """Where each token of the flattened batch reads and writes KV (DESIGN.md layout).

    Invariants: ``query_start_loc[-1] == T``; for sequence b the query tokens are
    ``query_start_loc[b]:query_start_loc[b+1]`` and sit at the last positions of its
    ``seq_lens[b]`` context; ``max_query_len``/``max_seq_len`` are host ints (no sync needed).
    """

    slot_mapping: torch.Tensor  # [T] int64, -1 = do not write
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B+1] int32
    max_query_len: int
    max_seq_len: int
    # [P] int32: the sequences with more than one query token, when decode rows share the step
    # (the prefill kernel then launches over those only); None = every row may be one.
    prefill_rows: torch.Tensor | None = None

    @classmethod
    def padding(cls, slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                query_start_loc: torch.Tensor, query_len: int, max_seq_len: int) -> AttentionMetadata:
        """Padding rows over the given tensors, filled here: each of the B rows runs ``query_len``
        tokens at positions 0.. of its own ``query_len``-long context, writes no KV (slot -1) and
        reads block 0. ``query_start_loc`` ([B+1]) must already be ``arange * query_len``.
        ``max_seq_len`` sizes the kernels' launch grids: a CUDA graph captured on these tensors
        serves any context up to it."""
        slot_mapping.fill_(-1)
        block_tables.zero_()
        seq_lens.fill_(query_len)
        return cls(slot_mapping, block_tables, seq_lens, query_start_loc, query_len, max_seq_len)

    @classmethod
    def prompts(cls, counts: list[int], block_size: int, device: torch.device | str = "cpu") -> AttentionMetadata:
        """Whole prompts of ``counts`` tokens from position 0, every one in blocks 0, 1, ... of
        the cache (shared: for one prompt a real prefill, for several a memory profile whose
        KV nobody reads). Token t of a prompt writes slot t, so ``slot_mapping`` is also the
        flattened positions."""
        lens = torch.tensor(counts, dtype=torch.int32)
        qsl = torch.zeros(len(counts) + 1, dtype=torch.int32)
        torch.cumsum(lens, 0, out=qsl[1:])
        positions = torch.arange(int(qsl[-1])) - torch.repeat_interleave(qsl[:-1].long(), lens.long())
        blocks = torch.arange(cdiv(max(counts), block_size), dtype=torch.int32).repeat(len(counts), 1)
        return cls(positions.to(device), blocks.to(device), lens.to(device), qsl.to(device), max(counts), max(counts))


# ----------------------------------------------------------------------------- references


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    *, k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """Store k/v [T, Hkv, D] at their slots of the caches [NB, BS, Hkv, D]; slot < 0 is skipped.

    An FP8 cache stores ``fp8_kv.quantize(x, scale)``; other caches take scales of 1.0 only.
    """
    _check_scales(k_cache, k_scale, v_scale)
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    # A boolean mask is a host sync on CUDA; acceptable here, since on CUDA the Triton
    # kernel normally does this and the reference is the fallback.
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    if k_cache.dtype == fp8_kv.FP8_KV_DTYPE:
        k_new, v_new = fp8_kv.quantize(k[keep], k_scale), fp8_kv.quantize(v[keep], v_scale)
    else:
        k_new, v_new = k[keep].to(k_cache.dtype), v[keep].to(v_cache.dtype)
    k_cache.view(num_slots, *k_cache.shape[2:])[slots] = k_new
    v_cache.view(num_slots, *v_cache.shape[2:])[slots] = v_new


def _check_scales(cache: torch.Tensor, k_scale: float, v_scale: float) -> None:
    if cache.dtype != fp8_kv.FP8_KV_DTYPE and (k_scale != 1.0 or v_scale != 1.0):
        raise ValueError(f"KV scales ({k_scale}, {v_scale}) apply to an FP8 cache only; this cache is {cache.dtype}")


def _attend_group(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    k_scale: float,
    v_scale: float,
) -> torch.Tensor:
    """Reference attention for one group of sequences (q holds exactly their tokens)."""
    num_tokens, num_heads, head_size = q.shape
    num_seqs = seq_lens.shape[0]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    device = q.device

    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    seq_idx = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_lens, output_size=num_tokens)
    tok_idx = torch.arange(num_tokens, device=device) - query_start_loc[:-1].long()[seq_idx]

    # Gather each sequence's context into [B, S, Hkv, D].
    num_blocks = cdiv(max_seq_len, block_size)
    table = block_tables[:, :num_blocks].long().clamp_min(0)
    keys = k_cache[table].flatten(1, 2)[:, :max_seq_len]
    values = v_cache[table].flatten(1, 2)[:, :max_seq_len]

    # Pad queries to [B, Lq, Hq, D]; padded rows are computed and dropped.
    padded = q.new_zeros(num_seqs, max_query_len, num_heads, head_size)
    padded[seq_idx, tok_idx] = q

    # GQA: query head h uses KV head h // group.
    qg = padded.view(num_seqs, max_query_len, num_kv_heads, group, head_size).permute(0, 2, 3, 1, 4)
    kg = keys.permute(0, 2, 1, 3).unsqueeze(2)  # [B, Hkv, 1, S, D]
    vg = values.permute(0, 2, 1, 3).unsqueeze(2)
    # The KV scales multiply the logits and the output, as in the kernels (1.0 unless FP8).
    scores = torch.matmul(qg.float(), kg.float().transpose(-1, -2)) * (scale * k_scale)  # [B, Hkv, G, Lq, S]

    # Query i of sequence b sits at position seq_len - q_len + i and sees keys at <= it.
    q_pos = (seq_lens - q_lens).long().unsqueeze(1) + torch.arange(max_query_len, device=device)
    k_pos = torch.arange(max_seq_len, device=device)
    visible = k_pos.view(1, 1, -1) <= q_pos.unsqueeze(-1)  # [B, Lq, S]
    visible &= k_pos.view(1, 1, -1) < seq_lens.view(-1, 1, 1)
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, vg.float())  # [B, Hkv, G, Lq, D]
    if v_scale != 1.0:
        out = out * v_scale
    out = out.permute(0, 3, 1, 2, 4).reshape(num_seqs, max_query_len, num_heads, head_size)
    return out[seq_idx, tok_idx].to(q.dtype)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    prefill_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] over each sequence's paged context -> [T, Hq, D].

    An FP8 cache holds K/V divided by ``k_scale``/``v_scale`` (runtime/fp8_kv.py).
    ``prefill_rows`` (the sequences with more than one query token) sizes the kernels' prefill
    launch; the reference computes every row and does not need it."""
    _check_scales(k_cache, k_scale, v_scale)
    num_seqs = seq_lens.shape[0]
    per_seq = q.shape[1] * max_query_len * max_seq_len
    scales = (k_scale, v_scale)
    if num_seqs * per_seq <= _MAX_SCORE_ELEMENTS or num_seqs == 1:
        return _attend_group(
            q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, max_query_len, max_seq_len, *scales
        )
    # Fallback for very large mixed batches: groups of sequences bounded in score memory.
    # Needs the host copy of query_start_loc (one sync); the Triton path never gets here.
    starts = query_start_loc.tolist()
    step = max(1, _MAX_SCORE_ELEMENTS // per_seq)
    outputs = []
    for b0 in range(0, num_seqs, step):
        b1 = min(num_seqs, b0 + step)
        outputs.append(
            _attend_group(
                q[starts[b0] : starts[b1]], k_cache, v_cache, block_tables[b0:b1],
                query_start_loc[b0 : b1 + 1] - starts[b0], seq_lens[b0:b1], scale, max_query_len, max_seq_len,
                *scales,
            )
        )
    return torch.cat(outputs)


# ----------------------------------------------------------------------------- dispatch

_OPS = ("paged_attention", "write_kv_cache", "fused_add_rms_norm", "silu_and_mul", "apply_rotary")


@dataclass(frozen=True)
class KernelSet:
    """The implementation of each Kernel-API op the model calls; chosen once, never per step."""

    paged_attention: Callable[..., torch.Tensor] = paged_attention
    write_kv_cache: Callable[..., None] = write_kv_cache
    fused_add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = layers.fused_add_rms_norm
    silu_and_mul: Callable[..., torch.Tensor] = layers.silu_and_mul
    apply_rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]] = layers.apply_rotary
    name: str = "torch"
    # Small-batch decode: linear with the norm / SiLU / residual add fused in (layers.fused_linear
    # is its reference), used for steps of at most ``small_batch_rows`` tokens; None = off.
    small_linear: Callable[..., torch.Tensor] | None = None
    small_batch_rows: int = 0  # fused decoder layers up to this many tokens
    small_linear_max_rows: int = 0  # lm_head through small_linear up to this many rows
    small_linear_k_multiple: int = 1  # every linear's input width must be a multiple of this


def select_kernels(device: torch.device, kernel_backend: str) -> KernelSet:
    """Triton kernels on CUDA when allowed and importable, else the torch references.

    "torch" forces the references; "triton" requires the kernels (one clear error if they
    cannot load); "auto" uses them on CUDA when they import. An op the kernels package does
    not provide keeps its reference.
    """
    if kernel_backend == "torch" or (kernel_backend == "auto" and device.type != "cuda"):
        return KernelSet()
    try:
        from kiln.runtime import kernels
    except Exception as exc:  # an import error or a Triton failure at import: same remedy
        if kernel_backend == "triton":
            raise KernelBackendError(f"kernel_backend='triton' but kiln.runtime.kernels failed to import: {exc}")
        logger.warning("Triton kernels unavailable (%s); using the torch reference ops", exc)
        return KernelSet()
    found = {op: getattr(kernels, op) for op in _OPS if callable(getattr(kernels, op, None))}
    if not found:
        if kernel_backend == "triton":
            raise KernelBackendError("kernel_backend='triton' but kiln.runtime.kernels provides no kernels")
        return KernelSet()
    missing = sorted(set(_OPS) - set(found))
    if missing:
        logger.info("Triton kernels missing for %s; those use the torch references", missing)
    gemv = getattr(kernels, "gemv", None)
    # Measured on an H100 (BENCHMARKS.md "Small-batch GEMV"): the fused layers win at 1-2 rows
    # and lose from 4 on; the plain GEMV beats cuBLAS on lm_head up to its 8-row limit.
    small = {} if gemv is None else {"small_linear": gemv, "small_batch_rows": kernels.GEMV_FASTER_UP_TO_ROWS,
                                     "small_linear_max_rows": kernels.GEMV_MAX_ROWS,
                                     "small_linear_k_multiple": kernels.GEMV_K_MULTIPLE}
    return KernelSet(**found, **small, name="triton")
