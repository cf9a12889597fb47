"""The tensor-parallel group of one rank: who it is and the collectives the model needs.

One object, swappable: ``SINGLE_RANK`` (tp 1: every collective is the identity) or a
``DistributedCollectives`` over torch.distributed (NCCL on CUDA, gloo on CPU), created by the
executor once the process group exists. The model and the runner call only these methods,
never torch.distributed directly, so the same code runs on one rank and on many.

Small all-reduces on CUDA (a decode step's [batch, hidden] activations, 2 per layer) go through
PyTorch's symmetric memory instead of NCCL: each rank copies its tensor into a buffer every
rank has mapped (CUDA IPC over NVLink), and one kernel reads all the peers' copies and sums
them (``torch.ops.symm_mem.one_shot_all_reduce_copy``, the idea of vLLM's and TensorRT-LLM's
custom all-reduce). It is captured in CUDA graphs like the NCCL call. Larger tensors, other
dtypes and machines where the buffer cannot be mapped keep NCCL. Messages above the one-shot
limit and up to ``TWO_SHOT_MAX_BYTES`` go through PyTorch's two-shot all-reduce over the same
buffer (``torch.ops.symm_mem.two_shot_all_reduce_``: reduce-scatter then all-gather through peer
memory), if a first call at start-up works on every rank. ``KILN_ALL_REDUCE`` picks (for
comparisons): ``auto`` (the default: one-shot, two-shot, NCCL by size), ``one_shot`` (no
two-shot), ``nccl`` (no peer path); ``two_shot`` is accepted as a synonym of ``auto``.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

# Messages up to this size take the one-shot peer all-reduce (the rest NCCL). One-shot reads
# every peer's whole tensor, so its cost grows with size x (ranks - 1): on an H200 pair it beat
# NCCL up to 1 MiB (6.5 vs 12-23 us small, 14.8 vs 21-26 us at 1 MiB) and tied from 2 MiB
# (scripts/bench_allreduce_gpu.py measures the crossover).
PEER_ALL_REDUCE_MAX_BYTES = 1 << 20
TWO_SHOT_MAX_BYTES = 16 << 20
"""Messages above the one-shot limit and up to this size take the two-shot peer all-reduce: each
rank moves 2 (ranks - 1) / ranks of the tensor instead of one-shot's (ranks - 1) whole copies,
vLLM's choice on two Hopper GPUs up to tens of MiB. On an H200 pair ([batch, 8192] bf16, 160 in
one graph): 16.8 / 24.9 / 40.7 us at 2 / 4 / 8 MiB against NCCL's 41-43 / 49 / 68-70, sums equal
to NCCL's; Llama-3.1-70B FP8 tp 2 128/128 6,370 -> 6,494 tok/s (BENCHMARKS.md, eighth session)."""
ALL_REDUCE_MODES = ("auto", "one_shot", "nccl", "two_shot")


class Collectives:
    """A group of one: every collective returns its input. Base of the distributed group.

    Invariants: ``0 <= rank < world_size``; every rank of a group calls the same collectives
    in the same order with tensors of the same shapes (the executor guarantees it by running
    the same plan on every rank).
    """

    rank: int = 0
    world_size: int = 1

    @property
    def is_first_rank(self) -> bool:
        """Rank 0 adds what must be counted once into a sum over ranks (a residual, a bias)."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the ranks (in place where the backend allows; use the result)."""
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' ``x`` concatenated along the last dim, rank order: [..., world_size * N]."""
        return x

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``x`` of rank ``src`` on every rank (in place)."""
        return x

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over the ranks (e.g. the KV blocks every rank can hold)."""
        return value

    def barrier(self) -> None:
        """Wait until every rank got here."""


SINGLE_RANK = Collectives()


