"""Several training processes: joining torchrun's process group, each process's device, and
agreeing on a decision made by rank 0."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Distributed:
    """Join the process group that torchrun set up (environment variables), if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device_name == "auto" or device_name.startswith("cuda")) and \
        torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Distributed(rank, world_size, local_rank)


def training_device(name: str, dist_info: Distributed):
    """The training device; with several processes on CUDA, each takes its local GPU."""
    import torch

    from ..engine.devices import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and dist_info.active:
        return torch.device("cuda", dist_info.local_rank)
    return device


def agree(flag: bool, dist_info: Distributed) -> bool:
    """True on every process when rank 0 says so (so all stop at the same step)."""
    if not dist_info.active:
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0])
    dist.broadcast(value, src=0)
    return bool(value.item())
