"""Triton kernel: dequantize an NF4 weight and write the trained blocks in place, in one pass.

Each program handles ``QBLOCKS`` absmax blocks (64 values each, 32 packed bytes): it reads the packed bytes once,
splits the nibbles (high nibble first, as bitsandbytes packs them), looks the codes up in the 16-value NF4 table,
scales each 64-value block by its absmax (undoing double quantization on the fly) and stores the row-major weight.
Elements inside a trained block take the block's value instead, read through a small (N/b, K/b) slot map, so
the output never holds a stale base value and no second pass over it is needed. When 64 divides b and b divides
K (b = 256 on LLaMA shapes), every absmax block lies in one row of one trained-block column: the map is read once
per absmax block and a program that hits no trained block reads nothing more; otherwise (a ragged K, b < 64) the
map is read per element. With the per-program hit flags (``smt_kernels.quant.dequant.program_hit_flags``, built
once per block layout) a program reads one flag and, where it is 0 (most programs at 1 % trained blocks), neither
the map nor any trained value, and makes no reduction over its tile.
The value for an element is ``fp32(code) * fp32(absmax)`` rounded once (to nearest even) to the output dtype:
bit for bit what ``smt_kernels.quant.nf4.dequantize_nf4`` and bitsandbytes compute. (Triton's CPU interpreter
truncates fp32 -> bf16 instead, so there bf16 outputs can be one bf16 ulp smaller in magnitude.)
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from smt_kernels.kernels.launcher import DirectLauncher, interpreting

# absmax blocks (of 64 values) per program: 4096 values, 2 KiB of packed input, 8 KiB of bf16 output; with
# NUM_WARPS the fastest pair of benchmarks/bench_nf4_kernel.py's sweep at LLaMA-3 shapes on an H200
# (docs/quantization.md)
QBLOCKS = 64
NUM_WARPS = 2


@triton.jit
def _slots_per_absmax_block(qb, q_ok, K, map_ptr, n_col_blocks, BLOCK_SIZE: tl.constexpr):
    """(QBLOCKS,) slot of the trained block each absmax block lies in (-1: none), and its row and column."""
    q_row = (qb * 64) // K
    q_col = qb * 64 - q_row * K
    q_slot = tl.load(map_ptr + (q_row // BLOCK_SIZE) * n_col_blocks + q_col // BLOCK_SIZE, mask=q_ok, other=-1)
    return q_slot, q_row, q_col


@triton.jit
def _overlay_runs(out, q_slot, q_row, q_col, bw_ptr, BLOCK_SIZE: tl.constexpr):
    """(QBLOCKS, 64) out with each hit absmax block's 64 values taken from its trained block (one row of it)."""
    hit = q_slot >= 0
    src = q_slot.to(tl.int64) * (BLOCK_SIZE * BLOCK_SIZE) + (q_row % BLOCK_SIZE) * BLOCK_SIZE + q_col % BLOCK_SIZE
    trained = tl.load(bw_ptr + src[:, None] + tl.arange(0, 64)[None, :], mask=hit[:, None], other=0.0)
    return tl.where(hit[:, None], trained.to(out.dtype), out)


