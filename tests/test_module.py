"""SparseBlockLinear and its op against a float64 dense reference, on every backend."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS
from torch import nn

from smt_kernels import SparseBlockLinear
from smt_kernels.kernels import torch_blocks, triton_blocks
from smt_kernels.layout import BlockLayout
from smt_kernels.ops import sparse_block_linear

# max |actual - reference| / max |reference| per dtype
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = list(TOLERANCE)


def assert_close_rel(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    actual = actual.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = reference.abs().max().clamp_min(1e-12)
    err = ((actual - reference).abs().max() / scale).item()
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3g} > {TOLERANCE[dtype]:.3g} ({dtype})"


def reference_grads(weight, bias, blocks, block_size, x, grad_out):
    """float64 dense linear; returns y, dx and the dense weight gradient cut into (n, b, b) blocks."""
    w = weight.detach().double().requires_grad_()
    xr = x.detach().double().requires_grad_()
    y = nn.functional.linear(xr, w, None if bias is None else bias.detach().double())
    y.backward(grad_out.double())
    idx = torch.as_tensor(blocks, dtype=torch.int64).reshape(-1, 2)
    return y.detach(), xr.grad, torch_blocks.extract_blocks(w.grad, idx, block_size)


def random_blocks(n_rows, n_cols, count, gen):
    perm = torch.randperm(n_rows * n_cols, generator=gen)[:count]
    return [(int(p) // n_cols, int(p) % n_cols) for p in perm]


def make_layer(out_f, in_f, blocks, block_size, dtype, device, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(device=device, dtype=dtype)
    return lin, SparseBlockLinear.from_linear(lin, blocks, block_size=block_size)


def check_against_reference(layer, lin, blocks, x, dtype, seed=1):
    """Run forward+backward with a random upstream gradient; compare y, dx, dB to the float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    x = x.detach().requires_grad_()
    y = layer(x)
    grad_out = torch.randn(y.shape, generator=gen).to(device=y.device, dtype=y.dtype)
    y.backward(grad_out)
    y_ref, dx_ref, db_ref = reference_grads(lin.weight, lin.bias, blocks, layer.block_size, x, grad_out)
    assert_close_rel(y, y_ref, dtype, "output")
    assert_close_rel(x.grad, dx_ref, dtype, "input gradient")
    if len(blocks):
        assert_close_rel(layer.block_weight.grad, db_ref, dtype, "block gradient")
    assert layer.weight.grad is None and not layer.weight.requires_grad
    return y


LAYOUT_CASES = {
    # name: (out, in, block_size, blocks or count)
    "one_block": (70, 100, 16, [(2, 3)]),
    "edge_corner_block": (70, 100, 16, [(4, 6)]),
    "random_many": (70, 100, 16, 9),
    "whole_block_row": (70, 100, 16, [(4, c) for c in range(7)]),
    "whole_block_col": (70, 100, 16, [(r, 6) for r in range(5)]),
    "every_block": (40, 48, 16, 9),
    "b32_ragged": (96, 81, 32, 4),
    "b64_ragged": (130, 200, 64, 5),
    "b128": (192, 300, 128, 3),
    "b256_smollm_kv": (192, 576, 256, [(0, 0), (0, 2)]),
    "aligned": (64, 96, 16, 7),  # b divides both sides: the torch path's block-view fast path
    "aligned_b64_shared_column": (128, 192, 64, [(1, 2), (0, 2), (1, 0)]),
}


@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda p: "-".join(p))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_matches_dense_reference(backend, dtype, case, poison_empty):
    _, device = backend
    out_f, in_f, b, blocks = LAYOUT_CASES[case]
    n_rows, n_cols = -(-out_f // b), -(-in_f // b)
    if isinstance(blocks, int):
        blocks = random_blocks(n_rows, n_cols, blocks, torch.Generator().manual_seed(len(case)))
    lin, layer = make_layer(out_f, in_f, blocks, b, dtype, device)
    x = torch.randn(3, 29, in_f).to(device=device, dtype=dtype)
    check_against_reference(layer, lin, blocks, x, dtype)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda p: "-".join(p))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("tokens", [1, 1100, 4133])
