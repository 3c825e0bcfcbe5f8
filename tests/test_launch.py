"""The direct launch path of the Triton kernels: its cache key never merges what Triton would compile apart."""

from __future__ import annotations

import itertools

import pytest
import torch

from smt_kernels.kernels import launcher, triton_blocks
from smt_kernels.layout import BlockLayout

INTS = [0, 1, 2, 15, 16, 17, 32, -1, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, -(2**31), -(2**31) - 1, 2**40]


def _triton_specialisation():
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:  # older/newer Triton without the native specialiser
        pytest.skip("this Triton has no native_specialize_impl to compare with")
    return lambda arg: native_specialize_impl(BaseBackend, arg, False, True, True)


def test_arg_key_at_least_as_fine_as_triton_for_ints():
    spec = _triton_specialisation()
    for a, b in itertools.combinations(INTS, 2):
        if launcher._arg_key(a) == launcher._arg_key(b):
            assert spec(a) == spec(b), (a, b)


def test_arg_key_at_least_as_fine_as_triton_for_tensors():
    spec = _triton_specialisation()
    base = torch.zeros(64, dtype=torch.float32)
    views = [base[i:] for i in range(8)] + [base.to(torch.bfloat16)[i:] for i in range(10)]
    for a, b in itertools.combinations(views, 2):
        if launcher._arg_key(a) == launcher._arg_key(b):
            assert spec(a) == spec(b)


def test_arg_key_tells_apart_dtype_and_alignment():
    x = torch.zeros(64, dtype=torch.float16)
    assert launcher._arg_key(x) != launcher._arg_key(x[1:])
    assert launcher._arg_key(x) != launcher._arg_key(x.to(torch.float32))
    assert launcher._arg_key(True) != launcher._arg_key(1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="direct launch runs compiled kernels (CUDA only)")
def test_direct_launch_matches_jit_launch_with_changing_alignment():
    torch.manual_seed(0)
    b, N, K, M = 32, 96, 80, 70
    layout = BlockLayout.build([(0, 1), (2, 2), (1, 0)], N, K, b)
    idx, cols, slots = (t.cuda() for t in (layout.indices, layout.col_blocks, layout.col_slot))
    base = torch.randn(M * K + 8, device="cuda", dtype=torch.float16)
    dy_base = torch.randn(M * N + 8, device="cuda", dtype=torch.float16)
    results = []
    for direct in (False, True, True):  # JIT, then the direct path compiling, then the direct path hitting
        launcher = triton_blocks._launch_block_weight_grad
        launcher.enabled = direct
        try:
            for offset in (0, 1, 0, 3):  # 2-byte offsets change the 16-byte alignment Triton specialises on
                x = base[offset : offset + M * K].view(M, K)
                dy = dy_base[offset : offset + M * N].view(M, N)
                xc = triton_blocks.gather_column_blocks(x, cols, b)
                results.append(triton_blocks.block_weight_grad(dy, xc, idx, slots, b, torch.float32))
        finally:
            launcher.enabled = True
    n = 4
    for i in range(n, len(results)):
        torch.testing.assert_close(results[i], results[i % n], rtol=0, atol=0)
    assert triton_blocks._launch_block_weight_grad.checked
