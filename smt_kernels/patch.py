"""Patch a Hugging Face model for SMT and merge it back.

``patch`` swaps the selected ``nn.Linear`` modules for ``SparseBlockLinear`` (and the selected 4-bit ``NF4Linear``
modules of a ``quantize_base`` model for ``NF4SparseBlockLinear``) and freezes everything else; ``merge`` turns
them back into plain ``nn.Linear`` with the trained blocks folded in. Saving and loading the
blocks live in ``smt_kernels.block_files``, base-weight fingerprints in ``smt_kernels.fingerprint``; their names
stay importable from here.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from smt_kernels.config import SMTConfig, resolve_config
from smt_kernels.layout import BlockLayout, check_block_size
from smt_kernels.module import SparseBlockLinear
from smt_kernels.ops import SUPPORTED_DTYPES
from smt_kernels.quant.module import CODE_NAMES, NF4Linear, NF4SparseBlockLinear

logger = logging.getLogger(__name__)

# the layers patch creates: 16-bit base, 4-bit NF4 base (same attribute names: block_weight, block_indices, ...)
PATCHED_TYPES = (SparseBlockLinear, NF4SparseBlockLinear)
CONFIG_ATTR = "smt_config"
# the per-module hook registries that patch and merge move onto the replacing module. Moving the dicts
# themselves (not their entries) keeps the user's RemovableHandles working: a handle holds a weak reference
# to the dict it was registered in.
_CALL_HOOKS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)
# hooks that act on parameter names/values; a SparseBlockLinear has other parameters, so these are refused
_STATE_HOOKS = (
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)

# names that moved to their own modules, still importable from smt_kernels.patch
_MOVED = {
    "_atomic_write": "smt_kernels.block_files",
    "save_blocks": "smt_kernels.block_files",
    "load_blocks": "smt_kernels.block_files",
    "META_FILE": "smt_kernels.block_files",
    "FORMAT": "smt_kernels.block_files",
    "FORMAT_VERSION": "smt_kernels.block_files",
    "BlockFileError": "smt_kernels.block_files",
    "base_fingerprint": "smt_kernels.fingerprint",
    "FINGERPRINT_SAMPLES": "smt_kernels.fingerprint",
}


def __getattr__(name: str) -> Any:
    # lazy, because block_files and fingerprint import this module
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class _Plan:
    name: str
    parent: nn.Module
    attr: str
    layout: BlockLayout
    block_dtype: torch.dtype | None = None  # NF4 targets: dtype of the trainable blocks; None for nn.Linear

    def build(self, old: nn.Module) -> SparseBlockLinear | NF4SparseBlockLinear:
        # the plan's layout is already validated for this shape: the layers take it as it is
        if isinstance(old, NF4Linear):  # shares old's 4-bit buffers: nothing is copied
            return NF4SparseBlockLinear.from_nf4_linear(old, self.layout, self.layout.block_size, self.block_dtype)
        return SparseBlockLinear.from_linear(old, self.layout, self.layout.block_size)


def _index(value: Any, where: str) -> int:
    # bool is an Integral, and True would silently become block 1; floats and strings would be truncated/split
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{where}: block index {value!r} is a {value.dtype} tensor, not an integer")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: block index {value!r} is a {type(value).__name__}, not an int")
    return int(value)


def _pairs(name: str, blocks: Any) -> list[list[int]]:
    where = f"selection[{name!r}]"
    if isinstance(blocks, torch.Tensor):
        if blocks.is_floating_point() or blocks.is_complex() or blocks.dtype == torch.bool:
            raise TypeError(
                f"{where} is a {blocks.dtype} tensor {blocks.tolist()!r:.80}; block indices must be "
                "an integer tensor of shape (n, 2)"
            )
        if blocks.dim() != 2 or blocks.shape[1] != 2:
            raise ValueError(f"{where} must have shape (n, 2), got {tuple(blocks.shape)}")
        return [[int(r), int(c)] for r, c in blocks.tolist()]
    if isinstance(blocks, str | bytes | Mapping) or not isinstance(blocks, Sequence):
        raise TypeError(f"{where} must be a list of (row_block, col_block) pairs, got {blocks!r:.80}")
    out = []
    for k, pair in enumerate(blocks):
        if isinstance(pair, torch.Tensor):
            if pair.is_floating_point() or pair.is_complex() or pair.dtype == torch.bool:
                raise TypeError(f"{where} block {k} is a {pair.dtype} tensor {pair.tolist()!r}; use integers")
            pair = pair.tolist()
        if isinstance(pair, str | bytes | Mapping) or not isinstance(pair, Sequence):
            raise TypeError(f"{where} block {k} must be a (row_block, col_block) pair, got {pair!r:.80}")
        if len(pair) != 2:
            raise ValueError(f"{where} block {k} must hold (row_block, col_block) integer pairs, got {pair!r:.80}")
        out.append([_index(v, f"{where} block {k}") for v in pair])
    return out


def canonical_selection(selection: Mapping[str, Any]) -> dict[str, list[list[int]]]:
    """The selection as {name: [[r, c], ...]} with empty entries dropped.

    Nothing is coerced: a block index must be an int (or numpy integer, or an element of an integer tensor);
    floats, strings, bools and float tensors are TypeErrors naming the value, pairs of the wrong length
    ValueErrors.
    """
    if not isinstance(selection, Mapping):
        raise TypeError(
            f"selection must be a mapping {{module_name: [(row_block, col_block), ...]}}, "
            f"got {type(selection).__name__}"
        )
    out = {}
    for name, blocks in selection.items():
        if not isinstance(name, str):
            raise TypeError(f"selection keys must be module names (str), got {name!r}")
        pairs = _pairs(name, blocks)
        if pairs:
            out[name] = pairs
    return out


def _describe_linears(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | NF4Linear)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    kinds = "nn.Linear/NF4Linear" if any(isinstance(m, NF4Linear) for m in model.modules()) else "nn.Linear"
    return (
        f"the model has {len(names)} {kinds} modules named {leaves}, e.g. {names[:3]}"
        if names
        else "the model has no nn.Linear modules"
    )


def _storage_key(t: torch.Tensor) -> Any:
    # tied weights are one Parameter, or two sharing their data; views of one flat buffer are not ties
    try:
        ptr = t.data_ptr() if t.device.type != "meta" else 0
    except RuntimeError:  # tensor subclasses without storage (e.g. sharded): identity only
        ptr = 0
    return (t.device, ptr, tuple(t.shape), t.stride()) if ptr else id(t)


def _tensor_owners(model: nn.Module) -> dict[Any, list[str]]:
    """{tensor key: every parameter/buffer name holding it}, tied names included."""
    owners: dict[Any, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        owners.setdefault(_storage_key(t), []).append(name)
    return owners


def _unpatchable(name: str, m: nn.Linear | NF4Linear, owners: Mapping[Any, list[str]]) -> str | None:
    """Why ``m`` cannot be swapped without changing the model's behaviour, or None."""
    # an NF4SparseBlockLinear shares its base's buffers and bias Parameter (no copies), so ties survive patching
    for pname in () if isinstance(m, NF4Linear) else ("weight", "bias"):
        t = getattr(m, pname)
        if t is None:
            continue
        others = [o for o in owners.get(_storage_key(t), []) if o != f"{name}.{pname}"]
        if others:
            return (
                f"its {pname} is tied to {others[:3]} (the same tensor); patching would untie them. Leave it "
                "out, or untie first (e.g. tie_word_embeddings=False and a copy of the weight)"
            )
    if parametrize.is_parametrized(m):
        return "it has a torch.nn.utils.parametrize parametrization, which patch cannot carry over"
    hook = getattr(m, "_hf_hook", None)
    if hook is not None and not _placement_only(hook):
        return (
            f"it has an accelerate hook ({type(hook).__name__}) that offloads or is unknown, which patch cannot "
            "carry over; load the model without offloading (device_map onto GPUs is fine)"
        )
    state_hooks = [a for a in _STATE_HOOKS if getattr(m, a, None)]
    if state_hooks:
        return f"it has state-dict hooks ({', '.join(state_hooks)}), which patch cannot carry over"
    return None


