"""NF4Linear and NF4SparseBlockLinear against a float64 dense reference (the dequantized weight with the blocks
in place), on every backend."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS
from torch import nn
from torch.utils.checkpoint import checkpoint

from smt_kernels.kernels import torch_blocks
from smt_kernels.quant import buffers
from smt_kernels.quant.module import NF4Linear, NF4SparseBlockLinear

TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
CASES = {
    # name: (out, in, block_size, blocks)
    "edge_corner": (70, 100, 16, [(4, 6), (0, 0), (2, 3)]),
    "b32_shared_column": (96, 81, 32, [(0, 2), (2, 2), (1, 0)]),
    "aligned": (64, 96, 16, [(1, 1), (3, 5)]),
}


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    assert actual.shape == reference.shape
    assert torch.isfinite(actual).all()
    return ((actual.double() - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()


def make(case, dtype, device, block_dtype=None, seed=0, bias=True):
    out_f, in_f, b, blocks = CASES[case]
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(device=device, dtype=dtype)
    base = NF4Linear.from_linear(lin)
    layer = NF4SparseBlockLinear.from_nf4_linear(base, blocks, b, block_dtype=block_dtype)
    with torch.no_grad():  # "trained" blocks, far from the base values
        layer.block_weight.copy_(torch.randn(layer.block_weight.shape) * 0.1)
    return base, layer


def reference(layer, x, grad_out):
    """float64: y, dx and the dense weight gradient cut into blocks, for the weight the layer computes with."""
    w = layer.dequantized_weight(torch.float64).requires_grad_()
    xr = x.detach().double().requires_grad_()
    y = nn.functional.linear(xr, w, None if layer.bias is None else layer.bias.double())
    y.backward(grad_out.double())
    return y.detach(), xr.grad, torch_blocks.extract_blocks(w.grad, layer.block_indices, layer.block_size)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda p: "-".join(p))
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("case", list(CASES))
def test_against_float64_reference(case, dtype, backend, poison_empty):
    buffers.release_buffers()  # the shared buffer is allocated (NaN-poisoned) inside this test
    _, device = backend
    _, layer = make(case, dtype, device)
    x = torch.randn(3, 5, layer.in_features, device=device).to(dtype).requires_grad_()
    y = layer(x)
    grad_out = torch.randn(y.shape, device=device).to(dtype)
    y.backward(grad_out)
    y_ref, dx_ref, db_ref = reference(layer, x, grad_out)
    tol = TOLERANCE[dtype]
    assert rel_err(y, y_ref) <= tol
    assert rel_err(x.grad, dx_ref) <= tol
    assert rel_err(layer.block_weight.grad, db_ref) <= tol
    # clipped edge blocks: no gradient past the weight's edge
    b = layer.block_size
    for k, (r, c) in enumerate(layer.block_indices.tolist()):
        rows, cols = min(b, layer.out_features - r * b), min(b, layer.in_features - c * b)
        assert (layer.block_weight.grad[k, rows:] == 0).all() and (layer.block_weight.grad[k, :, cols:] == 0).all()
    assert layer.bias.grad is None and not layer.bias.requires_grad
    buffers.release_buffers()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda p: "-".join(p))
def test_fp32_blocks_bf16_compute_and_untrained_identity(backend):
    _, device = backend
    lin = nn.Linear(100, 70).to(device=device, dtype=torch.bfloat16)
    base = NF4Linear.from_linear(lin)
    layer = NF4SparseBlockLinear.from_nf4_linear(base, CASES["edge_corner"][3], 16, block_dtype=torch.float32)
    assert layer.block_weight.dtype == torch.float32 and layer.weight_packed is base.weight_packed
    x = torch.randn(4, 100, device=device, dtype=torch.bfloat16)
    # untrained blocks hold the base values: the same output (the interpreter rounds bf16 differently from torch,
    # so allow one bf16 rounding there)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-2, atol=1e-2)
    if backend[0] == "torch":
        assert torch.equal(layer(x), base(x))
    x.requires_grad_()
    layer(x).float().pow(2).sum().backward()
    assert layer.block_weight.grad.dtype == torch.float32 and torch.isfinite(layer.block_weight.grad).all()


@pytest.mark.parametrize("backend", BACKENDS[:2], indirect=True, ids=lambda p: "-".join(p))
def test_frozen_layer_input_gradient(backend):
    _, device = backend
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(33, 37).to(device))
    assert not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(6, 33, device=device, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    w = layer.dequantized_weight(torch.float64)
    assert rel_err(x.grad, g.double() @ w) <= TOLERANCE[torch.float32]
    assert rel_err(y, x.detach().double() @ w.t() + layer.bias.double()) <= TOLERANCE[torch.float32]


def test_gradient_checkpointing_and_accumulation():
    """Checkpointed forward (recomputed in backward) and two forwards before two backwards (other layers use the
    shared buffer in between) give the plain step's gradients."""
    _, l1 = make("edge_corner", torch.float32, "cpu")
    l2 = NF4SparseBlockLinear.from_nf4_linear(NF4Linear.from_linear(nn.Linear(70, 100)), [(1, 2)], 16)

    def net(x):
        return l2(torch.relu(l1(x)))

    x = torch.randn(2, 7, 100)
    net(x).pow(2).sum().backward()
    want = (l1.block_weight.grad.clone(), l2.block_weight.grad.clone())
    for p in (l1.block_weight, l2.block_weight):
        p.grad = None
    checkpoint(net, x, use_reentrant=False).pow(2).sum().backward()
    assert torch.allclose(l1.block_weight.grad, want[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(l2.block_weight.grad, want[1], rtol=1e-5, atol=1e-6)
    for p in (l1.block_weight, l2.block_weight):
        p.grad = None
    xa, xb = x[:1], x[1:]
    ya, yb = net(xa), net(xb)
    ya.pow(2).sum().backward()
    yb.pow(2).sum().backward()
    assert torch.allclose(l1.block_weight.grad, want[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(l2.block_weight.grad, want[1], rtol=1e-5, atol=1e-6)


def test_no_dequantized_weight_is_kept_by_default():
    layer = NF4Linear.from_linear(nn.Linear(96, 80))
    x = torch.randn(2, 96, requires_grad=True)
    layer(x).sum().backward()
    assert buffers.buffer_bytes() == 0


def test_one_pooled_buffer_per_device_and_dtype():
    previous = buffers.use_pooled_buffer(True)
    try:
        _check_one_pooled_buffer()
    finally:
        buffers.use_pooled_buffer(previous)
    assert buffers.buffer_bytes() == 0  # switching the pool off releases it


def _check_one_pooled_buffer():
    buffers.release_buffers()
    small = NF4Linear.from_linear(nn.Linear(64, 32))
    big = NF4Linear.from_linear(nn.Linear(96, 80))
    x = torch.randn(2, 96, requires_grad=True)
    big(x).sum().backward()
    small(torch.randn(2, 64)).sum()
    assert buffers.buffer_bytes() == 96 * 80 * 4  # the largest weight once, in fp32; not one copy per layer
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = big(x)
    assert y.dtype == torch.bfloat16
    assert buffers.buffer_bytes() == 96 * 80 * 4 + 96 * 80 * 2
    assert buffers.release_buffers() == 96 * 80 * 6 and buffers.buffer_bytes() == 0


def test_input_dtype_cast_and_errors():
    layer = NF4Linear.from_linear(nn.Linear(16, 8).to(torch.bfloat16))
    y = layer(torch.randn(3, 16))  # fp32 input: computed in bf16, returned in fp32 (as bitsandbytes does)
    assert y.dtype == torch.float32
    with pytest.raises(ValueError, match="in_features=16"):
        layer(torch.randn(3, 15))
    with pytest.raises(TypeError, match="float64"):
        layer(torch.randn(3, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="frozen NF4Linear"):
        NF4SparseBlockLinear.from_nf4_linear(nn.Linear(16, 8), [(0, 0)], 16)
    with pytest.raises(ValueError, match="out of range"):
        NF4SparseBlockLinear.from_nf4_linear(layer, [(1, 0)], 16)
    with pytest.raises(TypeError, match="compute_dtype"):
        NF4Linear(16, 8, compute_dtype=torch.float64)


def test_state_dict_round_trip():
    _, layer = make("b32_shared_column", torch.float32, "cpu")
    state = layer.state_dict()
    assert {"weight_packed", "weight_absmax_q", "block_weight", "block_indices"} <= set(state)
    assert "block_map" not in state and "program_hits" not in state
    _, other = make("b32_shared_column", torch.float32, "cpu", seed=1)
    other.load_state_dict(state)
    x = torch.randn(4, 81)
    assert torch.equal(other(x), layer(x))
    assert torch.equal(other.block_map, layer.block_map)
    assert torch.equal(other.program_hits, layer.program_hits)
    merged = layer.to_linear()
    assert isinstance(merged, nn.Linear) and torch.equal(merged.weight, layer.dequantized_weight())
    torch.testing.assert_close(merged(x), layer(x))


def test_dtype_casts_keep_the_quantized_weight():
    """model.to(bfloat16) / .half() cast the bias and blocks but never the codes or fp32 scales."""
    _, layer = make("edge_corner", torch.float32, "cpu")
    before = {k: v.clone() for k, v in layer.nf4.tensors().items()}
    layer.to(torch.bfloat16)
    for k, v in layer.nf4.tensors().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert layer.bias.dtype == torch.bfloat16 and layer.block_weight.dtype == torch.bfloat16
    assert layer.block_map.dtype == torch.int32  # the index buffers keep their dtypes as always
    assert torch.isfinite(layer(torch.randn(2, 100))).all()


def test_no_blocks_and_no_input_gradient():
    base = NF4Linear.from_linear(nn.Linear(40, 24))
    empty = NF4SparseBlockLinear.from_nf4_linear(base, [], 16)
    x = torch.randn(3, 40, requires_grad=True)
    empty(x).sum().backward()
    assert empty.block_weight.grad.shape == (0, 16, 16) and x.grad is not None
    _, layer = make("aligned", torch.float32, "cpu")
    layer(torch.randn(2, 96)).sum().backward()  # the input needs no gradient: only the blocks get one
    assert torch.isfinite(layer.block_weight.grad).all() and layer.block_weight.grad.abs().sum() > 0


def test_from_nf4_linear_takes_a_validated_layout():
    """A BlockLayout (what patch plans) is taken as is when it is for the layer's shape; another shape is refused."""
    from smt_kernels.layout import BlockLayout

    out_f, in_f, b, blocks = CASES["edge_corner"]
    base = NF4Linear.from_linear(nn.Linear(in_f, out_f))
    from_pairs = NF4SparseBlockLinear.from_nf4_linear(base, blocks, b)
    layout = BlockLayout.build(blocks, out_f, in_f, b)
    from_layout = NF4SparseBlockLinear.from_nf4_linear(base, layout, b)
    assert torch.equal(from_layout.block_indices, from_pairs.block_indices)
    assert torch.equal(from_layout.block_weight, from_pairs.block_weight)
    with pytest.raises(ValueError, match=f"layout is for a {out_f}×{in_f + 1} weight with block_size {b}"):
        NF4SparseBlockLinear.from_nf4_linear(base, BlockLayout.build(blocks, out_f, in_f + 1, b), b)


def _two_layouts(seed=0):
    """A 128×128 layer in 64-blocks (4 programs of the shipped overlay launch, 32 rows each) trained at (0, 0), and
    the state of one trained at (1, 1): the programs that meet a block are [0, 1] and [2, 3]."""
    torch.manual_seed(seed)
    base = NF4Linear.from_linear(nn.Linear(128, 128))
    layer = NF4SparseBlockLinear.from_nf4_linear(base, [(0, 0)], 64)
    other = NF4SparseBlockLinear.from_nf4_linear(base, [(1, 1)], 64)
    with torch.no_grad():  # "trained" blocks, far from the base values
        other.block_weight.copy_(torch.randn(other.block_weight.shape) * 0.1)
    return layer, other


@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda p: "-".join(p))
def test_new_block_indices_rebuild_the_hit_flags(backend):
    """load_state_dict with blocks elsewhere rebuilds the per-program hit flags with the slot map: flags left from
    the old layout would make the Triton overlay skip the programs of the new blocks (their trained values lost)."""
    from smt_kernels.kernels.nf4_dequant import num_programs
    from smt_kernels.quant.custom_ops import dequantize_overlay
    from smt_kernels.quant.dequant import program_hit_flags

    name, device = backend
    layer, other = _two_layouts()
    assert layer.program_hits.tolist() == [1, 1, 0, 0] and num_programs(128 * 128) == 4
    layer.load_state_dict(other.state_dict())
    layer.to(device)
    assert layer.program_hits.tolist() == [0, 0, 1, 1]
    assert torch.equal(layer.program_hits, program_hit_flags(layer.block_map, (128, 128), 64))
    want = layer.dequantized_weight(torch.float32)  # the torch path: block_indices, no map, no flags
    bw = layer.block_weight.detach()
    w = dequantize_overlay(
        layer.nf4, torch.float32, name, bw, layer.block_indices, layer.block_map, 64, program_hits=layer.program_hits
    )
    assert torch.equal(w, want)
    x = torch.randn(3, 128, device=device, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    w64 = want.double()
    assert rel_err(y, x.detach().double() @ w64.t() + layer.bias.double()) <= TOLERANCE[torch.float32]
    assert rel_err(x.grad, g.double() @ w64) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS[1:2], indirect=True, ids=lambda p: "-".join(p))
def test_forward_and_backward_read_the_layers_hit_flags(backend):
    """The layer's flags reach the Triton kernel in forward and in dX's dequantization: with every flag cleared,
    both compute with the plain NF4 weight (the trained block skipped)."""
    _, device = backend
    _, layer = _two_layouts()
    layer.to(device)
    plain = NF4Linear.from_nf4(layer.nf4, layer.bias).dequantized_weight(torch.float32).double()
    layer.program_hits.zero_()
    x = torch.randn(3, 128, device=device, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    assert rel_err(y, x.detach().double() @ plain.t() + layer.bias.double()) <= TOLERANCE[torch.float32]
    assert rel_err(x.grad, g.double() @ plain) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda p: "-".join(p))
def test_written_block_indices_take_effect(backend, replace):
    """Blocks moved by writing block_indices in place (or assigning another tensor) are where the next forward
    computes with them: the slot map and hit flags are derived again, as the 16-bit layer does; stale ones would
    overlay the trained values at their old positions. Output, dX and the block gradients against float64."""
    _, device = backend
    _, layer = make("edge_corner", torch.float32, device)
    x = torch.randn(3, layer.in_features, device=device, requires_grad=True)
    layer(x).sum().backward()  # the old layout has been used once
    layer.zero_grad(set_to_none=True)
    moved = torch.tensor([[1, 1], [0, 0], [3, 5]], device=device)  # edge corner (4, 6) -> (3, 5) and (2, 3) -> (1, 1)
    if replace:
        layer.block_indices = moved
    else:
        with torch.no_grad():
            layer.block_indices.copy_(moved)
    x.grad = None
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(layer.block_map[1, 1].cpu(), torch.tensor(0, dtype=torch.int32))
    y_ref, dx_ref, db_ref = reference(layer, x, g)
    assert rel_err(y, y_ref) <= TOLERANCE[torch.float32]
    assert rel_err(x.grad, dx_ref) <= TOLERANCE[torch.float32]
    assert rel_err(layer.block_weight.grad, db_ref) <= TOLERANCE[torch.float32]
    # the weight it computed with has the trained values at the new positions
    w = layer.dequantized_weight(torch.float32)
    assert torch.equal(w[16:32, 16:32], layer.block_weight.detach()[0])


def test_bad_written_block_indices_are_refused_before_any_kernel_runs():
    _, layer = make("edge_corner", torch.float32, "cpu")
    x = torch.randn(2, layer.in_features)
    with torch.no_grad():
        layer.block_indices[0, 1] = 7  # in_features 100 has 7 block-columns of 16: 0..6
    with pytest.raises(ValueError, match="7"):
        layer(x)
    layer.block_indices = torch.zeros(3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="int64"):
        layer(x)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda p: "-".join(p))
def test_more_block_indices_than_blocks_are_refused(backend):
    """Two positions for one trained block: the map would send the kernels past block_weight's end (garbage on a
    GPU, NaN or a repeated block elsewhere); refused naming the shapes, as the 16-bit layer does."""
    _, device = backend
    _, layer = make("edge_corner", torch.float32, device)
    layer.block_indices = torch.tensor([[0, 0], [1, 1], [2, 2], [3, 3]], device=device)
    with pytest.raises(ValueError, match=r"block_weight must have shape \(4, 16, 16\), got \(3, 16, 16\)"):
        layer(torch.randn(2, layer.in_features, device=device))


def test_layers_built_and_run_under_inference_mode():
    """Inference tensors have no version counter: the layers remember the indices tensor alone then."""
    from smt_kernels import SparseBlockLinear

    with torch.inference_mode():
        lin = nn.Linear(64, 48)
        x = torch.randn(2, 64)
        nf4 = NF4SparseBlockLinear.from_nf4_linear(NF4Linear.from_linear(lin), [(0, 0), (2, 3)], 16)
        dense = SparseBlockLinear.from_linear(lin, [(0, 0), (2, 3)], 16)
        assert torch.equal(nf4(x), NF4Linear.from_linear(lin)(x))
        assert torch.allclose(dense(x), lin(x))
        nf4.block_indices = torch.tensor([[1, 1], [0, 2]])  # another (inference) tensor: seen
        nf4(x)
        assert nf4.block_map[1, 1].item() == 0 and nf4.block_map[0, 0].item() == -1


def test_a_layer_without_an_indices_stamp_derives_its_index_again():
    """A layer pickled before the stamp existed (no ``_indices_seen``, no ``program_hits``) rebuilds both."""
    _, layer = make("edge_corner", torch.float32, "cpu")
    want = layer(torch.ones(1, layer.in_features))
    del layer._indices_seen, layer._buffers["program_hits"]
    assert torch.equal(layer(torch.ones(1, layer.in_features)), want)
    assert layer.program_hits.dtype == torch.uint8


def test_second_derivatives_are_refused_with_blocks_and_exact_without():
    """The 4-bit layer with trainable blocks refuses create_graph=True (its second derivatives would be wrong); a
    frozen NF4Linear (QLoRA's base) keeps an exact Hessian-vector product over its input."""
    base, layer = make("edge_corner", torch.float32, "cpu")
    x = torch.randn(3, layer.in_features, requires_grad=True)
    with pytest.raises(RuntimeError, match="do not support second derivatives"):
        torch.autograd.grad(layer(x).pow(2).sum(), [x, layer.block_weight], create_graph=True)
    v = torch.randn_like(x)
    _, hv = torch.autograd.functional.hvp(lambda t: base(t).pow(2).sum(), x.detach(), v)
    w = base.dequantized_weight(torch.float64)
    _, hv64 = torch.autograd.functional.hvp(
        lambda t: (t @ w.T + base.bias.double()).pow(2).sum(), x.detach().double(), v.double()
    )
    assert rel_err(hv, hv64) < TOLERANCE[torch.float32]


def test_index_rebuilt_under_inference_mode_still_trains():
    _, layer = make("edge_corner", torch.float32, "cpu")
    with torch.no_grad():
        layer.block_indices.copy_(torch.tensor([[1, 1], [0, 2], [3, 5]]))
    with torch.inference_mode():
        layer(torch.randn(2, layer.in_features))
    assert not any(t.is_inference() for t in (layer.col_blocks, layer.col_slot, layer.block_map, layer.program_hits))
    layer(torch.randn(2, layer.in_features, requires_grad=True)).sum().backward()
    assert layer.block_weight.grad is not None


def test_loaded_codes_without_blocks_bring_their_own_blocks():
    """load_state_dict(strict=False) of a frozen NF4Linear's state (another 4-bit base): the blocks are read from
    its codes, so the layer computes what that base computes."""
    _, layer = make("edge_corner", torch.float32, "cpu")
    torch.manual_seed(7)
    new = NF4Linear.from_linear(nn.Linear(layer.in_features, layer.out_features))
    layer.load_state_dict(new.state_dict(), strict=False)
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), new(x), rtol=0, atol=0)


def test_a_refused_load_leaves_the_trained_blocks_alone():
    _, layer = make("edge_corner", torch.float32, "cpu")
    trained = layer.block_weight.detach().clone()
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict({"weight_packed": torch.zeros(3, 3, dtype=torch.uint8)}, strict=False)
    assert torch.equal(layer.block_weight, trained)


def test_converting_blocks_to_an_unsupported_dtype_is_refused():
    """.double() on a 4-bit layer with blocks: refused by name and the layer stays as it was (a float64 block file
    could never be loaded)."""
    _, layer = make("edge_corner", torch.float32, "cpu")
    with pytest.raises(TypeError, match="converting its block_weight to torch.float64 was refused"):
        layer.double()
    assert layer.block_weight.dtype == layer.bias.dtype == torch.float32
    layer(torch.randn(2, layer.in_features))
