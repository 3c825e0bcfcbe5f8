"""The registered operators and what they are for: opcheck, torch.compile without graph breaks (clipped edge
blocks included), CUDA-graph safety, indices that cannot go wrong after construction, up-to-date state_dicts,
strict index types, the launcher's version gate and device guard."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import HAS_CUDA
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import smt_kernels.custom_ops  # noqa: F401  (registers the operators)
from smt_kernels import SparseBlockLinear, patch
from smt_kernels.kernels import launcher
from smt_kernels.layout import BlockLayout

BACKENDS = ["torch", "triton"]
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _device(backend: str) -> torch.device:
    # Triton runs compiled on a GPU, interpreted on the CPU without one
    return torch.device("cuda" if backend == "triton" and HAS_CUDA else "cpu")


def _op_args(backend: str, dtype=torch.float32):
    # a 40×50 weight in 16-blocks: block-row 2 and block-column 3 are clipped
    torch.manual_seed(0)
    layout = BlockLayout.build([(2, 3), (0, 1), (1, 3)], 40, 50, 16)
    idx, cols, slots = (t.to(DEVICE) for t in (layout.indices, layout.col_blocks, layout.col_slot))
    w = torch.randn(40, 50, device=DEVICE, dtype=dtype)
    bw = torch.randn(3, 16, 16, device=DEVICE, dtype=dtype)
    x = torch.randn(7, 50, device=DEVICE, dtype=dtype)
    dy = torch.randn(7, 40, device=DEVICE, dtype=dtype)
    xc = torch.randn(7, cols.numel() * 16, device=DEVICE, dtype=dtype)
    return w, bw, idx, cols, slots, x, dy, xc


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    w, bw, idx, cols, slots, x, dy, xc = _op_args(backend)
    ops = torch.ops.smt_kernels
    cases = [
        (ops.scatter_blocks.default, (w.clone(), bw, idx, backend)),
        (ops.scatter_blocks_and_gather_columns.default, (w.clone(), bw, idx, x, cols, 16, True, backend)),
        (ops.scatter_blocks_and_gather_columns.default, (w.clone(), bw, idx, x, cols, 16, False, backend)),
        (ops.block_weight_grad.default, (dy, xc, idx, slots, 16, torch.float32, backend)),
        (ops.block_weight_grad_and_scatter.default, (dy, xc, w.clone(), bw, idx, slots, 16, torch.float32, backend)),
    ]
    if backend == "triton" and HAS_CUDA and hasattr(ops, "triton_block_weight_grad"):
        cases += [  # the triton_op twins Inductor traces
            (ops.triton_scatter_blocks.default, (w.clone(), bw, idx)),
            (ops.triton_scatter_blocks_and_gather_columns.default, (w.clone(), bw, idx, x, cols, 16, True)),
            (ops.triton_block_weight_grad.default, (dy, xc, idx, slots, 16, torch.float32)),
            (ops.triton_block_weight_grad_and_scatter.default, (dy, xc, w.clone(), bw, idx, slots, 16, torch.float32)),
        ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    # k/v out 40 and hidden 48 are not multiples of 16 or 32: clipped edge blocks
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=20,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def _patched_llama(block_size=32):
    model = _tiny_llama()
    sel = {n: [(0, 0), (1, 1)] for n, _ in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj"))}
    sel["model.layers.1.mlp.down_proj"] = [(1, 2)]  # 48×80: column block 2 clipped
    return patch(model, sel, block_size=block_size, verbose=False)


def _loss_and_grads(m, ids):
    loss = m(input_ids=ids, labels=ids).loss
    return loss.detach(), torch.autograd.grad(loss, [p for p in m.parameters() if p.requires_grad])


def test_compiled_checkpointed_patched_model_matches_eager():
    """Gradient checkpointing under torch.compile: eager runs the checkpointed layers as two autograd nodes
    (ops.split_layer), the compiled graph as one; losses and block gradients agree. (fullgraph=False: transformers'
    checkpointing hook calls requires_grad_() on the embeddings' output, which dynamo does not trace.)"""
    model = _patched_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # transformers would log a warning inside the compiled region
    model.train()
    ids = torch.randint(0, 96, (2, 12))
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager")
    for _ in range(2):
        loss, grads = _loss_and_grads(compiled, ids)
        torch.testing.assert_close(loss, ref_loss)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_patched_model_has_no_graph_break_with_clipped_blocks(backend, monkeypatch):
    monkeypatch.setenv("SMT_KERNELS_BACKEND", backend)
    device = _device(backend)
    model = _patched_llama().to(device)
    ids = torch.randint(0, 96, (2, 12)).to(device)
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True)  # a break raises
    tol = {"rtol": 1e-4, "atol": 1e-5} if device.type == "cuda" else {}  # other GEMM algorithms on the GPU
    for _ in range(2):  # the second call runs the compiled graph again (the weight already holds the blocks)
        loss, grads = _loss_and_grads(compiled, ids)
        torch.testing.assert_close(loss, ref_loss, **tol)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, **tol)