def plan_patch(
    model: nn.Module,
    selection: Mapping[str, Any],
    block_size: int,
    block_dtype: torch.dtype | Mapping[str, torch.dtype] | None = None,
    nf4_only: bool = False,
) -> list[_Plan]:
    """Check every selected module and block; raise one ValueError listing all problems. Changes nothing.

    ``block_dtype`` (one dtype, or one per module name) applies to NF4Linear targets; an nn.Linear target's
    blocks have its weight's dtype, so another dtype for one is a problem. ``nf4_only`` refuses nn.Linear targets.
    """
    sel = canonical_selection(selection)
    if not sel:
        raise ValueError("the selection selects no blocks (it is empty or every module has an empty list)")
    if getattr(model, CONFIG_ATTR, None) is not None or any(isinstance(m, PATCHED_TYPES) for m in model.modules()):
        raise ValueError("the model is already patched for SMT; merge(model) first or load blocks onto it")
    modules = dict(model.named_modules())
    owners = _tensor_owners(model)
    problems, plans = [], []
    for name, blocks in sel.items():
        m = modules.get(name)
        dtype = block_dtype.get(name) if isinstance(block_dtype, Mapping) else block_dtype
        if m is None:
            problems.append(f"{name!r}: no such module")
            continue
        if not isinstance(m, nn.Linear | NF4Linear):
            problems.append(f"{name!r}: is a {type(m).__name__}, not an nn.Linear or NF4Linear")
            continue
        if isinstance(m, nn.Linear):
            if nf4_only:
                problems.append(f"{name!r}: is an nn.Linear, not an NF4Linear (quantize_base(model) first)")
                continue
            if m.weight.dtype not in SUPPORTED_DTYPES:
                problems.append(
                    f"{name!r}: weight dtype {m.weight.dtype} is not float32/float16/bfloat16 "
                    "(quantised layers other than smt_kernels' NF4Linear cannot be patched; quantize_base "
                    "takes bitsandbytes Linear4bit models over)"
                )
                continue
            if dtype is not None and dtype != m.weight.dtype:
                problems.append(
                    f"{name!r}: block dtype {dtype} asked for, but the blocks of an nn.Linear have its weight's "
                    f"dtype {m.weight.dtype}"
                )
                continue
        elif dtype is not None and dtype not in SUPPORTED_DTYPES:
            problems.append(f"{name!r}: block dtype {dtype} is not float32/float16/bfloat16")
            continue
        why = _unpatchable(name, m, owners)
        if why is not None:
            problems.append(f"{name!r}: {why}")
            continue
        try:
            layout = BlockLayout.build(blocks, m.out_features, m.in_features, block_size)
        except (ValueError, TypeError) as err:
            problems.append(f"{name!r}: {err}")
            continue
        parent_name, _, attr = name.rpartition(".")
        plans.append(_Plan(name, modules[parent_name], attr, layout, dtype if isinstance(m, NF4Linear) else None))
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise ValueError(
            f"the selection does not fit this {type(model).__name__} (block_size {block_size}); nothing was changed:\n"
            + "\n".join(f"  - {p}" for p in shown)
            + f"\n{_describe_linears(model)}"
        )
    return plans


