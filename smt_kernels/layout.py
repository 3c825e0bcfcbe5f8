"""Block layouts: which b×b blocks of an (out_features × in_features) weight are trainable.

A layout is validated once, at construction, and carries the metadata the kernels need:
the (row_block, col_block) of every block, the sorted list of block-columns that some block uses
(only those input columns are kept for backward) and, per block, its slot in that list.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

MIN_BLOCK_SIZE = 16
MAX_BLOCK_SIZE = 256

BlocksLike = torch.Tensor | Sequence[Sequence[int]]


def check_block_size(block_size: int) -> int:
    """Return ``block_size`` if it is a power of two in [16, 256], else raise ValueError."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__} ({block_size!r})")
    if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE) or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}], got {block_size}")
    return block_size


def num_blocks_along(features: int, block_size: int) -> int:
    """Number of (possibly clipped) blocks covering ``features`` elements."""
    return -(-features // block_size)


def covered_elements(indices: torch.Tensor, out_features: int, in_features: int, block_size: int) -> int:
    """Number of weight elements that the blocks at ``indices`` (n, 2) cover, edge blocks clipped."""
    rows = (out_features - indices[:, 0] * block_size).clamp(max=block_size)
    cols = (in_features - indices[:, 1] * block_size).clamp(max=block_size)
    return int((rows * cols).sum())


def _strict_int(value, k: int) -> int:
    # no coercion: 0.5 -> 0, "1" -> 1 or True -> 1 would silently pick another block
    is_bool_tensor = isinstance(value, torch.Tensor) and value.dtype == torch.bool
    if isinstance(value, bool) or isinstance(value, (str, bytes)) or is_bool_tensor:
        raise TypeError(f"block {k}: indices must be integers, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"block {k}: indices must be integers, got {value!r} ({type(value).__name__})") from None


def _as_index_tensor(blocks: BlocksLike) -> torch.Tensor:
    if isinstance(blocks, torch.Tensor):
        if blocks.is_floating_point() or blocks.is_complex() or blocks.dtype == torch.bool:
            raise TypeError(f"blocks tensor must have an integer dtype, got {blocks.dtype}")
        # a copy: the layout must not change when the caller later writes to the tensor it was built from
        t = blocks.detach().to("cpu", torch.int64, copy=True)
    else:
        if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Iterable):
            raise TypeError(
                "blocks must be a sequence of (row_block, col_block) pairs or an int tensor of shape (n, 2), "
                f"got {type(blocks).__name__}"
            )
        rows = []
        for k, pair in enumerate(blocks):
            if isinstance(pair, (str, bytes)) or not isinstance(pair, Iterable):
                raise TypeError(f"blocks must be (row_block, col_block) pairs of ints; block {k} is {pair!r}")
            values = tuple(pair)
            if len(values) != 2:
                raise ValueError(f"block {k}: each block must be a (row_block, col_block) pair, got {pair!r}")
            rows.append(tuple(_strict_int(v, k) for v in values))
        t = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 2)
    if t.dim() != 2 or t.shape[1] != 2:
        raise ValueError(f"blocks must have shape (n, 2), got {tuple(t.shape)}")
    return t.contiguous()


