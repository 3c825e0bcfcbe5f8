"""Dequantize-and-overlay: the Triton kernel (interpreted on the CPU, compiled on a GPU) against the torch path,
the reference dequantization and bitsandbytes."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA

from smt_kernels.kernels.launcher import interpreting
from smt_kernels.kernels.nf4_dequant import QBLOCKS, dequantize_overlay, num_programs
from smt_kernels.layout import BlockLayout
from smt_kernels.quant.dequant import block_slot_map, dequantize_overlay_torch, kernels_for, program_hit_flags
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
@pytest.mark.parametrize("shape", [(37, 70), (40, 128)])  # a partial last absmax block, and none
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_bitsandbytes(dtype, shape):
    from smt_kernels.quant.bnb import nf4_from_bnb

    w = (torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * 0.05).to(dtype)
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


def brute_force_hits(bmap: torch.Tensor, shape: tuple[int, int], b: int, qblocks: int) -> torch.Tensor:
    """uint8 (P,): per element whether it lies in a trained block, any() over each program's range."""
    n, k = shape
    span = 64 * qblocks
    inside = (bmap.cpu()[torch.arange(n)[:, None] // b, torch.arange(k)[None, :] // b] >= 0).flatten()
    padded = torch.zeros(-(-n * k // span) * span, dtype=torch.bool)
    padded[: n * k] = inside
    return padded.view(-1, span).any(1).to(torch.uint8)


HIT_CASES = {
    # name: (N, K, block_size, blocks, qblocks); span = 64·qblocks elements per program
    "odd_shape_one_partial_program": (37, 33, 16, [(2, 1)], 64),
    "k_not_a_multiple_of_the_span": (70, 100, 16, [(4, 6), (0, 0), (2, 3)], 2),  # programs straddle rows
    "many_rows_per_program": (150, 7, 16, [(3, 0), (8, 0)], 4),  # block rows only in the middle of a range
    "program_ends_on_a_row_end": (64, 64, 16, [(3, 3)], 1),
    "row_longer_than_the_span": (5, 300, 32, [(0, 9), (0, 0), (0, 4)], 1),  # a head and a tail, no middle
    "last_program_partial_at_the_corner": (70, 128, 64, [(1, 1)], 2),
    "no_blocks": (30, 50, 16, [], 1),
    "every_block": (40, 48, 16, [(r, c) for r in range(3) for c in range(3)], 2),
    "shipped_span_b256": (300, 512, 256, [(1, 1)], None),
}


@pytest.mark.parametrize("case", list(HIT_CASES))
def test_program_hit_flags_match_brute_force(case):
    n, k, b, blocks, qblocks = HIT_CASES[case]
    idx = BlockLayout.build(blocks, n, k, b).indices
    bmap = block_slot_map(idx, (n, k), b)
    flags = program_hit_flags(bmap, (n, k), b, qblocks=qblocks)
    assert flags.dtype == torch.uint8 and flags.shape == (num_programs(n * k, qblocks),)
    assert torch.equal(flags, brute_force_hits(bmap, (n, k), b, qblocks or QBLOCKS))


def test_program_hit_flags_random_layouts():
    g = torch.Generator().manual_seed(3)
    for trial in range(150):
        n, k = (int(v) for v in torch.randint(1, 200, (2,), generator=g))
        b, qblocks = (4, 16, 32, 64, 7)[trial % 5], (1, 2, 3, 8)[trial % 4]
        rows, cols = -(-n // b), -(-k // b)
        picked = torch.randperm(rows * cols, generator=g)[: int(torch.randint(0, 6, (1,), generator=g))]
        bmap = block_slot_map(torch.stack([picked // cols, picked % cols], 1), (n, k), b)
        flags = program_hit_flags(bmap, (n, k), b, qblocks=qblocks)
        assert torch.equal(flags, brute_force_hits(bmap, (n, k), b, qblocks)), (n, k, b, qblocks, picked)


OVERLAY_HIT_CASES = {
    # name: (N, K, block_size, blocks); with QBLOCKS 2 a program covers 128 values
    "runs_most_programs_untouched": (256, 128, 64, [(3, 1)]),
    "runs_every_program_hit": (128, 128, 64, [(0, 0), (0, 1), (1, 0), (1, 1)]),
    "runs_clipped_rows": (70, 128, 64, [(1, 1), (0, 0)]),
    "ragged_edge_corner": (70, 100, 16, [(4, 6), (0, 0), (2, 3)]),
    "ragged_every_program_hit": (37, 33, 16, [(r, c) for r in range(3) for c in range(3)]),
    "ragged_wide_rows": (3, 4200, 64, [(0, 65), (0, 16)]),
    "b32_per_element": (64, 96, 32, [(1, 2)]),
}


@pytest.mark.parametrize("qblocks", [None, 2], ids=["shipped_qblocks", "qblocks2"])
@pytest.mark.parametrize("case", list(OVERLAY_HIT_CASES))
def test_kernel_with_hit_flags_equals_kernel_without(case, qblocks, monkeypatch, poison_empty):
    """Flags skip only programs that hit nothing: the same bits as without them and as the torch path."""
    from smt_kernels.kernels import nf4_dequant

    if qblocks:  # more, smaller programs: more of them straddle rows and block edges
        monkeypatch.setattr(nf4_dequant, "QBLOCKS", qblocks)
    n, k, b, blocks = OVERLAY_HIT_CASES[case]
    g = torch.Generator().manual_seed(4)
    q = quantize_nf4((torch.randn(n, k, generator=g) * 0.05).to(DEVICE), double_quant=True)
    idx = BlockLayout.build(blocks, n, k, b).indices.to(DEVICE)
    bw = torch.randn(len(blocks), b, b, generator=g).to(DEVICE)
    bmap = block_slot_map(idx, (n, k), b)
    hits = program_hit_flags(bmap, (n, k), b)
    assert 0 < int(hits.sum()) and hits.shape == (num_programs(n * k),)
    without = dequantize_overlay(q, torch.empty(n, k, device=DEVICE), bw, idx, bmap, b)
    flagged = dequantize_overlay(q, torch.empty(n, k, device=DEVICE), bw, idx, bmap, b, hits)
    assert torch.equal(flagged, without)
    assert torch.equal(flagged, dequantize_overlay_torch(q, torch.empty(n, k, device=DEVICE), bw, idx, bmap, b))
    # the flags are what the kernel goes by: a program flagged 0 keeps the plain weight even inside a block
    first = int(hits.nonzero()[0])
    stale = hits.clone()
    stale[first] = 0
    dropped = dequantize_overlay(q, torch.empty(n, k, device=DEVICE), bw, idx, bmap, b, stale)
    span = 64 * nf4_dequant.QBLOCKS
    plain, got = dequantize_nf4(q, torch.float32).flatten(), dropped.flatten()
    lo, hi = first * span, min((first + 1) * span, n * k)
    assert torch.equal(got[lo:hi], plain[lo:hi]) and not torch.equal(got[lo:hi], without.flatten()[lo:hi])
    assert torch.equal(torch.cat([got[:lo], got[hi:]]), torch.cat([without.flatten()[:lo], without.flatten()[hi:]]))


def test_hit_flags_of_another_launch_are_refused():
    q, bw, idx, bmap, b = setup("runs_clipped_rows", torch.float32, True)
    wrong = program_hit_flags(bmap, q.shape, b, qblocks=2)
    with pytest.raises(ValueError, match=r"shape \(3,\) .* got torch.uint8 \(70,\)"):
        dequantize_overlay(q, torch.empty(q.shape, device=DEVICE), bw, idx, bmap, b, wrong)
    right = program_hit_flags(bmap, q.shape, b)
    # flags read at stride 1 or as bytes: a strided view or another dtype would drop blocks silently
    strided = torch.stack([right, torch.zeros_like(right)], 1)[:, 0]
    for bad, what in ((strided, r"strides \(2,\)"), (right.to(torch.int32), "torch.int32")):
        with pytest.raises(ValueError, match=what):
            dequantize_overlay(q, torch.empty(q.shape, device=DEVICE), bw, idx, bmap, b, bad)
    # without blocks the flags are not read
    out = dequantize_overlay(q, torch.empty(q.shape, device=DEVICE), None, None, None, 0, wrong)
    assert torch.equal(out, dequantize_nf4(q, torch.float32))