def test_token_counts_split_reduction(backend, dtype, tokens, poison_empty):
    """Token counts that split the reduction across programs (atomics) with ragged last splits."""
    _, device = backend
    blocks = [(1, 2), (0, 0)]
    lin, layer = make_layer(40, 50, blocks, 16, dtype, device)
    x = torch.randn(tokens, 50).to(device=device, dtype=dtype)
    check_against_reference(layer, lin, blocks, x, dtype)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda p: "-".join(p))
def test_zero_tokens_and_zero_blocks(backend, poison_empty):
    _, device = backend
    lin, layer = make_layer(40, 50, [(1, 2)], 16, torch.float32, device)
    x = torch.randn(0, 50, device=device, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 40)
    y.sum().backward()
    assert torch.equal(layer.block_weight.grad, torch.zeros_like(layer.block_weight))

    lin, frozen = make_layer(40, 50, [], 16, torch.float32, device)
    assert frozen.block_weight.shape == (0, 16, 16)
    x = torch.randn(7, 50, device=device)
    check_against_reference(frozen, lin, [], x, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda p: "-".join(p))
def test_non_contiguous_input_and_grad(backend):
    _, device = backend
    blocks = [(0, 1), (2, 0), (1, 3)]
    lin, layer = make_layer(48, 60, blocks, 16, torch.float32, device)
    base = torch.randn(60, 5, 11, device=device)
    x = base.permute(1, 2, 0)  # (5, 11, 60), last dim strided
    assert not x.is_contiguous()
    check_against_reference(layer, lin, blocks, x, torch.float32)
    # an expanded (stride-0) upstream gradient, as .sum() produces
    layer.block_weight.grad = None
    xg = torch.randn(9, 60, device=device)
    layer(xg).sum().backward()
    _, _, db_ref = reference_grads(lin.weight, lin.bias, blocks, 16, xg, torch.ones(9, 48, device=device))
    assert_close_rel(layer.block_weight.grad, db_ref, torch.float32, "block gradient")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda p: "-".join(p))
def test_gradient_accumulation_with_interleaved_forwards(backend):
    """Two forwards, then their two backwards (as pipelined accumulation does): gradients add up."""
    _, device = backend
    blocks = [(0, 1), (2, 2)]
    lin, layer = make_layer(40, 50, blocks, 16, torch.float32, device)
    x1, x2 = torch.randn(13, 50, device=device), torch.randn(6, 50, device=device)
    y1, y2 = layer(x1), layer(x2)
    g1, g2 = torch.randn_like(y1), torch.randn_like(y2)
    y1.backward(g1)
    y2.backward(g2)
    _, _, d1 = reference_grads(lin.weight, lin.bias, blocks, 16, x1, g1)
    _, _, d2 = reference_grads(lin.weight, lin.bias, blocks, 16, x2, g2)
    assert_close_rel(layer.block_weight.grad, d1 + d2, torch.float32, "accumulated block gradient")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda p: "-".join(p))
