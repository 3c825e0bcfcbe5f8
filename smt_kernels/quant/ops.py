"""The autograd operator of a linear layer on a frozen NF4 weight, with optional trainable b×b blocks.

Forward: dequantize the weight with the current blocks in place (``quant.buffers``), y = x·Wᵀ + bias, keep
only the input block-columns the blocks read. Backward: the block gradients from those columns
(``block_weight_grad``, unchanged from the bf16 layer) and dX = dY·W with W dequantized again,
so no dequantized weight outlives a call. Gradient checkpointing only re-runs the forward; under it the layer
is two autograd nodes (``smt_kernels.ops.split_layer``), so the recomputation of a checkpointed function whose
last op is this layer stops before its dequantization and GEMM.
The kernels are called through registered operators (``smt_kernels.quant.custom_ops``, ``smt_kernels.custom_ops``),
so ``torch.compile`` traces both layers without graph breaks; compiled, each dequantization returns a new tensor
of its own (see there why).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from smt_kernels import custom_ops
from smt_kernels.kernels.backend import resolve_backend
from smt_kernels.ops import refuse_second_order, saved_columns_relay, split_layer
from smt_kernels.quant import custom_ops as nf4_ops
from smt_kernels.quant.nf4 import SUPPORTED_DTYPES, NF4Weight


def _input_grad(ctx, grad_out, blocks, block_indices, block_map, program_hits) -> torch.Tensor:
    """dX = dY · W for a backward whose ctx holds ``q``, ``compute_dtype``, ``backend`` and ``block_size``: the NF4
    weight dequantized again with ``blocks`` (or none) in place, so no dequantized weight lives from forward to
    backward."""
    w = nf4_ops.dequantize_overlay(
        ctx.q,
        ctx.compute_dtype,
        ctx.backend,
        blocks,
        block_indices,
        block_map,
        ctx.block_size,
        backward=True,
        program_hits=program_hits,
    )
    return grad_out.matmul(w)


class _NF4BlockLinearFunction(torch.autograd.Function):
    """y = x · (NF4 weight with blocks in place)ᵀ + bias in ``compute_dtype``; gradients for x and block_weight."""

    @staticmethod
    def forward(
        ctx,
        x,
        block_weight,
        bias,
        q,
        block_indices,
        block_map,
        program_hits,
        col_blocks,
        col_slot,
        block_size,
        compute_dtype,
        backend,
    ):
        has_blocks = block_weight is not None and block_weight.shape[0] > 0
        blocks = block_weight.detach() if has_blocks else None
        w = nf4_ops.dequantize_overlay(
            q, compute_dtype, backend, blocks, block_indices, block_map, block_size, program_hits=program_hits
        )
        x_cols = None
        if has_blocks and ctx.needs_input_grad[1]:
            x_cols = nf4_ops.gather_column_blocks(x.reshape(-1, x.shape[-1]), col_blocks, block_size, backend)
        y = F.linear(x, w, bias)
        # block_weight is saved so that an in-place update before backward is caught by autograd
        ctx.save_for_backward(x_cols, block_weight, block_indices, block_map, program_hits, col_slot)
        ctx.q, ctx.block_size, ctx.compute_dtype, ctx.backend = q, block_size, compute_dtype, backend
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x_cols, block_weight, block_indices, block_map, program_hits, col_slot = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            refuse_second_order()  # a frozen NF4Linear (no trainable blocks) stays differentiable
        grad_x = grad_blocks = None
        has_blocks = block_weight is not None and block_weight.shape[0] > 0
        if ctx.needs_input_grad[1]:
            grad_blocks = (
                custom_ops.block_weight_grad(
                    grad_out.reshape(-1, grad_out.shape[-1]),
                    x_cols,
                    block_indices,
                    col_slot,
                    ctx.block_size,
                    block_weight.dtype,
                    ctx.backend,
                )
                if has_blocks
                else torch.zeros_like(block_weight)
            )
        if ctx.needs_input_grad[0]:
            blocks = block_weight.detach() if has_blocks else None
            grad_x = _input_grad(ctx, grad_out, blocks, block_indices, block_map, program_hits)
        return grad_x, grad_blocks, None, None, None, None, None, None, None, None, None, None


class _NF4DenseFunction(torch.autograd.Function):
    """Second node of a split NF4 layer (``smt_kernels.ops.split_layer``; the first is ``saved_columns_relay``,
    which gathers and saves the input block-columns): y = x·(NF4 weight with blocks in place)ᵀ + bias; saves
    nothing, so a checkpoint's recomputation need not re-run it. Backward: dX from a new dequantization, and dY
    (M, N) as the gradient of ``relay``."""

    @staticmethod
    def forward(
        ctx, x, relay, block_weight, bias, q, block_indices, block_map, program_hits, block_size, compute_dtype, backend
    ):
        w = nf4_ops.dequantize_overlay(
            q, compute_dtype, backend, block_weight, block_indices, block_map, block_size, program_hits=program_hits
        )
        ctx.q, ctx.block_size, ctx.compute_dtype, ctx.backend = q, block_size, compute_dtype, backend
        ctx.block_weight, ctx.block_indices, ctx.block_map = block_weight, block_indices, block_map
        ctx.program_hits = program_hits
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_second_order()  # this node exists only where blocks train (split_layer)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(ctx, grad_out, ctx.block_weight, ctx.block_indices, ctx.block_map, ctx.program_hits)
        return grad_x, grad_out.reshape(-1, grad_out.shape[-1]), None, None, None, None, None, None, None, None, None


def nf4_block_linear(
    x: torch.Tensor,
    q: NF4Weight,
    compute_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    block_weight: torch.Tensor | None = None,
    block_indices: torch.Tensor | None = None,
    block_map: torch.Tensor | None = None,
    col_blocks: torch.Tensor | None = None,
    col_slot: torch.Tensor | None = None,
    block_size: int = 0,
    program_hits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Linear layer on an NF4 weight, optionally with trainable blocks written over it.

    Args:
        x: (..., K) input, fp32/fp16/bf16. Cast to the compute dtype (the autocast dtype under ``torch.autocast``,
            else ``compute_dtype``); outside autocast the output is cast back to x's dtype, as bitsandbytes does.
        q: the frozen (N, K) weight.
        bias: optional (N,), frozen.
        block_weight: (n, b, b) trainable blocks, or None for a frozen layer; block_indices int64 (n, 2);
            block_map int32 (ceil(N/b), ceil(K/b)) from ``block_slot_map``; col_blocks (u,) / col_slot (n,) as in
            ``BlockLayout``; program_hits uint8 (P,) from ``program_hit_flags`` of block_map (or None: the kernel
            reads the map in every program); all on x's device.
    Returns:
        (..., N). Gradients flow to x and block_weight.
    """
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != q.shape[1]:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"input last dimension must be in_features={q.shape[1]}, got input of shape {got}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"input dtype {x.dtype} is not supported; use float32, float16 or bfloat16")
    if x.device != q.device:
        raise ValueError(f"input is on {x.device} but the NF4 weight is on {q.device}")
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else compute_dtype
    b = None if bias is None else bias.to(dtype)
    backend = resolve_backend(x.device)
    in_dtype = x.dtype
    # the op casts by itself; the context is entered only where autocast is on (it costs host time per call)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        x = x.to(dtype)
        if block_weight is not None and split_layer(block_weight):
            relay = saved_columns_relay(
                x,
                block_weight,
                None,
                block_indices,
                col_blocks,
                col_slot,
                block_size,
                q.shape[0],
                backend,
            )
            args = (block_weight.detach(), b, q, block_indices, block_map, program_hits, block_size, dtype, backend)
            y = _NF4DenseFunction.apply(x, relay, *args)
        else:
            args = (
                block_weight,
                b,
                q,
                block_indices,
                block_map,
                program_hits,
                col_blocks,
                col_slot,
                block_size,
                dtype,
                backend,
            )
            y = _NF4BlockLinearFunction.apply(x, *args)
    return y if autocast or y.dtype == in_dtype else y.to(in_dtype)


