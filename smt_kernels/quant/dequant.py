"""Dequantize-and-overlay: an NF4 weight with the current trained blocks in place, into a reusable buffer.

``kernels_for(device)`` is the single place that picks the backend for the NF4 layers (through
``smt_kernels.kernels.backend``); it returns the block kernels (``gather_column_blocks``, ``block_weight_grad``)
and the matching ``dequantize_overlay``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from smt_kernels.kernels import torch_blocks
from smt_kernels.layout import num_blocks_along
from smt_kernels.quant.nf4 import NF4Weight, dequantize_nf4


def dequantize_overlay_torch(
    q: NF4Weight,
    out: torch.Tensor,
    block_weight: torch.Tensor | None = None,
    block_indices: torch.Tensor | None = None,
    block_map: torch.Tensor | None = None,
    block_size: int = 0,
) -> torch.Tensor:
    """The pure-torch path of ``kernels.nf4_dequant.dequantize_overlay`` (same arguments, same bits); it reads
    ``block_indices`` where the Triton kernel reads ``block_map``."""
    dequantize_nf4(q, out.dtype, out=out)
    if block_weight is not None and block_weight.shape[0] > 0:
        torch_blocks.scatter_blocks(out, block_weight, block_indices)
    return out


def block_slot_map(block_indices: torch.Tensor, shape: tuple[int, int], block_size: int) -> torch.Tensor:
    """int32 (ceil(N/b), ceil(K/b)) with the slot k of block_indices[k] at its position and -1 elsewhere."""
    grid = torch.full(
        (num_blocks_along(shape[0], block_size), num_blocks_along(shape[1], block_size)),
        -1,
        dtype=torch.int32,
        device=block_indices.device,
    )
    if block_indices.numel():
        grid[block_indices[:, 0], block_indices[:, 1]] = torch.arange(
            block_indices.shape[0], dtype=torch.int32, device=block_indices.device
        )
    return grid


def overlay_kernel(backend: str):
    """The dequantize-and-overlay function of ``backend`` ("triton": ``kernels.nf4_dequant``, "torch": the torch
    path); both take ``(q, out, block_weight, block_indices, block_map, block_size)`` and return ``out``."""
    if backend == "triton":
        from smt_kernels.kernels.nf4_dequant import dequantize_overlay

        return dequantize_overlay
    return dequantize_overlay_torch


def kernels_for(device: torch.device) -> SimpleNamespace:
    """The kernels for NF4 layers on ``device``: the block kernels of the backend ``resolve_backend`` picks
    (Triton on CUDA, torch elsewhere, ``SMT_KERNELS_BACKEND`` respected) plus that backend's dequantize-and-overlay.
    """
    from smt_kernels.kernels.backend import kernels, resolve_backend

    name = resolve_backend(device)
    blocks = kernels(name)
    return SimpleNamespace(
        name=name,
        gather_column_blocks=blocks.gather_column_blocks,
        block_weight_grad=blocks.block_weight_grad,
        dequantize_overlay=overlay_kernel(name),
    )
