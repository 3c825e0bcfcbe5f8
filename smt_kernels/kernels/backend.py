"""The one entry into the kernels: which implementation runs, chosen once, behind one interface.

Two backends implement the same launch functions with the same signatures and results:
``triton`` (``triton_blocks``: compiled on CUDA, or interpreted on the CPU with ``TRITON_INTERPRET=1``) and
``torch`` (``torch_blocks``: pure torch, any device). ``resolve_backend`` picks one for a device (Triton on CUDA,
torch elsewhere; ``SMT_KERNELS_BACKEND=triton|torch`` forces one) and is called when a layer is built or moved,
not per call. ``kernels(name)`` returns the ``KernelBackend`` whose functions every caller uses.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch

from smt_kernels.kernels import torch_blocks, triton_blocks
from smt_kernels.kernels.launcher import interpreting

BACKEND_ENV = "SMT_KERNELS_BACKEND"
BACKENDS = ("triton", "torch")


class KernelBackend(Protocol):
    """What a backend provides (shapes: M tokens, weight N×K, n blocks of b×b, u distinct block-columns)."""

    def scatter_blocks(self, weight: torch.Tensor, block_weight: torch.Tensor, block_indices: torch.Tensor) -> None:
        """block_weight (n, b, b) into weight (N, K) at block_indices (n, 2), in place, clipped at the edges."""

    def gather_column_blocks(self, x: torch.Tensor, col_blocks: torch.Tensor, block_size: int) -> torch.Tensor:
        """x (M, K) -> new contiguous (M, u·b): the block-columns col_blocks (u,), zero past K."""

    def scatter_blocks_and_gather_columns(
        self,
        weight: torch.Tensor | None,
        block_weight: torch.Tensor | None,
        block_indices: torch.Tensor | None,
        x: torch.Tensor | None,
        col_blocks: torch.Tensor | None,
        block_size: int,
    ) -> torch.Tensor | None:
        """Both of the above (either may be skipped with None); returns the gathered columns or None."""

    def block_weight_grad(
        self,
        grad_out: torch.Tensor,
        x_cols: torch.Tensor,
        block_indices: torch.Tensor,
        col_slot: torch.Tensor,
        block_size: int,
        out_dtype: torch.dtype,
        rescatter: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(n, b, b) block gradients dY[:, rows_k]ᵀ · X[:, cols_k], fp32 accumulation, zero past the edges."""


class _TritonBackend:
    # block extraction happens at construction and merge, never per step: the torch version serves both
    name = "triton"
    scatter_blocks = staticmethod(triton_blocks.scatter_blocks)
    gather_column_blocks = staticmethod(triton_blocks.gather_column_blocks)
    scatter_blocks_and_gather_columns = staticmethod(triton_blocks.scatter_blocks_and_gather_columns)
    block_weight_grad = staticmethod(triton_blocks.block_weight_grad)


class _TorchBackend:
    name = "torch"
    scatter_blocks = staticmethod(torch_blocks.scatter_blocks)
    gather_column_blocks = staticmethod(torch_blocks.gather_column_blocks)
    scatter_blocks_and_gather_columns = staticmethod(torch_blocks.scatter_blocks_and_gather_columns)
    block_weight_grad = staticmethod(torch_blocks.block_weight_grad)


_BY_NAME: dict[str, KernelBackend] = {"triton": _TritonBackend(), "torch": _TorchBackend()}


def kernels(name: str) -> KernelBackend:
    """The backend called ``name`` ("triton" or "torch")."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown kernel backend {name!r}; use one of {', '.join(BACKENDS)}") from None


def resolve_backend(device: torch.device | str, strict: bool = True) -> str:
    """Name of the backend for tensors on ``device``: "triton" on CUDA, "torch" elsewhere, or what
    ``SMT_KERNELS_BACKEND`` forces. With ``strict``, raises if Triton is forced onto CPU tensors without the
    interpreter; layers pass ``strict=False`` (built on the CPU, they may run on CUDA) and check when they run."""
    device = torch.device(device)
    choice = os.environ.get(BACKEND_ENV, "").strip().lower()
    if choice not in ("", *BACKENDS):
        raise ValueError(f"{BACKEND_ENV} must be 'triton' or 'torch', got {choice!r}")
    if choice == "torch":
        return "torch"
    if choice == "triton" or device.type == "cuda":
        if strict and not triton_runs_on(device):
            raise RuntimeError(
                f"{BACKEND_ENV}=triton needs CUDA tensors (got {device}) or TRITON_INTERPRET=1 to run on the CPU"
            )
        return "triton"
    return "torch"


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can take tensors on ``device`` (CUDA, or any device under the interpreter)."""
    return device.type in ("cuda", "meta") or interpreting()


def extract_blocks(weight: torch.Tensor, block_indices: torch.Tensor, block_size: int) -> torch.Tensor:
    """The blocks at block_indices (n, 2) of weight (N, K) as a new (n, b, b) tensor; zero past the edges."""
    return torch_blocks.extract_blocks(weight, block_indices, block_size)


def scatter_blocks(weight: torch.Tensor, block_weight: torch.Tensor, block_indices: torch.Tensor) -> None:
    """Write block_weight (n, b, b) into weight (N, K) at block_indices (n, 2) with the backend for its device.

    For callers outside a training step (merge, loading, gathered FSDP2 weights): the backend is resolved here.
    """
    kernels(resolve_backend(weight.device)).scatter_blocks(weight, block_weight, block_indices.to(weight.device))
