"""The autograd operator of a linear layer whose only trainable part is a list of b×b weight blocks.

The frozen dense weight holds the current blocks in place: before each forward the blocks are written
into it (a copy of n·b² elements), so forward and input gradient are single library GEMMs on it, and
backward computes only the block gradients from the saved input block-columns. The block copies and the
block gradient are registered operators (``smt_kernels.custom_ops``), so ``torch.compile`` traces through.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from smt_kernels import custom_ops
from smt_kernels.kernels.backend import kernels, resolve_backend

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _process_group_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# looked up once: saved_tensors_are_hooked runs on every layer call that trains blocks
_TOP_SAVED_TENSORS_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def saved_tensors_are_hooked() -> bool:
    """Whether tensors saved for backward go through saved-tensor hooks right now: non-reentrant gradient
    checkpointing (``torch.utils.checkpoint``, Hugging Face's ``gradient_checkpointing_enable``), CPU offloading."""
    if _TOP_SAVED_TENSORS_HOOKS is None:
        return False
    try:
        return _TOP_SAVED_TENSORS_HOOKS(False) is not None
    except TypeError:  # older signature without ``ignore_is_tracing``
        return _TOP_SAVED_TENSORS_HOOKS() is not None


def refuse_second_order() -> None:
    """Raise when a backward that gives trainable blocks their gradient runs with ``create_graph=True``.

    Its results are not differentiable as the math says: dX = dY·W is computed on a weight that holds the blocks
    without their autograd history, and the block gradient from a detached copy of the input columns, so a second
    derivative through them (a gradient penalty, a Hessian-vector product) would come out silently wrong (None or
    zero through ``torch.autograd.grad``). A frozen layer's dX is exact and stays differentiable. Traced backward
    graphs (``torch.compile``) are left alone."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            "SMT layers with trainable blocks do not support second derivatives (create_graph=True): the input "
            "gradient does not carry its dependence on the blocks, nor the block gradient its dependence on the "
            "input. Take the gradient without create_graph, or merge the layers (smt_kernels.merge) first"
        )


class _SavedColumnsFunction(torch.autograd.Function):
    """First of the two autograd nodes of a layer whose saved tensors are hooked (see ``split_layer``).

    Forward: with ``weight``, writes the blocks into it (in place, one launch with the gather); gathers x2d's
    (M, K) block-columns as x_cols (M, u·b) and saves them. Returns ``relay``: an (M, N) zero-stride stand-in that
    the second node takes as input; its backward hands dY (M, N) back through it, and this node's backward turns
    dY and x_cols into the block gradients (n, b, b). No GEMM runs here, so a checkpoint's recomputation, which
    re-runs the forward only up to the last node that saved something, stops before the layer's dense GEMM when
    the layer is the last op of the checkpointed function (LLaMA's down_proj), as it does for a frozen layer.
    """

    @staticmethod
    def forward(ctx, x2d, block_weight, weight, block_indices, col_blocks, col_slot, block_size, out_features, backend):
        if weight is not None:
            x_cols = custom_ops.scatter_blocks_and_gather_columns(
                weight, block_weight.detach(), block_indices, x2d, col_blocks, block_size, True, backend
            )
        else:
            x_cols = kernels(backend).gather_column_blocks(x2d, col_blocks, block_size)
        ctx.save_for_backward(x_cols, block_weight, block_indices, col_slot)
        ctx.block_size, ctx.backend = block_size, backend
        return x2d.new_zeros(()).expand(x2d.shape[0], out_features)

    @staticmethod
    def backward(ctx, grad_relay):
        refuse_second_order()
        x_cols, block_weight, block_indices, col_slot = ctx.saved_tensors
        grad_blocks = custom_ops.block_weight_grad(
            grad_relay, x_cols, block_indices, col_slot, ctx.block_size, block_weight.dtype, ctx.backend
        )
        return None, grad_blocks, None, None, None, None, None, None, None


class _DenseOnWrittenWeightFunction(torch.autograd.Function):
    """Second node: y = x · Wᵀ + bias on the weight the first node wrote the blocks into; saves nothing.

    Backward: dX = dY·W (with ``rescatter=(block_weight, block_indices)``, the blocks written into W again
    first, for FSDP2), and dY itself, reshaped (M, N), as the gradient of ``relay``. A weight of another dtype than
    ``compute_dtype`` (fp32 weights under bf16 autocast) is cast in forward and again in backward: keeping the cast
    copy from one to the other would hold a copy of every patched weight through the whole forward, which
    checkpointing exists to avoid (a frozen layer's cast weight is a saved tensor, recomputed there).
    """

    @staticmethod
    def forward(ctx, x, relay, weight, bias, compute_dtype, backend, rescatter):
        ctx.weight, ctx.compute_dtype, ctx.backend, ctx.rescatter = weight, compute_dtype, backend, rescatter
        w = weight if weight.dtype == compute_dtype else weight.to(compute_dtype)
        return F.linear(x, w, None if bias is None else bias.to(compute_dtype))

    @staticmethod
    def backward(ctx, grad_out):
        refuse_second_order()  # this node exists only where blocks train (split_layer)
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = ctx.weight
            if ctx.rescatter is not None:
                custom_ops.scatter_blocks(weight, ctx.rescatter[0], ctx.rescatter[1], ctx.backend)
            w = weight if weight.dtype == ctx.compute_dtype else weight.to(ctx.compute_dtype)
            grad_x = grad_out.matmul(w)
        return grad_x, grad_out.reshape(-1, grad_out.shape[-1]), None, None, None, None, None


def saved_columns_relay(
    x: torch.Tensor,
    block_weight: torch.Tensor,
    weight: torch.Tensor | None,
    block_indices: torch.Tensor,
    col_blocks: torch.Tensor,
    col_slot: torch.Tensor,
    block_size: int,
    out_features: int,
    backend: str,
) -> torch.Tensor:
    """The first node of a split layer (``_SavedColumnsFunction``) on x (..., K), the blocks written into ``weight``
    unless it is None (the NF4 layer overlays them itself); returns the (M, out_features) relay."""
    x2d = x.detach().reshape(-1, x.shape[-1])  # no gradient flows to x through this node
    return _SavedColumnsFunction.apply(
        x2d, block_weight, weight, block_indices, col_blocks, col_slot, block_size, out_features, backend
    )


def split_layer(block_weight: torch.Tensor) -> bool:
    """Whether a layer call runs as two autograd nodes (``_SavedColumnsFunction`` + the GEMM's node) instead of
    one: in eager mode, when block gradients are wanted and saved tensors are hooked (checkpointing), where the
    split keeps a recomputation from re-running the dense GEMM. Elsewhere one node costs less host time."""
    return (
        block_weight.requires_grad
        and block_weight.shape[0] > 0
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and saved_tensors_are_hooked()
    )


class _SparseBlockLinearFunction(torch.autograd.Function):
    """Writes ``block_weight`` into ``weight`` in place, then y = x · Wᵀ + bias in ``compute_dtype``.

    Gradients: x and block_weight only; weight and bias are frozen.
    """

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        block_weight,
        bias,
        block_indices,
        col_blocks,
        col_slot,
        block_size,
        compute_dtype,
        backend,
        rescatter,
    ):
        gather = ctx.needs_input_grad[2] and block_weight.shape[0] > 0
        # one launch: the blocks into the frozen weight (in its own dtype) and, when block gradients are
        # wanted, only the input block-columns some block reads, as a contiguous copy (never a view of x)
        x_cols = custom_ops.scatter_blocks_and_gather_columns(
            weight,
            block_weight.detach(),
            block_indices,
            x.reshape(-1, x.shape[-1]),
            col_blocks,
            block_size,
            gather,
            backend,
        )
        w = weight if weight.dtype == compute_dtype else weight.to(compute_dtype)
        y = F.linear(x, w, None if bias is None else bias.to(compute_dtype))
        # block_weight is saved (it costs nothing) so that an in-place update before backward is caught
        ctx.save_for_backward(x_cols, block_weight, block_indices, col_slot)
        # the weight is held without a version check: later forwards rewrite the same block values into it
        # in place (gradient accumulation runs several forwards before their backwards)
        ctx.weight = w
        ctx.block_size = block_size
        ctx.backend = backend
        ctx.rescatter = rescatter
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x_cols, block_weight, block_indices, col_slot = ctx.saved_tensors
        need_x, need_blocks = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if need_blocks:
            refuse_second_order()
        grad_x = grad_blocks = None
        # the blocks are written into the weight again before dX = dY·W: a sharding engine (FSDP2) may have
        # re-materialised the weight from shards that never saw them; fused into the block-gradient launch
        rescatter = (ctx.weight, block_weight.detach()) if need_x and ctx.rescatter else None
        if need_blocks and x_cols is not None:
            grad_blocks = custom_ops.block_weight_grad(
                grad_out.reshape(-1, grad_out.shape[-1]),
                x_cols,
                block_indices,
                col_slot,
                ctx.block_size,
                block_weight.dtype,
                ctx.backend,
                rescatter=rescatter,
            )
        else:
            if need_blocks:
                grad_blocks = torch.zeros_like(block_weight)
            if rescatter is not None:
                custom_ops.scatter_blocks(ctx.weight, block_weight.detach(), block_indices, ctx.backend)
        if need_x:
            grad_x = grad_out.matmul(ctx.weight)
        return grad_x, None, grad_blocks, None, None, None, None, None, None, None, None


def check_input(x: torch.Tensor, weight: torch.Tensor) -> None:
    """Per-call checks of the input against the (already validated) weight; raise naming the numbers."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"input last dimension must be in_features={weight.shape[1]}, got input of shape {tuple(x.shape)}"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"input dtype {x.dtype} is not supported; use one of float32, float16, bfloat16")
    if x.device != weight.device:
        raise ValueError(f"input is on {x.device} but the weight is on {weight.device}")


def check_parameters(weight, block_weight, bias, block_indices, block_size) -> None:
    """Checks of the layer's own tensors (done once, when a layer is built or its tensors change)."""
    for name, t in (("weight", weight), ("block_weight", block_weight)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} dtype {t.dtype} is not supported; use one of float32, float16, bfloat16")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0] or bias.device != weight.device):
        raise ValueError(
            f"bias must have shape ({weight.shape[0]},) on {weight.device}, got {tuple(bias.shape)} on {bias.device}"
        )
    check_block_weight_shape(block_weight, block_indices.shape[0], block_size)
    _check_index("block_indices", block_indices, 2, weight.device)


def _check_index(name: str, t: torch.Tensor, dim: int, device: torch.device) -> None:
    # the Triton kernels read index tensors as flat int64 arrays: another dtype, stride or device reads garbage
    if t.dtype != torch.int64 or t.dim() != dim or not t.is_contiguous() or t.device != device:
        raise ValueError(
            f"{name} must be a contiguous {dim}-D int64 tensor on {device}, got {t.dtype} of shape "
            f"{tuple(t.shape)} and strides {t.stride()} on {t.device}"
        )


def undo_unsupported_conversion(layer: torch.nn.Module, before: dict[str, torch.dtype], names: tuple[str, ...]) -> None:
    """After ``layer._apply`` (``.to``, ``.double()``, ...): if one of the parameters ``names`` now has a dtype the
    layer cannot run in, put every parameter of the layer back to its dtype in ``before`` and raise TypeError."""
    for name in names:
        refused = layer._parameters[name].dtype
        if refused in SUPPORTED_DTYPES:
            continue
        for n, p in layer.named_parameters(recurse=False):
            p.data = p.data.to(before[n])
        raise TypeError(
            f"{type(layer).__name__} supports float32, float16 and bfloat16; converting its {name} to {refused} was "
            f"refused (this layer stays {before[name]}; modules converted before it keep the new dtype: "
            f".to({before[name]}) puts a model back)"
        )


def check_block_weight_shape(block_weight: torch.Tensor, n: int, block_size: int) -> None:
    """block_weight must be (n, b, b); checked on every call (a cheap guard: the kernels index it as contiguous)."""
    # plain int comparisons: comparing torch.Size with a tuple is several times slower
    bs = block_weight.shape
    if len(bs) != 3 or bs[0] != n or bs[1] != block_size or bs[2] != block_size:
        raise ValueError(
            f"block_weight must have shape ({n}, {block_size}, {block_size}), got {tuple(block_weight.shape)}"
        )


def apply_sparse_block_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    block_weight: torch.Tensor,
    block_indices: torch.Tensor,
    col_blocks: torch.Tensor,
    col_slot: torch.Tensor,
    block_size: int,
    bias: torch.Tensor | None,
    backend: str,
    rescatter_in_backward: bool | None = None,
) -> torch.Tensor:
    """``sparse_block_linear`` without the checks of the layer's own tensors or the backend lookup: for callers
    (``SparseBlockLinear``) that validated them once. ``x`` must have passed ``check_input``.

    ``rescatter_in_backward=None`` writes the blocks into the weight again before dX in eager mode (fused into the
    block-gradient launch, free) and, under ``torch.compile``, only when a process group is initialised (FSDP2 may
    have re-materialised the weight; elsewhere the compiled mutation would copy the weight for nothing). Under
    checkpointing the layer runs as two autograd nodes (``split_layer``); the rewrite is then a launch of its own.
    """
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        compute_dtype = torch.get_autocast_dtype(device_type)
    elif x.dtype != weight.dtype:
        raise TypeError(f"input dtype {x.dtype} does not match the weight dtype {weight.dtype} (outside autocast)")
    else:
        compute_dtype = weight.dtype
    # the ops cast by themselves; autocast inside them would only add work (the context is entered only where
    # autocast is on: entering it costs host time on every call, and a checkpoint's recomputation calls again)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        x = x.to(compute_dtype)
        if split_layer(block_weight):
            relay = saved_columns_relay(
                x, block_weight, weight, block_indices, col_blocks, col_slot, block_size, weight.shape[0], backend
            )
            # the re-write is a launch of its own here (the single node fuses it into the block-gradient launch)
            rescatter = (block_weight.detach(), block_indices) if rescatter_in_backward is not False else None
            return _DenseOnWrittenWeightFunction.apply(x, relay, weight, bias, compute_dtype, backend, rescatter)
        if rescatter_in_backward is None:
            rescatter_in_backward = not torch.compiler.is_compiling() or _process_group_initialized()
        return _SparseBlockLinearFunction.apply(
            x,
            weight,
            block_weight,
            bias,
            block_indices,
            col_blocks,
            col_slot,
            block_size,
            compute_dtype,
            backend,
            rescatter_in_backward,
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
        block_indices: int64 (n, 2) (row_block, col_block) of each block, on x's device, contiguous, validated
            (``BlockLayout.build``).
        col_blocks: int64 (u,) sorted distinct block-columns; col_slot: int64 (n,) each block's slot in it.
        bias: optional (N,), frozen.
    Returns:
        (..., N) output. Gradients flow to x and block_weight only.
    Under ``torch.autocast`` the product runs in the autocast dtype; the blocks are written in their own dtype.
    Every call checks all tensors and looks up the backend; ``SparseBlockLinear`` does both once.
    """
    check_input(x, weight)
    check_parameters(weight, block_weight, bias, block_indices, block_size)
    _check_index("col_blocks", col_blocks, 1, weight.device)
    _check_index("col_slot", col_slot, 1, weight.device)
    return apply_sparse_block_linear(
        x, weight, block_weight, block_indices, col_blocks, col_slot, block_size, bias, resolve_backend(x.device)
    )
