"""Model-level NF4: quantize a model's linears, make chosen blocks of them trainable, and merge back.

``quantize_base`` turns every ``nn.Linear`` except ``lm_head`` (and ``skip``) into a frozen ``NF4Linear``;
bitsandbytes ``Linear4bit`` layers (a model transformers loaded with ``load_in_4bit``) are taken over without
requantizing. ``patch_nf4`` swaps selected ``NF4Linear`` modules for ``NF4SparseBlockLinear`` and freezes
everything else (the ``patch`` of a 4-bit model); ``merge_nf4`` gives plain ``nn.Linear`` layers back.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from smt_kernels.layout import check_block_size
from smt_kernels.quant.bnb import is_bnb_linear4bit, nf4_from_bnb
from smt_kernels.quant.module import NF4Linear, NF4SparseBlockLinear
from smt_kernels.quant.nf4 import SUPPORTED_DTYPES

logger = logging.getLogger(__name__)

CONFIG_ATTR = "smt_config"  # the attribute smt_kernels.patch keeps its record in; the same record here
ALWAYS_SKIPPED = ("lm_head",)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    # a pattern names a module fully ("model.layers.0.mlp.down_proj") or by its last parts ("mlp.down_proj")
    return any(name == p or name.endswith("." + p) for p in patterns)


def quantize_base(
    model: nn.Module,
    method: str = "nf4",
    skip: Sequence[str] = (),
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` (and bitsandbytes ``Linear4bit``) except ``lm_head`` and ``skip`` by a frozen
    ``NF4Linear``, quantizing on the layer's own device (a GPU quantizes fast); returns the same model.

    Args:
        method: "nf4" (the only format).
        skip: module names (full, or trailing parts such as "down_proj") to leave alone.
        double_quant: quantize the absmax scales to 8 bits (QLoRA's default).
        compute_dtype: dtype of the forward/backward GEMMs; default each linear's dtype (bitsandbytes layers:
            their ``compute_dtype``).
    Layers are replaced one at a time, so the peak is one layer's temporaries above the model.
    """
    if method != "nf4":
        raise ValueError(f"quantize_base supports method='nf4' only, got {method!r}")
    if compute_dtype is not None and compute_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"compute_dtype {compute_dtype} is not supported; use float32, float16 or bfloat16")
    if getattr(model, CONFIG_ATTR, None) is not None:
        raise ValueError("the model is already patched for SMT; quantize the base before patching")
    targets = [
        (n, m)
        for n, m in model.named_modules()
        if (isinstance(m, nn.Linear) or is_bnb_linear4bit(m))
        and not _matches(n, ALWAYS_SKIPPED)
        and not _matches(n, skip)
    ]
    bad = [
        f"{n} ({m.weight.dtype})"
        for n, m in targets
        if not is_bnb_linear4bit(m) and m.weight.dtype not in SUPPORTED_DTYPES
    ]
    if bad:
        raise TypeError(f"quantize_base: these linears are not float32/float16/bfloat16: {bad[:5]}")
    modules = dict(model.named_modules())
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    for name, m in targets:
        if is_bnb_linear4bit(m):
            dtype = compute_dtype or getattr(m, "compute_dtype", None) or torch.bfloat16
            new = NF4Linear.from_nf4(nf4_from_bnb(m), m.bias, dtype)
        else:
            new = NF4Linear.from_linear(m, double_quant=double_quant, compute_dtype=compute_dtype)
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent] if parent else model, attr, new)
    after = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        m.nbytes() for m in model.modules() if isinstance(m, NF4Linear)
    )
    logger.info(
        "quantize_base: %d linears to NF4 (double_quant=%s); parameters %.1f MB -> %.1f MB",
        len(targets),
        double_quant,
        before / 1e6,
        after / 1e6,
    )
    return model


