"""Launch functions for the Triton kernels and their pure-torch equivalents."""

from smt_kernels.kernels import torch_blocks, triton_blocks

__all__ = ["torch_blocks", "triton_blocks"]
