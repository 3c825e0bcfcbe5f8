"""Baselines that SparseBlockLinear is measured against (benchmark code, not part of the library).

- ``PaperBlockLinear``: the algorithm of the SMT paper's published code (He et al., 2025), rewritten cleanly:
  blocks written into the frozen weight by a Python loop before each forward, the input block-column *views*
  kept for backward (they pin the whole input), and in backward one matmul per block over its slices.
- ``GatherBmmBlockLinear``: the obvious torch version: gather the used input columns into a contiguous copy,
  and in backward gather the matching output-gradient rows and do one batched matmul over all blocks.

Both keep the frozen weight (N, K), trainable ``block_weight`` (n, b, b), and need N and K to be multiples of b.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check_divisible(linear: nn.Linear, block_size: int) -> None:
    if linear.out_features % block_size or linear.in_features % block_size:
        raise ValueError(
            f"baselines need a weight shape divisible by block_size={block_size}, "
            f"got {linear.out_features}×{linear.in_features}"
        )


def _blocks_list(blocks) -> list[tuple[int, int]]:
    return [(int(r), int(c)) for r, c in (blocks.tolist() if isinstance(blocks, torch.Tensor) else blocks)]


class _BlockBase(nn.Module):
    def __init__(self, linear: nn.Linear, blocks, block_size: int) -> None:
        super().__init__()
        _check_divisible(linear, block_size)
        self.block_size = block_size
        self.blocks = _blocks_list(blocks)
        w = linear.weight.detach().clone()
        self.weight = nn.Parameter(w, requires_grad=False)
        b = block_size
        init = [w[r * b : (r + 1) * b, c * b : (c + 1) * b] for r, c in self.blocks]
        self.block_weight = nn.Parameter(torch.stack(init) if init else w.new_zeros(0, b, b))


class _PaperFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, block_weight, weight, blocks, block_size):
        b = block_size
        # the paper keeps x[..., cols] slices (views) for backward; saving them through save_for_backward
        # (the paper stashes them on ctx) lets the saved-bytes hook see what they pin
        slices = [x[..., c * b : (c + 1) * b] for _, c in blocks]
        ctx.save_for_backward(weight, *slices)
        ctx.blocks = blocks
        ctx.block_size = b
        return torch.matmul(x, weight.t())

    @staticmethod
    def backward(ctx, grad_out):
        weight, *slices = ctx.saved_tensors
        b = ctx.block_size
        grad_t = grad_out.transpose(-1, -2)
        grad_blocks = grad_out.new_empty(len(ctx.blocks), b, b)
        for k, (r, _) in enumerate(ctx.blocks):
            prod = torch.matmul(grad_t[..., r * b : (r + 1) * b, :], slices[k])
            # the paper sums the per-sequence products over the batch dimension
            grad_blocks[k] = prod.sum(dim=0) if prod.dim() == 3 else prod
        return torch.matmul(grad_out, weight), grad_blocks, None, None, None


class PaperBlockLinear(_BlockBase):
    """The SMT paper's per-block algorithm (Python loops over blocks in forward and backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block_size
        with torch.no_grad():
            for k, (r, c) in enumerate(self.blocks):
                self.weight[r * b : (r + 1) * b, c * b : (c + 1) * b] = self.block_weight[k]
        x3 = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 3 else x
        y = _PaperFunction.apply(x3, self.block_weight, self.weight, self.blocks, b)
        return y.reshape(*x.shape[:-1], self.weight.shape[0])


class _GatherBmmFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, block_weight, weight, col_index, row_blocks, col_slot, block_size):
        ctx.save_for_backward(x2d.index_select(1, col_index), weight, row_blocks, col_slot)
        ctx.block_size = block_size
        return F.linear(x2d, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x_cols, weight, row_blocks, col_slot = ctx.saved_tensors
        b = ctx.block_size
        m = grad_out.shape[0]
        dy = grad_out.reshape(m, -1, b).index_select(1, row_blocks)  # (M, n, b)
        xs = x_cols.view(m, -1, b).index_select(1, col_slot)  # (M, n, b)
        grad_blocks = torch.bmm(dy.permute(1, 2, 0), xs.permute(1, 0, 2))  # (n, b, M) @ (n, M, b)
        return grad_out.matmul(weight), grad_blocks, None, None, None, None, None


class GatherBmmBlockLinear(_BlockBase):
    """Vectorised torch: one index_put for the blocks, a gathered input copy, one bmm for all block gradients."""

    def __init__(self, linear: nn.Linear, blocks, block_size: int) -> None:
        super().__init__(linear, blocks, block_size)
        idx = torch.tensor(self.blocks, dtype=torch.int64, device=self.weight.device).reshape(-1, 2)
        col_blocks, col_slot = torch.unique(idx[:, 1], sorted=True, return_inverse=True)
        col_index = (col_blocks[:, None] * block_size + torch.arange(block_size, device=idx.device)).reshape(-1)
        self.register_buffer("row_blocks", idx[:, 0].contiguous())
        self.register_buffer("col_blocks", idx[:, 1].contiguous())
        self.register_buffer("col_slot", col_slot.reshape(-1))
        self.register_buffer("col_index", col_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block_size
        n_out, n_in = self.weight.shape
        with torch.no_grad():
            # (R, b, C, b) view: the two index tensors pick (n, b, b) blocks in one index_put
            self.weight.view(n_out // b, b, n_in // b, b)[self.row_blocks, :, self.col_blocks, :] = self.block_weight
        x2d = x.reshape(-1, n_in)
        y = _GatherBmmFunction.apply(
            x2d, self.block_weight, self.weight, self.col_index, self.row_blocks, self.col_slot, b
        )
        return y.reshape(*x.shape[:-1], n_out)
