"""Fingerprints of a base model's weights: which checkpoint a set of trained blocks belongs to.

``save_blocks`` stores one, ``load_blocks`` recomputes it on the model it loads onto and compares. A digest
samples a fixed set of elements per tensor, so it is cheap on an 8B model and the same on any device.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from smt_kernels.layout import num_blocks_along
from smt_kernels.patch import PATCHED_TYPES, canonical_selection

# NF4 statistics whose fp32 rounding depends on the device that quantized (the offset is a mean: its summation
# order differs between CPU and GPU; the group scales are maxima of absmax - offset). The 4-bit and 8-bit codes
# identify the base; digesting these too would refuse blocks trained on a GPU-quantized base for the same
# checkpoint quantized on the CPU. Left out of new fingerprints and ignored in saved ones.
DEVICE_ROUNDED = (".weight_absmax_scale", ".weight_absmax_offset")

# elements sampled per tensor (at least): enough that another checkpoint differs somewhere in the sample, cheap
# enough for an 8B model in seconds
FINGERPRINT_SAMPLES = 4096
# scheme 2: a 2-D tensor is sampled in every b×b tile (b = the block size), at least this many elements per tile,
# so that another fine-tune of the same checkpoint that changed whole blocks anywhere (a merged SMT run) differs
# in the sample; scheme 1's evenly spaced positions fell on the diagonal of square weights (4096×4096: 16 of 256
# blocks sampled)
SAMPLES_PER_TILE = 4
# ... but one per tile where that many would exceed this per tensor (small block sizes on big weights: b = 16 on a
# 4096×14336 weight has 229,376 tiles), so a save or load of an 8B model stays a matter of seconds
MAX_TILE_SAMPLES = 2**18
FINGERPRINT_SCHEME = 2  # what save_blocks writes (block files of format version 4)
FINGERPRINT_SCHEMES = (1, 2)


def block_mask(blocks: Sequence[Sequence[int]], shape: tuple[int, int], block_size: int) -> torch.Tensor:
    """Bool (R, C) grid over the b×b blocks of a ``shape`` weight, True at ``blocks``."""
    grid = torch.zeros(num_blocks_along(shape[0], block_size), num_blocks_along(shape[1], block_size), dtype=torch.bool)
    if blocks:
        idx = torch.tensor([list(p) for p in blocks], dtype=torch.int64)
        grid[idx[:, 0], idx[:, 1]] = True
    return grid


def _coprime_step(n: int) -> int:
    # a step near n / golden ratio with gcd 1: i·step mod n visits distinct, well spread positions
    step = max(1, round(n * 0.6180339887498949))
    while math.gcd(step, n) != 1:
        step += 1
    return step


def _mix64(x: np.ndarray) -> np.ndarray:
    # splitmix64's finaliser: fixed pseudo-random uint64 values, the same on every machine (uint64 arithmetic wraps)
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _tile_positions(shape: tuple[int, int], block_size: int) -> torch.Tensor:
    """Flat positions of scheme 2 in a 2-D ``shape``: per b×b tile (row-major order of the tiles) k elements at
    fixed pseudo-random places inside the tile (clipped edge tiles included); int64 (tiles, k)."""
    rows, cols = shape
    b = block_size
    grid_r, grid_c = num_blocks_along(rows, b), num_blocks_along(cols, b)
    tiles = grid_r * grid_c
    per_tile = SAMPLES_PER_TILE if tiles * SAMPLES_PER_TILE <= MAX_TILE_SAMPLES else 1
    k = min(b * b, max(per_tile, -(-FINGERPRINT_SAMPLES // tiles)))
    t = np.arange(tiles, dtype=np.uint64)[:, None]
    draw = _mix64(t * np.uint64(k) + np.arange(k, dtype=np.uint64)[None, :])
    t = t.astype(np.int64)
    tile_r, tile_c = t // grid_c, t % grid_c
    height = np.minimum(rows - tile_r * b, b)
    width = np.minimum(cols - tile_c * b, b)
    offset = (draw % (height * width).astype(np.uint64)).astype(np.int64)
    flat = (tile_r * b + offset // width) * cols + tile_c * b + offset % width
    return torch.from_numpy(flat)


def sample_positions(
    shape: tuple[int, ...], blocks: Sequence[Sequence[int]] | None, block_size: int, scheme: int = FINGERPRINT_SCHEME
) -> torch.Tensor:
    """The flat positions (int64, CPU) a fingerprint samples in a tensor of ``shape``, without those inside
    ``blocks`` (the selected b×b blocks of a 2-D weight, or None).

    Tensors of at most ``FINGERPRINT_SAMPLES`` elements: every element. Larger ones, scheme 1 (format versions
    1-3): ``FINGERPRINT_SAMPLES`` evenly spaced positions. Scheme 2: a 2-D tensor at ``SAMPLES_PER_TILE`` or more
    positions in every b×b tile; any other tensor at max(``FINGERPRINT_SAMPLES``, numel / 4096) positions
    i·step mod numel with step coprime to numel.
    """
    if scheme not in FINGERPRINT_SCHEMES:
        raise ValueError(f"unknown fingerprint scheme {scheme!r}; this smt_kernels knows {list(FINGERPRINT_SCHEMES)}")
    n = math.prod(shape)
    two_d = len(shape) == 2
    if n <= FINGERPRINT_SAMPLES:
        pos = torch.arange(n, dtype=torch.int64)
    elif scheme == 1:  # evenly spaced, first and last included; integer maths, no float rounding
        pos = torch.arange(FINGERPRINT_SAMPLES, dtype=torch.int64) * (n - 1) // (FINGERPRINT_SAMPLES - 1)
    elif two_d:
        pos = _tile_positions((shape[0], shape[1]), block_size)
        if blocks:  # whole tiles of trained blocks are left out (the tiles are the blocks)
            pos = pos[~block_mask(blocks, (shape[0], shape[1]), block_size).reshape(-1)]
        return pos.reshape(-1)
    else:
        count = max(FINGERPRINT_SAMPLES, n // 4096)
        pos = torch.arange(count, dtype=torch.int64) * _coprime_step(n) % n
    if blocks and two_d:
        grid = block_mask(blocks, (shape[0], shape[1]), block_size)
        rows, cols = pos // shape[1], pos % shape[1]
        pos = pos[~grid[rows // block_size, cols // block_size]]
    return pos


def values_digest(key: str, shape: tuple[int, ...], dtype: torch.dtype, values: torch.Tensor) -> str:
    """32 hex digits: SHA-256 of ``key``, ``shape``, ``dtype`` and the sampled ``values`` (CPU, in ``dtype``)."""
    h = hashlib.sha256(f"{key}|{tuple(shape)}|{dtype}|".encode())
    h.update(values.contiguous().view(torch.uint8).numpy().tobytes() if values.numel() else b"")
    return h.hexdigest()[:32]


@torch.no_grad()
def tensor_digest(
    key: str,
    tensor: torch.Tensor,
    blocks: Sequence[Sequence[int]] | None,
    block_size: int,
    scheme: int = FINGERPRINT_SCHEME,
) -> str:
    """``values_digest`` of ``tensor`` at its ``sample_positions``."""
    flat = tensor.detach().reshape(-1)
    pos = sample_positions(tuple(tensor.shape), blocks, block_size, scheme)
    return values_digest(key, tuple(tensor.shape), tensor.dtype, flat[pos.to(flat.device)].cpu())


@torch.no_grad()
def base_fingerprint(
    model: nn.Module,
    selection: Mapping[str, Sequence[Sequence[int]]],
    block_size: int,
    scheme: int = FINGERPRINT_SCHEME,
) -> dict[str, str]:
    """{state_dict key: digest} of every base tensor (but the ``DEVICE_ROUNDED`` NF4 statistics), the same for a
    patched and an unpatched model.

    Each digest is ``tensor_digest``: the name, shape, dtype and the elements at ``sample_positions``. Positions
    inside the selected blocks of a selected weight are left out: training rewrites them in place, so only the
    weights outside the blocks identify the base model. ``block_weight``/``block_indices`` of patched layers are
    not base tensors and are skipped. ``scheme`` 1 is what block files of format versions 1-3 hold.
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
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        blocks = sel[module] if module in sel and t.dim() == 2 else None
        out[key] = tensor_digest(key, t, blocks, block_size, scheme)
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