def test_optimizer_step_is_what_next_forward_uses(backend):
    _, device = backend
    blocks = [(0, 1), (3, 5)]
    lin, layer = make_layer(70, 100, blocks, 16, torch.float32, device)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    x = torch.randn(20, 100, device=device)
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    # the dense equivalent: the source weight with the trained blocks written in
    w = lin.weight.detach().clone()
    torch_blocks.scatter_blocks(w, layer.block_weight.detach(), layer.block_indices)
    changed = (w != lin.weight).any()
    assert changed, "training did not change the blocks"
    torch.testing.assert_close(layer(x), nn.functional.linear(x, w, lin.bias), rtol=1e-5, atol=1e-5)
    # elements outside the blocks never move
    mask = torch.zeros_like(w, dtype=torch.bool)
    torch_blocks.scatter_blocks(mask, torch.ones_like(layer.block_weight, dtype=torch.bool), layer.block_indices)
    assert torch.equal(layer.weight[~mask], lin.weight[~mask])
    merged = layer.to_linear()
    assert isinstance(merged, nn.Linear) and merged.weight.dtype == lin.weight.dtype
    torch.testing.assert_close(merged(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda p: "-".join(p))
def test_update_between_forward_and_backward_is_refused(backend):
    """The blocks changing before a pending backward would give a stale input gradient: autograd refuses."""
    _, device = backend
    lin, layer = make_layer(40, 50, [(0, 1)], 16, torch.float32, device)
    y = layer(torch.randn(4, 50, device=device))
    with torch.no_grad():
        layer.block_weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda p: "-".join(p))
@pytest.mark.parametrize("train_blocks", [True, False])
def test_backward_rewrites_blocks_into_a_rematerialised_weight(backend, train_blocks):
    """A sharding engine (FSDP2) may re-gather the weight between forward and backward from shards that never
    saw the blocks: the input gradient must still use the blocks."""
    _, device = backend
    blocks = [(0, 1), (2, 2)]
    lin, layer = make_layer(40, 50, blocks, 16, torch.float32, device)
    with torch.no_grad():
        layer.block_weight.mul_(3.0)
    layer.block_weight.requires_grad_(train_blocks)
    x = torch.randn(11, 50, device=device, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        layer.weight.copy_(lin.weight)  # the pre-training values, as the shards hold them
    g = torch.randn_like(y)
    y.backward(g)
    w = lin.weight.detach().clone()
    torch_blocks.scatter_blocks(w, layer.block_weight.detach(), layer.block_indices)
    _, dx_ref, db_ref = reference_grads(w, lin.bias, blocks, 16, x, g)
    assert_close_rel(x.grad, dx_ref, torch.float32, "input gradient")
    if train_blocks:
        assert_close_rel(layer.block_weight.grad, db_ref, torch.float32, "block gradient")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda p: "-".join(p))
def test_saves_only_the_gathered_columns(backend):
    _, device = backend
    blocks = [(0, 1), (2, 1), (1, 4)]  # block-columns 1 and 4
    lin, layer = make_layer(48, 100, blocks, 16, torch.float32, device)
    x = torch.randn(37, 100, device=device, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    params = {p.data_ptr() for p in layer.parameters()} | {b.data_ptr() for b in layer.buffers()}
    activations = [t for t in saved if t.data_ptr() not in params]
    assert [tuple(t.shape) for t in activations] == [(37, 2 * 16)]
    assert activations[0].data_ptr() != x.data_ptr()
    torch.testing.assert_close(activations[0], torch.cat([x[:, 16:32], x[:, 64:80]], dim=1))
    y.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda p: "-".join(p))
def test_autocast(backend):
    _, device = backend
    blocks = [(0, 1), (2, 0)]
    lin, layer = make_layer(48, 64, blocks, 16, torch.float32, device)
    x = torch.randn(10, 64, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = layer(x)
        y_lin = lin(x)
    assert y.dtype == torch.bfloat16 == y_lin.dtype
    torch.testing.assert_close(y, y_lin, rtol=0, atol=0)
    y.float().sum().backward()
    assert layer.block_weight.grad.dtype == torch.float32
    _, _, db_ref = reference_grads(lin.weight, lin.bias, blocks, 16, x, torch.ones(10, 48, device=device))
    assert_close_rel(layer.block_weight.grad, db_ref, torch.bfloat16, "block gradient under autocast")


def test_from_linear_is_exact_and_independent():
    lin = nn.Linear(100, 70)
    layer = SparseBlockLinear.from_linear(lin, [(1, 2)], block_size=16)
    x = torch.randn(2, 3, 100)
    assert torch.equal(layer(x), lin(x))
    assert layer.weight.data_ptr() != lin.weight.data_ptr()
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["block_weight"]
    assert layer.block_indices.dtype == torch.int64 and layer.block_indices.tolist() == [[1, 2]]
    assert "num_blocks=1" in repr(layer)
    no_bias = SparseBlockLinear.from_linear(nn.Linear(100, 70, bias=False), torch.tensor([[0, 0]]), block_size=16)
    assert no_bias.bias is None


def test_state_dict_round_trip():
    lin = nn.Linear(50, 40)
    a = SparseBlockLinear.from_linear(lin, [(1, 2), (0, 0)], block_size=16)
    with torch.no_grad():
        a.block_weight.mul_(2)
    b = SparseBlockLinear.from_linear(lin, [(1, 2), (0, 0)], block_size=16)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 50)
    assert torch.equal(a(x), b(x))
    other = SparseBlockLinear.from_linear(lin, [(1, 2)], block_size=16)
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(a.state_dict())