class _NF4WeightGradFunction(torch.autograd.Function):
    """Selection warm-up on a frozen NF4 layer: y = x·Wᵀ + bias; backward hands the dense dL/dW = dYᵀ·X (N, K, in
    the compute dtype, as autograd computes it for a 16-bit weight) to ``fold`` and drops it, so one dense weight
    gradient exists at a time. ``anchor`` is a 0-element tensor that requires grad: it makes autograd run this
    backward even where x needs no gradient (the first layer)."""

    @staticmethod
    def forward(ctx, x, anchor, bias, q, compute_dtype, fold):
        backend = resolve_backend(x.device)
        y = F.linear(x, nf4_ops.dequantize_overlay(q, compute_dtype, backend), bias)
        ctx.save_for_backward(x)
        ctx.q, ctx.compute_dtype, ctx.backend, ctx.fold = q, compute_dtype, backend, fold
        return y

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        ctx.fold(dy.t().matmul(x.reshape(-1, x.shape[-1])))
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = nf4_ops.dequantize_overlay(ctx.q, ctx.compute_dtype, ctx.backend, backward=True)
            grad_x = grad_out.matmul(w)
        return grad_x, None, None, None, None, None


def nf4_weight_grad_linear(
    x: torch.Tensor, q: NF4Weight, compute_dtype: torch.dtype, bias: torch.Tensor | None, anchor: torch.Tensor, fold
) -> torch.Tensor:
    """``nf4_block_linear`` without blocks whose backward also calls ``fold(dL/dW)`` (see _NF4WeightGradFunction)."""
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else compute_dtype
    with torch.autocast(device_type, enabled=False):
        y = _NF4WeightGradFunction.apply(x.to(dtype), anchor, None if bias is None else bias.to(dtype), q, dtype, fold)
    return y if autocast or y.dtype == x.dtype else y.to(x.dtype)