def _resolve_config(selection: Any, config: SMTConfig | None, block_size: int | None) -> SMTConfig | None:
    """The config to record: ``config``, else the one the selection was made with (``select_blocks`` attaches
    it). ValueError if ``block_size`` or the selection's own config disagrees with ``config``."""
    own = getattr(selection, "config", None)
    if config is None:
        return own if isinstance(own, SMTConfig) else None
    resolve_config(config, "patch", block_size=block_size)
    if isinstance(own, SMTConfig) and own != config:
        raise ValueError(f"patch: config={config} but the selection was made with {own}; give one of them")
    return config


def _resolve_block_size(selection: Any, block_size: int | None) -> int:
    own = getattr(selection, "block_size", None)
    if block_size is not None and own is not None and block_size != own:
        raise ValueError(f"block_size={block_size} but the selection was made with block_size {own}")
    return check_block_size(block_size if block_size is not None else own if own is not None else 256)


def _placement_only(hook) -> bool:
    """Whether an accelerate hook only moves inputs to its module's device (``device_map`` over GPUs, no
    offloading): such a hook carries over to the replacing module unchanged."""
    if type(hook).__name__ == "SequentialHook":
        return all(_placement_only(h) for h in getattr(hook, "hooks", ()))
    return (
        type(hook).__name__ == "AlignDevicesHook"
        and not getattr(hook, "offload", True)
        and getattr(hook, "weights_map", None) is None
    )