class DistributedCollectives(Collectives):
    """The collectives of one rank in the default torch.distributed process group."""

    def __init__(self, rank: int, world_size: int, device: torch.device,
                 peer_max_bytes: int = PEER_ALL_REDUCE_MAX_BYTES) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank, self.world_size, self.device = rank, world_size, device
        # torch 2.13 renamed the gather into one tensor; older releases only have the old name.
        self._gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._peer_buffer: torch.Tensor | None = None  # bf16, mapped by every rank
        self._group_name = ""
        self._one_shot_numel = peer_max_bytes // 2  # elements of a 2-byte dtype
        self._two_shot_numel = 0  # > 0 only once the start-up probe passed on every rank
        mode = os.environ.get("KILN_ALL_REDUCE", "auto")
        if mode not in ALL_REDUCE_MODES:
            raise ValueError(f"KILN_ALL_REDUCE={mode!r}: choose one of {', '.join(ALL_REDUCE_MODES)}")
        if device.type == "cuda" and peer_max_bytes > 0 and mode != "nccl":
            two_shot = mode in ("auto", "two_shot")
            self._peer_buffer = self._map_peer_buffer(max(peer_max_bytes, TWO_SHOT_MAX_BYTES if two_shot else 0))
            if two_shot and self._peer_buffer is not None:
                self._two_shot_numel = self._probe_two_shot(TWO_SHOT_MAX_BYTES // 2)
            if self._peer_buffer is not None and rank == 0:
                logger.info("all-reduces above %d KiB: NCCL", max(self._one_shot_numel, self._two_shot_numel) * 2 >> 10)

    def _map_peer_buffer(self, nbytes: int) -> torch.Tensor | None:
        """The symmetric buffer of the peer all-reduces, or None (NCCL only) on every rank.

        A collective: every rank calls it at the same point (the constructor). The ranks agree
        on the outcome, so no rank waits in a peer all-reduce the others do not run.
        """
        buffer = None
        try:
            import torch.distributed._symmetric_memory as symm_mem

            group_name = self._dist.group.WORLD.group_name
            if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before torch 2.9, a no-op after
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    symm_mem.enable_symm_mem_for_group(group_name)
            buffer = symm_mem.empty(nbytes // 2, dtype=torch.bfloat16, device=self.device)
            symm_mem.rendezvous(buffer, group_name)
            self._group_name = group_name
        except Exception as exc:  # noqa: BLE001 - any failure means: NCCL only
            logger.warning("peer all-reduce unavailable (%s: %s); all-reduces use NCCL", type(exc).__name__, exc)
            buffer = None
        if self.min_int(1 if buffer is not None else 0) == 0:
            return None
        if self.rank == 0:
            logger.info("all-reduces up to %d KiB: one-shot over peer memory", self._one_shot_numel * 2 >> 10)
        return buffer

    def _probe_two_shot(self, numel: int) -> int:
        """``numel`` if a two-shot all-reduce of a small tensor gives the right sum on every rank,
        else 0 (and the two-shot path stays off on every rank). A collective, like the mapping."""
        ok = 0
        try:
            assert self._peer_buffer is not None
            probe = self._peer_buffer[:4096]
            probe.fill_(float(self.rank + 1))
            torch.ops.symm_mem.two_shot_all_reduce_(probe, "sum", self._group_name)
            want = self.world_size * (self.world_size + 1) / 2
            ok = int(bool((probe.float() == want).all()))
        except Exception as exc:  # noqa: BLE001 - an op this torch lacks, a launch failure: no two-shot
            logger.warning("two-shot peer all-reduce unavailable (%s: %s)", type(exc).__name__, exc)
        if self.min_int(ok) == 0:
            return 0
        if self.rank == 0:
            logger.info("all-reduces above %d KiB and up to %d KiB: two-shot over peer memory (KILN_ALL_REDUCE=one_shot: NCCL)",
                        self._one_shot_numel * 2 >> 10, numel * 2 >> 10)
        return numel

    def _peer_path(self, x: torch.Tensor) -> str | None:
        """The peer path ``x`` takes ("one_shot", "two_shot") or None for NCCL; the same on every
        rank (the ranks reduce tensors of the same shapes)."""
        buffer = self._peer_buffer
        if not (buffer is not None and x.dtype in (torch.bfloat16, torch.float16) and x.is_cuda
                and (x.numel() * 2) % 16 == 0 and x.data_ptr() % 16 == 0 and x.is_contiguous()):
            return None  # the kernels move 16-byte vectors
        if x.numel() <= self._one_shot_numel:
            return "one_shot"
        # two-shot splits x into one 16-byte-aligned slice per rank
        two_shot = x.numel() <= self._two_shot_numel and x.numel() % (8 * self.world_size) == 0
        return "two_shot" if two_shot else None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        path = self._peer_path(x)
        if path is not None:
            assert self._peer_buffer is not None
            symm = self._peer_buffer.view(x.dtype)[: x.numel()].view(x.shape)
            if path == "one_shot":
                return torch.ops.symm_mem.one_shot_all_reduce_copy(symm, x, "sum", self._group_name)
            symm.copy_(x)
            torch.ops.symm_mem.two_shot_all_reduce_(symm, "sum", self._group_name)
            return x.copy_(symm)
        self._dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((self.world_size * x.shape[0], *x.shape[1:]))
        self._gather(out, x)  # rank r's rows at [r * S, (r + 1) * S)
        # [W, S, N] -> [S, W, N] -> [S, W * N]: rank r's columns land at r * N.
        return out.view(self.world_size, *x.shape).movedim(0, -2).reshape(*x.shape[:-1], self.world_size * x.shape[-1])

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._dist.broadcast(x, src)
        return x

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MIN)
        return int(t.item())

    def barrier(self) -> None:
        t = torch.zeros(1, device=self.device)
        self._dist.all_reduce(t)  # a collective on the group's own device (barrier() may pick another)
        if t.is_cuda:
            torch.cuda.synchronize(t.device)
