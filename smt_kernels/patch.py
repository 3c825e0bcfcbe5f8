"""Patch a Hugging Face model for SMT, merge it back, and save/load only the trained blocks.

``patch`` swaps the selected ``nn.Linear`` modules for ``SparseBlockLinear`` and freezes everything else;
``merge`` turns them back into plain ``nn.Linear`` with the trained blocks folded in; ``save_blocks`` writes
the blocks (safetensors) and a JSON with the layout and a fingerprint of the base weights; ``load_blocks``
checks all of it before it touches the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from smt_kernels.kernels import torch_blocks
from smt_kernels.layout import BlockLayout, check_block_size, num_blocks_along
from smt_kernels.module import SparseBlockLinear
from smt_kernels.ops import SUPPORTED_DTYPES

CONFIG_ATTR = "smt_config"
BLOCKS_FILE = "smt_blocks.safetensors"
META_FILE = "smt_blocks.json"
FORMAT = "smt_kernels.blocks"
FORMAT_VERSION = 1
# elements sampled per tensor for the base-weight fingerprint: enough that another checkpoint (or another
# fine-tune of the same one) differs somewhere in the sample, cheap enough for an 8B model in seconds
FINGERPRINT_SAMPLES = 4096


@dataclass(frozen=True)
class _Plan:
    name: str
    parent: nn.Module
    attr: str
    layout: BlockLayout


def _canonical(selection: Mapping[str, Sequence[Sequence[int]]]) -> dict[str, list[list[int]]]:
    """The selection as {name: [[r, c], ...]} with empty entries dropped; TypeError/ValueError on bad structure."""
    if not isinstance(selection, Mapping):
        raise TypeError(f"selection must be a mapping {{module_name: [(row_block, col_block), ...]}}, "
                        f"got {type(selection).__name__}")
    out = {}
    for name, blocks in selection.items():
        if not isinstance(name, str):
            raise TypeError(f"selection keys must be module names (str), got {name!r}")
        if isinstance(blocks, str | bytes) or not isinstance(blocks, Sequence | torch.Tensor):
            raise TypeError(f"selection[{name!r}] must be a list of (row_block, col_block) pairs, got {blocks!r}")
        pairs = blocks.tolist() if isinstance(blocks, torch.Tensor) else list(blocks)
        if not pairs:
            continue
        try:
            out[name] = [[int(r), int(c)] for r, c in pairs]
        except (TypeError, ValueError) as err:
            raise ValueError(f"selection[{name!r}] must hold (row_block, col_block) integer pairs: {err}") from None
    return out


def _describe_linears(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    return (f"the model has {len(names)} nn.Linear modules named {leaves}, e.g. "
            f"{names[:3]}" if names else "the model has no nn.Linear modules")


def _plan(model: nn.Module, selection: Mapping[str, Any], block_size: int) -> list[_Plan]:
    """Check every selected module and block; raise one ValueError listing all problems. Changes nothing."""
    sel = _canonical(selection)
    if not sel:
        raise ValueError("the selection selects no blocks (it is empty or every module has an empty list)")
    if getattr(model, CONFIG_ATTR, None) is not None or any(isinstance(m, SparseBlockLinear) for m in model.modules()):
        raise ValueError("the model is already patched for SMT; merge(model) first or load blocks onto it")
    modules = dict(model.named_modules())
    problems, plans = [], []
    for name, blocks in sel.items():
        m = modules.get(name)
        if m is None:
            problems.append(f"{name!r}: no such module")
            continue
        if not isinstance(m, nn.Linear):
            problems.append(f"{name!r}: is a {type(m).__name__}, not an nn.Linear")
            continue
        if m.weight.dtype not in SUPPORTED_DTYPES:
            problems.append(f"{name!r}: weight dtype {m.weight.dtype} is not float32/float16/bfloat16 "
                            "(quantised layers cannot be patched)")
            continue
        try:
            layout = BlockLayout.build(blocks, m.out_features, m.in_features, block_size)
        except (ValueError, TypeError) as err:
            problems.append(f"{name!r}: {err}")
            continue
        parent_name, _, attr = name.rpartition(".")
        plans.append(_Plan(name, modules[parent_name], attr, layout))
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise ValueError(
            f"the selection does not fit this {type(model).__name__} (block_size {block_size}); nothing was changed:\n"
            + "\n".join(f"  - {p}" for p in shown) + f"\n{_describe_linears(model)}"
        )
    return plans


def _resolve_block_size(selection: Any, block_size: int | None) -> int:
    own = getattr(selection, "block_size", None)
    if block_size is not None and own is not None and block_size != own:
        raise ValueError(f"block_size={block_size} but the selection was made with block_size {own}")
    return check_block_size(block_size if block_size is not None else own if own is not None else 256)


def patched_modules(model: nn.Module) -> dict[str, SparseBlockLinear]:
    """``{name: module}`` of every SparseBlockLinear in ``model``, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseBlockLinear)}


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable weight elements, all parameters).

    For a patched model, trainable counts the weight elements the blocks cover (clipped edge blocks count
    clipped) and ``block_weight`` storage is not counted twice in the total.
    """
    patched = patched_modules(model)
    block_ids = {id(m.block_weight) for m in patched.values()}
    total = sum(p.numel() for p in model.parameters() if id(p) not in block_ids)
    trainable = sum(m.trainable_elements() for m in patched.values() if m.block_weight.requires_grad)
    trainable += sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in block_ids)
    return trainable, total


def patch(
    model: nn.Module,
    selection: Mapping[str, Sequence[Sequence[int]]],
    block_size: int | None = None,
    verbose: bool = True,
) -> nn.Module:
    """Swap every selected ``nn.Linear`` for a ``SparseBlockLinear``; only the block weights stay trainable.

    Args:
        model: e.g. LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM (biases are kept).
        selection: {module_name: [(row_block, col_block), ...]} as from ``select_blocks`` (or its JSON);
            modules with an empty list are left alone.
        block_size: b; defaults to the selection's own ``block_size`` if it has one, else 256.
        verbose: print one line with the trainable parameter count.
    Returns:
        the same model object, patched in place. The selection, block size and the original ``requires_grad``
        flags (restored by ``merge``) are kept in ``model.smt_config``.
    Raises:
        ValueError naming every unknown module, non-Linear module and out-of-range or duplicate block, before
        anything is changed.
    """
    block_size = _resolve_block_size(selection, block_size)
    plans = _plan(model, selection, block_size)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    swapped: list[tuple[_Plan, SparseBlockLinear]] = []
    try:
        for plan in plans:
            old = getattr(plan.parent, plan.attr)
            new = SparseBlockLinear.from_linear(old, plan.layout.indices, block_size)
            setattr(plan.parent, plan.attr, new)  # the old layer is freed here, so the copy costs one matrix
            swapped.append((plan, new))
    except BaseException:
        # only allocation can fail after validation; put plain layers back (exact: no block was trained)
        for plan, new in reversed(swapped):
            setattr(plan.parent, plan.attr, new.to_linear())
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, True))
        raise
    for p in model.parameters():
        p.requires_grad_(False)
    for _, new in swapped:
        new.block_weight.requires_grad_(True)
    setattr(model, CONFIG_ATTR, {
        "block_size": block_size,
        "selection": {p.name: p.layout.to_list() for p in plans},
        "requires_grad": flags,
    })
    if verbose:
        trainable, total = trainable_parameters(model)
        n_blocks = sum(p.layout.num_blocks for p in plans)
        print(f"smt_kernels.patch: {len(plans)} modules, {n_blocks} blocks of {block_size}×{block_size}; "
              f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    return model


def _require_patched(model: nn.Module, what: str) -> tuple[dict[str, Any], dict[str, SparseBlockLinear]]:
    cfg = getattr(model, CONFIG_ATTR, None)
    mods = patched_modules(model)
    if not mods:
        raise ValueError(f"{what} needs a model patched with smt_kernels.patch; this {type(model).__name__} has "
                         "no SparseBlockLinear modules")
    if cfg is None:
        raise ValueError(f"{what}: the model has SparseBlockLinear modules but no model.{CONFIG_ATTR}; "
                         "patch it with smt_kernels.patch")
    if set(mods) != set(cfg["selection"]):
        raise ValueError(f"{what}: model.{CONFIG_ATTR} and the model disagree: listed but not patched "
                         f"{sorted(set(cfg['selection']) - set(mods))[:3]}, patched but not listed "
                         f"{sorted(set(mods) - set(cfg['selection']))[:3]}")
    return cfg, mods


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold the trained blocks back: every SparseBlockLinear becomes a plain ``nn.Linear`` (same device, dtype).

    Outputs equal the patched model's; ``save_pretrained``/``from_pretrained`` then work as for any HF model.
    The ``requires_grad`` flags from before ``patch`` are restored. Returns the same model object.
    """
    cfg, mods = _require_patched(model, "merge")
    modules = dict(model.named_modules())
    flags = cfg.get("requires_grad", {})
    for name, m in mods.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name], attr, m.to_linear())
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, True))
    delattr(model, CONFIG_ATTR)
    return model