def test_state_dict_with_other_blocks_of_the_same_count():
    """Loading blocks at other positions rebuilds the column index; blocks that do not fit are refused intact."""
    lin = nn.Linear(50, 40)
    a = SparseBlockLinear.from_linear(lin, [(1, 2), (0, 0)], block_size=16)
    with torch.no_grad():
        a.block_weight.add_(1)
    b = SparseBlockLinear.from_linear(lin, [(2, 3), (0, 1)], block_size=16)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 50, requires_grad=True)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    assert b.col_blocks.tolist() == [0, 2] and b.col_slot.tolist() == [1, 0]
    ga = torch.autograd.grad(a(x).sum(), [x, a.block_weight])
    gb = torch.autograd.grad(b(x).sum(), [x, b.block_weight])
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(u, v)
    bad = {**a.state_dict(), "block_indices": torch.tensor([[9, 0], [0, 0]])}
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with pytest.raises(ValueError, match=r"\(9, 0\) is out of range"):
        b.load_state_dict(bad)
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---- bad input: a clear error naming the numbers, nothing half-built ----


@pytest.mark.parametrize(
    ("blocks", "block_size", "error", "match"),
    [
        ([(5, 0)], 16, ValueError, r"\(5, 0\) is out of range.*70×100.*row blocks 0\.\.4"),
        ([(0, 7)], 16, ValueError, r"col blocks 0\.\.6"),
        ([(1, 1), (0, 2), (1, 1)], 16, ValueError, r"duplicate block \(1, 1\) at positions \[0, 2\]"),
        ([(-1, 0)], 16, ValueError, r"negative index \(-1, 0\)"),
        ([(0, 0)], 48, ValueError, r"power of two in \[16, 256\], got 48"),
        ([(0, 0)], 8, ValueError, r"got 8"),
        ([(0, 0)], 512, ValueError, r"got 512"),
        (torch.zeros(2, 3, dtype=torch.int64), 16, ValueError, r"shape \(n, 2\), got \(2, 3\)"),
        (torch.zeros(2, 2), 16, TypeError, r"integer dtype"),
        ([(0, 0, 1)], 16, ValueError, r"pair"),
        ([3], 16, TypeError, r"pairs"),
    ],
)
def test_bad_layouts(blocks, block_size, error, match):
    lin = nn.Linear(100, 70)
    with pytest.raises(error, match=match):
        SparseBlockLinear.from_linear(lin, blocks, block_size=block_size)
    with pytest.raises(error, match=match):
        SparseBlockLinear(100, 70, blocks, block_size=block_size)


