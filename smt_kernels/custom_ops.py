"""SMT's kernels as registered PyTorch operators (namespace ``smt_kernels``), the seam for the compiler.

``torch.compile`` sees each operator as one node with a fake (shape-only) implementation, so a patched model
traces without graph breaks whichever backend runs underneath; Inductor keeps the frozen GEMMs around them.
The weight a kernel writes blocks into is declared mutated. In eager mode the Python wrappers below call the
implementations directly: going through the dispatcher would add host time per call and change nothing else.
Under ``torch.compile`` with compiled Triton kernels (CUDA), each operator has a ``triton_op`` twin
(``smt_kernels::triton_*``): Inductor traces its body, sees the kernels (``wrap_triton``) and launches them from
its generated code, so a compiled step pays no Python per operator. The ``custom_op`` versions serve the torch
backend and the Triton interpreter.

Operators (shapes: M tokens, weight N×K, n blocks of b×b, u distinct block-columns; ``backend`` is "triton" or
"torch", see ``smt_kernels.kernels.backend``):
- ``scatter_blocks(weight!, block_weight, block_indices, backend)``
- ``scatter_blocks_and_gather_columns(weight!, block_weight, block_indices, x, col_blocks, block_size, gather,
  backend) -> x_cols`` (M, u·b), or an empty (0, 0) tensor when ``gather`` is False
- ``block_weight_grad(grad_out, x_cols, block_indices, col_slot, block_size, out_dtype, backend) -> (n, b, b)``
- ``block_weight_grad_and_scatter(grad_out, x_cols, weight!, block_weight, block_indices, col_slot, block_size,
  out_dtype, backend) -> (n, b, b)``: also writes the blocks into the weight, in the same launch on Triton.
"""

from __future__ import annotations

import torch
from torch.library import custom_op

from smt_kernels.kernels import triton_blocks
from smt_kernels.kernels.backend import kernels
from smt_kernels.kernels.launcher import interpreting

_is_compiling = torch.compiler.is_compiling


def _scatter_impl(weight: torch.Tensor, block_weight: torch.Tensor, block_indices: torch.Tensor, backend: str) -> None:
    kernels(backend).scatter_blocks(weight, block_weight, block_indices)


def _scatter_and_gather_impl(
    weight: torch.Tensor,
    block_weight: torch.Tensor,
    block_indices: torch.Tensor,
    x: torch.Tensor,
    col_blocks: torch.Tensor,
    block_size: int,
    gather: bool,
    backend: str,
) -> torch.Tensor:
    x_cols = kernels(backend).scatter_blocks_and_gather_columns(
        weight, block_weight, block_indices, x if gather else None, col_blocks, block_size
    )
    return x_cols if x_cols is not None else x.new_empty((0, 0))


