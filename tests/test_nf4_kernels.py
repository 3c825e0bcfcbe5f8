"""Dequantize-and-overlay: the Triton kernel (interpreted on the CPU, compiled on a GPU) against the torch path,
the reference dequantization and bitsandbytes."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA

from smt_kernels.kernels.launcher import interpreting
from smt_kernels.kernels.nf4_dequant import dequantize_overlay
from smt_kernels.layout import BlockLayout
from smt_kernels.quant.dequant import block_slot_map, dequantize_overlay_torch, kernels_for
from smt_kernels.quant.nf4 import dequantize_nf4, quantize_nf4

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = {
    # name: (N, K, block_size, blocks)
    "no_blocks_odd": (37, 33, 16, []),
    "edge_corner": (70, 100, 16, [(4, 6), (0, 0), (2, 3)]),
    "b32_ragged_row": (40, 150, 32, [(1, c) for c in range(5)]),
    "aligned_many_groups": (128, 320, 64, [(1, 4), (0, 2)]),  # 40960 values: 640 absmax blocks, 3 groups
    "rows_wider_than_a_tile": (3, 4200, 64, [(0, 65), (0, 0), (0, 16)]),  # K >= the tile: one division per tile
    # 64 | b | K: the slot map is read per absmax block (kernels/nf4_dequant.py), trained values only where hit
    "runs_most_tiles_untouched": (256, 128, 64, [(3, 1)]),
    "runs_clipped_rows": (70, 128, 64, [(1, 1), (0, 0)]),
    "runs_wide_rows": (4, 8192, 64, [(0, 100), (0, 0)]),
    "b32_aligned_per_element": (64, 96, 32, [(1, 2), (0, 0)]),  # b < 64: the per-element map path
}


def assert_matches_torch(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit for bit, except that Triton's CPU interpreter truncates fp32 -> bf16 (a GPU rounds to nearest even):
    there one bf16 ulp toward zero is allowed."""
    if actual.dtype == torch.bfloat16 and interpreting():
        a, e = actual.float(), expected.float()
        ulp = e.abs().clamp_min(1e-30) * 2.0**-7
        assert ((a - e).abs() <= ulp).all() and (a.abs() <= e.abs()).all()
    else:
        assert torch.equal(actual, expected)


def setup(case, dtype, double_quant, block_dtype=None, seed=0):
    n, k, b, blocks = CASES[case]
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(device=DEVICE, dtype=dtype)
    q = quantize_nf4(w, double_quant=double_quant)
    layout = BlockLayout.build(blocks, n, k, b)
    idx = layout.indices.to(DEVICE)
    bw = torch.randn(len(blocks), b, b, generator=g).to(device=DEVICE, dtype=block_dtype or dtype)
    return q, bw, idx, block_slot_map(idx, (n, k), b), b


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_torch_path(case, dtype, double_quant, poison_empty):
    q, bw, idx, bmap, b = setup(case, dtype, double_quant)
    expected = dequantize_overlay_torch(q, torch.empty(q.shape, device=DEVICE, dtype=dtype), bw, idx, bmap, b)
    out = torch.empty(q.shape, device=DEVICE, dtype=dtype)  # NaN-poisoned: every element must be written
    assert dequantize_overlay(q, out, bw, idx, bmap, b) is out
    assert_matches_torch(out, expected)
    # outside the blocks: the plain dequantization; inside: the block values
    plain = dequantize_nf4(q, dtype)
    inside = torch.zeros(q.shape, dtype=torch.bool, device=DEVICE)
    for r, c in idx.tolist():
        inside[r * b : (r + 1) * b, c * b : (c + 1) * b] = True
    assert_matches_torch(out[~inside], plain[~inside])
    for slot, (r, c) in enumerate(idx.tolist()):
        block = out[r * b : (r + 1) * b, c * b : (c + 1) * b]
        assert_matches_torch(block, bw[slot, : block.shape[0], : block.shape[1]])


def test_fp32_blocks_into_bf16_buffer():
    q, bw, idx, bmap, b = setup("edge_corner", torch.bfloat16, True, block_dtype=torch.float32)
    out = dequantize_overlay(q, torch.empty(q.shape, device=DEVICE, dtype=torch.bfloat16), bw, idx, bmap, b)
    ref = dequantize_overlay_torch(q, torch.empty_like(out), bw, idx, bmap, b)
    assert_matches_torch(out, ref)


def test_buffer_reused_across_layers():
    """A buffer that held another layer's weight (a larger one, viewed smaller) is fully overwritten."""
    q1, bw1, idx1, map1, b = setup("aligned_many_groups", torch.float32, True)
    q2, bw2, idx2, map2, _ = setup("edge_corner", torch.float32, True, seed=1)
    flat = torch.empty(q1.numel, device=DEVICE)
    dequantize_overlay(q1, flat.view(q1.shape), bw1, idx1, map1, b)
    out = dequantize_overlay(q2, flat[: q2.numel].view(q2.shape), bw2, idx2, map2, 16)
    assert torch.equal(out, dequantize_overlay_torch(q2, torch.empty_like(out), bw2, idx2, map2, 16))


try:
    import bitsandbytes.functional as bnbf
except ImportError:  # pragma: no cover
    bnbf = None


@pytest.mark.skipif(bnbf is None, reason="bitsandbytes is not installed")
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_bitsandbytes(dtype):
    from smt_kernels.quant.bnb import nf4_from_bnb

    w = (torch.randn(37, 70, generator=torch.Generator().manual_seed(2)) * 0.05).to(dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")

    class Layer:
        pass

    layer = Layer()
    layer.weight = torch.nn.Parameter(packed, requires_grad=False)
    layer.weight.quant_state = state
    q = nf4_from_bnb(layer).to(DEVICE)
    out = dequantize_overlay(q, torch.empty(q.shape, device=DEVICE, dtype=dtype))
    assert_matches_torch(out.cpu(), bnbf.dequantize_4bit(packed, state))


def test_backend_choice(monkeypatch):
    monkeypatch.setenv("SMT_KERNELS_BACKEND", "torch")
    assert kernels_for(torch.device(DEVICE)).dequantize_overlay is dequantize_overlay_torch
    monkeypatch.setenv("SMT_KERNELS_BACKEND", "triton")
    assert kernels_for(torch.device(DEVICE)).dequantize_overlay is dequantize_overlay