def test_bad_inputs():
    layer = SparseBlockLinear.from_linear(nn.Linear(100, 70), [(0, 0)], block_size=16)
    with pytest.raises(ValueError, match=r"in_features=100, got input of shape \(4, 99\)"):
        layer(torch.randn(4, 99))
    with pytest.raises(TypeError, match="float64"):
        layer(torch.randn(4, 100, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"does not match the weight dtype"):
        layer(torch.randn(4, 100, dtype=torch.float16))
    with pytest.raises(TypeError, match="int32"):
        SparseBlockLinear(100, 70, [(0, 0)], block_size=16, dtype=torch.int32)
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseBlockLinear.from_linear(nn.Conv1d(3, 3, 1), [(0, 0)], block_size=16)
    with pytest.raises(TypeError, match="float64"):
        SparseBlockLinear.from_linear(nn.Linear(100, 70).double(), [(0, 0)], block_size=16)
    with pytest.raises(ValueError, match=r"bias must have shape \(70,\) on cpu, got \(69,\)"):
        sparse_block_linear(
            torch.randn(4, 100),
            layer.weight,
            layer.block_weight,
            layer.block_indices,
            layer.col_blocks,
            layer.col_slot,
            16,
            bias=torch.zeros(69),
        )


def test_bad_backend_name(monkeypatch):
    """The backend is resolved when a layer is built (or moved), so a bad name fails there, not per call."""
    monkeypatch.setenv("SMT_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="'triton' or 'torch', got 'cuda'"):
        SparseBlockLinear.from_linear(nn.Linear(100, 70), [(0, 0)], block_size=16)
    with pytest.raises(ValueError, match="'triton' or 'torch', got 'cuda'"):
        sparse_block_linear(torch.randn(2, 100), *_functional_args(nn.Linear(100, 70)))


def _functional_args(lin):
    lay = BlockLayout.build([(0, 0)], 70, 100, 16)
    w = lin.weight.detach().clone()
    return w, torch.zeros(1, 16, 16), lay.indices, lay.col_blocks, lay.col_slot, 16


# ---- the launch functions directly, both backends, outputs poisoned ----


@pytest.mark.parametrize("kernels", [torch_blocks, triton_blocks], ids=["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_and_scatter_kernels(kernels, dtype, poison_empty):
    device = "cuda" if (kernels is triton_blocks and torch.cuda.is_available()) else "cpu"
    x = torch.randn(100, 37, device=device).to(dtype).t()  # (37, 100), strided
    cols = torch.tensor([0, 2, 6], device=device)
    out = kernels.gather_column_blocks(x, cols, 16)
    assert out.shape == (37, 48) and out.is_contiguous()
    expected = torch.cat([x[:, 0:16], x[:, 32:48], x[:, 96:100], torch.zeros(37, 12, device=device, dtype=dtype)], 1)
    assert torch.equal(out, expected)

    w = torch.randn(70, 100, device=device).to(dtype)
    idx = torch.tensor([[4, 6], [0, 1]], device=device)
    blocks = torch.randn(2, 16, 16, device=device).to(dtype)
    w2 = w.clone()
    kernels.scatter_blocks(w2, blocks, idx)
    expected = w.clone()
    expected[64:70, 96:100] = blocks[0, :6, :4]
    expected[0:16, 16:32] = blocks[1]
    assert torch.equal(w2, expected)
    assert torch.equal(torch_blocks.extract_blocks(w2, idx, 16)[1], blocks[1])


@pytest.mark.parametrize("kernels", [torch_blocks, triton_blocks], ids=["torch", "triton"])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_kernels_on_block_aligned_shapes(kernels, transposed):
    """b divides both sides (the torch path's block-view route), weights and inputs of any strides."""
    device = "cuda" if (kernels is triton_blocks and torch.cuda.is_available()) else "cpu"
    w = torch.randn(96, 64, device=device).t() if transposed else torch.randn(64, 96, device=device)
    idx = torch.tensor([[3, 5], [0, 0], [2, 5]], device=device)
    blocks = torch.randn(3, 16, 16, device=device)
    w2 = w.clone() if not transposed else w.clone().t().contiguous().t()
    kernels.scatter_blocks(w2, blocks, idx)
    expected = w.clone()
    for k, (r, c) in enumerate(idx.tolist()):
        expected[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] = blocks[k]
    assert torch.equal(w2, expected)
    assert torch.equal(torch_blocks.extract_blocks(w2, idx, 16), blocks)
    x = torch.randn(96, 21, device=device).t() if transposed else torch.randn(21, 96, device=device)
    cols = torch.tensor([0, 5], device=device)
    out = kernels.gather_column_blocks(x, cols, 16)
    assert out.is_contiguous() and torch.equal(out, torch.cat([x[:, 0:16], x[:, 80:96]], 1))
    dy = torch.randn(21, 64, device=device)
    grad = kernels.block_weight_grad(dy, out, idx[[0, 2]], torch.tensor([1, 1], device=device), 16, torch.float32)
    ref = torch.stack([dy[:, 48:64].t() @ x[:, 80:96], dy[:, 32:48].t() @ x[:, 80:96]])
    torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_match_eager_across_optimizer_steps():
    """make_graphed_callables on the layer: replays equal eager steps, and see the blocks an optimizer updated."""
    torch.manual_seed(0)
    lin = nn.Linear(300, 200, device="cuda", dtype=torch.bfloat16)
    blocks = [(0, 1), (2, 0), (3, 4)]
    eager = SparseBlockLinear.from_linear(lin, blocks, block_size=64)
    graphed = SparseBlockLinear.from_linear(lin, blocks, block_size=64)
    sample = torch.randn(4, 37, 300, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(graphed, (sample,))
    opts = [torch.optim.SGD([m.block_weight], lr=0.5) for m in (eager, graphed)]
    for _ in range(3):
        x = torch.randn_like(sample)
        dy = torch.randn(4, 37, 200, device="cuda", dtype=torch.bfloat16)
        outs = []
        for layer, opt in zip((eager, graphed), opts, strict=True):
            xi = x.clone().requires_grad_(True)
            y = layer(xi)
            y.backward(dy)
            outs.append((y.detach().clone(), xi.grad.clone(), layer.block_weight.grad.clone()))
            opt.step()
            # graphed backward hands out its static gradient buffers: .grad must be dropped, not zeroed in place
            opt.zero_grad(set_to_none=True)
        for e, g in zip(*outs, strict=True):
            torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(graphed.block_weight, eager.block_weight, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_second_derivatives_are_refused_not_wrong(checkpointed):
    """dX = dY·W does not carry W's dependence on the blocks, nor the block gradient its dependence on x: a gradient
    penalty or a Hessian-vector product would be silently wrong (None or zero through autograd.grad), so a backward
    with create_graph=True raises, on both autograd paths (one node; two under checkpointing). With the blocks
    frozen dX is exact and stays differentiable."""
    from torch.utils.checkpoint import checkpoint

    layer = SparseBlockLinear.from_linear(nn.Linear(48, 40), [(0, 0), (1, 1)], block_size=16)
    x = torch.randn(3, 48, requires_grad=True)

    def loss():
        y = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
        return y.pow(2).sum()

    with pytest.raises(RuntimeError, match="do not support second derivatives"):
        torch.autograd.grad(loss(), [x, layer.block_weight], create_graph=True)
    with pytest.raises(RuntimeError, match="do not support second derivatives"):
        torch.autograd.grad(loss(), layer.block_weight, create_graph=True)
    layer.block_weight.requires_grad_(False)
    (gx,) = torch.autograd.grad(loss(), x, create_graph=True)
    (hx,) = torch.autograd.grad(gx.pow(2).sum(), x)
    w = layer.merged_weight().double()
    x64 = x.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad((x64 @ w.T + layer.bias.double()).pow(2).sum(), x64, create_graph=True)
    (h64,) = torch.autograd.grad(g64.pow(2).sum(), x64)
    torch.testing.assert_close(hx.double(), h64, rtol=1e-5, atol=1e-5)


def test_index_rebuilt_under_inference_mode_still_trains():
    """A write to block_indices seen by an eval forward under inference_mode, or load_state_dict there: the derived
    buffers are normal tensors, so training goes on (inference tensors cannot be saved for backward)."""
    layer = SparseBlockLinear.from_linear(nn.Linear(48, 40), [(0, 0), (1, 1)], block_size=16)
    with torch.no_grad():
        layer.block_indices.copy_(torch.tensor([[2, 2], [0, 1]]))
    with torch.inference_mode():
        layer(torch.randn(2, 48))
    assert not layer.col_blocks.is_inference() and not layer.col_slot.is_inference()
    layer(torch.randn(2, 48, requires_grad=True)).sum().backward()
    other = SparseBlockLinear.from_linear(nn.Linear(48, 40), [(2, 2), (0, 1)], block_size=16)
    with torch.inference_mode():
        layer.load_state_dict(other.state_dict())
    x = torch.randn(2, 48, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(layer(x), other(x))


def test_index_tensors_of_the_functional_op_are_checked():
    """The Triton kernels read the index tensors as flat int64 arrays: a transposed (non-contiguous) one used to
    give wrong outputs there and right ones on the torch backend."""
    layer = SparseBlockLinear.from_linear(nn.Linear(64, 48), [(0, 2), (1, 3)], block_size=16)
    args = [torch.randn(3, 64), layer.weight, layer.block_weight]
    transposed = torch.tensor([[0, 1], [2, 3]]).t()
    assert torch.equal(transposed, layer.block_indices) and not transposed.is_contiguous()
    with pytest.raises(
        ValueError, match=r"block_indices must be a contiguous 2-D int64 tensor on cpu.*strides \(1, 2\)"
    ):
        sparse_block_linear(*args, transposed, layer.col_blocks, layer.col_slot, 16)
    with pytest.raises(ValueError, match="col_slot must be a contiguous 1-D int64 tensor"):
        sparse_block_linear(*args, layer.block_indices, layer.col_blocks, layer.col_slot.int(), 16)
    sparse_block_linear(*args, layer.block_indices, layer.col_blocks, layer.col_slot, 16)


def test_a_loaded_weight_without_blocks_brings_its_own_blocks():
    """load_state_dict(strict=False) of a plain nn.Linear's state (another base): the blocks are read from it, so the
    layer computes what the loaded linear computes (before, the next forward wrote the old blocks over it)."""
    layer = SparseBlockLinear.from_linear(nn.Linear(48, 40), [(0, 0), (1, 1)], block_size=16)
    new = nn.Linear(48, 40)
    layer.load_state_dict(new.state_dict(), strict=False)
    x = torch.randn(3, 48)
    torch.testing.assert_close(layer(x), new(x), rtol=0, atol=0)
    # a full state (blocks included) still loads its blocks, not the weight's
    trained = SparseBlockLinear.from_linear(nn.Linear(48, 40), [(0, 0), (1, 1)], block_size=16)
    with torch.no_grad():
        trained.block_weight.add_(1.0)
    layer.load_state_dict(trained.state_dict())
    torch.testing.assert_close(layer(x), trained(x), rtol=0, atol=0)


def test_converting_to_an_unsupported_dtype_names_the_layer():
    layer = SparseBlockLinear.from_linear(nn.Linear(48, 40), [(0, 0)], block_size=16)
    with pytest.raises(TypeError, match="its weight to torch.float64 was refused .this layer stays torch.float32"):
        layer.double()
    assert layer.weight.dtype == layer.block_weight.dtype == layer.bias.dtype == torch.float32
    layer(torch.randn(2, 48))  # left as it was: runs


def test_a_refused_load_leaves_the_trained_blocks_alone():
    """A load that fails (a weight of another shape) still runs the post-hook: the blocks are not read from the
    weight it never wrote."""
    layer = SparseBlockLinear.from_linear(nn.Linear(48, 40), [(0, 0), (1, 1)], block_size=16)
    with torch.no_grad():
        layer.block_weight.add_(1.0)
    trained = layer.block_weight.detach().clone()
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict({"weight": torch.zeros(3, 3)}, strict=False)
    assert torch.equal(layer.block_weight, trained)
