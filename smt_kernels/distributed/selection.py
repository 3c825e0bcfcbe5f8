"""``select_blocks_distributed``: each rank warms up on its own batches, the statistics are reduced across ranks,
and rank 0's selection is broadcast, so every rank patches exactly the same blocks."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from smt_kernels.distributed.ranks import collective_device, is_main_process, is_sharded, world_size
from smt_kernels.quant.module import NF4Linear
from smt_kernels.select import GRADIENT_SCORES, Selection, find_target_linears, select_blocks


@contextmanager
def _averaged_gradients(weights: Iterable[torch.Tensor]):
    """Average each weight's ``.grad`` over ranks as soon as it is accumulated.

    Post-accumulate-grad hooks run in registration order, so this one runs before the hook that
    ``select_blocks`` registers later and folds the gradient into its statistic: every rank then folds the
    same (all-ranks) gradient. A hook can only be registered while the tensor requires grad; it survives the
    flag being switched off and on again (``select_blocks`` does both).
    """
    world = world_size()

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


@contextmanager
def _averaged_nf4_gradients(modules: Iterable[NF4Linear]):
    """``_averaged_gradients`` for 4-bit targets, which have no weight Parameter: ``select_blocks`` hands their
    dense gradients to a fold function it installs as ``module.weight_grad_fold`` (``nf4_weight_gradients``) when
    the warm-up starts. A forward pre-hook wraps that function once, so that the gradient is averaged over ranks
    before it is folded (one all-reduce per target and batch, in backward order, the same on every rank)."""
    world = world_size()
    wrapped: dict[int, tuple] = {}

    def wrap(module: NF4Linear, args: tuple) -> None:
        current = module.weight_grad_fold
        if current is None or wrapped.get(id(module)) is current:
            return  # not in a gradient warm-up, or wrapped already (gradient checkpointing re-runs forwards)
        fold, anchor = current

        def averaged(grad: torch.Tensor, fold=fold) -> None:
            dist.all_reduce(grad)
            fold(grad.div_(world))

        module.weight_grad_fold = wrapped[id(module)] = (averaged, anchor)

    handles = [m.register_forward_pre_hook(wrap) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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
    world = world_size()
    if world == 1:
        return select_blocks(model, batches, num_batches=num_batches, progress=progress, **kwargs)
    if isinstance(model, nn.parallel.DistributedDataParallel) or is_sharded(model):
        raise ValueError(
            "select_blocks_distributed needs the plain model (the same on every rank): select the "
            "blocks before wrapping it in DistributedDataParallel or fully_shard"
        )
    from smt_kernels.config import SMTConfig, resolve_config  # config imports select, as select_blocks does

    bad_count = isinstance(num_batches, bool) or not isinstance(num_batches, numbers.Integral) or num_batches < 1
    if num_batches is not None and bad_count:
        raise ValueError(f"num_batches must be >= 1, got {num_batches!r}")
    # the settings as select_blocks resolves them (config= or keywords, None meaning the default), on every rank
    # alike: which targets get their gradients averaged and which branch runs depend on them
    keywords = {k: kwargs.get(k) for k in ("num_blocks", "ratio", "targets", "score", "strategy")}
    cfg = resolve_config(kwargs.get("config"), "select_blocks", block_size=kwargs.get("block_size"), **keywords)
    if cfg is None:
        cfg = SMTConfig()  # raises: the budget is missing
    if isinstance(batches, Mapping):
        batches = [batches]
    batches = list(islice(batches, num_batches) if num_batches is not None else batches)

    # every collective below must be reached by every rank: agree on the batch count before any of them
    counts = torch.tensor([len(batches), -len(batches)], device=collective_device())
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    most, fewest = int(counts[0]), -int(counts[1])
    if most != fewest:
        raise ValueError(
            f"select_blocks_distributed: ranks hold between {fewest} and {most} warm-up batches; "
            "give every rank the same number (e.g. num_batches=)"
        )

    if cfg.score in GRADIENT_SCORES:
        targets = find_target_linears(model, cfg.targets).values()
        nf4 = [m for m in targets if isinstance(m, NF4Linear)]
        with (
            _averaged_gradients(m.weight for m in targets if not isinstance(m, NF4Linear)),
            _averaged_nf4_gradients(nf4),
        ):
            local = select_blocks(model, batches, progress=progress, **kwargs)
        batches_seen = local.num_batches * world  # each rank's distinct batches (with a warm-up, at most N)
    else:
        # a forward hook cannot reduce per-token statistics across ranks: run every rank's batches everywhere
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, [_to_cpu(b) for b in batches])
        local = select_blocks(
            model, [b for rank_batches in gathered for b in rank_batches], progress=progress, **kwargs
        )
        batches_seen = local.num_batches

    # the reductions make the scores equal on every rank up to rounding; rank 0's choice settles near ties
    payload = [local.to_json() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(payload, src=0, device=collective_device())
    chosen = Selection.from_json(payload[0])
    chosen.num_batches = batches_seen
    chosen.scores = local.scores
    chosen.config = local.config  # the same on every rank; patch records it and save_blocks writes it
    return chosen
