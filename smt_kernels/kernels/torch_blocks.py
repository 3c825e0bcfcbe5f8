"""Pure-torch equivalents of the Triton launch functions (same signatures, same results).

Used on CPU and wherever Triton is not wanted. Exact up to the reduction order of the library matmul.
"""

from __future__ import annotations

import torch


def _block_index(blocks: torch.Tensor, block_size: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element indices (len(blocks)·b,) of the given block numbers, clamped to ``limit``, and their mask."""
    idx = (blocks.reshape(-1, 1) * block_size + torch.arange(block_size, device=blocks.device)).reshape(-1)
    valid = idx < limit
    return idx.clamp(max=max(limit - 1, 0)), valid


def _block_grid(t: torch.Tensor, block_size: int) -> torch.Tensor | None:
    """(N, K) as a (N/b, b, K/b, b) view when b divides both and the strides allow it, else None.

    Indexing that view with block numbers needs no per-element index tensors and no edge masks.
    """
    n, k = t.shape
    if n % block_size or k % block_size:
        return None
    try:
        return t.view(n // block_size, block_size, k // block_size, block_size)
    except RuntimeError:  # strides that cannot be split this way
        return None


def gather_column_blocks(x: torch.Tensor, col_blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Copy the block-columns ``col_blocks`` (u,) of x (M, K) into a new contiguous (M, u·b) tensor."""
    if x.shape[1] % block_size == 0:
        # splitting the last dimension is always a view; index_select makes the contiguous copy
        cols = x.unflatten(1, (x.shape[1] // block_size, block_size)).index_select(1, col_blocks)
        return cols.reshape(x.shape[0], col_blocks.numel() * block_size)
    idx, valid = _block_index(col_blocks, block_size, x.shape[1])
    # masked on every call: testing whether any column is past the edge first would wait for the device
    return x.index_select(1, idx).masked_fill_(~valid, 0)


def extract_blocks(weight: torch.Tensor, block_indices: torch.Tensor, block_size: int) -> torch.Tensor:
    """Read the blocks at block_indices (n, 2) out of weight (N, K) as (n, b, b); zero past the edges."""
    block_indices = block_indices.to(weight.device)
    grid = _block_grid(weight, block_size)
    if grid is not None:
        return grid[block_indices[:, 0], :, block_indices[:, 1], :]
    n = block_indices.shape[0]
    b = block_size
    rows, row_ok = _block_index(block_indices[:, 0], b, weight.shape[0])
    cols, col_ok = _block_index(block_indices[:, 1], b, weight.shape[1])
    rows, row_ok = rows.view(n, b, 1), row_ok.view(n, b, 1)
    cols, col_ok = cols.view(n, 1, b), col_ok.view(n, 1, b)
    out = weight[rows, cols]
    return out.masked_fill_(~(row_ok & col_ok), 0)


def scatter_blocks(weight: torch.Tensor, block_weight: torch.Tensor, block_indices: torch.Tensor) -> None:
    """Write block_weight (n, b, b) into weight (N, K) in place at block_indices (n, 2); edges clipped."""
    n, b, _ = block_weight.shape
    if n == 0:
        return
    grid = _block_grid(weight, b)
    if grid is not None:
        grid[block_indices[:, 0], :, block_indices[:, 1], :] = block_weight.to(weight.dtype)
        return
    # clipped edge blocks: element indices clamped to the edge, and the source clamped the same way, so every
    # write that lands on an edge element carries that element's own value (duplicate writes agree); no boolean
    # mask, hence no device sync and no data-dependent shape (CUDA graphs, torch.compile)
    rows, _ = _block_index(block_indices[:, 0], b, weight.shape[0])
    cols, _ = _block_index(block_indices[:, 1], b, weight.shape[1])
    rows, cols = rows.view(n, b), cols.view(n, b)
    src_r = rows - block_indices[:, :1] * b
    src_c = cols - block_indices[:, 1:] * b
    k = torch.arange(n, device=block_weight.device).view(n, 1, 1)
    vals = block_weight[k, src_r.view(n, b, 1), src_c.view(n, 1, b)]
    weight[rows.view(n, b, 1), cols.view(n, 1, b)] = vals.to(weight.dtype)


def scatter_blocks_and_gather_columns(
    weight: torch.Tensor | None,
    block_weight: torch.Tensor | None,
    block_indices: torch.Tensor | None,
    x: torch.Tensor | None,
    col_blocks: torch.Tensor | None,
    block_size: int,
) -> torch.Tensor | None:
    """``scatter_blocks`` (unless weight is None), then ``gather_column_blocks`` of x (unless x is None)."""
    if weight is not None:
        scatter_blocks(weight, block_weight, block_indices)
    return None if x is None else gather_column_blocks(x, col_blocks, block_size)


def block_weight_grad(
    grad_out: torch.Tensor,
    x_cols: torch.Tensor,
    block_indices: torch.Tensor,
    col_slot: torch.Tensor,
    block_size: int,
    out_dtype: torch.dtype,
    rescatter: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """dB_k = dY[:, rows_k]ᵀ · X[:, cols_k] for each block: (n, b, b), zero past the edges.

    grad_out (M, N); x_cols (M, u·b) from ``gather_column_blocks``; block_indices (n, 2); col_slot (n,).
    Accumulates in fp32. ``rescatter=(weight, block_weight)`` also writes the blocks into weight.
    """
    if rescatter is not None:
        scatter_blocks(rescatter[0], rescatter[1], block_indices)
    M = grad_out.shape[0]
    n = block_indices.shape[0]
    b = block_size
    if n == 0 or M == 0:
        return torch.zeros((n, b, b), device=grad_out.device, dtype=out_dtype)
    if grad_out.shape[1] % b == 0:
        dy = grad_out.unflatten(1, (grad_out.shape[1] // b, b)).index_select(1, block_indices[:, 0]).float()
    else:
        rows, row_ok = _block_index(block_indices[:, 0], b, grad_out.shape[1])
        dy = grad_out.index_select(1, rows).float().masked_fill_(~row_ok, 0).view(M, n, b)
    xb = x_cols.view(M, -1, b).index_select(1, col_slot).float()
    # (n, b, M) @ (n, M, b) -> (n, b, b)
    grad = torch.bmm(dy.permute(1, 2, 0), xb.permute(1, 0, 2))
    return grad.to(out_dtype)