@dataclass(frozen=True)
class BlockLayout:
    """A validated set of b×b blocks of an ``out_features × in_features`` weight.

    Attributes:
        indices: int64 (n, 2) on the CPU, the (row_block, col_block) of each block, in the given order.
        col_blocks: int64 (u,), sorted distinct block-columns used by some block.
        col_slot: int64 (n,), position of each block's column in ``col_blocks``.
    """

    out_features: int
    in_features: int
    block_size: int
    indices: torch.Tensor
    col_blocks: torch.Tensor
    col_slot: torch.Tensor

    @classmethod
    def build(cls, blocks: BlocksLike, out_features: int, in_features: int, block_size: int = 256) -> BlockLayout:
        """Validate ``blocks`` against the weight shape; raise ValueError/TypeError naming the numbers."""
        check_block_size(block_size)
        for name, value in (("out_features", out_features), ("in_features", in_features)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"BlockLayout: {name} must be an int, got {value!r}")
        if out_features <= 0 or in_features <= 0:
            raise ValueError(f"weight shape must be positive, got {out_features}×{in_features}")
        idx = _as_index_tensor(blocks)
        n_rows = num_blocks_along(out_features, block_size)
        n_cols = num_blocks_along(in_features, block_size)
        if idx.numel():
            neg = (idx < 0).any(dim=1).nonzero()
            if neg.numel():
                k = int(neg[0])
                raise ValueError(f"block {k} has a negative index {tuple(idx[k].tolist())}")
            out_r = (idx[:, 0] >= n_rows).nonzero()
            out_c = (idx[:, 1] >= n_cols).nonzero()
            if out_r.numel() or out_c.numel():
                k = min(int(t[0]) for t in (out_r, out_c) if t.numel())  # the first bad block
                raise ValueError(
                    f"block {k} = {tuple(idx[k].tolist())} is out of range: a {out_features}×{in_features} "
                    f"weight with block_size {block_size} has row blocks 0..{n_rows - 1} and "
                    f"col blocks 0..{n_cols - 1}"
                )
            flat = idx[:, 0] * n_cols + idx[:, 1]
            uniq, counts = torch.unique(flat, return_counts=True)
            if (counts > 1).any():
                dup = int(uniq[counts > 1][0])
                where = (flat == dup).nonzero().flatten().tolist()
                raise ValueError(
                    f"duplicate block {(dup // n_cols, dup % n_cols)} at positions {where}; each block may appear once"
                )
        col_blocks, col_slot = torch.unique(idx[:, 1], sorted=True, return_inverse=True)
        return cls(
            out_features=out_features,
            in_features=in_features,
            block_size=block_size,
            indices=idx,
            col_blocks=col_blocks.to(torch.int64),
            col_slot=col_slot.to(torch.int64).reshape(-1),
        )

    @property
    def num_blocks(self) -> int:
        return int(self.indices.shape[0])

    @property
    def shape_in_blocks(self) -> tuple[int, int]:
        return (
            num_blocks_along(self.out_features, self.block_size),
            num_blocks_along(self.in_features, self.block_size),
        )

    def num_trainable(self) -> int:
        """Number of weight elements covered by the blocks (edge blocks counted clipped)."""
        return covered_elements(self.indices, self.out_features, self.in_features, self.block_size)

    def to_list(self) -> list[tuple[int, int]]:
        return [(int(r), int(c)) for r, c in self.indices.tolist()]


def layout_of_buffer(
    indices: object, out_features: int, in_features: int, block_size: int, device: torch.device
) -> BlockLayout:
    """Validate a layer's ``block_indices`` buffer after it was written or replaced: an int64 (n, 2) tensor on the
    layer's ``device`` with every block inside the weight. Returns its ``BlockLayout``; raises naming the numbers."""
    if (
        not isinstance(indices, torch.Tensor)
        or indices.dtype != torch.int64
        or indices.dim() != 2
        or indices.shape[1] != 2
    ):
        got = f"{indices.dtype} {tuple(indices.shape)}" if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"block_indices must be an int64 (n, 2) tensor, got {got}")
    if indices.device != device:
        raise ValueError(f"block_indices is on {indices.device} but the weight is on {device}")
    return BlockLayout.build(indices.cpu(), out_features, in_features, block_size)


def tensor_stamp(t: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    """A tensor and its version counter (None for an inference tensor): ``tensor_changed`` tells a later write."""
    return t, None if t.is_inference() else t._version


def tensor_changed(stamp: tuple[torch.Tensor, int | None], t: object) -> bool:
    """Whether ``t`` is another tensor than the stamped one or was written in place since the stamp."""
    return t is not stamp[0] or (stamp[1] is not None and t._version != stamp[1])


def indices_stamp(indices: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    """What a layer remembers of the ``block_indices`` it derived its index buffers from: the tensor and its version
    counter (None for an inference tensor, which has none: only its replacement is seen then)."""
    return tensor_stamp(indices)


def indices_changed(stamp: tuple[torch.Tensor, int | None] | None, indices: object) -> bool:
    """Whether ``indices`` is another tensor than the stamped one, or was written in place since (a write through
    ``.data`` bumps no version and is not seen). No stamp (a layer pickled before stamps existed): changed."""
    return stamp is None or tensor_changed(stamp, indices)
