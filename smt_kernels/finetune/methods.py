"""Methods: make a model trainable as SMT (selected blocks), LoRA or DoRA (the same parameter budget) or full
fine-tuning.

The budget is ``smt_kernels.select``'s own (``budget_elements``), so the LoRA/DoRA rank matches the blocks SMT
trains under both selection strategies. DoRA (PEFT ``use_dora=True``) also trains a magnitude vector of
out_features per target; ``lora_rank`` counts it, so DoRA's trainable parameters are as close to SMT's as LoRA's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

import smt_kernels
from smt_kernels.distributed import is_main_process, select_blocks_distributed
from smt_kernels.finetune.config import ADAPTER_METHODS, FinetuneConfig, FinetuneError
from smt_kernels.finetune.evaluate import autocast
from smt_kernels.select import Selection, budget_elements, find_target_linears
from smt_kernels.selection_summary import SelectionSummary, summarize_selection

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A model made trainable by one method, and what the report needs to know about how."""

    model: nn.Module
    target_params: int | None = None  # weight elements of the target matrices (SMT and LoRA)
    selection: Selection | None = None  # SMT
    summary: SelectionSummary | None = None  # SMT
    select_seconds: float | None = None  # SMT, None when the selection came from a checkpoint
    lora_rank: int | None = None  # LoRA and DoRA


def target_linears(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Module]:
    try:
        return find_target_linears(model, targets)
    except ValueError as err:
        raise FinetuneError(str(err)) from None


def smt_budget(model: nn.Module, cfg: FinetuneConfig) -> int:
    """Weight elements SMT trains under ``cfg``'s budget and strategy; FinetuneError if it does not fit."""
    target_linears(model, cfg.targets)
    try:
        return budget_elements(
            model, targets=cfg.targets, strategy=cfg.strategy, block_size=cfg.block_size, **cfg.budget
        )
    except ValueError as err:
        raise FinetuneError(f"the budget is larger than the model: {err}") from None


def lora_rank(model: nn.Module, targets: tuple[str, ...], budget: int, dora: bool = False) -> int:
    """The LoRA rank whose A and B matrices on ``targets`` hold about ``budget`` parameters (at least 1).

    ``dora``: DoRA's magnitude vectors (out_features per target, independent of the rank) come off the budget
    first, so r·Σ(in + out) + Σout is within half a rank step of ``budget`` (unless even rank 1 exceeds it).
    """
    linears = target_linears(model, targets).values()
    per_rank = sum(m.in_features + m.out_features for m in linears)
    fixed = sum(m.out_features for m in linears) if dora else 0
    return max(1, round((budget - fixed) / per_rank))


def prepare_method(
    model: nn.Module,
    cfg: FinetuneConfig,
    select_batches: list[dict],
    device: torch.device,
    selection: Selection | None = None,
) -> Prepared:
    """Make ``model`` trainable the way ``cfg.method`` says. ``selection``: SMT blocks chosen earlier (a resumed
    run), instead of selecting on ``select_batches``. Under a process group of several ranks every rank calls this
    with its own ``select_batches`` and all get the same selection (``select_blocks_distributed``)."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return Prepared(model)
    elements = sum(m.out_features * m.in_features for m in target_linears(model, cfg.targets).values())
    if cfg.method in ADAPTER_METHODS:
        return _prepare_lora(model, cfg, elements)
    return _prepare_smt(model, cfg, select_batches, device, selection, elements)


def _prepare_lora(model: nn.Module, cfg: FinetuneConfig, elements: int) -> Prepared:
    """LoRA, or DoRA (``use_dora=True``) for ``method="dora"``, at the rank of SMT's budget; on a 4-bit base
    (``cfg.quantize``) LoRA through ``smt_kernels.quant.lora`` (QLoRA)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise FinetuneError(f"--method {cfg.method} needs PEFT: pip install peft") from None
    dora = cfg.method == "dora"
    rank = lora_rank(model, cfg.targets, smt_budget(model, cfg), dora=dora)
    options = dict(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=list(cfg.targets),
        bias="none",
        use_dora=dora,
        task_type="CAUSAL_LM",
    )
    if cfg.quantize:  # QLoRA: the same adapters on the 4-bit NF4Linear targets (check_config refused DoRA)
        from smt_kernels.quant.lora import get_nf4_peft_model, nf4_lora_config

        peft_model = get_nf4_peft_model(model, nf4_lora_config(**options))
    else:
        peft_model = get_peft_model(model, LoraConfig(**options))
    return Prepared(peft_model, target_params=elements, lora_rank=rank)


def _prepare_smt(
    model: nn.Module,
    cfg: FinetuneConfig,
    select_batches: list[dict],
    device: torch.device,
    selection: Selection | None,
    elements: int,
) -> Prepared:
    seconds = None
    if selection is None:
        selection, seconds = select_smt(model, cfg, select_batches, device)
    prepared = patch_smt(model, cfg, selection)
    prepared.target_params, prepared.select_seconds = elements, seconds
    if is_main_process():
        log.info("%s", prepared.summary)
    return prepared


def select_smt(
    model: nn.Module, cfg: FinetuneConfig, select_batches: list[dict], device: torch.device
) -> tuple[Selection, float]:
    """``cfg``'s block selection on ``select_batches`` (an unpatched model) and the seconds it took.

    One process: select_blocks; under torchrun each rank warms up on its share of the batches and every rank
    gets rank 0's selection.
    """
    t0 = time.perf_counter()
    try:
        with autocast(device):
            selection = select_blocks_distributed(
                model,
                select_batches,
                targets=cfg.targets,
                score=cfg.score,
                strategy=cfg.strategy,
                block_size=cfg.block_size,
                progress=cfg.progress and is_main_process(),
                **cfg.select_warmup,
                **cfg.budget,
            )
    except (ValueError, TypeError) as err:
        raise FinetuneError(f"SMT selection failed: {err}") from None
    # global batches (under torchrun: not each rank's share); a warm-up of N steps uses the first N of them
    warmup = cfg.select_warmup.get("warmup_steps", 0)
    selection.num_batches = min(len(select_batches), warmup) if warmup else len(select_batches)
    return selection, time.perf_counter() - t0


def patch_smt(model: nn.Module, cfg: FinetuneConfig, selection: Selection) -> Prepared:
    """``model`` patched with ``selection`` (its blocks the only trainable tensors) and the selection's summary."""
    try:
        # the config explicitly: a selection read back on --resume does not carry it
        # fp32 blocks on a 4-bit base: the run's master weights are fp32 whatever the base's compute dtype
        block_dtype = torch.float32 if cfg.quantize else None
        model = smt_kernels.patch(model, selection, config=cfg.smt_config, verbose=False, block_dtype=block_dtype)
    except (ValueError, TypeError) as err:
        raise FinetuneError(f"SMT patching failed: {err}") from None
    summary = summarize_selection(model, selection, block_size=cfg.block_size, targets=cfg.targets)
    return Prepared(model, selection=selection, summary=summary)