def _replace(parent: nn.Module, attr: str, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` in ``old``'s place, with ``old``'s forward/backward hooks (the same registries, so handles
    the caller holds still remove them) and its accelerate placement hook (``device_map``), if any."""
    for hooks in _CALL_HOOKS:
        setattr(new, hooks, getattr(old, hooks))
    hf_hook = getattr(old, "_hf_hook", None)
    if hf_hook is not None:
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, hf_hook)
    new._is_full_backward_hook = old._is_full_backward_hook
    new.train(old.training)
    setattr(parent, attr, new)


def patched_modules(model: nn.Module) -> dict[str, SparseBlockLinear | NF4SparseBlockLinear]:
    """``{name: module}`` of every SparseBlockLinear and NF4SparseBlockLinear in ``model``, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PATCHED_TYPES)}


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable weight elements, all parameters).

    For a patched model, trainable counts the weight elements the blocks cover (clipped edge blocks count
    clipped) and ``block_weight`` storage is not counted twice in the total. A 4-bit ``NF4Linear`` weight (held
    in buffers, not parameters) counts its out × in elements, so the percentage is the same as on the 16-bit model.
    """
    patched = patched_modules(model)
    block_ids = {id(m.block_weight) for m in patched.values()}
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    # 4-bit codes that ``shard_nf4_base`` made parameters are the weights counted just below, not more parameters
    skip = block_ids | {id(p) for m in nf4 for name, p in m.named_parameters(recurse=False) if name in CODE_NAMES}
    total = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    total += sum(m.out_features * m.in_features for m in nf4)
    trainable = sum(m.trainable_elements() for m in patched.values() if m.block_weight.requires_grad)
    trainable += sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in skip)
    return trainable, total


def patch(
    model: nn.Module,
    selection: Mapping[str, Sequence[Sequence[int]]],
    block_size: int | None = None,
    verbose: bool = True,
    block_dtype: torch.dtype | None = None,
    config: SMTConfig | None = None,
) -> nn.Module:
    """Swap every selected ``nn.Linear`` for a ``SparseBlockLinear`` and every selected 4-bit ``NF4Linear`` (of a
    ``quantize_base`` model) for an ``NF4SparseBlockLinear``; only the block weights stay trainable.

    Args:
        model: e.g. LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM (biases are kept), 16-bit, 4-bit
            (``quantize_base`` / ``load_nf4_pretrained``) or a mix of the two.
        selection: {module_name: [(row_block, col_block), ...]} as from ``select_blocks`` (or its JSON);
            modules with an empty list are left alone. Indices must be ints (or an integer tensor).
        block_size: b; defaults to ``config.block_size``, else the selection's own ``block_size`` if it has
            one, else 256.
        verbose: log the trainable parameter count at INFO (else at DEBUG) on the ``smt_kernels.patch`` logger.
        block_dtype: dtype of the trainable blocks of NF4 targets (default: each layer's compute dtype; e.g.
            float32 blocks over a bf16 compute dtype). An nn.Linear target's blocks always have its weight's
            dtype; another ``block_dtype`` for one is an error.
        config: the ``SMTConfig`` the selection was made with, recorded (and saved by ``save_blocks``); default
            the selection's own ``.config`` (a ``Selection`` from ``select_blocks`` has one). A ``block_size``
            or a selection config that differs from it is a ValueError.
    Returns:
        the same model object, patched in place. The selection, block size, config and the original
        ``requires_grad`` flags (restored by ``merge``) are kept in ``model.smt_config``. Forward (pre-)hooks and
        backward hooks registered on a replaced module move to its new layer.
    Raises:
        TypeError for a block index that is not an int; ValueError naming every unknown module, non-linear,
        tied, parametrized or hooked-for-state-dict module and out-of-range or duplicate block, before
        anything is changed.
    """
    return _patch(model, selection, block_size, verbose, block_dtype, config=config)


def _patch(
    model: nn.Module,
    selection: Mapping[str, Any],
    block_size: int | None,
    verbose: bool,
    block_dtype: torch.dtype | Mapping[str, torch.dtype] | None,
    nf4_only: bool = False,
    config: SMTConfig | None = None,
) -> nn.Module:
    config = _resolve_config(selection, config, block_size)
    if block_size is None and config is not None:
        block_size = config.block_size
    block_size = _resolve_block_size(selection, block_size)
    plans = plan_patch(model, selection, block_size, block_dtype, nf4_only)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    # (plan, new layer, the old layer where keeping it is free: an NF4 layer shares its buffers with the new one)
    swapped: list[tuple[_Plan, nn.Module, nn.Module | None]] = []
    try:
        for plan in plans:
            old = getattr(plan.parent, plan.attr)
            new = plan.build(old)
            _replace(plan.parent, plan.attr, old, new)  # a dropped nn.Linear is freed here: the copy costs one matrix
            swapped.append((plan, new, old if isinstance(old, NF4Linear) else None))
    except BaseException:
        # only allocation can fail after validation; put the old layers back (exact: no block was trained)
        for plan, new, old in reversed(swapped):
            _replace(plan.parent, plan.attr, new, old if old is not None else new.to_linear())
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, True))
        raise
    for p in model.parameters():
        p.requires_grad_(False)
    for _, new, _ in swapped:
        new.block_weight.requires_grad_(True)
    setattr(
        model,
        CONFIG_ATTR,
        {
            "block_size": block_size,
            "selection": {p.name: p.layout.to_list() for p in plans},
            "config": config,
            "requires_grad": flags,
        },
    )
    trainable, total = trainable_parameters(model)
    n_blocks = sum(p.layout.num_blocks for p in plans)
    n_nf4 = sum(isinstance(new, NF4SparseBlockLinear) for _, new, _ in swapped)
    logger.log(
        logging.INFO if verbose else logging.DEBUG,
        "%d modules%s, %d blocks of %d×%d; trainable params: %s || all params: %s || trainable%%: %.4f",
        len(plans),
        f" ({n_nf4} on a 4-bit base)" if n_nf4 else "",
        n_blocks,
        block_size,
        block_size,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    return model


def require_patched(
    model: nn.Module, what: str
) -> tuple[dict[str, Any], dict[str, SparseBlockLinear | NF4SparseBlockLinear]]:
    """(``model.smt_config``, ``patched_modules(model)``); ValueError naming ``what`` if they are missing or
    disagree."""
    cfg = getattr(model, CONFIG_ATTR, None)
    mods = patched_modules(model)
    if not mods:
        raise ValueError(
            f"{what} needs a model patched with smt_kernels.patch; this {type(model).__name__} has "
            "no SparseBlockLinear (or NF4SparseBlockLinear) modules"
        )
    if cfg is None:
        raise ValueError(
            f"{what}: the model has patched (SparseBlockLinear) modules but no model.{CONFIG_ATTR}; "
            "patch it with smt_kernels.patch"
        )
    if set(mods) != set(cfg["selection"]):
        raise ValueError(
            f"{what}: model.{CONFIG_ATTR} and the model disagree: listed but not patched "
            f"{sorted(set(cfg['selection']) - set(mods))[:3]}, patched but not listed "
            f"{sorted(set(mods) - set(cfg['selection']))[:3]}"
        )
    return cfg, mods


@torch.no_grad()
def merge(model: nn.Module, frozen: str = "dequantize") -> nn.Module:
    """Fold the trained blocks back: every patched layer becomes a plain ``nn.Linear`` (same device).

    A ``SparseBlockLinear`` keeps its dtype and outputs equal the patched model's bit for bit; an
    ``NF4SparseBlockLinear`` becomes an ``nn.Linear`` in its compute dtype holding the dequantized 4-bit base with
    the trained blocks in place (outputs equal up to the GEMM's rounding). ``frozen`` says what happens to the
    frozen 4-bit ``NF4Linear`` layers of a ``quantize_base`` model: "dequantize" (default) makes them
    ``nn.Linear`` too, so the result is an ordinary model (``save_pretrained``/``from_pretrained`` then work as
    for any HF model); "keep" leaves them 4-bit. It does not matter for a 16-bit model.
    The ``requires_grad`` flags from before ``patch`` are restored (parameters that did not exist then, such as
    a dequantized weight, are left trainable, as a new ``nn.Linear``'s are), and forward/backward hooks move
    back onto the ``nn.Linear``. Returns the same model object. If a layer fails to merge (out of memory), every
    layer merged so far is put back and the model is left patched as it was.

    Merging into a 4-bit base is lossy in the base only (its NF4 rounding); for the original 16-bit base with the
    trained blocks, fold them into the original checkpoint (``fold_blocks_into_checkpoint``).
    """
    if frozen not in ("dequantize", "keep"):
        raise ValueError(f"frozen must be 'dequantize' or 'keep', got {frozen!r}")
    cfg, mods = require_patched(model, "merge")
    modules = dict(model.named_modules())
    flags = cfg.get("requires_grad", {})
    if frozen == "dequantize":
        mods = {n: m for n, m in modules.items() if n in mods or isinstance(m, NF4Linear)}
    swapped: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []
    try:
        for name, m in mods.items():
            parent_name, _, attr = name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            new = m.to_linear()
            _replace(parent, attr, m, new)
            swapped.append((parent, attr, m, new))
    except BaseException:
        # out of memory while dequantizing, say: the model goes back to its patched state, blocks intact (the old
        # layers are still held here, so this costs nothing)
        for parent, attr, old, new in reversed(swapped):
            _replace(parent, attr, new, old)
        raise
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, True))
    delattr(model, CONFIG_ATTR)
    return model
