"""SMT under PyTorch's data-parallel engines (DDP, FSDP2): one selection for all ranks, one writer for files.

Training itself needs nothing from here: ``block_weight`` is an ordinary parameter, so DDP averages its
gradient and FSDP2 shards it and reduce-scatters its gradient like any other; the frozen weights get no
gradient and no optimizer state. What does need care, and lives here:

- ``select_blocks_distributed``: every rank warms up on its own batches, the statistics are reduced across
  ranks, and rank 0's selection is broadcast, so every rank patches exactly the same blocks.
- ``save_blocks_distributed``, ``merged_state_dict``, ``save_merged``: gather full tensors (FSDP2 keeps only
  shards) and write once, on rank 0.

All collectives use the default process group; "rank 0" is its rank 0. Without an initialised process group
(or with one rank) every function behaves like its single-process counterpart.
See docs/distributed.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from smt_kernels.kernels.backend import scatter_blocks
from smt_kernels.module import SparseBlockLinear
from smt_kernels.patch import CONFIG_ATTR, patched_modules, save_blocks
from smt_kernels.select import DEFAULT_TARGETS, GRADIENT_SCORES, Selection, find_target_linears, select_blocks


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 of the default process group, and in a process without one."""
    return _world() == 1 or dist.get_rank() == 0


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (FSDP2 shards in place: returned as is)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    """True if some parameter of ``model`` is a DTensor (FSDP2 ``fully_shard`` or tensor parallel)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def _collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones
    if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------------------------ selection


@contextmanager
def _averaged_gradients(weights: Iterable[torch.Tensor]):
    """Average each weight's ``.grad`` over ranks as soon as it is accumulated.

    Post-accumulate-grad hooks run in registration order, so this one runs before the hook that
    ``select_blocks`` registers later and folds the gradient into its statistic: every rank then folds the
    same (all-ranks) gradient. A hook can only be registered while the tensor requires grad; it survives the
    flag being switched off and on again (``select_blocks`` does both).
    """
    world = _world()

    def average(param: torch.Tensor) -> None:
        dist.all_reduce(param.grad)  # gloo has no ReduceOp.AVG
        param.grad.div_(world)

    handles, flags = [], []
    try:
        for w in weights:
            flags.append((w, w.requires_grad))
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(average))
        for w, flag in flags:
            w.requires_grad_(flag)
        yield
    finally:
        for h in handles:
            h.remove()
        for w, flag in flags:
            w.requires_grad_(flag)


def _to_cpu(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def select_blocks_distributed(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]] | Mapping[str, Any],
    num_batches: int | None = None,
    progress: bool | None = None,
    **kwargs: Any,
) -> Selection:
    """``select_blocks`` with each rank's own warm-up batches; every rank returns the same selection.

    Args:
        model: the plain (unwrapped, unsharded) model, the same on every rank; select before wrapping it in
            DDP or ``fully_shard``.
        batches: this rank's warm-up batches (e.g. from a ``DistributedSampler``); at most ``num_batches`` of
            them are used and they are held in a list during the warm-up.
        num_batches: per rank.
        progress: a tqdm bar; default on rank 0 only.
        **kwargs: the other arguments of ``select_blocks`` (num_blocks or ratio, targets, score, strategy,
            block_size, ...).
    Returns:
        The selection made by rank 0, broadcast to all ranks. Its ``scores`` are this rank's (equal on every
        rank up to rounding) and ``num_batches`` counts the batches of all ranks.

    Gradient scores (abs_mean, mean_abs, l1, l2): each target weight's gradient is averaged over ranks after
    every backward (one all-reduce per target per batch, as DDP would do), so the scores equal those of one
    process whose batch t is the concatenation of every rank's batch t (equal local batch sizes, mean loss).
    Every rank must hold the same number of batches (checked first: ValueError on all ranks otherwise).
    The activation score: the batches of all ranks are gathered and every rank runs the forward passes on all
    of them (forward only, in rank order), so its scores equal one process run on all the batches.
    """
    if progress is None:
        progress = is_main_process()
    world = _world()
    if world == 1:
        return select_blocks(model, batches, num_batches=num_batches, progress=progress, **kwargs)
    if isinstance(model, nn.parallel.DistributedDataParallel) or is_sharded(model):
        raise ValueError(
            "select_blocks_distributed needs the plain model (the same on every rank): select the "
            "blocks before wrapping it in DistributedDataParallel or fully_shard"
        )
    if isinstance(batches, Mapping):
        batches = [batches]
    batches = list(islice(batches, num_batches) if num_batches is not None else batches)

    # every collective below must be reached by every rank: agree on the batch count before any of them
    counts = torch.tensor([len(batches), -len(batches)], device=_collective_device())
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    most, fewest = int(counts[0]), -int(counts[1])
    if most != fewest:
        raise ValueError(
            f"select_blocks_distributed: ranks hold between {fewest} and {most} warm-up batches; "
            "give every rank the same number (e.g. num_batches=)"
        )

    score = kwargs.get("score", "abs_mean")
    if score in GRADIENT_SCORES:
        targets = find_target_linears(model, kwargs.get("targets", DEFAULT_TARGETS))
        with _averaged_gradients(m.weight for m in targets.values()):
            local = select_blocks(model, batches, progress=progress, **kwargs)
    else:
        # a forward hook cannot reduce per-token statistics across ranks: run every rank's batches everywhere
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, [_to_cpu(b) for b in batches])
        local = select_blocks(
            model, [b for rank_batches in gathered for b in rank_batches], progress=progress, **kwargs
        )

    # the reductions make the scores equal on every rank up to rounding; rank 0's choice settles near ties
    payload = [local.to_json() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(payload, src=0, device=_collective_device())
    chosen = Selection.from_json(payload[0])
    chosen.num_batches = most * world
    chosen.scores = local.scores
    return chosen


# ------------------------------------------------------------------------------------------------- save and merge


def _full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict on rank 0 (gathered from shards under FSDP2), ``{}`` on the other ranks.

    Collective under FSDP2: every rank must call it.
    """
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main_process():
        return {}
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class _GatheredModel:
    """What ``save_blocks`` reads of a patched model (``smt_config``, its SparseBlockLinear layers' blocks and
    shapes, ``state_dict()``), served from a full state dict, so that a sharded model saves like a plain one."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        setattr(self, CONFIG_ATTR, getattr(model, CONFIG_ATTR))
        self._state = state
        self._layers = {}
        for name, m in patched_modules(model).items():
            # a shell on the meta device: only the blocks, their indices and the shape are real
            shell = SparseBlockLinear(
                m.in_features, m.out_features, [], m.block_size, bias=False, device="meta", dtype=m.weight.dtype
            )
            shell.block_weight = nn.Parameter(state[f"{name}.block_weight"], requires_grad=False)
            shell.block_indices = state[f"{name}.block_indices"]
            self._layers[name] = shell

    def named_modules(self):
        return iter(self._layers.items())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def save_blocks_distributed(model: nn.Module, path: str | os.PathLike) -> Path:
    """``save_blocks`` for a DDP-wrapped or FSDP2-sharded model: gathers the blocks (and, sharded, the base
    tensors the fingerprint samples) and writes the files once, on rank 0. Call it on every rank.

    Under FSDP2 rank 0 holds a full CPU copy of the state dict while saving, as any full-state-dict checkpoint
    does. The files equal what ``save_blocks`` writes for the same model trained in one process.
    """
    model = unwrap(model)
    if is_sharded(model):
        state = _full_state_dict(model)
        if is_main_process():
            save_blocks(_GatheredModel(model, state), path)  # type: ignore[arg-type]
    elif is_main_process():
        save_blocks(model, path)
    _barrier()  # no rank reads the files before they exist
    return Path(path)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The merged model's full state dict (blocks folded into the weights, keys as in the unpatched model, on
    the CPU) on rank 0; ``{}`` on the other ranks. Call it on every rank (it gathers shards under FSDP2).

    The model itself is left as it is (``merge`` would swap modules of a sharded model in place).
    """
    model = unwrap(model)
    mods = patched_modules(model)
    if not mods:
        raise ValueError(
            f"merged_state_dict needs a model patched with smt_kernels.patch; this "
            f"{type(model).__name__} has no SparseBlockLinear modules"
        )
    state = _full_state_dict(model)
    if not is_main_process():
        return {}
    for name in mods:
        # the gathered FSDP2 weight comes from shards that never saw the blocks: write them in
        w = state[f"{name}.weight"].clone()
        scatter_blocks(w, state.pop(f"{name}.block_weight"), state.pop(f"{name}.block_indices"))
        state[f"{name}.weight"] = w
    return state


def save_merged(model: nn.Module, path: str | os.PathLike, **save_pretrained_kwargs: Any) -> Path:
    """Write the merged model as a Hugging Face checkpoint (``save_pretrained``) once, on rank 0.

    Call it on every rank. ``AutoModelForCausalLM.from_pretrained(path)`` then loads a plain model with the
    trained blocks folded in; the model being trained is left as it is.
    """
    state = merged_state_dict(model)
    if is_main_process():
        unwrap(model).save_pretrained(path, state_dict=state, **save_pretrained_kwargs)
    _barrier()
    return Path(path)