# ------------------------------------------------------------------------------------------------- fingerprint

def _block_mask(selection_blocks: Sequence[Sequence[int]], shape: tuple[int, int], block_size: int) -> torch.Tensor:
    grid = torch.zeros(num_blocks_along(shape[0], block_size), num_blocks_along(shape[1], block_size),
                       dtype=torch.bool)
    if selection_blocks:
        idx = torch.tensor([list(p) for p in selection_blocks], dtype=torch.int64)
        grid[idx[:, 0], idx[:, 1]] = True
    return grid


@torch.no_grad()
def base_fingerprint(
    model: nn.Module, selection: Mapping[str, Sequence[Sequence[int]]], block_size: int
) -> dict[str, str]:
    """{state_dict key: digest} of every base tensor, the same for a patched and an unpatched model.

    Each digest is a SHA-256 of the name, shape, dtype and ``FINGERPRINT_SAMPLES`` elements at fixed evenly
    spaced positions (all elements of small tensors). Positions inside the selected blocks of a selected
    weight are left out: training rewrites them in place, so only the weights outside the blocks identify
    the base model. ``block_weight``/``block_indices`` of patched layers are not base tensors and are skipped.
    """
    sel = _canonical(selection)
    skip = set()
    for name, m in model.named_modules():
        if isinstance(m, SparseBlockLinear):
            skip.update({f"{name}.block_weight", f"{name}.block_indices"})
    out = {}
    for key, t in model.state_dict().items():
        if key in skip:
            continue
        flat = t.detach().reshape(-1)
        n = flat.numel()
        pos = torch.arange(min(n, FINGERPRINT_SAMPLES), dtype=torch.int64)
        if n > FINGERPRINT_SAMPLES:  # evenly spaced, first and last included; integer maths, no float rounding
            pos = pos * (n - 1) // (FINGERPRINT_SAMPLES - 1)
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module in sel and t.dim() == 2:
            grid = _block_mask(sel[module], tuple(t.shape), block_size)
            rows, cols = pos // t.shape[1], pos % t.shape[1]
            pos = pos[~grid[rows // block_size, cols // block_size]]
        vals = flat[pos.to(flat.device)].cpu().contiguous()
        h = hashlib.sha256(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(vals.view(torch.uint8).numpy().tobytes() if vals.numel() else b"")
        out[key] = h.hexdigest()[:32]
    return out


# --------------------------------------------------------------------------------------------------- save/load

def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_blocks(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the trained blocks of a patched model into directory ``path`` (created if needed).

    Files: ``smt_blocks.safetensors`` ({module}.block_weight: (n, b, b) each, in the layer's dtype) and
    ``smt_blocks.json`` (format version, block size, per module its weight shape, dtype and blocks in order,
    the SHA-256 of the safetensors file and the base-weight fingerprint). Returns the directory.
    """
    cfg, mods = _require_patched(model, "save_blocks")
    block_size = cfg["block_size"]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, modules = {}, {}
    for name, m in mods.items():
        tensors[f"{name}.block_weight"] = m.block_weight.detach().to("cpu").contiguous()
        modules[name] = {
            "shape": [m.out_features, m.in_features],
            "dtype": _dtype_name(m.block_weight.dtype),
            "blocks": [[int(r), int(c)] for r, c in m.block_indices.tolist()],
        }
    selection = {n: v["blocks"] for n, v in modules.items()}
    blocks_path = path / BLOCKS_FILE
    _atomic_write(blocks_path, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "block_size": block_size,
        "num_blocks": sum(len(v["blocks"]) for v in modules.values()),
        "modules": modules,
        "safetensors_sha256": _sha256_file(blocks_path),
        "fingerprint": base_fingerprint(model, selection, block_size),
    }
    _atomic_write(path / META_FILE, lambda tmp: Path(tmp).write_text(_dump_meta(meta)))
    return path


def _dump_meta(meta: Mapping[str, Any]) -> str:
    """JSON with one line per top-level key and per module / fingerprint entry (diffable, not one huge line)."""
    lines = []
    for key, value in meta.items():
        if isinstance(value, dict):
            inner = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
            lines.append(f" {json.dumps(key)}: {{\n{inner}\n }}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"no {META_FILE} in {path} (save_blocks writes {META_FILE} and {BLOCKS_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta_path} is not valid JSON (corrupt or truncated): {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} is not an smt_kernels blocks file (format {FORMAT!r} expected)")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format version {meta.get('version')}; this smt_kernels reads "
                         f"version {FORMAT_VERSION}")
    need = ("block_size", "modules", "safetensors_sha256", "fingerprint")
    missing = [k for k in need if k not in meta]
    if missing:
        raise ValueError(f"{meta_path} misses keys {missing} (corrupt or truncated)")
    try:
        for name, v in meta["modules"].items():
            if not (len(v["shape"]) == 2 and isinstance(v["dtype"], str)
                    and all(len(p) == 2 for p in v["blocks"])):
                raise ValueError(name)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{meta_path}: malformed module entry {err}") from None
    return meta


def _compare_fingerprints(saved: Mapping[str, str], now: Mapping[str, str]) -> None:
    missing = [k for k in saved if k not in now]
    extra = [k for k in now if k not in saved]
    differ = [k for k in saved if k in now and saved[k] != now[k]]
    if missing or extra or differ:
        parts = []
        if differ:
            parts.append(f"{len(differ)} base tensors differ, e.g. {differ[:4]}")
        if missing:
            parts.append(f"{len(missing)} saved tensors are missing from the model, e.g. {missing[:4]}")
        if extra:
            parts.append(f"{len(extra)} model tensors were not in the saved base model, e.g. {extra[:4]}")
        raise ValueError("the blocks were trained on a different base model: " + "; ".join(parts)
                         + " (pass strict=False to load anyway)")


@torch.no_grad()
def load_blocks(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load blocks written by ``save_blocks`` onto ``model``; returns the model.

    ``model`` is either patched with the same selection (same modules, same blocks in the same order, same
    block size) or a plain model, which is then patched with the saved selection. Everything is checked before
    anything changes: the JSON, the file's SHA-256 (truncated/corrupt file), tensor names/shapes/dtypes, the
    layout, and (``strict``) the fingerprint of the base weights outside the blocks.
    """
    path = Path(path)
    meta = _read_meta(path)
    block_size = check_block_size(int(meta["block_size"]))
    saved = meta["modules"]
    selection = {n: v["blocks"] for n, v in saved.items()}

    cfg = getattr(model, CONFIG_ATTR, None)
    if cfg is not None:
        cfg, mods = _require_patched(model, "load_blocks")
        _check_same_layout(cfg, mods, saved, block_size, path)
    else:
        plans = _plan(model, selection, block_size)
        mods = None
        for p in plans:
            lin = getattr(p.parent, p.attr)
            if [lin.out_features, lin.in_features] != list(saved[p.name]["shape"]):
                raise ValueError(f"{p.name}: the model's weight is {lin.out_features}×{lin.in_features}, the "
                                 f"file's {saved[p.name]['shape'][0]}×{saved[p.name]['shape'][1]}")
            if _dtype_name(lin.weight.dtype) != saved[p.name]["dtype"]:
                raise ValueError(f"{p.name}: the model's weight is {_dtype_name(lin.weight.dtype)} but the blocks "
                                 f"were saved as {saved[p.name]['dtype']}; convert the model first")

    blocks_path = path / BLOCKS_FILE
    if not blocks_path.is_file():
        raise FileNotFoundError(f"no {BLOCKS_FILE} in {path}")
    digest = _sha256_file(blocks_path)
    if digest != meta["safetensors_sha256"]:
        raise ValueError(f"{blocks_path} is corrupt or truncated: its SHA-256 is {digest[:16]}…, "
                         f"{META_FILE} says {meta['safetensors_sha256'][:16]}…")
    try:
        tensors = load_file(blocks_path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{blocks_path} cannot be read as safetensors: {err}") from None
    expected = {f"{n}.block_weight" for n in saved}
    if set(tensors) != expected:
        raise ValueError(f"{blocks_path} holds tensors {sorted(tensors)[:4]}..., expected {sorted(expected)[:4]}...")
    for name, v in saved.items():
        t = tensors[f"{name}.block_weight"]
        want = (len(v["blocks"]), block_size, block_size)
        if tuple(t.shape) != want or _dtype_name(t.dtype) != v["dtype"]:
            raise ValueError(f"{name}.block_weight is {tuple(t.shape)} {_dtype_name(t.dtype)} in the file; "
                             f"its JSON says {want} {v['dtype']}")
    if strict:
        _compare_fingerprints(meta["fingerprint"], base_fingerprint(model, selection, block_size))

    if mods is None:
        patch(model, selection, block_size, verbose=False)
        _, mods = _require_patched(model, "load_blocks")
    for name, m in mods.items():
        m.block_weight.copy_(tensors[f"{name}.block_weight"])
        # keep the dense weight consistent with the blocks even before the next forward
        torch_blocks.scatter_blocks(m.weight.data, m.block_weight.detach(), m.block_indices)
    return model


def _check_same_layout(cfg, mods, saved, block_size, path) -> None:
    if cfg["block_size"] != block_size:
        raise ValueError(f"the model is patched with block_size {cfg['block_size']}, the file in {path} has "
                         f"block_size {block_size}")
    if set(mods) != set(saved):
        only_model = sorted(set(mods) - set(saved))
        only_file = sorted(set(saved) - set(mods))
        raise ValueError(f"the file in {path} has another layout: modules only in the model {only_model[:4]}, "
                         f"only in the file {only_file[:4]}")
    for name, m in mods.items():
        v = saved[name]
        if [m.out_features, m.in_features] != list(v["shape"]):
            raise ValueError(f"{name}: the model's weight is {m.out_features}×{m.in_features}, the file's "
                             f"{v['shape'][0]}×{v['shape'][1]}")
        if m.block_indices.tolist() != [list(p) for p in v["blocks"]]:
            raise ValueError(f"{name}: the file in {path} has another layout ({len(v['blocks'])} blocks "
                             f"{v['blocks'][:4]}...) than the model ({m.num_blocks} blocks "
                             f"{m.block_indices.tolist()[:4]}...)")
        if _dtype_name(m.block_weight.dtype) != v["dtype"]:
            raise ValueError(f"{name}: the model's blocks are {_dtype_name(m.block_weight.dtype)}, the file's "
                             f"{v['dtype']}")
