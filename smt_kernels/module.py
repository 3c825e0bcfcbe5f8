"""``SparseBlockLinear``: an ``nn.Linear`` whose only trainable part is a list of b×b weight blocks."""

from __future__ import annotations

import torch
from torch import nn

from smt_kernels.kernels.backend import extract_blocks, resolve_backend, scatter_blocks, triton_runs_on
from smt_kernels.layout import (
    BlockLayout,
    BlocksLike,
    covered_elements,
    indices_changed,
    indices_stamp,
    layout_of_buffer,
    tensor_changed,
    tensor_stamp,
)
from smt_kernels.ops import (
    SUPPORTED_DTYPES,
    apply_sparse_block_linear,
    check_block_weight_shape,
    check_input,
    check_parameters,
    undo_unsupported_conversion,
)


class SparseBlockLinear(nn.Module):
    """Linear layer with a frozen dense weight and trainable b×b blocks.

    Parameters and buffers:
        weight: (out_features, in_features), frozen; holds the current blocks in place after each forward.
        bias: (out_features,) or None, frozen.
        block_weight: (n, b, b), the only trainable tensor. Entries past the weight's edge (clipped edge
            blocks) are zero and receive zero gradient.
        block_indices: int64 (n, 2), the (row_block, col_block) of each entry of ``block_weight``. Writing to
            it (or assigning another tensor) is validated at the next eager forward, before any kernel runs.

    Attributes:
        layout: the validated ``BlockLayout`` (CPU), built once; rebuilt only when ``block_indices`` changes.
        backend: kernel backend name ("triton"/"torch"), resolved when the layer is built or moved.
        rescatter_in_backward: None (default: automatic, see ``ops.apply_sparse_block_linear``), or a bool.

    ``state_dict()`` (and so ``save_pretrained``) writes the current blocks into ``weight`` first: a checkpoint
    taken at any moment, e.g. right after ``optimizer.step()``, holds the trained dense weight.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        blocks: BlocksLike | BlockLayout,
        block_size: int = 256,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        layout = _layout_for(blocks, out_features, in_features, block_size)
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype {dtype} is not supported; use one of float32, float16, bfloat16")
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.rescatter_in_backward: bool | None = None
        self._install_blocks(layout)
        self.register_load_state_dict_pre_hook(_check_loaded_blocks)
        self.register_load_state_dict_post_hook(_rebuild_column_index)
        self.register_state_dict_pre_hook(_write_blocks_into_weight)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, blocks: BlocksLike | BlockLayout, block_size: int = 256
    ) -> SparseBlockLinear:
        """Copy ``linear`` (any dtype/device) and make ``blocks`` (pairs, an (n, 2) int tensor, or a ``BlockLayout``
        already validated for this shape) of its weight trainable.

        The result computes exactly what ``linear`` computes until the blocks are trained.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        if w.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"linear weight dtype {w.dtype} is not supported; use float32, float16 or bfloat16")
        layout = _layout_for(blocks, linear.out_features, linear.in_features, block_size)
        # build the shell on the meta device, then adopt copies of the real tensors
        layer = cls(
            linear.in_features,
            linear.out_features,
            [],
            block_size,
            bias=linear.bias is not None,
            device="meta",
            dtype=w.dtype,
        )
        layer._adopt(w.detach().clone(), None if linear.bias is None else linear.bias.detach().clone(), layout)
        return layer

    def _adopt(self, weight: torch.Tensor, bias: torch.Tensor | None, layout: BlockLayout) -> None:
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._install_blocks(layout)

    def _install_blocks(self, layout: BlockLayout) -> None:
        """Index buffers on the weight's device and the trainable blocks, read from the current weight."""
        device = self.weight.device
        self.register_buffer("block_indices", layout.indices.to(device))
        # derived from block_indices, so not saved in state_dict; rebuilt after load_state_dict
        self.register_buffer("col_blocks", layout.col_blocks.to(device), persistent=False)
        self.register_buffer("col_slot", layout.col_slot.to(device), persistent=False)
        self.block_weight = nn.Parameter(extract_blocks(self.weight.detach(), self.block_indices, layout.block_size))
        self._adopt_layout(layout)

    def _adopt_layout(self, layout: BlockLayout) -> None:
        # everything that does not change between calls, derived once: the layout, the backend, the check that
        # the indices are the ones validated (tensor identity and version counter)
        self.layout = layout
        self.backend = resolve_backend(self.weight.device, strict=False)
        self._indices_seen = indices_stamp(self.block_indices)
        check_parameters(self.weight, self.block_weight, self.bias, self.block_indices, self.block_size)

    @torch.inference_mode(False)
    def _refresh_layout(self) -> None:
        """Validate ``block_indices`` after it was written or replaced, and derive the column index again.

        Outside inference mode even when called from it (an eval forward, ``load_state_dict``): the derived
        buffers serve the training steps that follow, and inference tensors cannot be saved for backward."""
        idx = self.block_indices
        layout = layout_of_buffer(idx, self.out_features, self.in_features, self.block_size, self.weight.device)
        if not idx.is_contiguous() or idx.is_inference():
            self.block_indices = idx = idx.clone(memory_format=torch.contiguous_format)
        self.col_blocks = layout.col_blocks.to(idx.device)
        self.col_slot = layout.col_slot.to(idx.device)
        self._adopt_layout(layout)

    def _apply(self, fn, *args, **kwargs):
        # a move to another device may change the backend; the moved indices are new tensors, so the next eager
        # forward validates them once (and anything written to them before the move)
        before = {n: t.dtype for n, t in self.named_parameters(recurse=False)}
        out = super()._apply(fn, *args, **kwargs)
        if hasattr(self, "layout"):
            self.backend = resolve_backend(self.weight.device, strict=False)
            # .double(), .to(torch.float64): the layer could never run
            undo_unsupported_conversion(self, before, ("weight", "block_weight"))
        return out

    @property
    def num_blocks(self) -> int:
        return int(self.block_indices.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            if indices_changed(getattr(self, "_indices_seen", None), self.block_indices):
                self._refresh_layout()
            check_input(x, self.weight)
            if self.backend == "triton" and x.device.type != "cuda" and not triton_runs_on(x.device):
                resolve_backend(x.device)  # raises the error that says what to do
        check_block_weight_shape(self.block_weight, self.block_indices.shape[0], self.block_size)
        return apply_sparse_block_linear(
            x,
            self.weight,
            self.block_weight,
            self.block_indices,
            self.col_blocks,
            self.col_slot,
            self.block_size,
            self.bias,
            self.backend,
            self.rescatter_in_backward,
        )

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """A new (out_features, in_features) tensor: the frozen weight with the current blocks in place."""
        w = self.weight.detach().clone()
        scatter_blocks(w, self.block_weight.detach(), self.block_indices)
        return w

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` (same device and dtype) with the current blocks folded in."""
        w = self.merged_weight()
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype
        )
        linear.weight.copy_(w)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def trainable_elements(self) -> int:
        """Number of weight elements the blocks cover (clipped edge blocks counted clipped)."""
        return covered_elements(self.block_indices.cpu(), self.out_features, self.in_features, self.block_size)

    def extra_repr(self) -> str:
        total = self.out_features * self.in_features
        pct = 100.0 * self.trainable_elements() / total
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={self.block_size}, num_blocks={self.num_blocks} ({pct:.2f}% of the weight)"
        )


def _layout_for(blocks: BlocksLike | BlockLayout, out_features: int, in_features: int, block_size: int) -> BlockLayout:
    # a layout validated by the caller (patch plans every module first) is taken as is, if it is for this shape
    if isinstance(blocks, BlockLayout):
        have = (blocks.out_features, blocks.in_features, blocks.block_size)
        if have != (out_features, in_features, block_size):
            raise ValueError(
                f"the layout is for a {have[0]}×{have[1]} weight with block_size {have[2]}, not "
                f"{out_features}×{in_features} with block_size {block_size}"
            )
        return blocks
    return BlockLayout.build(blocks, out_features, in_features, block_size)


def _check_loaded_blocks(layer: SparseBlockLinear, state_dict, prefix, *unused) -> None:
    # refuse blocks that do not fit this layer before anything is copied into it
    incoming = state_dict.get(prefix + "block_indices")
    if isinstance(incoming, torch.Tensor) and incoming.shape == layer.block_indices.shape:
        BlockLayout.build(incoming.cpu(), layer.out_features, layer.in_features, layer.block_size)
    # a new dense weight without blocks (strict=False, e.g. another base): the blocks are then read from it,
    # or the next forward would write the old blocks over the loaded weight. Only if the weight is really written
    # (a refused load, e.g. a size mismatch, still runs the post-hook)
    loads_weight = prefix + "weight" in state_dict and prefix + "block_weight" not in state_dict
    layer._weight_before_load = tensor_stamp(layer.weight) if loads_weight else None


def _rebuild_column_index(layer: SparseBlockLinear, incompatible_keys) -> None:
    # a loaded state may carry other blocks (the same number of them): derive the column index again
    layer._refresh_layout()
    before = layer.__dict__.pop("_weight_before_load", None)
    if before is not None and tensor_changed(before, layer.weight):
        with torch.no_grad():
            layer.block_weight.copy_(extract_blocks(layer.weight.detach(), layer.block_indices, layer.block_size))


def _write_blocks_into_weight(layer: SparseBlockLinear, prefix, keep_vars) -> None:
    # the blocks reach the weight at each forward; a state_dict taken after an optimizer step must not be one
    # step stale. Sharded (DTensor) or meta weights are left alone: smt_kernels.distributed gathers and merges those.
    w = layer.weight
    if type(w.data) is torch.Tensor and not w.is_meta and layer.block_indices.shape[0]:
        with torch.no_grad():
            scatter_blocks(w.data, layer.block_weight.detach(), layer.block_indices)
