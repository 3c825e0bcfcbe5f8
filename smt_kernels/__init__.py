"""smt_kernels: fast, memory-lean Sparse Matrix Tuning (SMT) for LLaMA-family models."""

from smt_kernels.layout import BlockLayout
from smt_kernels.module import SparseBlockLinear
from smt_kernels.ops import sparse_block_linear

__all__ = ["BlockLayout", "SparseBlockLinear", "sparse_block_linear"]
__version__ = "0.1.0"
