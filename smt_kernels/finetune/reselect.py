"""Re-selection during training (``--reselect-at``): fold the trained blocks into the weights, choose the blocks
again with the run's own selection on fresh training batches, patch, and continue with a new AdamW.

AdamW's state carries over for every matrix whose block set is unchanged (its blocks' moments and step count, so
that matrix continues exactly as without the re-selection). A matrix that gained or lost a block starts afresh:
AdamW keeps one step count per tensor, and a tensor holding both kept and new blocks cannot have the bias
correction of both. The scheduler is a function of the step, so the learning rate continues where it was.

Blocks of earlier selections stay trained in the dense weights (``folded``). A checkpoint stores their values, so
``--resume`` rebuilds the same weights; the saved blocks are the union of every selection (``union_selection``),
so loading them onto the base model gives the trained model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import smt_kernels
from smt_kernels.finetune.config import FinetuneConfig
from smt_kernels.finetune.data import TokenizedTask
from smt_kernels.finetune.loop import TrainingRun
from smt_kernels.finetune.methods import Prepared, patch_smt, select_smt
from smt_kernels.finetune.parallel import Ranks
from smt_kernels.select import Selection

log = logging.getLogger(__name__)


def reselect_seed(cfg: FinetuneConfig, step: int) -> int:
    """Seed of the batch order the re-selection after ``step`` steps draws its batches from (the initial
    selection's is ``seed + 1``, training's ``seed``)."""
    return cfg.seed + 1 + step


def _block(weight: torch.Tensor, r: int, c: int, b: int) -> torch.Tensor:
    return weight[r * b : (r + 1) * b, c * b : (c + 1) * b]


@dataclass
class Reselector:
    """The re-selections of one run: ``before_step`` for ``TrainingRun.run``, and what a checkpoint needs."""

    cfg: FinetuneConfig
    ranks: Ranks
    data: TokenizedTask
    prepared: Prepared
    run: TrainingRun | None = None
    folded: dict[str, set[tuple[int, int]]] = field(default_factory=dict)  # earlier blocks, now in the weights
    records: list[dict[str, Any]] = field(default_factory=list)  # per re-selection: step, kept, changed, seconds

    def before_step(self, step: int) -> None:
        if step in self.cfg.reselect_at:
            self.reselect(step)

    def reselect(self, step: int) -> None:
        """Fold, select on fresh batches with the current weights, patch, and give the run the new blocks."""
        cfg, run, old = self.cfg, self.run, self.prepared.selection
        states = _states_by_module(run.optimizer_state(), suffix=".block_weight")
        model = smt_kernels.merge(run.model)
        for name, pairs in old.items():
            self.folded.setdefault(name, set()).update(map(tuple, pairs))
        stream = self.data.stream(cfg.batch_size, reselect_seed(cfg, step))
        batches = [self.ranks.selection_shard(next(stream)) for _ in range(cfg.select_batches)]
        selection, seconds = select_smt(model, cfg, batches, self.ranks.device)
        prepared = patch_smt(model, cfg, selection)
        prepared.target_params = self.prepared.target_params
        prepared.select_seconds = self.prepared.select_seconds
        self.prepared.model, self.prepared.selection, self.prepared.summary = (
            prepared.model,
            prepared.selection,
            prepared.summary,
        )
        run.set_model(prepared.model)
        carried = {}
        for name, pairs in selection.items():
            before = [tuple(p) for p in old.get(name, [])]
            if name in states and pairs and sorted(before) == sorted(map(tuple, pairs)):
                order = torch.tensor([before.index(tuple(p)) for p in pairs])
                carried[f"{name}.block_weight"] = {
                    k: (v if v.dim() == 0 else v[order.to(v.device)].clone()) for k, v in states[name].items()
                }
        run.set_optimizer_state(carried)
        old_blocks = {(n, tuple(p)) for n, pairs in old.items() for p in pairs}
        new_blocks = {(n, tuple(p)) for n, pairs in selection.items() for p in pairs}
        kept, changed = len(new_blocks & old_blocks), len(new_blocks - old_blocks)
        self.records.append({"step": step, "kept": kept, "changed": changed, "seconds": seconds})
        if self.ranks.main:
            log.info(
                "re-selection after step %d: %d blocks kept, %d changed (%.1f s); AdamW state kept for %d of %d "
                "matrices",
                step,
                kept,
                changed,
                seconds,
                len(carried),
                sum(1 for pairs in selection.values() if pairs),
            )

    def state_dict(self) -> dict[str, Any]:
        """The folded blocks' current values (per module: (n, 2) indices and a list of blocks) and the records."""
        modules = dict(self.prepared.model.named_modules())
        b = self.cfg.block_size
        folded = {}
        for name, pairs in self.folded.items():
            order = sorted(pairs)
            weight = modules[name].weight.detach()
            folded[name] = {
                "indices": torch.tensor(order, dtype=torch.int64).reshape(-1, 2),
                "blocks": [_block(weight, r, c, b).to("cpu", copy=True) for r, c in order],
            }
        return {"folded": folded, "records": list(self.records)}


def apply_folded(model: nn.Module, state: dict[str, Any], block_size: int) -> dict[str, set[tuple[int, int]]]:
    """Write a checkpoint's folded blocks into ``model``'s (unpatched) weights; returns them as ``folded``."""
    modules = dict(model.named_modules())
    folded = {}
    with torch.no_grad():
        for name, entry in state["folded"].items():
            weight = modules[name].weight
            pairs = [tuple(int(x) for x in p) for p in entry["indices"].tolist()]
            for (r, c), value in zip(pairs, entry["blocks"], strict=True):
                _block(weight, r, c, block_size).copy_(value)
            folded[name] = set(pairs)
    return folded


def union_selection(cfg: FinetuneConfig, selection: Selection, folded: dict[str, set[tuple[int, int]]]) -> Selection:
    """Every block trained at some point: the current selection and the folded ones."""
    names = list(dict.fromkeys([*selection, *folded]))
    blocks = {n: sorted(set(map(tuple, selection.get(n, []))) | folded.get(n, set())) for n in names}
    return Selection(
        blocks,
        block_size=cfg.block_size,
        score=selection.score,
        strategy=selection.strategy,
        targets=selection.targets,
        num_batches=selection.num_batches,
        warmup_steps=selection.warmup_steps,
        warmup_lr=selection.warmup_lr,
    )


def patch_union(model: nn.Module, cfg: FinetuneConfig, selection: Selection, folded) -> tuple[nn.Module, Selection]:
    """``model`` re-patched with ``union_selection`` (block values from the current weights), for saving."""
    union = union_selection(cfg, selection, folded)
    model = smt_kernels.merge(model)
    return patch_smt(model, cfg, union).model, union


def _states_by_module(states: dict[str, dict[str, torch.Tensor]], suffix: str) -> dict[str, dict[str, torch.Tensor]]:
    return {n[: -len(suffix)]: s for n, s in states.items() if n.endswith(suffix)}
