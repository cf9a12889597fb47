"""DistributedCollectives' start-up choices on the CPU (gloo, one rank in this process): the
all-reduce mode read from KILN_ALL_REDUCE. The peer paths themselves need CUDA peers
(scripts/bench_allreduce_gpu.py checks their sums against NCCL's)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from kiln.runtime.parallel import DistributedCollectives


@pytest.fixture
def one_rank_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_an_unknown_all_reduce_mode_is_one_line(one_rank_group, monkeypatch) -> None:
    monkeypatch.setenv("KILN_ALL_REDUCE", "fast")
    with pytest.raises(ValueError, match="KILN_ALL_REDUCE='fast': choose one of auto, one_shot, nccl, two_shot"):
        DistributedCollectives(0, 1, torch.device("cpu"))


@pytest.mark.parametrize("mode", ["auto", "one_shot", "nccl", "two_shot"])
def test_every_mode_reduces_through_the_backend_on_the_cpu(one_rank_group, monkeypatch, mode: str) -> None:
    monkeypatch.setenv("KILN_ALL_REDUCE", mode)
    group = DistributedCollectives(0, 1, torch.device("cpu"))
    assert group._peer_buffer is None  # peer memory is CUDA only
    x = torch.arange(6, dtype=torch.float32)
    assert torch.equal(group.all_reduce(x.clone()), x)  # one rank: the sum is the input
