"""SMT under PyTorch's data-parallel engines (DDP, FSDP2): one selection for all ranks, one writer for files.

Training itself needs nothing from here: ``block_weight`` is an ordinary parameter, so DDP averages its
gradient and FSDP2 shards it and reduce-scatters its gradient like any other; the frozen weights get no
gradient and no optimizer state. What does need care, and lives here:

- ``select_blocks_distributed``: every rank warms up on its own batches, the statistics are reduced across
  ranks, and rank 0's selection is broadcast, so every rank patches exactly the same blocks.
- ``save_blocks_distributed``, ``merged_state_dict``, ``save_merged``: gather full tensors (FSDP2 keeps only
  shards) and write once, on rank 0.
- ``wrap_ddp``: ``DistributedDataParallel`` without the per-forward buffer broadcast, which on a 4-bit base
  (``quantize_base``) would send the whole frozen NF4 base (buffers, not parameters) from rank 0 every forward.
- ``shard_nf4_base``: before ``fully_shard``, makes the 4-bit codes parameters, so that FSDP2 shards them too.
- ``shard_model``: FSDP2 for a patched decoder model in one call (units of decoder layers, embeddings, root,
  prefetch, the 4-bit codes).

A 4-bit base works with all of them. Its NF4 data are buffers, so DDP and FSDP2 keep them replicated on every
rank (FSDP2 shards only the parameters: ``block_weight`` and the 16-bit rest) unless ``shard_nf4_base`` is used.

All collectives use the default process group; "rank 0" is its rank 0. Without an initialised process group
(or with one rank) every function behaves like its single-process counterpart.
See docs/distributed.md.
"""

from smt_kernels.distributed.ranks import is_main_process, is_sharded, unwrap
from smt_kernels.distributed.saving import merged_state_dict, save_blocks_distributed, save_merged
from smt_kernels.distributed.selection import select_blocks_distributed
from smt_kernels.distributed.wrapping import (
    decoder_layers,
    fsdp2_shards_integer_parameters,
    shard_model,
    shard_nf4_base,
    wrap_ddp,
)

__all__ = [
    "decoder_layers",
    "fsdp2_shards_integer_parameters",
    "is_main_process",
    "is_sharded",
    "merged_state_dict",
    "save_blocks_distributed",
    "save_merged",
    "select_blocks_distributed",
    "shard_model",
    "shard_nf4_base",
    "unwrap",
    "wrap_ddp",
]
