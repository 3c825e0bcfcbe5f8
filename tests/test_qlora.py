"""QLoRA inside ``smt-kernels finetune``: ``--method lora --quantize nf4`` (PEFT LoRA on the frozen ``NF4Linear``
base, ``smt_kernels.quant.lora``), on a float64 reference and end to end on the tiny saved Llama (CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import TINY_FOR, run_interrupted
from test_finetune_nf4 import _eval_batches, _fresh, check_merged_output
from torch import nn

from smt_kernels.cli import main
from smt_kernels.finetune.evaluate import eval_loss
from smt_kernels.quant.lora import NF4LoraLinear, get_nf4_peft_model, load_nf4_adapter, nf4_lora_config
from smt_kernels.quant.module import NF4Linear

CPU = torch.device("cpu")
LORA = TINY_FOR["lora"]


@pytest.fixture(autouse=True)
def _tiny_models_on_one_thread(one_thread):
    """Every test here runs on one intra-op thread (conftest's ``one_thread``)."""


class _Block(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.q_proj = NF4Linear.from_linear(linear)
        # a model has parameters besides its 4-bit layers (embeddings, norms); PEFT reads its device from one
        self.unused = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x):
        return self.q_proj(x)


@pytest.mark.parametrize("bias", [False, True])
def test_layer_matches_float64_reference(bias):
    """y = dequantized W·x + B·A·x·scaling (+ bias), and its gradients, against float64; merge and unmerge."""
    torch.manual_seed(0)
    n, k, r = 40, 72, 3  # ragged: 40·72 is not a multiple of the 64-weight NF4 block's row
    model = _Block(nn.Linear(k, n, bias=bias))
    peft = get_nf4_peft_model(model, nf4_lora_config(r=r, lora_alpha=2 * r, target_modules=["q_proj"]))
    layer = peft.base_model.model.q_proj
    assert isinstance(layer, NF4LoraLinear) and isinstance(layer.base_layer, NF4Linear)
    assert not hasattr(layer.base_layer, "qweight")  # the device hint is gone after wrapping
    with torch.no_grad():  # PEFT starts B at zero; a nonzero B makes the adapter path count
        layer.lora_B["default"].weight.normal_(0, 0.1)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.dtype == b.dtype == torch.float32 and a.requires_grad and b.requires_grad
    assert [n for n, p in peft.named_parameters() if p.requires_grad] == [
        "base_model.model.q_proj.lora_A.default.weight",
        "base_model.model.q_proj.lora_B.default.weight",
    ]

    x = torch.randn(2, 5, k, requires_grad=True)
    y = peft(x)
    g = torch.randn_like(y)
    y.backward(g)

    w = layer.base_layer.dequantized_weight(torch.float64)
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    y64 = x64 @ w.T + (x64 @ a64.T) @ b64.T * 2.0  # scaling = alpha / r = 2
    if bias:
        y64 = y64 + layer.base_layer.bias.double()
    y64.backward(g.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for got, want in ((x.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)

    nf4 = layer.base_layer
    with torch.no_grad():
        layer.merge()
        assert type(layer.base_layer) is nn.Linear and layer.base_layer.weight.dtype == torch.float32
        torch.testing.assert_close(peft(x).double(), y64, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        assert layer.base_layer is nf4  # the 4-bit layer itself, not a requantization
        torch.testing.assert_close(peft(x), y)


def _run(tiny_model_dir, out, *extra, quantize=True):
    argv = ["--model", str(tiny_model_dir), "--method", "lora", *LORA, "--steps", "8", "--lr", "1e-2", "--ratio", "0.1"]
    argv += ["--quantize", "nf4"] if quantize else []
    # on the CPU also where a GPU exists: the tests compare with CPU evaluations to fp32 rounding
    argv += ["--output-dir", str(out), "--output-json", str(out / "r.json"), "--device", "cpu", *extra]
    return argv, main(["finetune", *argv])


def test_qlora_trains_and_outputs_reproduce(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    argv, code = _run(tiny_model_dir, out, "--save-merged")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "4-bit NF4 base" in captured.out
    r = json.loads((out / "r.json").read_text())
    assert r["method"] == "lora" and r["quantize"] == "nf4"
    # the random model's held-out loss falls by ~0.23 in 8 steps (4.61 -> 4.38, as on the 16-bit base)
    assert r["eval_loss_after"] < r["eval_loss_before"] - 0.1, (r["eval_loss_before"], r["eval_loss_after"])

    # equal parameters: the same rank and trainable count as LoRA on the 16-bit base with the same options
    _, code = _run(tiny_model_dir, tmp_path / "b16", quantize=False)
    assert code == 0, capsys.readouterr().err
    r16 = json.loads((tmp_path / "b16" / "r.json").read_text())
    assert (r["lora_rank"], r["trainable_params"]) == (r16["lora_rank"], r16["trainable_params"])

    # the adapter loads back onto a freshly quantized base (quantization is deterministic) with the trained loss
    batches = _eval_batches(tiny_model_dir, argv)
    fresh = load_nf4_adapter(_fresh(tiny_model_dir), out / "lora_adapter")
    assert sum(isinstance(m, NF4LoraLinear) for m in fresh.modules()) == 14  # 7 targets × 2 layers
    assert eval_loss(fresh, batches, CPU) == pytest.approx(r["eval_loss_after"], rel=1e-6)

    # --save-merged: a plain fp32 HF model (dequantized base + B·A·scaling)
    check_merged_output(out, fresh, batches, r["eval_loss_after"], _fresh(tiny_model_dir))


def test_qlora_resume_equals_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """4 steps in one run == 2 steps, a crash, and 2 more after --resume (the base is quantized again)."""
    from safetensors.torch import load_file

    args = ["finetune", "--model", str(tiny_model_dir), "--method", "lora", *LORA, "--steps", "4", "--lr", "1e-2",
            "--quantize", "nf4"]  # fmt: skip
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*args, "--output-dir", str(a), "--output-json", str(a / "r.json")]) == 0, capsys.readouterr().err
    assert run_interrupted(args, b, monkeypatch) == 130
    resumed = [*args, "--output-dir", str(b), "--checkpoint-every", "2", "--resume", str(b / "checkpoint")]
    assert main([*resumed, "--output-json", str(b / "r.json")]) == 0, capsys.readouterr().err
    ra, rb = json.loads((a / "r.json").read_text()), json.loads((b / "r.json").read_text())
    assert rb["resumed_from_step"] == 2
    assert ra["loss_curve"] == rb["loss_curve"] and ra["eval_loss_curve"] == rb["eval_loss_curve"]
    wa = load_file(a / "lora_adapter" / "adapter_model.safetensors")
    wb = load_file(b / "lora_adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_qlora_two_ranks_equal_one_process(tiny_model_dir, tmp_path, capsys):
    """Under torchrun (2 forked gloo ranks): the same losses and adapter as one process."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    from test_cli_torchrun import one_process_and_two_ranks

    one_process_and_two_ranks(tiny_model_dir, "lora", tmp_path, capsys, "--quantize", "nf4")


def test_merged_layers_of_a_bf16_model_are_bf16():
    """A bf16 model: merge_adapter and merge_and_unload give bf16 nn.Linear layers (the fp32 sum of base and delta
    rounded once) that take bf16 inputs outside autocast, and compute what the adapted layer does."""
    torch.manual_seed(0)
    n, k, r = 40, 72, 3
    model = _Block(nn.Linear(k, n, bias=True, dtype=torch.bfloat16))
    peft = get_nf4_peft_model(model, nf4_lora_config(r=r, lora_alpha=2 * r, target_modules=["q_proj"]))
    layer = peft.base_model.model.q_proj
    assert layer.base_layer.compute_dtype == torch.bfloat16
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    w = layer.base_layer.dequantized_weight(torch.float32) + b @ a * 2.0
    x = torch.randn(2, 5, k, dtype=torch.bfloat16)
    with torch.no_grad():
        adapted = peft(x)
        peft.merge_adapter()
        assert layer.base_layer.weight.dtype == torch.bfloat16
        assert torch.equal(layer.base_layer.weight, w.to(torch.bfloat16))  # one rounding of the fp32 sum
        merged = peft(x)
        peft.unmerge_adapter()
        plain = peft.merge_and_unload()
        unloaded = plain(x)
    assert type(plain.q_proj) is nn.Linear and merged.dtype == unloaded.dtype == adapted.dtype == torch.bfloat16
    torch.testing.assert_close(merged, unloaded)
    torch.testing.assert_close(merged.float(), adapted.float(), rtol=2e-2, atol=2e-2)
