"""DistributedDataParallel under torchrun: who we are (rank, world), joining, waiting, leaving."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from gptcli.errors import EXIT_RUNTIME, GptcliError
from gptcli.train.errors import RankStopped


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

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device.startswith("cuda"):  # before any collective: NCCL's run on the current device
            import torch

            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(world, dist.get_rank(), local_rank)


@contextmanager
def main_first(d: Dist) -> Iterator[None]:
    """Rank 0 runs the block first (it fills a cache, writes the run folder) while the others wait, then they run
    it. Rank 0's outcome reaches them instead of a bare barrier: when it fails, they stop at once (RankStopped)
    rather than wait for a rank that is gone (with NCCL across machines, until the collective's timeout)."""
    if d.world > 1 and not d.main:
        _receive_outcome()
        yield
        return
    with main_checked(d):
        yield


@contextmanager
def main_checked(d: Dist) -> Iterator[None]:
    """Every rank runs the block, then the others learn rank 0's outcome (RankStopped if it failed): for work
    rank 0 does alone (a checkpoint, the plot) before the next collective, which it would never join."""
    if d.world == 1:
        yield
        return
    if not d.main:
        yield
        _receive_outcome()
        return
    try:
        yield
    except BaseException as exc:
        with suppress(Exception):  # the others failed too (the same error) and left: this rank's error is told
            _outcome(exc.exit_code if isinstance(exc, GptcliError) else EXIT_RUNTIME)
        raise
    _outcome(0)


def _receive_outcome() -> None:
    code = _outcome(0)
    if code:
        raise RankStopped("rank 0 failed (it tells why)", code)


def _outcome(code: int) -> int:
    """Rank 0's exit code (0: it went on), broadcast: one small collective, on the device the backend uses."""
    import torch
    import torch.distributed as dist

    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    shared = torch.tensor([code], dtype=torch.int32, device=device)
    dist.broadcast(shared, src=0)
    return int(shared.item())


def shutdown_distributed(*, together: bool = False) -> None:
    """Leave the process group, if one was joined. It imports nothing: after an interrupt inside the first
    `import torch` (SIGTERM at start-up), importing torch.distributed from the half-imported torch would
    fail and hide the interrupt."""
    tdist = sys.modules.get("torch.distributed")
    try:
        joined = tdist is not None and tdist.is_available() and tdist.is_initialized()
    except AttributeError:  # itself cut short mid-import
        return
    if joined:
        if together:  # every rank is here: none leaves while another still tears its connections down
            tdist.barrier()
        tdist.destroy_process_group()
