"""A 4-bit NF4 frozen base for SMT (QLoRA's format, bitsandbytes' layout): format, kernels, layers, model tools.

See docs/quantization.md. Entry points: ``quantize_base`` / ``load_nf4_pretrained`` (a 4-bit model; from there
``smt_kernels.select_blocks``, ``patch``, ``save_blocks``/``load_blocks`` and ``merge`` work on it as on a 16-bit
model), ``fold_blocks_into_checkpoint`` (the trained blocks in the original 16-bit checkpoint); ``patch_nf4`` /
``merge_nf4`` are ``patch`` / ``merge`` for 4-bit targets only.
"""

from smt_kernels.quant.buffers import release_buffers, use_pooled_buffer
from smt_kernels.quant.checkpoint import fold_blocks_into_checkpoint, load_nf4_pretrained
from smt_kernels.quant.model import (
    merge_nf4,
    nf4_modules,
    nf4_weight_gradients,
    patch_nf4,
    quantize_base,
    trained_blocks,
)
from smt_kernels.quant.module import NF4Linear, NF4SparseBlockLinear
from smt_kernels.quant.nf4 import NF4Weight, dequantize_nf4, quantize_nf4

__all__ = [
    "NF4Linear",
    "NF4SparseBlockLinear",
    "NF4Weight",
    "dequantize_nf4",
    "fold_blocks_into_checkpoint",
    "load_nf4_pretrained",
    "merge_nf4",
    "nf4_modules",
    "nf4_weight_gradients",
    "patch_nf4",
    "quantize_base",
    "quantize_nf4",
    "release_buffers",
    "trained_blocks",
    "use_pooled_buffer",
]
