"""Data parallelism for ``smt-kernels finetune`` under torchrun: the process group, each rank's share of a batch,
the DDP-wrapped loss, and rank 0 as the one evaluator and writer.

The rule: ``--batch-size`` is the global batch. Every rank draws the same global batch from the seeded stream and
trains on its contiguous share of the rows (``--batch-size`` must divide by the number of ranks); each rank's loss
is its answer-token sum divided by the global answer-token count (times the rank count, since DDP averages), so
the averaged gradient, the loss and the update equal those of one process on the whole batch. Evaluation and
every file are rank 0's; the other ranks receive its results (``on_main``), so every rank returns the same result.

Outside torchrun (``WORLD_SIZE`` unset or 1) ``Ranks`` is one process and every helper is a no-op.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from smt_kernels.finetune.config import FinetuneConfig, FinetuneError
from smt_kernels.finetune.data import IGNORE
from smt_kernels.finetune.evaluate import answer_loss, autocast, to_device
from smt_kernels.finetune.model import pick_device

log = logging.getLogger(__name__)
T = TypeVar("T")
# rank 0 evaluates while the others wait in a collective: allow a long evaluation before they time out
TIMEOUT = timedelta(hours=2)


def torchrun_world() -> int:
    """The number of processes torchrun (or any launcher setting ``WORLD_SIZE``) started; 1 outside one."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise FinetuneError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def is_main_rank() -> bool:
    """Rank 0 under torchrun (from the environment, before any process group exists), or a single process."""
    return os.environ.get("RANK", "0") == "0"


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``world`` processes, this one ``rank``, training on ``device``."""

    device: torch.device
    world: int = 1
    rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's contiguous share of the rows of a global batch (the whole batch in one process)."""
        if self.world == 1:
            return batch
        rows = batch["input_ids"].shape[0]
        if rows % self.world:
            raise FinetuneError(f"a batch of {rows} examples does not split over {self.world} ranks")
        per = rows // self.world
        return {k: v[self.rank * per : (self.rank + 1) * per] for k, v in batch.items()}

    def selection_shard(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """``shard`` for ``select_blocks_distributed``: the model's loss (``num_items_in_batch``) is the rank's
        label-token sum over the global count divided by the rank count, so the rank-averaged gradient equals the
        gradient of one process's mean loss on the whole batch."""
        if self.world == 1:
            return batch
        labelled = int((batch["labels"][:, 1:] != IGNORE).sum())
        return {**self.shard(batch), "num_items_in_batch": torch.tensor(max(labelled, 1) / self.world)}

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0, its result sent to every rank; an error there is raised on every rank."""
        if self.world == 1:
            return fn()
        payload: list[Any] = [None]
        error: BaseException | None = None
        if self.main:
            try:
                payload[0] = ("ok", fn())
            except BaseException as err:  # noqa: BLE001 - reported to the other ranks, then re-raised here
                error = err
                payload[0] = ("error", f"{type(err).__name__}: {err}", isinstance(err, FinetuneError))
        dist.broadcast_object_list(payload, src=0, device=self._collective_device())
        if error is not None:
            raise error
        if payload[0][0] == "error":
            message, input_error = payload[0][1], payload[0][2]
            raise (FinetuneError if input_error else RuntimeError)(f"rank 0 failed: {message}")
        return payload[0][1]

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a tensor (a copy; the tensor itself in one process)."""
        if self.world == 1:
            return value
        total = value.detach().to(self._collective_device(), copy=True)
        dist.all_reduce(total)
        return total

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _collective_device(self) -> torch.device:
        # NCCL moves CUDA tensors only, gloo CPU ones
        return self.device if "nccl" in str(dist.get_backend()) else torch.device("cpu")


@contextmanager
def data_parallel(cfg: FinetuneConfig) -> Iterator[Ranks]:
    """The ``Ranks`` of this run: one process, or torchrun's processes in a process group (NCCL with each rank on
    ``cuda:LOCAL_RANK``, gloo on the CPU). A group this opens is closed on exit; one already open (a caller's
    own) is used as it is."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else torchrun_world()
    if world <= 1:
        yield Ranks(pick_device(cfg.device))
        return
    check_world(cfg, world)
    device = _rank_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # collectives (and select_blocks_distributed's) use the current device
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    ranks = Ranks(device, world, dist.get_rank())
    log.info("data parallel: %d ranks (%s, %s), global batch %d = %d per rank", world, dist.get_backend(),
             device.type, cfg.batch_size, cfg.batch_size // world)  # fmt: skip
    try:
        yield ranks
    finally:
        if owned:
            dist.destroy_process_group()


def _rank_device(name: str) -> torch.device:
    """Under torchrun: ``cuda:LOCAL_RANK`` for ``auto`` (with CUDA) or ``cuda``, else the CPU."""
    device = pick_device(name)
    if device.type == "cpu":
        return device
    if name not in ("auto", "cuda"):
        raise FinetuneError(
            f"--device {name}: under torchrun every rank uses cuda:LOCAL_RANK; pass --device cuda (or auto), and "
            "pick GPUs with CUDA_VISIBLE_DEVICES"
        )
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise FinetuneError(f"LOCAL_RANK {local}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", local)


def check_world(cfg: FinetuneConfig, world: int, num_train: int | None = None) -> None:
    """FinetuneError if ``cfg`` cannot run on ``world`` ranks: the global batch (or, with fewer training examples
    than ``--batch-size``, the one short batch an epoch then holds) must split evenly over the ranks."""
    if world > 1 and cfg.batch_size % world:
        raise FinetuneError(
            f"--batch-size {cfg.batch_size} (the global batch) does not split over {world} ranks; give a multiple of "
            f"{world}"
        )
    if world > 1 and num_train is not None and num_train < cfg.batch_size and num_train % world:
        raise FinetuneError(
            f"{num_train} training examples, fewer than --batch-size {cfg.batch_size}, make batches of {num_train} "
            f"that do not split over {world} ranks; use more examples or a batch of at most {num_train}"
        )


# buffers (rotary tables, block metadata) are the same on every rank and never change: no sync before each forward
# (torch 2.13 renamed the option; the new one still syncs once at construction, which is harmless here)
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


class _AnswerLoss(nn.Module):
    """The training loss as a module, so that it runs through DDP's forward (which arms the gradient averaging)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        return answer_loss(self.model, batch, reduction="sum") * scale


class DataParallelLoss:
    """``loss(global_batch)``: the backward-ready loss of this rank's share and the whole batch's mean loss.

    One process: ``answer_loss`` on the batch (both values are the same tensor). Several: this rank's rows through
    a DDP-wrapped ``_AnswerLoss`` scaled by ranks / global answer tokens, and the mean loss summed over ranks.
    """

    def __init__(self, model: nn.Module, ranks: Ranks) -> None:
        self.model, self.ranks = model, ranks
        self.ddp = None
        if ranks.world > 1:
            ids = [ranks.device.index] if ranks.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(_AnswerLoss(model), device_ids=ids, **_NO_BUFFER_SYNC)

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch``: the global batch (on the CPU); each rank moves only its share to its device."""
        device = self.ranks.device
        if self.ddp is None:
            with autocast(device):
                loss = answer_loss(self.model, to_device(batch, device))
            return loss, loss.detach()
        tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
        scale = self.ranks.world / max(tokens, 1)
        with autocast(device):
            loss = self.ddp(to_device(self.ranks.shard(batch), device), scale)
        return loss, self.ranks.sum(loss.detach()) / self.ranks.world
