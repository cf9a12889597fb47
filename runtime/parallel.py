"""The tensor-parallel group of one rank: who it is and the collectives the model needs.

One object, swappable: ``SINGLE_RANK`` (tp 1: every collective is the identity) or a
``DistributedCollectives`` over torch.distributed (NCCL on CUDA, gloo on CPU), created by the
executor once the process group exists. The model and the runner call only these methods,
never torch.distributed directly, so the same code runs on one rank and on many.
"""

from __future__ import annotations

import torch


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

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank, self.world_size, self.device = rank, world_size, device
        # torch 2.13 renamed the gather into one tensor; older releases only have the old name.
        self._gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
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
