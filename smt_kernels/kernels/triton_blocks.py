"""Triton kernels for sparse block tuning, with plain launch functions (no autograd).

Shapes: tokens M, weight N×K (out × in), block size b, n blocks, u distinct block-columns.
- ``scatter_blocks``:       writes block_weight (n, b, b) into weight (N, K) in place, clipped at the edges.
- ``gather_column_blocks``: x (M, K) -> (M, u·b), the input columns some block uses, zero-padded at the edge.
- ``scatter_blocks_and_gather_columns``: both in one launch (what the forward pass uses).
- ``block_weight_grad``:    dB_k = dY[:, rows_k]ᵀ · X[:, cols_k] for every block, fp32 accumulation, the token
                            reduction split across programs so that few blocks still fill the GPU; the fp32
                            partial sums are added in a fixed order (deterministic, no atomics).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from smt_kernels.kernels.launcher import DirectLauncher, interpreting

# elements one program of the copy kernels moves: enough to amortise its start, small enough for many programs
_COPY_TILE_ELEMENTS = 8192


@functools.lru_cache(maxsize=16)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 2  # interpreter: few programs, each with many tokens, keeps tests fast


@triton.jit
def _scatter_tile(
    w_ptr, bw_ptr, idx_ptr, N, K, stride_wn, stride_wk, pid, BLOCK_SIZE: tl.constexpr, SCATTER_ROWS: tl.constexpr
):
    offs_c = tl.arange(0, BLOCK_SIZE)
    tiles_per_block: tl.constexpr = BLOCK_SIZE // SCATTER_ROWS
    blk = pid // tiles_per_block
    offs_r = (pid % tiles_per_block) * SCATTER_ROWS + tl.arange(0, SCATTER_ROWS)
    row_block = tl.load(idx_ptr + 2 * blk)
    col_block = tl.load(idx_ptr + 2 * blk + 1)
    rows = (row_block * BLOCK_SIZE + offs_r).to(tl.int64)
    cols = col_block * BLOCK_SIZE + offs_c
    # block_weight is contiguous (n, b, b)
    vals = tl.load(bw_ptr + blk * BLOCK_SIZE * BLOCK_SIZE + offs_r[:, None] * BLOCK_SIZE + offs_c[None, :])
    tl.store(
        w_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wk,
        vals.to(w_ptr.dtype.element_ty),
        mask=((rows >= 0) & (rows < N))[:, None] & ((cols >= 0) & (cols < K))[None, :],
    )


@triton.jit
def _gather_tile(
    x_ptr,
    col_blocks_ptr,
    xc_ptr,
    M,
    K,
    stride_xm,
    stride_xk,
    stride_cm,
    g,
    m_tiles,
    BLOCK_SIZE: tl.constexpr,
    GATHER_ROWS: tl.constexpr,
):
    offs_c = tl.arange(0, BLOCK_SIZE)
    slot = g // m_tiles
    offs_m = ((g % m_tiles) * GATHER_ROWS + tl.arange(0, GATHER_ROWS)).to(tl.int64)
    col_block = tl.load(col_blocks_ptr + slot)
    src_cols = col_block * BLOCK_SIZE + offs_c
    m_mask = offs_m < M
    # both bounds: a corrupted column index must read nothing rather than memory before x
    vals = tl.load(
        x_ptr + offs_m[:, None] * stride_xm + src_cols[None, :] * stride_xk,
        mask=m_mask[:, None] & ((src_cols >= 0) & (src_cols < K))[None, :],
        other=0.0,
    )
    tl.store(xc_ptr + offs_m[:, None] * stride_cm + (slot * BLOCK_SIZE + offs_c)[None, :], vals, mask=m_mask[:, None])


@triton.jit
def _scatter_and_gather_kernel(
    w_ptr,
    bw_ptr,
    idx_ptr,
    N,
    K,
    stride_wn,
    stride_wk,
    x_ptr,
    col_blocks_ptr,
    xc_ptr,
    M,
    stride_xm,
    stride_xk,
    stride_cm,
    num_scatter_programs,
    m_tiles,
    BLOCK_SIZE: tl.constexpr,
    SCATTER_ROWS: tl.constexpr,
    GATHER_ROWS: tl.constexpr,
    DO_SCATTER: tl.constexpr,
    DO_GATHER: tl.constexpr,
):
    # programs [0, num_scatter_programs) write blocks into the weight, the rest copy input block-columns
    pid = tl.program_id(0)
    if DO_SCATTER:
        if pid < num_scatter_programs:
            _scatter_tile(w_ptr, bw_ptr, idx_ptr, N, K, stride_wn, stride_wk, pid, BLOCK_SIZE, SCATTER_ROWS)
    if DO_GATHER:
        if pid >= num_scatter_programs:
            _gather_tile(
                x_ptr,
                col_blocks_ptr,
                xc_ptr,
                M,
                K,
                stride_xm,
                stride_xk,
                stride_cm,
                pid - num_scatter_programs,
                m_tiles,
                BLOCK_SIZE,
                GATHER_ROWS,
            )


_launch_scatter_and_gather = DirectLauncher(_scatter_and_gather_kernel)


def _launch(launcher: DirectLauncher, traced: bool, grid: tuple[int, ...], *args, **meta) -> None:
    if traced:
        # Inductor sees the kernel itself and launches it from its generated code (no Python op per call)
        torch.library.wrap_triton(launcher.kernel)[grid](*args, **meta)
    else:
        launcher(grid, *args, **meta)


def scatter_blocks_and_gather_columns(
    weight: torch.Tensor | None,
    block_weight: torch.Tensor | None,
    block_indices: torch.Tensor | None,
    x: torch.Tensor | None,
    col_blocks: torch.Tensor | None,
    block_size: int,
    *,
    traced: bool = False,
) -> torch.Tensor | None:
    """In one launch: write block_weight (n, b, b) into weight (N, K) at block_indices (n, 2), in place, and
    copy the block-columns col_blocks (u,) of x (M, K) into a new contiguous (M, u·b) tensor, which is returned.

    Pass ``weight=None`` to skip the scatter, ``x=None`` to skip the gather (then None is returned).
    Columns past K of a clipped edge block-column are zero in the copy; x and weight may have any strides.
    ``traced=True`` launches through ``torch.library.wrap_triton`` (inside a ``triton_op`` that Inductor traces).
    """
    b = block_size
    do_scatter = weight is not None and block_weight.shape[0] > 0
    do_gather = x is not None
    x_cols = None
    n_scatter = m_tiles = 0
    scatter_rows = min(b, _COPY_TILE_ELEMENTS // b)
    gather_rows = max(16, _COPY_TILE_ELEMENTS // b)
    if do_gather:
        M = x.shape[0]
        u = col_blocks.numel()
        x_cols = torch.empty((M, u * b), device=x.device, dtype=x.dtype)
        m_tiles = triton.cdiv(M, gather_rows)
        do_gather = M > 0 and u > 0
    if do_scatter:
        n_scatter = block_weight.shape[0] * (b // scatter_rows)
        block_weight = block_weight.contiguous()
    programs = n_scatter + (m_tiles * col_blocks.numel() if do_gather else 0)
    if programs == 0:
        return x_cols
    ref = weight if do_scatter else x
    w, bw, idx = (weight, block_weight, block_indices) if do_scatter else (ref, ref, ref)
    xs, cb, xc = (x, col_blocks, x_cols) if do_gather else (ref, ref, ref)
    _launch(
        _launch_scatter_and_gather,
        traced,
        (programs,),
        w,
        bw,
        idx,
        w.shape[0],
        w.shape[-1],
        w.stride(0),
        w.stride(-1),
        xs,
        cb,
        xc,
        xs.shape[0],
        xs.stride(0),
        xs.stride(-1),
        xc.stride(0),
        n_scatter,
        max(m_tiles, 1),
        BLOCK_SIZE=b,
        SCATTER_ROWS=scatter_rows,
        GATHER_ROWS=gather_rows,
        DO_SCATTER=do_scatter,
        DO_GATHER=do_gather,
        num_warps=4,
    )
    return x_cols


def gather_column_blocks(x: torch.Tensor, col_blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Copy the block-columns ``col_blocks`` (u,) of x (M, K) into a new contiguous (M, u·b) tensor.

    Columns past K in a clipped edge block are zero. x may have any strides.
    """
    return scatter_blocks_and_gather_columns(None, None, None, x, col_blocks, block_size)


