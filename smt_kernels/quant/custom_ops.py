"""The NF4 layers' kernels as registered PyTorch operators (namespace ``smt_kernels``), the seam for the compiler.

As ``smt_kernels.custom_ops`` does for the 16-bit layer: under ``torch.compile`` each operator is one node with a
fake (shape-only) implementation, so ``NF4Linear`` / ``NF4SparseBlockLinear`` trace without graph breaks; on CUDA
with compiled Triton each has a ``triton_op`` twin (``smt_kernels::triton_nf4_*``) whose body Inductor traces,
so it sees the kernels (``wrap_triton``) and launches them itself. The ``custom_op`` versions serve the torch
backend and the Triton interpreter. In eager mode the wrappers call the implementations directly.

Where the dequantized weight goes:
- eager: into ``smt_kernels.quant.buffers.dequant_buffer`` (a fresh tensor, or the optional pooled buffer);
- compiled: into a fresh tensor the operator returns. A module-level buffer is not a graph input, so its mutation
  cannot be declared (``mutates_args`` names arguments), and making it one would put the same storage into every
  layer's op and serialise them through functionalization copies. A fresh output is a plain graph value: it dies
  after its GEMM, and Inductor's memory planner reuses the freed storage for the next layer's weight, which is
  what the caching allocator does in eager mode. (``aot_eager`` has no planner; the allocator reuses the memory.)

Operators (weight N×K, n blocks of b×b, u distinct block-columns, M tokens; ``backend`` "triton" or "torch"):
- ``nf4_dequantize_overlay(packed, absmax?, absmax_q?, absmax_scale?, absmax_offset?, absmax_code?, N, K,
  block_weight?, block_indices?, block_map?, program_hits?, block_size, dtype, backward, backend) -> (N, K)`` in
  ``dtype``: the NF4 weight with the blocks in place (program_hits: ``quant.dequant.program_hit_flags``, read by
  the Triton kernel only). ``backward`` does not change the result: it tells the backward's call
  apart from the forward's, so the compiler's common-subexpression elimination cannot merge the two and keep
  one dequantized weight per layer alive from forward to backward.
- ``nf4_gather_column_blocks(x, col_blocks, block_size, backend) -> (M, u·b)``: the input block-columns the
  blocks read, kept for backward (the 16-bit layer fuses this copy into its scatter).
"""

from __future__ import annotations

import torch
from torch.library import custom_op

from smt_kernels.kernels.backend import kernels
from smt_kernels.kernels.launcher import interpreting
from smt_kernels.quant.buffers import dequant_buffer
from smt_kernels.quant.dequant import overlay_kernel
from smt_kernels.quant.nf4 import NF4Weight

_is_compiling = torch.compiler.is_compiling


def _nf4(packed, absmax, absmax_q, absmax_scale, absmax_offset, absmax_code, out_features, in_features, dtype):
    return NF4Weight(
        packed=packed,
        shape=(out_features, in_features),
        dtype=dtype,
        absmax=absmax,
        absmax_q=absmax_q,
        absmax_scale=absmax_scale,
        absmax_offset=absmax_offset,
        absmax_code=absmax_code,
    )


def _dequantize_impl(
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    absmax_q: torch.Tensor | None,
    absmax_scale: torch.Tensor | None,
    absmax_offset: torch.Tensor | None,
    absmax_code: torch.Tensor | None,
    out_features: int,
    in_features: int,
    block_weight: torch.Tensor | None,
    block_indices: torch.Tensor | None,
    block_map: torch.Tensor | None,
    program_hits: torch.Tensor | None,
    block_size: int,
    dtype: torch.dtype,
    backward: bool,
    backend: str,
) -> torch.Tensor:
    q = _nf4(packed, absmax, absmax_q, absmax_scale, absmax_offset, absmax_code, out_features, in_features, dtype)
    out = torch.empty(q.shape, device=packed.device, dtype=dtype)
    return overlay_kernel(backend)(q, out, block_weight, block_indices, block_map, block_size, program_hits)


def _gather_impl(x: torch.Tensor, col_blocks: torch.Tensor, block_size: int, backend: str) -> torch.Tensor:
    return kernels(backend).gather_column_blocks(x, col_blocks, block_size)


_dequantize_op = custom_op("smt_kernels::nf4_dequantize_overlay", _dequantize_impl, mutates_args=())
_gather_op = custom_op("smt_kernels::nf4_gather_column_blocks", _gather_impl, mutates_args=())


