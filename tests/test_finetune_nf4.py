"""``smt-kernels finetune --quantize nf4``: SMT on a 4-bit NF4 base end to end on the tiny saved Llama (CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import TINY, TINY_FOR, run_interrupted

import smt_kernels
from smt_kernels.cli import main
from smt_kernels.finetune import FinetuneConfig
from smt_kernels.finetune.data import TokenizedTask, build_task
from smt_kernels.finetune.evaluate import eval_loss
from smt_kernels.quant.module import NF4Linear, NF4SparseBlockLinear
from smt_kernels.selection_summary import summarize_selection

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _tiny_models_on_one_thread(one_thread):
    """Every test here runs on one intra-op thread (conftest's ``one_thread``)."""


def _fresh(model_dir, quantize: bool = True):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return smt_kernels.quantize_base(model, "nf4") if quantize else model


def _eval_batches(model_dir, argv):
    """The held-out batches the command evaluated on, rebuilt from its options."""
    from transformers import AutoTokenizer

    from smt_kernels.cli import build_parser

    args = build_parser().parse_args(["finetune", *argv])
    cfg = FinetuneConfig(**{k: v for k, v in vars(args).items() if k not in ("command", "func")})
    tok = AutoTokenizer.from_pretrained(model_dir)
    return TokenizedTask.build(build_task(cfg), tok, cfg).eval_batches


# the TINY run with more steps: the random model's held-out loss falls by ~0.16 (4.61 -> 4.45, as on the 16-bit
# base with the same options)
# on the CPU also where a GPU exists: the tests compare with CPU evaluations to fp32 rounding
RUN = [*TINY, "--steps", "8", "--lr", "1e-2", "--ratio", "0.1", "--quantize", "nf4", "--device", "cpu"]


def check_merged_output(out, trained, batches, loss_after: float, base) -> None:
    """``out/merged`` (``--save-merged``) is a plain fp32 HF model with the trained held-out loss and ``trained``'s
    logits: the GEMM's rounding only (bit for bit on this CPU so far; 1e-5 leaves room for another BLAS); ``base``,
    the untrained model, gives other logits."""
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert eval_loss(merged, batches, CPU) == pytest.approx(loss_after, rel=1e-5)
    ids = torch.randint(7, 100, (2, 12))
    with torch.no_grad():
        a, b, c = trained(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, c)  # training changed the model


def test_trains_on_a_4bit_base_and_outputs_reproduce(tiny_model_dir, tmp_path, capsys):
    out, js = tmp_path / "out", tmp_path / "r.json"
    argv = ["--model", str(tiny_model_dir), *RUN, "--output-dir", str(out), "--output-json", str(js), "--save-merged"]
    code = main(["finetune", *argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "4-bit NF4 base" in captured.out
    r = json.loads(js.read_text())
    assert r["quantize"] == "nf4" and r["config"]["quantize"] == "nf4"
    assert r["eval_loss_after"] < r["eval_loss_before"] - 0.1, (r["eval_loss_before"], r["eval_loss_after"])
    assert r["num_blocks"] >= 1 and r["trainable_params"] > 0

    # the block file records the 4-bit base: it loads onto a freshly quantized base (deterministic quantization)
    # and gives the trained model's held-out loss; onto the 16-bit base it is refused
    batches = _eval_batches(tiny_model_dir, argv)
    fresh = smt_kernels.load_blocks(_fresh(tiny_model_dir), out)
    assert any(isinstance(m, NF4SparseBlockLinear) for m in fresh.modules())
    assert all(m.block_weight.dtype == torch.float32 for m in smt_kernels.patched_modules(fresh).values())
    # the same model and batches in the same order: equal to fp32 summation-order noise at most
    assert eval_loss(fresh, batches, CPU) == pytest.approx(r["eval_loss_after"], rel=1e-6)
    with pytest.raises(ValueError, match="4-bit"):
        smt_kernels.load_blocks(_fresh(tiny_model_dir, quantize=False), out)

    # --save-merged: the dequantized weight with the blocks in place, the forward's own weight
    check_merged_output(out, fresh, batches, r["eval_loss_after"], _fresh(tiny_model_dir))


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--method", "full", *TINY_FOR["full"]], ["--quantize nf4", "--method full", "--method smt or lora"]),
        (
            ["--method", "dora", *TINY_FOR["lora"]],
            ["--quantize nf4", "--method dora", "BitsAndBytesConfig", "not implemented", "--method lora"],
        ),
        ([*TINY, "--select-warmup-steps", "2"], ["--select-warmup-steps 2", "--quantize nf4"]),
        (["--method", "lora", *TINY_FOR["lora"], "--score", "l1"], ["--score", "--method lora"]),  # QLoRA's options
    ],
)
def test_refused_combinations(argv, needles, capsys, tmp_path):
    code = main(["finetune", "--quantize", "nf4", *argv, "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("smt-kernels finetune: error: "), err
    assert all(n in err for n in needles), err
    assert not (tmp_path / "o").exists()


def test_unknown_format_is_refused(capsys):
    assert main(["finetune", "--quantize", "int8"]) == 2
    err = capsys.readouterr().err
    assert "--quantize" in err and "'nf4'" in err and err.count("\n") == 1


def test_resume_on_a_4bit_base_equals_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """4 steps in one run == 2 steps, a crash, and 2 more after --resume (the base is quantized again on resume)."""
    from safetensors.torch import load_file

    args = ["finetune", "--model", str(tiny_model_dir), *TINY, "--steps", "4", "--lr", "1e-2", "--quantize", "nf4"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*args, "--output-dir", str(a), "--output-json", str(a / "r.json")]) == 0, capsys.readouterr().err
    assert run_interrupted(args, b, monkeypatch) == 130
    capsys.readouterr()
    ckpt = str(b / "checkpoint")
    # the checkpoint's base was 4-bit: resuming on a 16-bit base is refused, naming the option
    assert main([*args[:-2], "--output-dir", str(b), "--checkpoint-every", "2", "--resume", ckpt]) == 2
    assert "--quantize 'nf4'" in capsys.readouterr().err
    resumed = [*args, "--output-dir", str(b), "--checkpoint-every", "2", "--resume", ckpt]
    assert main([*resumed, "--output-json", str(b / "r.json")]) == 0, capsys.readouterr().err
    ra, rb = json.loads((a / "r.json").read_text()), json.loads((b / "r.json").read_text())
    assert rb["resumed_from_step"] == 2 and rb["quantize"] == "nf4"
    assert ra["loss_curve"] == rb["loss_curve"] and ra["eval_loss_curve"] == rb["eval_loss_curve"]
    assert ra["examples"] == rb["examples"]
    [fa] = a.glob("smt_blocks*.safetensors")
    [fb] = b.glob("smt_blocks*.safetensors")
    wa, wb = load_file(fa), load_file(fb)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_summarize_selection_accepts_4bit_targets(tiny_model_dir):
    """Shapes only: the summary of a 4-bit model (plain or patched) equals that of its 16-bit twin."""
    selection = {"model.layers.0.self_attn.q_proj": [(0, 0), (1, 2)], "model.layers.1.mlp.down_proj": [(3, 5)]}
    targets = ("q_proj", "v_proj", "down_proj")
    want = summarize_selection(_fresh(tiny_model_dir, quantize=False), selection, block_size=16, targets=targets)
    nf4 = _fresh(tiny_model_dir)
    got = summarize_selection(nf4, selection, block_size=16, targets=targets)
    assert got == want and got.num_blocks == 3 and got.model_params == want.model_params
    smt_kernels.patch(nf4, selection, block_size=16, verbose=False)
    assert summarize_selection(nf4, selection, block_size=16, targets=targets) == want
    assert want.model_params == smt_kernels.trainable_parameters(nf4)[1]


def test_two_ranks_on_a_4bit_base_equal_one_process(tiny_model_dir, tmp_path, capsys):
    """Under torchrun (2 forked gloo ranks): the same selection, losses and blocks as one process."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    from test_cli_torchrun import one_process_and_two_ranks

    _, _, ranks = one_process_and_two_ranks(tiny_model_dir, "smt", tmp_path, capsys, "--quantize", "nf4")
    assert "cpu × 2 ranks, seed 0, 4-bit NF4 base" in ranks[0]["stdout"]
    selection = [json.loads((tmp_path / d / "selection.json").read_text()) for d in ("one", "two")]
    assert selection[0] == selection[1]
