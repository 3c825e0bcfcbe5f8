"""Fingerprints of a base model's weights: which checkpoint a set of trained blocks belongs to.

``save_blocks`` stores one, ``load_blocks`` recomputes it on the model it loads onto and compares. A digest
samples a fixed set of elements per tensor, so it is cheap on an 8B model and the same on any device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from smt_kernels.layout import num_blocks_along
from smt_kernels.patch import PATCHED_TYPES, canonical_selection

# NF4 statistics whose fp32 rounding depends on the device that quantized (the offset is a mean: its summation
# order differs between CPU and GPU; the group scales are maxima of absmax - offset). The 4-bit and 8-bit codes
# identify the base; digesting these too would refuse blocks trained on a GPU-quantized base for the same
# checkpoint quantized on the CPU. Left out of new fingerprints and ignored in saved ones.
DEVICE_ROUNDED = (".weight_absmax_scale", ".weight_absmax_offset")

# elements sampled per tensor: enough that another checkpoint (or another fine-tune of the same one) differs
# somewhere in the sample, cheap enough for an 8B model in seconds
FINGERPRINT_SAMPLES = 4096


def block_mask(blocks: Sequence[Sequence[int]], shape: tuple[int, int], block_size: int) -> torch.Tensor:
    """Bool (R, C) grid over the b×b blocks of a ``shape`` weight, True at ``blocks``."""
    grid = torch.zeros(num_blocks_along(shape[0], block_size), num_blocks_along(shape[1], block_size), dtype=torch.bool)
    if blocks:
        idx = torch.tensor([list(p) for p in blocks], dtype=torch.int64)
        grid[idx[:, 0], idx[:, 1]] = True
    return grid


@torch.no_grad()
def base_fingerprint(
    model: nn.Module, selection: Mapping[str, Sequence[Sequence[int]]], block_size: int
) -> dict[str, str]:
    """{state_dict key: digest} of every base tensor (but the ``DEVICE_ROUNDED`` NF4 statistics), the same for a
    patched and an unpatched model.

    Each digest is a SHA-256 of the name, shape, dtype and ``FINGERPRINT_SAMPLES`` elements at fixed evenly
    spaced positions (all elements of small tensors). Positions inside the selected blocks of a selected
    weight are left out: training rewrites them in place, so only the weights outside the blocks identify
    the base model. ``block_weight``/``block_indices`` of patched layers are not base tensors and are skipped.
    """
    sel = canonical_selection(selection)
    skip = set()
    for name, m in model.named_modules():
        if isinstance(m, PATCHED_TYPES):
            skip.update({f"{name}.block_weight", f"{name}.block_indices"})
    out = {}
    for key, t in model.state_dict().items():
        if key in skip or key.endswith(DEVICE_ROUNDED):
            continue
        flat = t.detach().reshape(-1)
        n = flat.numel()
        pos = torch.arange(min(n, FINGERPRINT_SAMPLES), dtype=torch.int64)
        if n > FINGERPRINT_SAMPLES:  # evenly spaced, first and last included; integer maths, no float rounding
            pos = pos * (n - 1) // (FINGERPRINT_SAMPLES - 1)
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module in sel and t.dim() == 2:
            grid = block_mask(sel[module], tuple(t.shape), block_size)
            rows, cols = pos // t.shape[1], pos % t.shape[1]
            pos = pos[~grid[rows // block_size, cols // block_size]]
        vals = flat[pos.to(flat.device)].cpu().contiguous()
        h = hashlib.sha256(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(vals.view(torch.uint8).numpy().tobytes() if vals.numel() else b"")
        out[key] = h.hexdigest()[:32]
    return out


NF4_KEY = ".weight_packed"  # an NF4Linear's state holds weight_packed, weight_absmax*, never weight


def base_kinds(fingerprint: Mapping[str, str]) -> dict[str, str]:
    """{module: "4-bit NF4" or "16-bit"} for every module whose weight a fingerprint covers."""
    out = {}
    for key in fingerprint:
        if key.endswith(NF4_KEY):
            out[key.removesuffix(NF4_KEY)] = "4-bit NF4"
        elif key.endswith(".weight"):
            out.setdefault(key.removesuffix(".weight"), "16-bit")
    return out


def _base_mismatch(saved: Mapping[str, str], now: Mapping[str, str]) -> str | None:
    """A sentence saying which modules were trained on another kind of base (16-bit vs 4-bit NF4), or None."""
    was, now_kinds = base_kinds(saved), base_kinds(now)
    differ = [n for n in was if n in now_kinds and was[n] != now_kinds[n]]
    if not differ:
        return None
    first = differ[0]
    advice = (
        "fold them into the original 16-bit checkpoint with fold_blocks_into_checkpoint (exact), or "
        if was[first] == "4-bit NF4"
        else ""
    )
    return (
        f"the blocks were trained on a {was[first]} base, but this model's base is {now_kinds[first]} "
        f"({len(differ)} modules, e.g. {differ[:3]}). SMT blocks are absolute weight values, so they can be put "
        f"over the other base: {advice}pass strict=False to load them anyway (outside the blocks this model "
        "then keeps its own weights, which differ from the training base by the NF4 rounding)"
    )


def compare_fingerprints(saved: Mapping[str, str], now: Mapping[str, str]) -> None:
    """Raise ValueError naming the tensors that differ, are missing or are new; return if all digests match.

    Blocks trained on a 16-bit base and checked against a 4-bit NF4 one (or the reverse) get an error that says so.
    """
    mismatch = _base_mismatch(saved, now)
    if mismatch is not None:
        raise ValueError(mismatch)
    saved = {k: v for k, v in saved.items() if not k.endswith(DEVICE_ROUNDED)}  # files written before 2026-11-30
    now = {k: v for k, v in now.items() if not k.endswith(DEVICE_ROUNDED)}
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
        raise ValueError(
            "the blocks were trained on a different base model: "
            + "; ".join(parts)
            + " (pass strict=False to load anyway)"
        )