def test_inductor_layer_matches_eager_and_sees_optimizer_steps():
    """Inductor on the torch path (C++ on the CPU): loss and block gradients equal eager over optimizer steps."""
    torch.manual_seed(0)
    layer = SparseBlockLinear.from_linear(nn.Linear(50, 40), [(2, 3), (0, 1)], block_size=16)
    twin = copy.deepcopy(layer)
    x = torch.randn(6, 50)
    torch._dynamo.reset()
    compiled = torch.compile(twin, fullgraph=True)
    opt_a = torch.optim.SGD(layer.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(twin.parameters(), lr=0.1)
    for _ in range(3):
        for mod, opt in ((layer, opt_a), (compiled, opt_b)):
            opt.zero_grad()
            mod(x).pow(2).sum().backward()
            opt.step()
        torch.testing.assert_close(twin.block_weight, layer.block_weight)
    torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_written_indices_are_validated_before_any_kernel_runs(backend, monkeypatch):
    monkeypatch.setenv("SMT_KERNELS_BACKEND", backend)
    torch.manual_seed(0)
    device = _device(backend)
    layer = SparseBlockLinear.from_linear(nn.Linear(50, 40), [(2, 3), (0, 1)], block_size=16).to(device)
    weight = layer.weight.detach().clone()
    with torch.no_grad():
        layer.block_indices[0, 0] = -1
    with pytest.raises(ValueError, match=r"block 0 has a negative index \(-1, 3\)"):
        layer(torch.randn(3, 50, device=device))
    assert torch.equal(layer.weight, weight)
    with torch.no_grad():
        layer.block_indices[0, 0] = 9
    with pytest.raises(ValueError, match=r"out of range"):
        layer(torch.randn(3, 50, device=device))
    # other valid blocks, replaced tensor: index rebuilt
    layer.block_indices = torch.tensor([[0, 1], [0, 0]], device=device)
    x = torch.randn(5, 50, dtype=torch.float64).float()
    y = layer(x.to(device))
    y.pow(2).sum().backward()
    # float64 reference on the CPU; the layer stays on its device (forced Triton needs CUDA tensors there)
    w, x64, bias = weight.cpu().double(), x.double(), layer.bias.detach().cpu().double()
    bw = layer.block_weight.detach().cpu().double()
    w[0:16, 16:32], w[0:16, 0:16] = bw[0], bw[1]
    tol = {"rtol": 1e-3, "atol": 1e-3} if device.type == "cuda" else {"rtol": 1e-5, "atol": 1e-5}  # TF32 GEMMs
    torch.testing.assert_close(y.cpu().double(), x64 @ w.t() + bias, **tol)
    dy = 2 * (x64 @ w.t() + bias)
    ref = torch.stack([dy[:, 0:16].t() @ x64[:, 16:32], dy[:, 0:16].t() @ x64[:, 0:16]])
    torch.testing.assert_close(
        layer.block_weight.grad.cpu().double(), ref, rtol=max(tol["rtol"], 1e-4), atol=max(tol["atol"], 1e-4)
    )
    assert layer.col_blocks.tolist() == [0, 1] and layer.layout.to_list() == [(0, 1), (0, 0)]


def test_state_dict_holds_the_current_blocks_right_after_a_step():
    torch.manual_seed(0)
    layer = SparseBlockLinear.from_linear(nn.Linear(50, 40), [(2, 3)], block_size=16)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer(torch.randn(4, 50)).sum().backward()
    opt.step()  # the weight still holds the old block values here
    state = layer.state_dict()
    plain = nn.Linear(50, 40)
    plain.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
    x = torch.randn(3, 50)
    torch.testing.assert_close(plain(x), layer(x))


@pytest.mark.parametrize(
    "blocks, match",
    [([(0.5, 1.9)], "0.5"), (["12"], "'12'"), ([(True, 0)], "True"), ([(0, "1")], "'1'"), ("01", "str")],
)
def test_indices_are_never_coerced(blocks, match):
    with pytest.raises(TypeError, match=match):
        BlockLayout.build(blocks, 40, 50, 16)
    assert BlockLayout.build([(torch.tensor(1), 2)], 40, 50, 16).to_list() == [(1, 2)]


def test_direct_launch_only_on_tested_triton(monkeypatch):
    monkeypatch.delenv(launcher.DIRECT_LAUNCH_ENV, raising=False)
    monkeypatch.setattr(launcher, "_INTERPRETING", False)
    assert launcher.direct_launch_supported("3.6.0")
    assert not launcher.direct_launch_supported("3.5.1")
    assert not launcher.direct_launch_supported("4.0.0")
    monkeypatch.setenv(launcher.DIRECT_LAUNCH_ENV, "0")
    assert not launcher.direct_launch_supported("3.6.0")


def test_untested_triton_falls_back_to_the_jit_launch(monkeypatch):
    """Outside the tested versions the launcher is the plain ``kernel[grid](...)`` call (here with a stand-in)."""
    calls = []

    class StandIn:
        def __getitem__(self, grid):
            return lambda *args, **meta: calls.append((grid, args, meta))

    monkeypatch.setattr(launcher.triton, "__version__", "9.9.0")
    monkeypatch.setattr(launcher, "_INTERPRETING", False)
    launch = launcher.DirectLauncher(StandIn())
    assert not launch.enabled
    x = torch.zeros(4)
    launch((3,), x, 5, BLOCK=16)
    assert calls == [((3,), (x, 5), {"BLOCK": 16})]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_on_the_second_gpu_while_the_first_is_current(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(300, 200).to(dtype)
    ref = SparseBlockLinear.from_linear(lin, [(0, 1), (0, 0)], block_size=128).cuda(0)
    layer = SparseBlockLinear.from_linear(lin, [(0, 1), (0, 0)], block_size=128).cuda(1)
    x = torch.randn(64, 300, dtype=dtype)
    torch.cuda.set_device(0)
    y0 = ref(x.cuda(0))
    y0.float().pow(2).sum().backward()
    y1 = layer(x.cuda(1))
    y1.float().pow(2).sum().backward()
    assert torch.cuda.current_device() == 0
    torch.testing.assert_close(y1.cpu(), y0.cpu())
    torch.testing.assert_close(layer.block_weight.grad.cpu(), ref.block_weight.grad.cpu())


@pytest.mark.skipif(not HAS_CUDA, reason="compiled Triton kernels and CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_patched_model_on_cuda_matches_eager_across_steps(mode):
    model = _patched_llama().cuda()
    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(twin, mode=None if mode == "default" else mode, fullgraph=True)
    opt_a = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    opt_b = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=0.5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        ids = torch.randint(0, 96, (2, 12), generator=gen).cuda()
        losses = []
        for mod, opt in ((model, opt_a), (compiled, opt_b)):
            if mod is compiled:
                torch.compiler.cudagraph_mark_step_begin()
            loss = mod(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach().clone())
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_a_validated_layout_is_taken_as_is_and_must_fit():
    layout = BlockLayout.build([(2, 3), (0, 1)], 40, 50, 16)
    layer = SparseBlockLinear.from_linear(nn.Linear(50, 40), layout, block_size=16)
    assert layer.layout is layout
    with pytest.raises(ValueError, match=r"layout is for a 40×50 weight with block_size 16, not 40×60"):
        SparseBlockLinear.from_linear(nn.Linear(60, 40), layout, block_size=16)


def test_a_replaced_block_weight_of_another_shape_is_refused():
    layer = SparseBlockLinear.from_linear(nn.Linear(50, 40), [(2, 3), (0, 1)], block_size=16)
    for shape in [(2, 16, 8), (2, 8, 16), (1, 16, 16), (2, 16, 16, 1)]:
        layer.block_weight = nn.Parameter(torch.zeros(shape))
        with pytest.raises(ValueError, match=r"block_weight must have shape \(2, 16, 16\)"):
            layer(torch.randn(3, 50))
