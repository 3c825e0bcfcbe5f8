"""The NF4 layers under torch.compile: the registered operators pass opcheck, a 4-bit patched Llama traces with
fullgraph=True and equals eager (loss and block gradients), the backward dequantizes again instead of keeping the
forward's weight, compiled runs leave the shared buffer alone, and Inductor on one layer equals eager."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import HAS_CUDA
from tiny_models import SELECTION, B, make_batch, tiny
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition

import smt_kernels
from smt_kernels.quant import buffers
from smt_kernels.quant.dequant import block_slot_map, dequantize_overlay_torch, program_hit_flags
from smt_kernels.quant.module import NF4Linear, NF4SparseBlockLinear
from smt_kernels.quant.nf4 import quantize_nf4

BACKENDS = ["torch", "triton"]  # triton: interpreted on the CPU (the custom_op versions), compiled on a GPU
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _device(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "triton" and HAS_CUDA else "cpu")


def _nf4_args(q, bw, idx, bmap, b, dtype, backward=False, hits=None):
    t = q.tensors()
    names = ("absmax", "absmax_q", "absmax_scale", "absmax_offset", "absmax_code")
    return (q.packed, *(t.get(n) for n in names), *q.shape, bw, idx, bmap, hits, b, dtype, backward)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    torch.manual_seed(0)
    device = _device(backend)
    # 40×50 in 16-blocks: block-row 2 and block-column 3 are clipped; 2000 values, not a multiple of 64·256
    idx = torch.tensor([[2, 3], [0, 1]], device=device)
    bmap = block_slot_map(idx, (40, 50), 16)
    hits = program_hit_flags(bmap, (40, 50), 16)
    bw = torch.randn(2, 16, 16, device=device)
    x = torch.randn(7, 50, device=device)
    cols = torch.tensor([1, 3], device=device)
    ops = torch.ops.smt_kernels
    cases = []
    for double_quant in (True, False):
        q = quantize_nf4(torch.randn(40, 50, device=device), double_quant=double_quant)
        cases += [
            (ops.nf4_dequantize_overlay.default, (*_nf4_args(q, bw, idx, bmap, 16, torch.float32), backend)),
            (ops.nf4_dequantize_overlay.default, (*_nf4_args(q, None, None, None, 0, torch.float16, True), backend)),
            (ops.nf4_dequantize_overlay.default, (*_nf4_args(q, bw, idx, bmap, 16, torch.float32, hits=hits), backend)),
        ]
    cases.append((ops.nf4_gather_column_blocks.default, (x, cols, 16, backend)))
    if backend == "triton" and HAS_CUDA and hasattr(ops, "triton_nf4_dequantize_overlay"):
        from smt_kernels.kernels.nf4_dequant import nf4_code

        cases += [  # the triton_op twins Inductor traces
            (
                ops.triton_nf4_dequantize_overlay.default,
                (*_nf4_args(q, bw, idx, bmap, 16, torch.bfloat16), nf4_code(q.device)),
            ),
            (
                ops.triton_nf4_dequantize_overlay.default,
                (*_nf4_args(q, bw, idx, bmap, 16, torch.bfloat16, hits=hits), nf4_code(q.device)),
            ),
            (ops.triton_nf4_gather_column_blocks.default, (x, cols, 16)),
        ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    # and the operator computes what the torch path computes
    ref = dequantize_overlay_torch(q, torch.empty(40, 50, device=device), bw, idx)
    for flags in (None, hits):
        out = ops.nf4_dequantize_overlay(*_nf4_args(q, bw, idx, bmap, 16, torch.float32, hits=flags), backend)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("double_quant", [True, False])
def test_triton_twins_compute_what_the_torch_path_computes(double_quant):
    """The ``triton_op`` bodies called eagerly (``wrap_triton`` then runs the kernel: interpreted on the CPU,
    compiled on a GPU): the arguments reach the kernels in the right order. Inductor's tracing of them needs CUDA."""
    from smt_kernels.kernels.nf4_dequant import nf4_code

    torch.manual_seed(0)
    idx = torch.tensor([[2, 3], [0, 1]], device=DEVICE)
    bmap = block_slot_map(idx, (40, 50), 16)
    hits = program_hit_flags(bmap, (40, 50), 16)
    bw = torch.randn(2, 16, 16, device=DEVICE)
    q = quantize_nf4(torch.randn(40, 50, device=DEVICE), double_quant=double_quant)
    ops = torch.ops.smt_kernels
    cases = [((bw, idx, bmap, 16), None, (bw, idx)), ((None, None, None, 0), None, (None, None))]
    # with the hit flags; with them cleared, the kernel skips the blocks: the flags reach it
    cases += [((bw, idx, bmap, 16), hits, (bw, idx)), ((bw, idx, bmap, 16), torch.zeros_like(hits), (None, None))]
    for blocks, flags, torch_blocks in cases:
        args = _nf4_args(q, *blocks, torch.float32, hits=flags)
        out = ops.triton_nf4_dequantize_overlay(*args, nf4_code(q.device))
        ref = dequantize_overlay_torch(q, torch.empty(40, 50, device=DEVICE), *torch_blocks)
        if HAS_CUDA:  # compiled without enable_fp_fusion=False: the absmax may be one FMA (an fp32 rounding)
            torch.testing.assert_close(out, ref, rtol=3e-7, atol=0)
        else:
            assert torch.equal(out, ref)
    x = torch.randn(7, 50, device=DEVICE)
    cols = torch.tensor([1, 3], device=DEVICE)
    expected = torch.cat([x[:, 16:32], x[:, 48:50], x.new_zeros(7, 14)], dim=1)
    assert torch.equal(ops.triton_nf4_gather_column_blocks(x, cols, 16), expected)


