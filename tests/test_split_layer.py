"""The layer as two autograd nodes under saved-tensor hooks (``smt_kernels.ops.split_layer``): same results as the
one-node layer and the float64 reference, and a checkpoint's recomputation no longer re-runs the dense GEMM (and,
on a 4-bit base, the dequantization) of a layer that is the last op of the checkpointed function."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS
from test_module import LAYOUT_CASES, TOLERANCE, check_against_reference, make_layer, random_blocks
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from smt_kernels import ops
from smt_kernels.kernels import torch_blocks
from smt_kernels.quant.module import NF4Linear, NF4SparseBlockLinear

GEMMS = ("mm", "addmm")


@pytest.fixture(params=[False, True], ids=["one_node", "two_nodes"])
def split(request, monkeypatch):
    """Force the layer's node count: two nodes as under checkpointing, or one even where tensors are hooked."""
    monkeypatch.setattr(ops, "saved_tensors_are_hooked", lambda: request.param)
    return request.param


class CountGemms(TorchDispatchMode):
    """Counts dense GEMMs (aten mm/addmm); the torch path's block gradients are bmm and not counted."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in GEMMS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_hooks_are_detected():
    assert not ops.saved_tensors_are_hooked()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert ops.saved_tensors_are_hooked()
    seen = []
    checkpoint(
        lambda x: seen.append(ops.saved_tensors_are_hooked()) or x * 2,
        torch.ones(2, requires_grad=True),
        use_reentrant=False,
    )
    assert seen == [True]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda p: "-".join(p))
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("case", ["edge_corner_block", "random_many", "b32_ragged", "whole_block_col"])
def test_two_nodes_match_dense_reference(backend, dtype, case, poison_empty, monkeypatch):
    monkeypatch.setattr(ops, "saved_tensors_are_hooked", lambda: True)
    _, device = backend
    out_f, in_f, b, blocks = LAYOUT_CASES[case]
    if isinstance(blocks, int):
        blocks = random_blocks(-(-out_f // b), -(-in_f // b), blocks, torch.Generator().manual_seed(len(case)))
    lin, layer = make_layer(out_f, in_f, blocks, b, dtype, device)
    assert ops.split_layer(layer.block_weight)
    check_against_reference(layer, lin, blocks, torch.randn(3, 29, in_f).to(device=device, dtype=dtype), dtype)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda p: "-".join(p))
def test_two_nodes_under_autocast_and_frozen_blocks(backend, monkeypatch):
    """fp32 layer under bf16 autocast: output and block gradients equal the one-node layer's, and the two-node
    layer holds no bf16 copy of the weight from forward to backward; with the blocks frozen the layer stays one
    node (no block gradient to relay)."""
    _, device = backend
    blocks = [(0, 1), (2, 0), (2, 3)]
    lin, layer = make_layer(48, 64, blocks, 16, torch.float32, device)
    x = torch.randn(10, 64, device=device)
    results = []
    for hooked in (False, True):
        monkeypatch.setattr(ops, "saved_tensors_are_hooked", lambda hooked=hooked: hooked)
        layer.block_weight.grad = None
        xr = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = layer(xr)
        assert y.dtype == torch.bfloat16
        if hooked:  # the GEMM node keeps the fp32 weight, not a bf16 copy, until its backward
            assert y.grad_fn.weight is layer.weight
        y.float().pow(2).sum().backward()
        results.append((y.detach(), xr.grad, layer.block_weight.grad))
    (y2, dx2, db2), (y1, dx1, db1) = results[1], results[0]
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    torch.testing.assert_close(db2, db1, rtol=0, atol=0)
    # dX: the one-node layer re-writes the fp32 blocks into its bf16 copy of the weight in a kernel (the Triton
    # interpreter rounds that conversion its own way), the two-node layer casts the weight again with torch
    assert ((dx2 - dx1).abs().max() / dx1.abs().max()).item() <= TOLERANCE[torch.bfloat16]
    layer.block_weight.requires_grad_(False)
    assert not ops.split_layer(layer.block_weight)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda p: "-".join(p))
def test_two_nodes_rewrite_blocks_into_a_rematerialised_weight(backend, monkeypatch):
    """As the one-node layer: the input gradient uses the blocks even if the weight was re-gathered (FSDP2)."""
    monkeypatch.setattr(ops, "saved_tensors_are_hooked", lambda: True)
    _, device = backend
    blocks = [(0, 1), (2, 2)]
    lin, layer = make_layer(40, 50, blocks, 16, torch.float32, device)
    with torch.no_grad():
        layer.block_weight.mul_(3.0)
    x = torch.randn(11, 50, device=device, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        layer.weight.copy_(lin.weight)
    g = torch.randn_like(y)
    y.backward(g)
    w = lin.weight.detach().clone()
    torch_blocks.scatter_blocks(w, layer.block_weight.detach(), layer.block_indices)
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda p: "-".join(p))
def test_two_nodes_save_only_the_gathered_columns(backend, split):
    _, device = backend
    lin, layer = make_layer(48, 100, [(0, 1), (2, 1), (1, 4)], 16, torch.float32, device)
    x = torch.randn(37, 100, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    own = {p.data_ptr() for p in layer.parameters()} | {b.data_ptr() for b in layer.buffers()}
    assert [tuple(t.shape) for t in saved if t.data_ptr() not in own] == [(37, 2 * 16)]
    y.sum().backward()


def _last_layer_net(last: nn.Module, device) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(3)
    first = nn.Linear(64, last.in_features).to(device).requires_grad_(False)
    return first, last


def _backward_gemms(first: nn.Module, last: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Dense GEMMs run by the backward of checkpoint(last(relu(first(x)))), and the block gradient it gives."""
    loss = checkpoint(lambda t: last(torch.relu(first(t))), x, use_reentrant=False).pow(2).sum()
    with CountGemms() as counter:
        loss.backward()
    grad = getattr(last, "block_weight", None)
    return counter.count, None if grad is None else grad.grad


