"""Data-parallel training under ``torchrun``: the world a process belongs to.

``torchrun --nproc-per-node N -m asbound transfer ...`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`world_from_env` joins them into a process group
(NCCL on CUDA, gloo on the CPU) and each uses ``cuda:LOCAL_RANK`` when CUDA is there. Without
those variables (or with one process) the world is the single process and nothing here
communicates.

The division of labour (:mod:`asbound.transfer`):

* every rank trains on its share of each global batch (``--batch-size`` is the global batch);
  gradients are averaged by ``DistributedDataParallel``;
* validation is sharded and the counts summed, so every rank selects the same epoch;
* rank 0 alone reads and writes the run directory (lock, config, checkpoints, ``epochs.csv``,
  ``model.pt``, the evaluation and the scores) and sends what it read (a resumed state, a best
  checkpoint) to the others.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

#: how long a rank waits for the others at a collective (rank 0 evaluates and scores alone)
TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: Sequence[float], device: torch.device) -> "list[float]":
        """The sums over the ranks of ``values`` (float64)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj: Any, device: torch.device) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
        return box[0]

    def gather(self, obj: Any) -> "list[Any]":
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: "list[Any]" = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def share(self, n: int) -> torch.Tensor:
        """This rank's positions among ``n`` rows (every ``size``-th from ``rank``): the ranks'
        shares are disjoint and together hold every row once (sharded validation)."""
        return torch.arange(self.rank, n, self.size)

    def sync_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (batch-norm running statistics) on every rank. Each rank's train-mode
        forward updates its own statistics from its share of the batch; eval-mode passes (the
        training attack, validation, AutoLoRa's lambdas) must all see the same model."""
        if self.distributed:
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        """Wait for every rank, then leave the process group (a rank exiting while another still
        works makes gloo abort it)."""
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


SINGLE = World()


def leave() -> None:
    """Leave the process group without waiting for the others (a rank that stops on an error):
    a process exiting inside a gloo group is otherwise aborted at exit."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def world_from_env() -> World:
    """The torchrun world of this process (joined on first call), or the single process."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return SINGLE
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dist = torch.distributed
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=TIMEOUT)
    return World(rank=rank, size=size, local_rank=local)


def local_device(world: World, requested: str) -> str:
    """``cuda:LOCAL_RANK`` for a distributed rank asking for CUDA (or auto with CUDA), else ``requested``."""
    if world.distributed and requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{world.local_rank % torch.cuda.device_count()}"
    return requested