@triton.jit
def _overlay_elements(
    out,
    elem,
    e_ok,
    pid,
    K,
    bw_ptr,
    map_ptr,
    n_col_blocks,
    BLOCK_SIZE: tl.constexpr,
    QBLOCKS: tl.constexpr,
    WIDE_ROWS: tl.constexpr,
):
    """(QBLOCKS, 64) out with every element inside a trained block taken from it (the map read per element)."""
    if WIDE_ROWS:  # K >= the tile: a tile spans at most two rows, found with one division per program
        row0 = (pid * (QBLOCKS * 64)) // K
        row = row0 + (elem >= (row0 + 1) * K).to(row0.dtype)
    else:
        row = elem // K
    col = elem - row * K
    slot = tl.load(map_ptr + (row // BLOCK_SIZE) * n_col_blocks + col // BLOCK_SIZE, mask=e_ok, other=-1)
    in_block = slot >= 0
    # block_weight is contiguous (n, b, b)
    trained = tl.load(
        bw_ptr + slot.to(tl.int64) * (BLOCK_SIZE * BLOCK_SIZE) + (row % BLOCK_SIZE) * BLOCK_SIZE + col % BLOCK_SIZE,
        mask=e_ok & in_block,
        other=0.0,
    )
    return tl.where(in_block, trained.to(out.dtype), out)


@triton.jit
def _nf4_dequant_overlay_kernel(
    packed_ptr,
    absmax_ptr,
    absmax_q_ptr,
    absmax_scale_ptr,
    absmax_code_ptr,
    offset_ptr,
    nf4_code_ptr,
    out_ptr,
    bw_ptr,
    map_ptr,
    hits_ptr,
    numel,
    K,
    n_col_blocks,
    DOUBLE_QUANT: tl.constexpr,
    HAS_BLOCKS: tl.constexpr,
    HAS_HITS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    QBLOCKS: tl.constexpr,
    WIDE: tl.constexpr,
    WIDE_ROWS: tl.constexpr,
    RUNS: tl.constexpr,
):
    pid = tl.program_id(0)
    if WIDE:  # element indices past 2^31
        pid = pid.to(tl.int64)
    if HAS_BLOCKS and HAS_HITS:
        # issued first, so that its latency hides behind the packed-code loads
        touched = tl.load(hits_ptr + pid) != 0
    qb = pid * QBLOCKS + tl.arange(0, QBLOCKS)
    n_qblocks = (numel + 63) // 64
    q_ok = qb < n_qblocks
    byte = qb[:, None] * 32 + tl.arange(0, 32)[None, :]
    packed = tl.load(packed_ptr + byte, mask=byte < (numel + 1) // 2, other=0).to(tl.int32)
    # (QBLOCKS, 32, 2) -> (QBLOCKS, 64): element 2j is byte j's high nibble, element 2j+1 its low nibble
    codes = tl.reshape(tl.join(packed >> 4, packed & 15), (QBLOCKS, 64))
    values = tl.load(nf4_code_ptr + codes)
    if DOUBLE_QUANT:
        q8 = tl.load(absmax_q_ptr + qb, mask=q_ok, other=0).to(tl.int32)
        group_scale = tl.load(absmax_scale_ptr + qb // 256, mask=q_ok, other=0.0)
        # launched with enable_fp_fusion=False: product and sum rounded separately, as bitsandbytes does
        scale = tl.load(absmax_code_ptr + q8) * group_scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + qb, mask=q_ok, other=0.0)
    out = (values * scale[:, None]).to(out_ptr.dtype.element_ty)
    elem = qb[:, None] * 64 + tl.arange(0, 64)[None, :]
    e_ok = elem < numel
    if HAS_BLOCKS and RUNS:
        # 64 divides b and b divides K: each absmax block (64 consecutive values) lies in one row of one block, so
        # the slot map is read once per absmax block, and trained values only by programs that hit a block
        if HAS_HITS:  # the flag says whether this program hits a block: no reduction over the tile
            if touched:
                q_slot, q_row, q_col = _slots_per_absmax_block(qb, q_ok, K, map_ptr, n_col_blocks, BLOCK_SIZE)
                out = _overlay_runs(out, q_slot, q_row, q_col, bw_ptr, BLOCK_SIZE)
        else:
            q_slot, q_row, q_col = _slots_per_absmax_block(qb, q_ok, K, map_ptr, n_col_blocks, BLOCK_SIZE)
            if tl.max(q_slot, axis=0) >= 0:
                out = _overlay_runs(out, q_slot, q_row, q_col, bw_ptr, BLOCK_SIZE)
    elif HAS_BLOCKS:
        if HAS_HITS:
            if touched:
                out = _overlay_elements(
                    out, elem, e_ok, pid, K, bw_ptr, map_ptr, n_col_blocks, BLOCK_SIZE, QBLOCKS, WIDE_ROWS
                )
        else:
            out = _overlay_elements(
                out, elem, e_ok, pid, K, bw_ptr, map_ptr, n_col_blocks, BLOCK_SIZE, QBLOCKS, WIDE_ROWS
            )
    tl.store(out_ptr + elem, out, mask=e_ok)


# launched on the device of its first argument, with less host time per call than a JIT call (launcher.py)
_launch = DirectLauncher(_nf4_dequant_overlay_kernel)


def dequantize_overlay(
    q,
    out: torch.Tensor,
    block_weight: torch.Tensor | None = None,
    block_indices: torch.Tensor | None = None,
    block_map: torch.Tensor | None = None,
    block_size: int = 0,
    program_hits: torch.Tensor | None = None,
    *,
    traced: bool = False,
    table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write the NF4 weight ``q`` (an ``NF4Weight`` of shape (N, K)) into ``out`` with the blocks in place.

    Args:
        out: contiguous (N, K) fp32/fp16/bf16 on q's device (a reusable buffer); returned.
        block_weight: (n, b, b) trained blocks (any float dtype, cast to out's), or None for the plain weight.
        block_indices: int64 (n, 2), unused here (the torch path's input; same signature).
        block_map: int32 (ceil(N/b), ceil(K/b)), the slot of the block at each block position or -1
            (``smt_kernels.quant.dequant.block_slot_map``); entries past the weight's edge are never read.
        program_hits: uint8 (P,) for the P = ``num_programs(N·K)`` programs of this launch, 1 where a program's
            elements meet a trained block (``smt_kernels.quant.dequant.program_hit_flags`` of the same block_map),
            or None: then every program finds that out from the map itself (same output, more work).
        traced: launch through ``torch.library.wrap_triton`` (inside a ``triton_op`` that Inductor traces). Inductor
            compiles the kernel with its own options, so ``enable_fp_fusion=False`` is not passed there: the
            double-quantized absmax (multiply, then add) may be contracted into one FMA and differ from
            bitsandbytes' by an fp32 rounding (not measured).
        table: float32 (16,) NF4 code values on q's device; default ``nf4_code(device)`` (a traced body must be
            given it: it cannot read a cached device tensor).
    """
    numel = q.numel
    has_blocks = block_weight is not None and block_weight.shape[0] > 0
    tables = q.tensors()
    dq = q.double_quant
    placeholder = q.packed
    absmax = placeholder if dq else tables["absmax"]
    absmax_q, scale, code, offset = (
        (tables["absmax_q"], tables["absmax_scale"], tables["absmax_code"], tables["absmax_offset"])
        if dq
        else (placeholder,) * 4
    )
    bw = block_weight.contiguous() if has_blocks else out
    bmap = block_map if has_blocks else placeholder
    grid = (num_programs(numel, QBLOCKS),)
    has_hits = has_blocks and program_hits is not None
    if has_hits and (
        program_hits.shape != grid
        or program_hits.dtype != torch.uint8
        or program_hits.device != out.device
        or program_hits.stride() != (1,)
    ):
        raise ValueError(
            f"program_hits must be a contiguous uint8 tensor of shape {grid} on {out.device} (one flag per program "
            f"of {QBLOCKS} absmax blocks: program_hit_flags with the kernel's QBLOCKS), got {program_hits.dtype} "
            f"{tuple(program_hits.shape)} with strides {program_hits.stride()} on {program_hits.device}"
        )
    if table is None:
        table = nf4_code(out.device)
    options = {} if interpreting() or traced else {"enable_fp_fusion": False}
    # Inductor sees the kernel itself and launches it from its generated code (no Python op per call)
    launch = torch.library.wrap_triton(_launch.kernel)[grid] if traced else functools.partial(_launch, grid)
    launch(
        q.packed,
        absmax,
        absmax_q,
        scale,
        code,
        offset,
        table,
        out,
        bw,
        bmap,
        program_hits if has_hits else placeholder,
        numel,
        q.shape[1],
        bmap.shape[1] if has_blocks else 1,
        DOUBLE_QUANT=dq,
        HAS_BLOCKS=has_blocks,
        HAS_HITS=has_hits,
        BLOCK_SIZE=block_size if has_blocks else 16,
        QBLOCKS=QBLOCKS,
        WIDE=numel + QBLOCKS * 64 >= 2**31,
        WIDE_ROWS=q.shape[1] >= QBLOCKS * 64,
        RUNS=has_blocks and runs_fit(q.shape[1], block_size),
        num_warps=NUM_WARPS,
        **options,
    )
    return out


def num_programs(numel: int, qblocks: int | None = None) -> int:
    """Programs of a launch over ``numel`` values with ``qblocks`` absmax blocks (64 values; default ``QBLOCKS``)
    per program."""
    n_qblocks = -(-numel // 64)
    return -(-n_qblocks // (qblocks or QBLOCKS))


def runs_fit(k: int, block_size: int) -> bool:
    """Whether the per-absmax-block overlay applies: 64 divides b and b divides K."""
    return block_size > 0 and block_size % 64 == 0 and k % block_size == 0


_CODE_CACHE: dict[torch.device, torch.Tensor] = {}


def nf4_code(device: torch.device) -> torch.Tensor:
    """The NF4 table on ``device`` (cached: the kernel reads it on every call)."""
    t = _CODE_CACHE.get(device)
    if t is None:
        from smt_kernels.quant.nf4 import NF4_CODE

        t = _CODE_CACHE[device] = NF4_CODE.to(device)
    return t
