"""The autograd operator of a linear layer whose only trainable part is a list of b×b weight blocks.

The frozen dense weight holds the current blocks in place: before each forward the blocks are written
into it (a copy of n·b² elements), so forward and input gradient are single library GEMMs on it, and
backward computes only the block gradients from the saved input block-columns.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
import torch.nn.functional as F

from smt_kernels.kernels import torch_blocks, triton_blocks

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKEND_ENV = "SMT_KERNELS_BACKEND"


def backend_for(device: torch.device) -> ModuleType:
    """The kernel module for tensors on ``device``: Triton on CUDA, pure torch elsewhere.

    ``SMT_KERNELS_BACKEND=triton|torch`` forces one; Triton on CPU tensors needs ``TRITON_INTERPRET=1``
    (set before smt_kernels is imported).
    """
    choice = os.environ.get(BACKEND_ENV, "").strip().lower()
    if choice not in ("", "triton", "torch"):
        raise ValueError(f"{BACKEND_ENV} must be 'triton' or 'torch', got {choice!r}")
    if choice == "torch":
        return torch_blocks
    if choice == "triton" or device.type == "cuda":
        if device.type != "cuda" and not triton_blocks.interpreting():
            raise RuntimeError(
                f"{BACKEND_ENV}=triton needs CUDA tensors (got {device}) or TRITON_INTERPRET=1 to run on the CPU"
            )
        return triton_blocks
    return torch_blocks


class _SparseBlockLinearFunction(torch.autograd.Function):
    """Writes ``block_weight`` into ``weight`` in place, then y = x · Wᵀ + bias in ``compute_dtype``.

    Gradients: x and block_weight only; weight and bias are frozen.
    """

    @staticmethod
    def forward(ctx, x, weight, block_weight, bias, block_indices, col_blocks, col_slot, block_size, compute_dtype):
        # x: (..., K); reshapes happen here, where they cost no autograd node
        kernels = backend_for(x.device)
        gather = ctx.needs_input_grad[2] and block_weight.shape[0] > 0
        # one launch: the blocks into the frozen weight (in its own dtype) and, when block gradients are
        # wanted, only the input block-columns some block reads, as a contiguous copy (never a view of x)
        x_cols = kernels.scatter_blocks_and_gather_columns(
            weight, block_weight.detach(), block_indices, x.reshape(-1, x.shape[-1]) if gather else None,
            col_blocks, block_size,
        )
        w = weight if weight.dtype == compute_dtype else weight.to(compute_dtype)
        y = F.linear(x, w, None if bias is None else bias.to(compute_dtype))
        # block_weight is saved (it costs nothing) so that an in-place update before backward is caught
        ctx.save_for_backward(x_cols, block_weight, block_indices, col_slot)
        # the weight is held without a version check: later forwards rewrite the same block values into it
        # in place (gradient accumulation runs several forwards before their backwards)
        ctx.weight = w
        ctx.block_size = block_size
        ctx.kernels = kernels
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x_cols, block_weight, block_indices, col_slot = ctx.saved_tensors
        need_x, need_blocks = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_x = grad_blocks = None
        # the blocks are written into the weight again before dX = dY·W: a sharding engine (FSDP2) may have
        # re-materialised the weight from shards that never saw them; fused into the block-gradient launch
        rescatter = (ctx.weight, block_weight.detach()) if need_x else None
        if need_blocks and x_cols is not None:
            grad_blocks = ctx.kernels.block_weight_grad(
                grad_out.reshape(-1, grad_out.shape[-1]), x_cols, block_indices, col_slot, ctx.block_size,
                block_weight.dtype, rescatter=rescatter,
            )
        else:
            if need_blocks:
                grad_blocks = torch.zeros_like(block_weight)
            if need_x:
                ctx.kernels.scatter_blocks(ctx.weight, block_weight.detach(), block_indices)
        if need_x:
            grad_x = grad_out.matmul(ctx.weight)
        return grad_x, None, grad_blocks, None, None, None, None, None, None


def _check_inputs(x, weight, block_weight, bias, block_indices, block_size):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"input last dimension must be in_features={weight.shape[1]}, got input of shape {tuple(x.shape)}"
        )
    for name, t in (("input", x), ("weight", weight), ("block_weight", block_weight)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} dtype {t.dtype} is not supported; use one of float32, float16, bfloat16")
    if x.device != weight.device:
        raise ValueError(f"input is on {x.device} but the weight is on {weight.device}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0] or bias.device != weight.device):
        raise ValueError(
            f"bias must have shape ({weight.shape[0]},) on {weight.device}, got {tuple(bias.shape)} on {bias.device}"
        )
    n = block_indices.shape[0]
    # plain int comparisons: comparing torch.Size with a tuple is several times slower on this hot path
    bs = block_weight.shape
    if len(bs) != 3 or bs[0] != n or bs[1] != block_size or bs[2] != block_size:
        raise ValueError(
            f"block_weight must have shape ({n}, {block_size}, {block_size}), got {tuple(block_weight.shape)}"
        )


def sparse_block_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    block_weight: torch.Tensor,
    block_indices: torch.Tensor,
    col_blocks: torch.Tensor,
    col_slot: torch.Tensor,
    block_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Linear layer with trainable blocks: writes ``block_weight`` into ``weight`` in place, then y = x·Wᵀ + b.

    Args:
        x: (..., K) input, any strides, fp32/fp16/bf16.
        weight: (N, K) frozen dense weight; its blocks are overwritten with ``block_weight``.
        block_weight: (n, b, b) trainable blocks; entries past the weight's edge are ignored.
        block_indices: int64 (n, 2) (row_block, col_block) of each block, on x's device, contiguous.
        col_blocks: int64 (u,) sorted distinct block-columns; col_slot: int64 (n,) each block's slot in it.
        bias: optional (N,), frozen.
    Returns:
        (..., N) output. Gradients flow to x and block_weight only.
    Under ``torch.autocast`` the product runs in the autocast dtype; the blocks are written in their own dtype.
    """
    _check_inputs(x, weight, block_weight, bias, block_indices, block_size)
    args = (weight, block_weight, bias, block_indices, col_blocks, col_slot, block_size)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
        # the op casts by itself; autocast inside it would only add work
        with torch.autocast(device_type, enabled=False):
            return _SparseBlockLinearFunction.apply(x.to(compute_dtype), *args, compute_dtype)
    if x.dtype != weight.dtype:
        raise TypeError(f"input dtype {x.dtype} does not match the weight dtype {weight.dtype} (outside autocast)")
    return _SparseBlockLinearFunction.apply(x, *args, weight.dtype)
