"""Triton kernels for sparse block tuning, with plain launch functions (no autograd).

Shapes: tokens M, weight N×K (out × in), block size b, n blocks, u distinct block-columns.
- ``gather_column_blocks``: x (M, K) -> (M, u·b), the input columns some block uses, zero-padded at the edge.
- ``scatter_blocks``:       writes block_weight (n, b, b) into weight (N, K) in place, clipped at the edges.
- ``block_weight_grad``:    dB_k = dY[:, rows_k]ᵀ · X[:, cols_k] for every block, fp32 accumulation,
                            the token reduction split across programs so that few blocks still fill the GPU.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=16)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _program_budget(device: torch.device) -> int:
    if device.type == "cuda":
        # about four resident programs of 8 warps per SM keep the tensor cores busy
        return 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: few programs, each with many tokens, keeps tests fast


@triton.jit
def _gather_column_blocks_kernel(
    x_ptr, col_blocks_ptr, out_ptr,
    M, K,
    stride_xm, stride_xk, stride_om,
    BLOCK_SIZE: tl.constexpr, TILE_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    slot = tl.program_id(1)
    col_block = tl.load(col_blocks_ptr + slot)
    offs_m = (pid_m * TILE_M + tl.arange(0, TILE_M)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_SIZE)
    src_cols = col_block * BLOCK_SIZE + offs_k
    m_mask = offs_m < M
    vals = tl.load(
        x_ptr + offs_m[:, None] * stride_xm + src_cols[None, :] * stride_xk,
        mask=m_mask[:, None] & (src_cols < K)[None, :],
        other=0.0,
    )
    tl.store(out_ptr + offs_m[:, None] * stride_om + (slot * BLOCK_SIZE + offs_k)[None, :], vals,
             mask=m_mask[:, None])


def gather_column_blocks(x: torch.Tensor, col_blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Copy the block-columns ``col_blocks`` (u,) of x (M, K) into a new contiguous (M, u·b) tensor.

    Columns past K in a clipped edge block are zero. x may have any strides.
    """
    M, K = x.shape
    u = col_blocks.numel()
    out = torch.empty((M, u * block_size), device=x.device, dtype=x.dtype)
    if M == 0 or u == 0:
        return out
    tile_m = max(16, min(64, 8192 // block_size))
    grid = (triton.cdiv(M, tile_m), u)
    _gather_column_blocks_kernel[grid](
        x, col_blocks, out, M, K, x.stride(0), x.stride(1), out.stride(0),
        BLOCK_SIZE=block_size, TILE_M=tile_m, num_warps=4,
    )
    return out


@triton.jit
def _scatter_blocks_kernel(
    w_ptr, bw_ptr, idx_ptr,
    N, K,
    stride_wn, stride_wk, stride_bn, stride_br, stride_bc,
    BLOCK_SIZE: tl.constexpr, TILE_R: tl.constexpr,
):
    blk = tl.program_id(0)
    tile = tl.program_id(1)
    row_block = tl.load(idx_ptr + 2 * blk)
    col_block = tl.load(idx_ptr + 2 * blk + 1)
    offs_r = tile * TILE_R + tl.arange(0, TILE_R)
    offs_c = tl.arange(0, BLOCK_SIZE)
    rows = (row_block * BLOCK_SIZE + offs_r).to(tl.int64)
    cols = col_block * BLOCK_SIZE + offs_c
    vals = tl.load(bw_ptr + blk * stride_bn + offs_r[:, None] * stride_br + offs_c[None, :] * stride_bc)
    tl.store(w_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wk,
             vals.to(w_ptr.dtype.element_ty),
             mask=(rows < N)[:, None] & (cols < K)[None, :])


def scatter_blocks(weight: torch.Tensor, block_weight: torch.Tensor, block_indices: torch.Tensor) -> None:
    """Write block_weight (n, b, b) into weight (N, K) in place at block_indices (n, 2); edges clipped."""
    n, b, _ = block_weight.shape
    if n == 0:
        return
    N, K = weight.shape
    tile_r = min(b, max(1, 8192 // b))
    _scatter_blocks_kernel[(n, b // tile_r)](
        weight, block_weight, block_indices, N, K,
        weight.stride(0), weight.stride(1),
        block_weight.stride(0), block_weight.stride(1), block_weight.stride(2),
        BLOCK_SIZE=b, TILE_R=tile_r, num_warps=4,
    )


@triton.jit
def _block_weight_grad_kernel(
    dy_ptr, xg_ptr, out_ptr, idx_ptr, slot_ptr,
    M, N, tokens_per_split,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_ob, stride_or, stride_oc,
    BLOCK_SIZE: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr, TILE_M: tl.constexpr,
    USE_ATOMIC: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_tile = tl.program_id(0)
    pid_split = tl.program_id(1)
    tiles_r: tl.constexpr = BLOCK_SIZE // TILE_R
    tiles_c: tl.constexpr = BLOCK_SIZE // TILE_C
    blk = pid_tile // (tiles_r * tiles_c)
    t = pid_tile % (tiles_r * tiles_c)
    tr = t // tiles_c
    tc = t % tiles_c
    row_block = tl.load(idx_ptr + 2 * blk)
    slot = tl.load(slot_ptr + blk)
    offs_r = tr * TILE_R + tl.arange(0, TILE_R)
    offs_c = tc * TILE_C + tl.arange(0, TILE_C)
    rows = (row_block * BLOCK_SIZE + offs_r).to(tl.int64)
    cols = (slot * BLOCK_SIZE + offs_c).to(tl.int64)
    row_mask = rows < N

    m_start = pid_split * tokens_per_split
    m_end = tl.minimum(m_start + tokens_per_split, M)
    acc = tl.zeros((TILE_R, TILE_C), dtype=tl.float32)
    for m0 in range(m_start, m_end, TILE_M):
        offs_m = (m0 + tl.arange(0, TILE_M)).to(tl.int64)
        m_mask = offs_m < m_end
        dy_t = tl.load(dy_ptr + rows[:, None] * stride_dyn + offs_m[None, :] * stride_dym,
                       mask=row_mask[:, None] & m_mask[None, :], other=0.0)
        x_t = tl.load(xg_ptr + offs_m[:, None] * stride_xm + cols[None, :] * stride_xk,
                      mask=m_mask[:, None], other=0.0)
        if UPCAST:
            # the CPU interpreter's dot is wrong on bf16 operands; fp32 is exact there
            dy_t = dy_t.to(tl.float32)
            x_t = x_t.to(tl.float32)
        acc += tl.dot(dy_t, x_t, input_precision=INPUT_PRECISION)

    out_ptrs = out_ptr + blk * stride_ob + offs_r[:, None] * stride_or + offs_c[None, :] * stride_oc
    if USE_ATOMIC:
        tl.atomic_add(out_ptrs, acc, sem="relaxed")
    else:
        tl.store(out_ptrs, acc)


def _default_grad_config(block_size: int) -> dict:
    tile = min(block_size, 128)
    return {"TILE_R": tile, "TILE_C": tile, "TILE_M": 64, "num_warps": 8 if tile == 128 else 4, "num_stages": 3}


def block_weight_grad(
    grad_out: torch.Tensor,
    x_cols: torch.Tensor,
    block_indices: torch.Tensor,
    col_slot: torch.Tensor,
    block_size: int,
    out_dtype: torch.dtype,
    deterministic: bool = False,
    config: dict | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Gradient of every block: dB_k = dY[:, rows_k]ᵀ · X[:, cols_k], reduced over all M tokens.

    Args:
        grad_out: (M, N) output gradient, any strides.
        x_cols: (M, u·b) gathered input columns from ``gather_column_blocks``.
        block_indices: int64 (n, 2) on the same device, contiguous.
        col_slot: int64 (n,), the slot of each block's column in ``x_cols``.
        out_dtype: dtype of the returned gradient.
        deterministic: reduce token splits without atomics (one split per tile).
        config, splits: override the tile configuration / number of token splits (for tuning).
    Returns:
        (n, b, b) gradient; rows past N and columns past K of clipped edge blocks are zero.
    """
    M, N = grad_out.shape
    n = block_indices.shape[0]
    b = block_size
    if n == 0 or M == 0:
        return torch.zeros((n, b, b), device=grad_out.device, dtype=out_dtype)
    cfg = {**_default_grad_config(b), **(config or {})}
    tiles = n * (b // cfg["TILE_R"]) * (b // cfg["TILE_C"])
    if deterministic:
        splits = 1
    elif splits is None:
        # split the token reduction until the grid covers the GPU; keep >= 4 token tiles per program
        max_splits = max(1, M // (4 * cfg["TILE_M"]))
        splits = max(1, min(max_splits, triton.cdiv(_program_budget(grad_out.device), tiles)))
    tokens_per_split = triton.cdiv(triton.cdiv(M, splits), cfg["TILE_M"]) * cfg["TILE_M"]
    splits = triton.cdiv(M, tokens_per_split)
    use_atomic = splits > 1
    acc = (torch.zeros if use_atomic else torch.empty)((n, b, b), device=grad_out.device, dtype=torch.float32)
    upcast = interpreting() and (grad_out.dtype == torch.bfloat16 or x_cols.dtype == torch.bfloat16)
    tf32 = grad_out.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    _block_weight_grad_kernel[(tiles, splits)](
        grad_out, x_cols, acc, block_indices, col_slot,
        M, N, tokens_per_split,
        grad_out.stride(0), grad_out.stride(1), x_cols.stride(0), x_cols.stride(1),
        acc.stride(0), acc.stride(1), acc.stride(2),
        BLOCK_SIZE=b, USE_ATOMIC=use_atomic, UPCAST=upcast, INPUT_PRECISION="tf32" if tf32 else "ieee",
        **cfg,
    )
    return acc if out_dtype == torch.float32 else acc.to(out_dtype)
