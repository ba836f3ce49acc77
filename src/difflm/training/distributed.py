"""torch.distributed set-up for ``torchrun`` (gloo on CPU, nccl on CUDA); a no-op in one process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return DistInfo(device=dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local, dev)


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum of ``x`` over ranks, on ``x``'s device (nccl reduces only CUDA tensors, so it goes through
    ``info.device``)."""
    if info.world > 1:
        y = x.to(info.device)
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y.to(x.device)
    return x


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def shutdown_distributed() -> None:
    """Tear down the process group that ``init_distributed`` created, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
