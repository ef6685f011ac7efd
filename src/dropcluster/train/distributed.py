"""One run on several processes: DistributedDataParallel under ``torchrun``.

``torchrun --nproc-per-node N -m dropcluster train ...`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`from_environment` joins them into a process group
(NCCL on GPUs, gloo on the CPU) and gives each its device. Without those variables everything
here is the single-process identity, so the trainer calls the same functions either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "SINGLE",
    "Ranks",
    "all_sum",
    "close_group",
    "from_environment",
    "gather",
]


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the run: its rank among ``world`` processes.

    Attributes:
        rank: 0 .. world - 1; rank 0 writes the run's files.
        world: number of processes training the run (1: no distributed training).
        local_rank: rank on this machine (picks the GPU).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True on the process that writes logs, checkpoints and results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


SINGLE = Ranks()


def from_environment(
    device: torch.device, timeout_minutes: float = 30.0
) -> tuple[Ranks, torch.device]:
    """Join the process group ``torchrun`` prepared, if any; returns the ranks and the device.

    A CUDA ``device`` becomes ``cuda:LOCAL_RANK`` (one GPU per process); the CPU stays the CPU.
    Called once per process; a process group initialised by the caller is used as it is.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return device, SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return device, Ranks(dist.get_rank(), dist.get_world_size(), local_rank)


def all_sum(values: list[float], ranks: Ranks, device: torch.device) -> list[float]:
    """The sums of ``values`` over all processes (float64; the values themselves when alone)."""
    if not ranks.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather(value: Any, ranks: Ranks) -> list[Any]:
    """Every process's ``value``, in rank order (``[value]`` when alone)."""
    if not ranks.distributed:
        return [value]
    values: list[Any] = [None] * ranks.world
    dist.all_gather_object(values, value)
    return values


def close_group() -> None:
    """Leave the process group, if this process is in one (after its last collective)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