def _grad_impl(
    grad_out: torch.Tensor,
    x_cols: torch.Tensor,
    block_indices: torch.Tensor,
    col_slot: torch.Tensor,
    block_size: int,
    out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    return kernels(backend).block_weight_grad(grad_out, x_cols, block_indices, col_slot, block_size, out_dtype)


def _grad_and_scatter_impl(
    grad_out: torch.Tensor,
    x_cols: torch.Tensor,
    weight: torch.Tensor,
    block_weight: torch.Tensor,
    block_indices: torch.Tensor,
    col_slot: torch.Tensor,
    block_size: int,
    out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    return kernels(backend).block_weight_grad(
        grad_out, x_cols, block_indices, col_slot, block_size, out_dtype, rescatter=(weight, block_weight)
    )


_scatter_op = custom_op("smt_kernels::scatter_blocks", _scatter_impl, mutates_args=("weight",))
_scatter_and_gather_op = custom_op(
    "smt_kernels::scatter_blocks_and_gather_columns", _scatter_and_gather_impl, mutates_args=("weight",)
)
_grad_op = custom_op("smt_kernels::block_weight_grad", _grad_impl, mutates_args=())
_grad_and_scatter_op = custom_op(
    "smt_kernels::block_weight_grad_and_scatter", _grad_and_scatter_impl, mutates_args=("weight",)
)


@_scatter_op.register_fake
def _(weight, block_weight, block_indices, backend):
    return None


@_scatter_and_gather_op.register_fake
def _(weight, block_weight, block_indices, x, col_blocks, block_size, gather, backend):
    if not gather:
        return x.new_empty((0, 0))
    return x.new_empty((x.shape[0], col_blocks.shape[0] * block_size))


@_grad_op.register_fake
def _(grad_out, x_cols, block_indices, col_slot, block_size, out_dtype, backend):
    return grad_out.new_empty((block_indices.shape[0], block_size, block_size), dtype=out_dtype)


@_grad_and_scatter_op.register_fake
def _(grad_out, x_cols, weight, block_weight, block_indices, col_slot, block_size, out_dtype, backend):
    return grad_out.new_empty((block_indices.shape[0], block_size, block_size), dtype=out_dtype)


# Triton twins for Inductor (torch.library.triton_op appeared in torch 2.6)
_triton_op = getattr(torch.library, "triton_op", None)
_TRACEABLE = _triton_op is not None and not interpreting()


def _triton_scatter(weight: torch.Tensor, block_weight: torch.Tensor, block_indices: torch.Tensor) -> None:
    triton_blocks.scatter_blocks(weight, block_weight, block_indices, traced=True)


def _triton_scatter_and_gather(
    weight: torch.Tensor,
    block_weight: torch.Tensor,
    block_indices: torch.Tensor,
    x: torch.Tensor,
    col_blocks: torch.Tensor,
    block_size: int,
    gather: bool,
) -> torch.Tensor:
    x_cols = triton_blocks.scatter_blocks_and_gather_columns(
        weight, block_weight, block_indices, x if gather else None, col_blocks, block_size, traced=True
    )
    return x_cols if x_cols is not None else x.new_empty((0, 0))


def _triton_grad(
    grad_out: torch.Tensor,
    x_cols: torch.Tensor,
    block_indices: torch.Tensor,
    col_slot: torch.Tensor,
    block_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return triton_blocks.block_weight_grad(
        grad_out, x_cols, block_indices, col_slot, block_size, out_dtype, traced=True
    )


def _triton_grad_and_scatter(
    grad_out: torch.Tensor,
    x_cols: torch.Tensor,
    weight: torch.Tensor,
    block_weight: torch.Tensor,
    block_indices: torch.Tensor,
    col_slot: torch.Tensor,
    block_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return triton_blocks.block_weight_grad(
        grad_out, x_cols, block_indices, col_slot, block_size, out_dtype, rescatter=(weight, block_weight), traced=True
    )


if _triton_op is not None:
    _triton_scatter_op = _triton_op("smt_kernels::triton_scatter_blocks", _triton_scatter, mutates_args={"weight"})
    _triton_scatter_and_gather_op = _triton_op(
        "smt_kernels::triton_scatter_blocks_and_gather_columns", _triton_scatter_and_gather, mutates_args={"weight"}
    )
    _triton_grad_op = _triton_op("smt_kernels::triton_block_weight_grad", _triton_grad, mutates_args={})
    _triton_grad_and_scatter_op = _triton_op(
        "smt_kernels::triton_block_weight_grad_and_scatter", _triton_grad_and_scatter, mutates_args={"weight"}
    )


def scatter_blocks(weight: torch.Tensor, block_weight: torch.Tensor, block_indices: torch.Tensor, backend: str) -> None:
    """Write block_weight (n, b, b) into weight (N, K) in place at block_indices (n, 2)."""
    if _is_compiling():
        if backend == "triton" and _TRACEABLE:
            _triton_scatter_op(weight, block_weight, block_indices)
        else:
            _scatter_op(weight, block_weight, block_indices, backend)
    else:
        _scatter_impl(weight, block_weight, block_indices, backend)


def scatter_blocks_and_gather_columns(
    weight: torch.Tensor,
    block_weight: torch.Tensor,
    block_indices: torch.Tensor,
    x: torch.Tensor,
    col_blocks: torch.Tensor,
    block_size: int,
    gather: bool,
    backend: str,
) -> torch.Tensor | None:
    """Blocks into weight in place; with ``gather``, the block-columns col_blocks (u,) of x (M, K) as (M, u·b)."""
    if _is_compiling() and backend == "triton" and _TRACEABLE:
        x_cols = _triton_scatter_and_gather_op(weight, block_weight, block_indices, x, col_blocks, block_size, gather)
    elif _is_compiling():
        x_cols = _scatter_and_gather_op(weight, block_weight, block_indices, x, col_blocks, block_size, gather, backend)
    else:
        x_cols = _scatter_and_gather_impl(
            weight, block_weight, block_indices, x, col_blocks, block_size, gather, backend
        )
    return x_cols if gather else None


def block_weight_grad(
    grad_out: torch.Tensor,
    x_cols: torch.Tensor,
    block_indices: torch.Tensor,
    col_slot: torch.Tensor,
    block_size: int,
    out_dtype: torch.dtype,
    backend: str,
    rescatter: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(n, b, b) gradient of every block from grad_out (M, N) and x_cols (M, u·b); with ``rescatter=(weight,
    block_weight)`` the blocks are also written into weight."""
    if _is_compiling() and backend == "triton" and _TRACEABLE:
        if rescatter is None:
            return _triton_grad_op(grad_out, x_cols, block_indices, col_slot, block_size, out_dtype)
        return _triton_grad_and_scatter_op(
            grad_out, x_cols, rescatter[0], rescatter[1], block_indices, col_slot, block_size, out_dtype
        )
    if rescatter is None:
        op = _grad_op if _is_compiling() else _grad_impl
        return op(grad_out, x_cols, block_indices, col_slot, block_size, out_dtype, backend)
    op = _grad_and_scatter_op if _is_compiling() else _grad_and_scatter_impl
    return op(grad_out, x_cols, rescatter[0], rescatter[1], block_indices, col_slot, block_size, out_dtype, backend)