@_dequantize_op.register_fake
def _(packed, absmax, absmax_q, absmax_scale, absmax_offset, absmax_code, n, k, bw, idx, bmap, hits, b, dtype, bwd, be):
    return packed.new_empty((n, k), dtype=dtype)


@_gather_op.register_fake
def _(x, col_blocks, block_size, backend):
    return x.new_empty((x.shape[0], col_blocks.shape[0] * block_size))


# Triton twins for Inductor (torch.library.triton_op appeared in torch 2.6); the NF4 table is an input, since a
# traced body cannot read a cached device tensor
_triton_op = getattr(torch.library, "triton_op", None)
_TRACEABLE = _triton_op is not None and not interpreting()


def _triton_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    absmax_q: torch.Tensor | None,
    absmax_scale: torch.Tensor | None,
    absmax_offset: torch.Tensor | None,
    absmax_code: torch.Tensor | None,
    out_features: int,
    in_features: int,
    block_weight: torch.Tensor | None,
    block_indices: torch.Tensor | None,
    block_map: torch.Tensor | None,
    program_hits: torch.Tensor | None,
    block_size: int,
    dtype: torch.dtype,
    backward: bool,
    nf4_code: torch.Tensor,
) -> torch.Tensor:
    from smt_kernels.kernels import nf4_dequant

    q = _nf4(packed, absmax, absmax_q, absmax_scale, absmax_offset, absmax_code, out_features, in_features, dtype)
    out = torch.empty(q.shape, device=packed.device, dtype=dtype)
    return nf4_dequant.dequantize_overlay(
        q, out, block_weight, block_indices, block_map, block_size, program_hits, traced=True, table=nf4_code
    )


def _triton_gather(x: torch.Tensor, col_blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    from smt_kernels.kernels import triton_blocks

    return triton_blocks.scatter_blocks_and_gather_columns(None, None, None, x, col_blocks, block_size, traced=True)


if _triton_op is not None:
    _triton_dequantize_op = _triton_op(
        "smt_kernels::triton_nf4_dequantize_overlay", _triton_dequantize, mutates_args={}
    )
    _triton_gather_op = _triton_op("smt_kernels::triton_nf4_gather_column_blocks", _triton_gather, mutates_args={})


def dequantize_overlay(
    q: NF4Weight,
    dtype: torch.dtype,
    backend: str,
    block_weight: torch.Tensor | None = None,
    block_indices: torch.Tensor | None = None,
    block_map: torch.Tensor | None = None,
    block_size: int = 0,
    backward: bool = False,
    program_hits: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, K) in ``dtype``: the NF4 weight ``q`` with ``block_weight`` (n, b, b) in place at block_indices (n, 2)
    (block_map: ``block_slot_map``; program_hits: uint8 (P,) ``program_hit_flags`` of it, or None). Eager:
    ``buffers.dequant_buffer`` (fresh, or the pooled buffer); compiled: a new tensor. ``backward``: set by the
    backward's call (see the module docstring)."""
    if not _is_compiling():
        out = dequant_buffer(q.device, q.shape, dtype)
        return overlay_kernel(backend)(q, out, block_weight, block_indices, block_map, block_size, program_hits)
    t = q.tensors()
    args = (
        q.packed,
        t.get("absmax"),
        t.get("absmax_q"),
        t.get("absmax_scale"),
        t.get("absmax_offset"),
        t.get("absmax_code"),
        q.shape[0],
        q.shape[1],
        block_weight,
        block_indices,
        block_map,
        program_hits,
        block_size,
        dtype,
        backward,
    )
    if backend == "triton" and _TRACEABLE:
        from smt_kernels.kernels.nf4_dequant import nf4_code

        return _triton_dequantize_op(*args, nf4_code(q.device))
    return _dequantize_op(*args, backend)


def gather_column_blocks(x: torch.Tensor, col_blocks: torch.Tensor, block_size: int, backend: str) -> torch.Tensor:
    """The block-columns col_blocks (u,) of x (M, K) as a new contiguous (M, u·b), zero past K."""
    if not _is_compiling():
        return _gather_impl(x, col_blocks, block_size, backend)
    if backend == "triton" and _TRACEABLE:
        return _triton_gather_op(x, col_blocks, block_size)
    return _gather_op(x, col_blocks, block_size, backend)
