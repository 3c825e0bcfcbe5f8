"""Where this process stands in the default process group, and the helpers the other distributed modules share.
Without an initialised process group: world size 1, this process is rank 0, barriers do nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

T = TypeVar("T")


def world_size() -> int:
    """Ranks in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 of the default process group, and in a process without one."""
    return world_size() == 1 or dist.get_rank() == 0


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (FSDP2 shards in place: returned as is)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    """True if some parameter of ``model`` is a DTensor (FSDP2 ``fully_shard`` or tensor parallel)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def collective_device() -> torch.device:
    """Where tensors for a collective of the default group must be: NCCL moves CUDA tensors only, gloo CPU ones."""
    if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """``dist.barrier()`` when there is more than one rank."""
    if world_size() > 1:
        dist.barrier()


def run_on_main(fn: Callable[[], T]) -> T | None:
    """``fn()`` on rank 0 only (its result there, None on the other ranks), every rank returning once it is done.

    An error on rank 0 is raised there and, as a RuntimeError naming it, on every other rank: no rank reports
    success for work that failed, or waits at a later collective for a rank that gave up."""
    if world_size() == 1:
        return fn()
    outcome: list[str | None] = [None]
    result, error = None, None
    if is_main_process():
        try:
            result = fn()
        except BaseException as err:  # noqa: BLE001 - reported to the other ranks, then re-raised here
            error = err
            outcome[0] = f"{type(err).__name__}: {err}"
    dist.broadcast_object_list(outcome, src=0, device=collective_device())
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise RuntimeError(f"rank 0 failed: {outcome[0]}")
    return result