def scatter_blocks(
    weight: torch.Tensor, block_weight: torch.Tensor, block_indices: torch.Tensor, *, traced: bool = False
) -> None:
    """Write block_weight (n, b, b) into weight (N, K) in place at block_indices (n, 2); edges clipped."""
    scatter_blocks_and_gather_columns(
        weight, block_weight, block_indices, None, None, block_weight.shape[-1], traced=traced
    )


@triton.jit
def _block_grad_tile(
    dy_ptr,
    xg_ptr,
    out_ptr,
    idx_ptr,
    slot_ptr,
    M,
    N,
    tokens_per_split,
    stride_dym,
    stride_dyn,
    stride_xm,
    stride_os,
    pid_tile,
    pid_split,
    BLOCK_SIZE: tl.constexpr,
    TILE_R: tl.constexpr,
    TILE_C: tl.constexpr,
    TILE_M: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    tiles_r: tl.constexpr = BLOCK_SIZE // TILE_R
    tiles_c: tl.constexpr = BLOCK_SIZE // TILE_C
    blk = pid_tile // (tiles_r * tiles_c)
    t = pid_tile % (tiles_r * tiles_c)
    offs_r = (t // tiles_c) * TILE_R + tl.arange(0, TILE_R)
    offs_c = (t % tiles_c) * TILE_C + tl.arange(0, TILE_C)
    row_block = tl.load(idx_ptr + 2 * blk)
    slot = tl.load(slot_ptr + blk)
    rows = (row_block * BLOCK_SIZE + offs_r).to(tl.int64)
    cols = (slot * BLOCK_SIZE + offs_c).to(tl.int64)
    row_mask = (rows >= 0) & (rows < N)

    m_start = pid_split * tokens_per_split
    m_end = tl.minimum(m_start + tokens_per_split, M)
    acc = tl.zeros((TILE_R, TILE_C), dtype=tl.float32)
    for m0 in range(m_start, m_end, TILE_M):
        offs_m = (m0 + tl.arange(0, TILE_M)).to(tl.int64)
        m_mask = offs_m < m_end
        dy_t = tl.load(
            dy_ptr + rows[:, None] * stride_dyn + offs_m[None, :] * stride_dym,
            mask=row_mask[:, None] & m_mask[None, :],
            other=0.0,
        )
        x_t = tl.load(xg_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=m_mask[:, None], other=0.0)
        if UPCAST:
            # the CPU interpreter's dot is wrong on bf16 operands; fp32 is exact there
            dy_t = dy_t.to(tl.float32)
            x_t = x_t.to(tl.float32)
        acc += tl.dot(dy_t, x_t, input_precision=INPUT_PRECISION)

    # out is contiguous (splits, n, b, b)
    out_ptrs = (
        out_ptr + pid_split * stride_os + blk * BLOCK_SIZE * BLOCK_SIZE + offs_r[:, None] * BLOCK_SIZE + offs_c[None, :]
    )
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["M", "tokens_per_split"])
def _block_weight_grad_kernel(
    dy_ptr,
    xg_ptr,
    out_ptr,
    idx_ptr,
    slot_ptr,
    M,
    N,
    tokens_per_split,
    stride_dym,
    stride_dyn,
    stride_xm,
    stride_os,
    w_ptr,
    bw_ptr,
    K,
    stride_wn,
    stride_wk,
    grad_tiles,
    BLOCK_SIZE: tl.constexpr,
    TILE_R: tl.constexpr,
    TILE_C: tl.constexpr,
    TILE_M: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    RESCATTER: tl.constexpr,
    SCATTER_ROWS: tl.constexpr,
):
    # programs past grad_tiles (first split only) write the blocks into the weight again, for the
    # input-gradient GEMM that follows: the weight may have been re-materialised since forward (FSDP2)
    pid_tile = tl.program_id(0)
    pid_split = tl.program_id(1)
    if RESCATTER:
        if pid_tile >= grad_tiles:
            if pid_split == 0:
                _scatter_tile(
                    w_ptr, bw_ptr, idx_ptr, N, K, stride_wn, stride_wk, pid_tile - grad_tiles, BLOCK_SIZE, SCATTER_ROWS
                )
        else:
            _block_grad_tile(
                dy_ptr,
                xg_ptr,
                out_ptr,
                idx_ptr,
                slot_ptr,
                M,
                N,
                tokens_per_split,
                stride_dym,
                stride_dyn,
                stride_xm,
                stride_os,
                pid_tile,
                pid_split,
                BLOCK_SIZE,
                TILE_R,
                TILE_C,
                TILE_M,
                UPCAST,
                INPUT_PRECISION,
            )
    else:
        _block_grad_tile(
            dy_ptr,
            xg_ptr,
            out_ptr,
            idx_ptr,
            slot_ptr,
            M,
            N,
            tokens_per_split,
            stride_dym,
            stride_dyn,
            stride_xm,
            stride_os,
            pid_tile,
            pid_split,
            BLOCK_SIZE,
            TILE_R,
            TILE_C,
            TILE_M,
            UPCAST,
            INPUT_PRECISION,
        )


_launch_block_weight_grad = DirectLauncher(_block_weight_grad_kernel)


def _default_grad_config(block_size: int) -> dict:
    # measured on an H200 (bf16, M=16384, b=256, 1-32 blocks): 128×128 tiles with 4 warps and 3 stages were
    # the fastest of eight configurations for every block count (a later probe of three of them with four split
    # policies, benchmarks/results/h200_2026-11-29/block_grad_splits_probe.log, kept this one)
    tile = min(block_size, 128)
    return {"TILE_R": tile, "TILE_C": tile, "TILE_M": 64, "num_warps": 4, "num_stages": 3}


def block_weight_grad(
    grad_out: torch.Tensor,
    x_cols: torch.Tensor,
    block_indices: torch.Tensor,
    col_slot: torch.Tensor,
    block_size: int,
    out_dtype: torch.dtype,
    rescatter: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: dict | None = None,
    splits: int | None = None,
    *,
    traced: bool = False,
) -> torch.Tensor:
    """Gradient of every block: dB_k = dY[:, rows_k]ᵀ · X[:, cols_k], reduced over all M tokens.

    Args:
        grad_out: (M, N) output gradient, any strides.
        x_cols: (M, u·b) gathered input columns from ``gather_column_blocks``.
        block_indices: int64 (n, 2) on the same device, contiguous.
        col_slot: int64 (n,), the slot of each block's column in ``x_cols``.
        out_dtype: dtype of the returned gradient.
        rescatter: optional (weight (N, K), block_weight (n, b, b)): also write the blocks into weight in the
            same launch (``scatter_blocks``), done before any later work on the stream.
        config, splits: override the tile configuration / number of token splits (for tuning).
        traced: launch through ``torch.library.wrap_triton`` (inside a ``triton_op`` that Inductor traces).
    Returns:
        (n, b, b) gradient; rows past N and columns past K of clipped edge blocks are zero. Deterministic.
    """
    M, N = grad_out.shape
    n = block_indices.shape[0]
    b = block_size
    if n == 0 or M == 0:
        if rescatter is not None:
            scatter_blocks(rescatter[0], rescatter[1], block_indices, traced=traced)
        return torch.zeros((n, b, b), device=grad_out.device, dtype=out_dtype)
    cfg = {**_default_grad_config(b), **(config or {})}
    tiles = n * (b // cfg["TILE_R"]) * (b // cfg["TILE_C"])
    if splits is None:
        # split the token reduction into at most two programs per SM (two fit in shared memory and hide each
        # other's load latency; a third wave, or a second one that only a few SMs run, costs more than it splits).
        # Measured on an H200 against one program per SM: 1.1-1.4x faster for 2-16 blocks. Keep >= 4 token tiles
        # per program.
        max_splits = max(1, M // (4 * cfg["TILE_M"]))
        splits = max(1, min(max_splits, 2 * _sm_count(grad_out.device) // tiles))
    tokens_per_split = triton.cdiv(triton.cdiv(M, splits), cfg["TILE_M"]) * cfg["TILE_M"]
    splits = triton.cdiv(M, tokens_per_split)
    if splits == 1:
        out = partial = torch.empty((n, b, b), device=grad_out.device, dtype=out_dtype)
    else:
        partial = torch.empty((splits, n, b, b), device=grad_out.device, dtype=torch.float32)
    upcast = interpreting() and (grad_out.dtype == torch.bfloat16 or x_cols.dtype == torch.bfloat16)
    tf32 = grad_out.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    scatter_rows = min(b, _COPY_TILE_ELEMENTS // b)
    w, bw = (rescatter[0], rescatter[1].contiguous()) if rescatter is not None else (grad_out, grad_out)
    scatter_programs = n * (b // scatter_rows) if rescatter is not None else 0
    if x_cols.stride(1) != 1:
        x_cols = x_cols.contiguous()
    _launch(
        _launch_block_weight_grad,
        traced,
        (tiles + scatter_programs, splits),
        grad_out,
        x_cols,
        partial,
        block_indices,
        col_slot,
        M,
        N,
        tokens_per_split,
        grad_out.stride(0),
        grad_out.stride(1),
        x_cols.stride(0),
        n * b * b,
        w,
        bw,
        w.shape[-1],
        w.stride(0),
        w.stride(-1),
        tiles,
        BLOCK_SIZE=b,
        UPCAST=upcast,
        INPUT_PRECISION="tf32" if tf32 else "ieee",
        RESCATTER=rescatter is not None,
        SCATTER_ROWS=scatter_rows,
        **cfg,
    )
    if splits > 1:
        # a torch reduction costs a fraction of a Triton launch's host time, and keeps the order fixed
        summed = partial.sum(0)
        return summed if out_dtype == torch.float32 else summed.to(out_dtype)
    return out
