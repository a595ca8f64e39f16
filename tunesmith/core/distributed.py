"""torchrun/DDP set-up: gloo on CPU (so tests run 2 ranks here), NCCL on CUDA."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on the rank that writes logs and outputs."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when running with more than one rank."""
        return self.world_size > 1


def setup() -> DistInfo:
    """Initialise the process group when launched by torchrun; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (identity on one rank)."""
    if info.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op on one rank)."""
    if info.enabled:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    """Destroy the process group if this module created one."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_tensors(value: torch.Tensor, info: DistInfo) -> list[torch.Tensor]:
    """Every rank's 1-D tensor, in rank order; lengths may differ (a list of `value` alone on one rank)."""
    if not info.enabled:
        return [value]
    local = value.reshape(-1).to(info.device)
    size = torch.tensor([local.numel()], dtype=torch.long, device=info.device)
    sizes = [torch.zeros_like(size) for _ in range(info.world_size)]
    dist.all_gather(sizes, size)
    longest = max(1, *(int(s.item()) for s in sizes))  # never an empty message
    padded = torch.cat([local, local.new_zeros(longest - local.numel())])  # all_gather needs equal shapes
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    return [p[: int(n.item())].to(value.device) for p, n in zip(parts, sizes)]


def all_gather_objects(value: object, info: DistInfo) -> list:
    """Every rank's picklable `value`, in rank order (a list of `value` alone on one rank)."""
    if not info.enabled:
        return [value]
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered
