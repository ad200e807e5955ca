"""Data-parallel training under ``torchrun`` (DistributedDataParallel).

``torchrun --nproc_per_node N -m deblend.train ...`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; each process then trains on its share of the batches (see
:class:`training.data.BlockBatchSampler`), gradients are averaged by DDP (gloo on CPU, nccl on
CUDA) and only rank 0 writes files. Without those variables everything runs in one process.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistContext:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and shows progress."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` inside DDP when distributed, else ``model`` itself."""
        if not self.is_distributed:
            return model
        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over processes (in place; a no-op in one process)."""
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()


def context_from_environment() -> DistContext:
    """The :class:`DistContext` that torchrun's environment variables describe."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    return DistContext(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def process_group(context: DistContext, device: torch.device) -> Iterator[None]:
    """Join the process group for the block's duration (nothing to do in one process)."""
    if not context.is_distributed:
        yield
        return
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"distributed training runs on CPU (gloo) or CUDA (nccl), not {device}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            rank=context.rank, world_size=context.world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
