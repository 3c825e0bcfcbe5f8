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
    program_hits: torch.Tensor | None = None,
) -> torch.Tensor:
    """The pure-torch path of ``kernels.nf4_dequant.dequantize_overlay`` (same arguments, same bits); it reads
    ``block_indices`` where the Triton kernel reads ``block_map`` and ``program_hits``."""
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


def program_hit_flags(
    block_map: torch.Tensor, shape: tuple[int, int], block_size: int, *, qblocks: int | None = None
) -> torch.Tensor:
    """uint8 (P,): 1 where program p of the dequantize-and-overlay launch meets a trained block, else 0.

    Program p covers the row-major elements [p·S, min((p+1)·S, N·K)) of the (N, K) weight, S = 64·qblocks
    (default: the kernel's ``QBLOCKS``, the only span the kernel takes: flags of another span can have the same
    length, so pass ``qblocks`` only to sweep the kernel's configuration), P = ceil(N·K / S); block_map int32
    (ceil(N/b), ceil(K/b)) is ``block_slot_map``'s. Such a range is a tail of its first row, whole rows, and a head
    of its last row; each part is tested against prefix counts of the map, so the cost is O(P + N + map) on
    block_map's device, not O(N·K).
    """
    from smt_kernels.kernels.nf4_dequant import QBLOCKS, num_programs

    n, k = shape
    numel = n * k
    qblocks = qblocks or QBLOCKS
    span = 64 * qblocks
    device = block_map.device
    trained = (block_map >= 0).to(torch.int32)
    # col_count[R, c]: trained blocks among block-columns < c of block-row R; row_count[r]: rows < r with any
    col_count = torch.nn.functional.pad(trained.cumsum(1), (1, 0))
    row_any = trained.amax(1).repeat_interleave(block_size)[:n]
    row_count = torch.nn.functional.pad(row_any.cumsum(0), (1, 0))
    start = torch.arange(num_programs(numel, qblocks), device=device, dtype=torch.int64) * span
    last = (start + span).clamp(max=numel) - 1
    r0, c0 = start // k, start % k
    r1, c1 = last // k, last % k

    def in_row(r, first, final):  # any trained block among columns first..final of row r
        br = r // block_size
        return col_count[br, final // block_size + 1] > col_count[br, first // block_size]

    head = in_row(r0, c0, torch.where(r1 == r0, c1, k - 1))
    tail = (r1 > r0) & in_row(r1, torch.zeros_like(c1), c1)
    middle = row_count[r1] > row_count[r0 + 1]  # rows r0+1 .. r1-1
    return (head | tail | ((r1 > r0 + 1) & middle)).to(torch.uint8)


def overlay_kernel(backend: str):
    """The dequantize-and-overlay function of ``backend`` ("triton": ``kernels.nf4_dequant``, "torch": the torch
    path); both take ``(q, out, block_weight, block_indices, block_map, block_size, program_hits)`` and return
    ``out``."""
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
