"""Shared test setup.

Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on before any
``@triton.jit`` function is defined, hence before smt_kernels is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
# (backend, device) pairs the kernel tests run on: the torch path on CPU always; Triton interpreted on
# CPU in CI, compiled on CUDA when a GPU is present.
BACKENDS = [("torch", "cpu"), ("triton", "cuda" if HAS_CUDA else "cpu")]
if HAS_CUDA:
    BACKENDS.append(("torch", "cuda"))


@pytest.fixture
def poison_empty(monkeypatch):
    """Make torch.empty/empty_like return NaN-filled tensors, so an output element a kernel never writes fails."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.numel():
            t.fill_(-(2**31) if t.dtype in (torch.int32, torch.int64) else 0)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _fill(real_empty_like(*a, **k)))


@pytest.fixture
def backend(request, monkeypatch):
    """Force SMT_KERNELS_BACKEND for one test; the parameter is a (backend, device) pair."""
    name, device = request.param
    monkeypatch.setenv("SMT_KERNELS_BACKEND", name)
    return name, torch.device(device)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on one intra-op thread: extra threads only add contention on a busy 2-core CI machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny random Llama with the character tokenizer (``test_cli.save_tiny_llama``), read-only for tests."""
    from test_cli import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
