"""``SparseBlockLinear``: an ``nn.Linear`` whose only trainable part is a list of b×b weight blocks."""

from __future__ import annotations

import torch
from torch import nn

from smt_kernels.kernels import torch_blocks
from smt_kernels.layout import BlockLayout, BlocksLike, covered_elements
from smt_kernels.ops import SUPPORTED_DTYPES, sparse_block_linear


class SparseBlockLinear(nn.Module):
    """Linear layer with a frozen dense weight and trainable b×b blocks.

    Parameters and buffers:
        weight: (out_features, in_features), frozen; holds the current blocks in place after each forward.
        bias: (out_features,) or None, frozen.
        block_weight: (n, b, b), the only trainable tensor. Entries past the weight's edge (clipped edge
            blocks) are zero and receive zero gradient.
        block_indices: int64 (n, 2), the (row_block, col_block) of each entry of ``block_weight``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        blocks: BlocksLike,
        block_size: int = 256,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        layout = BlockLayout.build(blocks, out_features, in_features, block_size)
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
        self._install_blocks(layout)
        self.register_load_state_dict_pre_hook(_check_loaded_blocks)
        self.register_load_state_dict_post_hook(_rebuild_column_index)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocks: BlocksLike, block_size: int = 256) -> SparseBlockLinear:
        """Copy ``linear`` (any dtype/device) and make ``blocks`` of its weight trainable.

        The result computes exactly what ``linear`` computes until the blocks are trained.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        if w.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"linear weight dtype {w.dtype} is not supported; use float32, float16 or bfloat16")
        layout = BlockLayout.build(blocks, linear.out_features, linear.in_features, block_size)
        # build the shell on the meta device, then adopt copies of the real tensors
        layer = cls(linear.in_features, linear.out_features, [], block_size,
                    bias=linear.bias is not None, device="meta", dtype=w.dtype)
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
        self.block_weight = nn.Parameter(
            torch_blocks.extract_blocks(self.weight.detach(), self.block_indices, layout.block_size)
        )

    @property
    def num_blocks(self) -> int:
        return int(self.block_indices.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_block_linear(
            x, self.weight, self.block_weight, self.block_indices, self.col_blocks, self.col_slot,
            self.block_size, self.bias,
        )

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """A new (out_features, in_features) tensor: the frozen weight with the current blocks in place."""
        w = self.weight.detach().clone()
        torch_blocks.scatter_blocks(w, self.block_weight.detach(), self.block_indices)
        return w

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` (same device and dtype) with the current blocks folded in."""
        w = self.merged_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=w.device, dtype=w.dtype)
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


def _check_loaded_blocks(layer: SparseBlockLinear, state_dict, prefix, *unused) -> None:
    # refuse blocks that do not fit this layer before anything is copied into it
    incoming = state_dict.get(prefix + "block_indices")
    if isinstance(incoming, torch.Tensor) and incoming.shape == layer.block_indices.shape:
        BlockLayout.build(incoming.cpu(), layer.out_features, layer.in_features, layer.block_size)


def _rebuild_column_index(layer: SparseBlockLinear, incompatible_keys) -> None:
    # a loaded state may carry other blocks (the same number of them): derive the column index again
    layout = BlockLayout.build(layer.block_indices.cpu(), layer.out_features, layer.in_features, layer.block_size)
    device = layer.block_indices.device
    layer.col_blocks = layout.col_blocks.to(device)
    layer.col_slot = layout.col_slot.to(device)