def _patched_nf4_llama(device):
    model = smt_kernels.quantize_base(tiny().to(device), "nf4", compute_dtype=torch.float32)
    model = smt_kernels.patch(model, SELECTION, block_size=B)
    with torch.no_grad():  # "trained" blocks, away from the base values
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def _loss_and_grads(model, batch):
    loss = model(**batch).loss
    return loss.detach(), torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_nf4_model_has_no_graph_break_and_matches_eager(backend, monkeypatch):
    """quantize_base + patch: NF4Linear (frozen) and NF4SparseBlockLinear (clipped edge blocks) in one graph."""
    monkeypatch.setenv("SMT_KERNELS_BACKEND", backend)
    monkeypatch.setattr(buffers, "_POOLED", True)  # even with the pool on, compiled code never allocates it
    device = _device(backend)
    model = _patched_nf4_llama(device)
    kinds = {type(m) for m in model.modules()}
    assert NF4Linear in kinds and NF4SparseBlockLinear in kinds
    batch = {k: v.to(device) for k, v in make_batch().items()}
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True)  # a break raises
    buffers.release_buffers()
    tol = {"rtol": 1e-4, "atol": 1e-5} if device.type == "cuda" else {}
    for _ in range(2):  # the second call runs the compiled graph again
        loss, grads = _loss_and_grads(compiled, batch)
        torch.testing.assert_close(loss, ref_loss, **tol)
        assert len(grads) == len(ref_grads) == len(SELECTION)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, **tol)
    # compiled, each dequantization returns a new tensor: the pooled (eager) buffer is never allocated
    assert buffers.buffer_bytes() == 0
    model(**batch)
    assert buffers.buffer_bytes() > 0  # eager still uses it
    buffers.release_buffers()


def test_compiled_nf4_model_under_bf16_autocast_matches_eager(monkeypatch):
    monkeypatch.setenv("SMT_KERNELS_BACKEND", "torch")
    model = _patched_nf4_llama("cpu")
    batch = make_batch()

    def run(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(**batch).loss
        return loss.detach(), torch.autograd.grad(loss, [p for p in m.parameters() if p.requires_grad])

    ref_loss, ref_grads = run(model)
    torch._dynamo.reset()
    loss, grads = run(torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True))
    # bf16 products: the traced graph may order the casts of the surrounding (HF) code differently
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == r.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2 * r.abs().max().item())


def test_backward_dequantizes_again_instead_of_saving_the_weight():
    """The compiler must not merge the forward's and the backward's dequantization (common-subexpression
    elimination) and keep every layer's dense weight alive from forward to backward."""
    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm)

        return compiler

    torch.manual_seed(0)
    sparse = NF4SparseBlockLinear.from_nf4_linear(NF4Linear.from_linear(nn.Linear(50, 40)), [(2, 3), (0, 1)], 16)
    layers = nn.Sequential(sparse, nn.Tanh(), NF4Linear.from_linear(nn.Linear(40, 40)))
    x = torch.randn(6, 50, requires_grad=True)
    torch._dynamo.reset()
    # Inductor's partitioner (it runs the elimination on the joint graph), with graphs kept instead of compiled
    backend = aot_autograd(
        fw_compiler=keep("fw"), bw_compiler=keep("bw"), partition_fn=min_cut_rematerialization_partition
    )
    compiled = torch.compile(layers, backend=backend, fullgraph=True)
    compiled(x).sum().backward()

    def dequantizations(gm):
        return [n for n in gm.graph.nodes if n.target is torch.ops.smt_kernels.nf4_dequantize_overlay.default]

    assert len(dequantizations(graphs["fw"])) == 2
    assert len(dequantizations(graphs["bw"])) == 2  # dX of both layers
    # what the forward hands to the backward: no dequantized weight among it
    saved = [n.meta["val"] for n in graphs["fw"].graph.output_node().args[0][1:] if isinstance(n, torch.fx.Node)]
    assert saved and not [t for t in saved if isinstance(t, torch.Tensor) and t.shape in ((40, 50), (40, 40))]


def test_inductor_layer_matches_eager_over_optimizer_steps():
    """Inductor on the torch path (C++ on the CPU): a sparse-block layer behind a frozen NF4 layer; outputs,
    block values after SGD steps and the input gradient equal eager."""
    torch.manual_seed(0)
    frozen = NF4Linear.from_linear(nn.Linear(24, 50))
    sparse = NF4SparseBlockLinear.from_nf4_linear(NF4Linear.from_linear(nn.Linear(50, 40)), [(2, 3), (0, 1)], 16)
    model = nn.Sequential(frozen, sparse)
    twin = copy.deepcopy(model)
    x = torch.randn(6, 24)
    torch._dynamo.reset()
    compiled = torch.compile(twin, fullgraph=True)
    opt_a = torch.optim.SGD([sparse.block_weight], lr=0.1)
    opt_b = torch.optim.SGD([twin[1].block_weight], lr=0.1)
    for _ in range(3):
        for mod, opt in ((model, opt_a), (compiled, opt_b)):
            opt.zero_grad()
            mod(x).pow(2).sum().backward()
            opt.step()
        torch.testing.assert_close(twin[1].block_weight, sparse.block_weight)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(compiled(xb), model(xa))
    model(xa).sum().backward()
    compiled(xb).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)
