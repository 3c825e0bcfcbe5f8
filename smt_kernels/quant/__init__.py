"""A 4-bit NF4 frozen base for SMT (QLoRA's format, bitsandbytes' layout): format, kernels, layers, model tools."""

from smt_kernels.quant.buffers import release_buffers
from smt_kernels.quant.module import NF4Linear, NF4SparseBlockLinear
from smt_kernels.quant.nf4 import NF4Weight, dequantize_nf4, quantize_nf4

__all__ = ["NF4Linear", "NF4SparseBlockLinear", "NF4Weight", "dequantize_nf4", "quantize_nf4", "release_buffers"]
