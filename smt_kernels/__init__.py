"""smt_kernels: fast, memory-lean Sparse Matrix Tuning (SMT) for LLaMA-family models."""

from smt_kernels.block_files import BlockFileError, load_blocks, read_blocks, save_blocks
from smt_kernels.config import SMTConfig
from smt_kernels.layout import BlockLayout
from smt_kernels.module import SparseBlockLinear
from smt_kernels.ops import sparse_block_linear
from smt_kernels.patch import merge, patch, patched_modules, trainable_parameters
from smt_kernels.quant import fold_blocks_into_checkpoint, load_nf4_pretrained, quantize_base
from smt_kernels.select import Selection, select_blocks
from smt_kernels.selection_summary import SelectionSummary, summarize_selection

__all__ = [
    "BlockFileError",
    "BlockLayout",
    "Selection",
    "SMTConfig",
    "SelectionSummary",
    "SparseBlockLinear",
    "fold_blocks_into_checkpoint",
    "load_blocks",
    "load_nf4_pretrained",
    "merge",
    "patch",
    "patched_modules",
    "quantize_base",
    "read_blocks",
    "save_blocks",
    "select_blocks",
    "sparse_block_linear",
    "summarize_selection",
    "trainable_parameters",
]

try:  # one source of truth: the installed distribution's version (pyproject.toml)
    from importlib.metadata import version as _dist_version

    __version__ = _dist_version("smt-kernels")
except Exception:  # running from a source tree that is not installed
    __version__ = "0+unknown"