@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda p: "-".join(p))
@pytest.mark.parametrize("base", ["16bit", "nf4"])
def test_checkpoint_recomputes_no_gemm_of_the_last_layer(backend, base, monkeypatch):
    """A checkpointed function ending in an SMT layer: the backward runs as many dense GEMMs as the same function
    ending in a frozen layer (the first layer's recomputation and the two input gradients), where the one-node
    layer re-ran its forward GEMM too; the block gradient is the same either way."""
    _, device = backend
    lin = nn.Linear(80, 70).to(device)
    blocks = [(1, 2), (4, 4)]
    if base == "nf4":
        frozen = NF4Linear.from_linear(lin)
        smt = NF4SparseBlockLinear.from_nf4_linear(NF4Linear.from_linear(lin), blocks, 16)
    else:
        frozen = nn.Linear(80, 70).to(device).requires_grad_(False)
        smt = make_layer(70, 80, blocks, 16, torch.float32, device)[1]
    x = torch.randn(2, 9, 64, device=device, requires_grad=True)
    floor, _ = _backward_gemms(*_last_layer_net(frozen, device), x)
    two_nodes, grad_split = _backward_gemms(*_last_layer_net(smt, device), x)
    grad_split = grad_split.clone()
    smt.block_weight.grad = None
    monkeypatch.setattr(ops, "saved_tensors_are_hooked", lambda: False)
    one_node, grad_single = _backward_gemms(*_last_layer_net(smt, device), x)
    assert floor == 3
    assert two_nodes == floor
    assert one_node == floor + 1
    torch.testing.assert_close(grad_split, grad_single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True, ids=lambda p: "-".join(p))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_dtype", [None, torch.float32], ids=["blocks_compute_dtype", "blocks_fp32"])
def test_nf4_two_nodes_match_one_node(backend, dtype, block_dtype, split):
    """The 4-bit layer under saved-tensor hooks (two nodes, or one when forced) against the float64 reference,
    with blocks in the compute dtype or in fp32 over a bf16 computation."""
    _, device = backend
    torch.manual_seed(0)
    layer = NF4SparseBlockLinear.from_nf4_linear(
        NF4Linear.from_linear(nn.Linear(100, 70).to(device=device, dtype=dtype)),
        [(4, 6), (0, 0), (2, 3)],
        16,
        block_dtype=block_dtype,
    )
    with torch.no_grad():
        layer.block_weight.copy_(torch.randn(layer.block_weight.shape) * 0.1)
    x = torch.randn(3, 5, 100, device=device).to(dtype).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        y = layer(x)
    g = torch.randn(y.shape, device=device).to(dtype)
    y.backward(g)
    w = layer.dequantized_weight(torch.float64).requires_grad_()
    xr = x.detach().double().requires_grad_()
    y_ref = nn.functional.linear(xr, w, layer.bias.double())
    y_ref.backward(g.double())
    tol = TOLERANCE[dtype]
    if block_dtype is not None:
        assert layer.block_weight.grad.dtype == block_dtype
    for got, want in (
        (y, y_ref),
        (x.grad, xr.grad),
        (layer.block_weight.grad, torch_blocks.extract_blocks(w.grad, layer.block_indices, 16)),
    ):
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert err <= tol, err


def test_checkpointed_llama_runs_the_frozen_models_gemms():
    """A whole patched Llama (blocks in all seven projections of every layer) under Hugging Face's non-reentrant
    checkpointing runs exactly the dense GEMMs of the same model frozen: none is recomputed for the blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from smt_kernels import patch

    def llama(patched: bool):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, use_cache=False)  # fmt: skip
        model = LlamaForCausalLM(cfg).requires_grad_(False)
        if patched:
            sel = {n: [(0, 0)] for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
            model = patch(model, sel, block_size=32, verbose=False)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # both models back-propagate into the embeddings' output
        return model.train()

    ids = torch.randint(0, 64, (2, 8))
    counts = []
    for patched in (False, True):
        loss = llama(patched)(input_ids=ids, labels=ids).loss
        with CountGemms() as counter:
            loss.backward()
        counts.append(counter.count)
    assert counts[1] == counts[0] > 0
