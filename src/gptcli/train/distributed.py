"""DistributedDataParallel under torchrun: who we are (rank, world), joining, waiting, leaving."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Under torchrun (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(world, dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def shutdown_distributed() -> None:
    """Leave the process group, if one was joined. It imports nothing: after an interrupt inside the first
    `import torch` (SIGTERM at start-up), importing torch.distributed from the half-imported torch would
    fail and hide the interrupt."""
    tdist = sys.modules.get("torch.distributed")
    try:
        joined = tdist is not None and tdist.is_available() and tdist.is_initialized()
    except AttributeError:  # itself cut short mid-import
        return
    if joined:
        tdist.destroy_process_group()