def nf4_modules(model: nn.Module, trainable: bool | None = None) -> dict[str, NF4Linear]:
    """``{name: module}`` of the NF4 layers; ``trainable=True`` only NF4SparseBlockLinear, False only frozen ones."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, NF4Linear) and (trainable is None or isinstance(m, NF4SparseBlockLinear) == trainable)
    }


def patch_nf4(
    model: nn.Module,
    selection: Mapping[str, Sequence[Sequence[int]]],
    block_size: int,
    block_dtype: torch.dtype | None = None,
) -> nn.Module:
    """``smt_kernels.patch`` restricted to 4-bit targets: every selected module must be an ``NF4Linear``.

    Args:
        selection: {module name: [(row_block, col_block), ...]}, each name an ``NF4Linear`` (empty lists ignored).
        block_size: b, a power of two in [16, 256].
        block_dtype: dtype of the trainable blocks; default each layer's compute dtype.
    Returns:
        the same model, patched as ``smt_kernels.patch`` patches it (validation, hooks, ``model.smt_config``,
        rollback). Raises ValueError naming every bad entry, an ``nn.Linear`` target included, before changing
        anything.
    """
    from smt_kernels.patch import _patch  # smt_kernels.patch imports this package

    return _patch(model, selection, check_block_size(block_size), True, block_dtype, nf4_only=True)


@torch.no_grad()
def merge_nf4(model: nn.Module, frozen: str = "dequantize") -> nn.Module:
    """Fold the trained blocks back: every ``NF4SparseBlockLinear`` becomes a plain ``nn.Linear`` in its compute
    dtype (dequantized base with the blocks in place). ``frozen="dequantize"`` (default) turns the frozen
    ``NF4Linear`` layers into ``nn.Linear`` too, so the result is an ordinary model; ``frozen="keep"`` leaves
    them 4-bit. On a patched model this is ``smt_kernels.merge(model, frozen)`` (flags restored, hooks moved
    back); on an unpatched 4-bit model it only dequantizes. Returns the same model.

    This is lossy only in the base (the NF4 rounding of the original weights); to keep the original 16-bit base,
    fold the saved blocks into the original checkpoint with ``fold_blocks_into_checkpoint``.
    """
    from smt_kernels.patch import _replace, merge

    if frozen not in ("dequantize", "keep"):
        raise ValueError(f"frozen must be 'dequantize' or 'keep', got {frozen!r}")
    if getattr(model, CONFIG_ATTR, None) is not None:
        return merge(model, frozen)
    if frozen == "dequantize":
        modules = dict(model.named_modules())
        for name, m in nf4_modules(model).items():
            parent, _, attr = name.rpartition(".")
            _replace(modules[parent], attr, m, m.to_linear())
    return model


def trained_blocks(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (block_indices (n, 2), block_weight (n, b, b))} of every patched layer (4-bit
    NF4SparseBlockLinear and 16-bit SparseBlockLinear alike), detached on the CPU: what
    ``fold_blocks_into_checkpoint`` takes (with the block size) without going through a file."""
    from smt_kernels.patch import patched_modules  # patch imports this package

    mods = patched_modules(model)
    return {n: (m.block_indices.detach().cpu(), m.block_weight.detach().cpu()) for n, m in mods.items()}


@contextlib.contextmanager
def nf4_weight_gradients(model: nn.Module, folds: Mapping[str, Callable[[torch.Tensor], None]]) -> Iterator[None]:
    """Within the block, every backward hands each named frozen ``NF4Linear``'s dense weight gradient dL/dW
    ((N, K), compute dtype; summed over the tokens of that backward) to ``folds[name]`` and drops it: one dense
    gradient exists at a time, as in gradient-based block selection on a 16-bit model (``select_blocks``'
    post-accumulate-grad hooks). Nothing else of the model gets a gradient from these layers.
    """
    modules = nf4_modules(model)
    bad = [n for n in folds if n not in modules or isinstance(modules[n], NF4SparseBlockLinear)]
    if bad:
        raise ValueError(f"nf4_weight_gradients needs frozen NF4Linear modules; not such: {bad[:5]}")
    try:
        for name, fold in folds.items():
            m = modules[name]
            anchor = torch.zeros(0, device=m.weight_packed.device, requires_grad=True)
            m.weight_grad_fold = (fold, anchor)
        yield
    finally:
        for name in folds:
            modules[name].weight_grad_fold = None
