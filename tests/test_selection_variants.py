"""Method and selection variants for the quality sweep: DoRA at SMT's budget, the paper's warm-up selection, and
the activation score / per-matrix budget through ``FinetuneConfig`` and the CLI (tiny models, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import TINY, save_tiny_llama
from transformers import AutoModelForCausalLM

from smt_kernels import trainable_parameters
from smt_kernels.cli import main
from smt_kernels.finetune import FinetuneConfig, prepare_method

TINY_ADAPTER = [a for a in TINY if a not in ("--select-batches", "2")]  # what LoRA/DoRA accept of TINY


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(path)


# --------------------------------------------------------------------------------------------- DoRA


@pytest.mark.parametrize("strategy, ratio", [("global", 0.1), ("per_matrix", 0.15)])
def test_dora_budget_matches_smt(tiny_model_dir, strategy, ratio):
    """DoRA's rank counts its magnitude vectors: its trainable parameters are as close to SMT's as LoRA's are."""
    opts = dict(model=str(tiny_model_dir), ratio=ratio, strategy=strategy, block_size=16, progress=False)
    ids = torch.randint(7, 100, (2, 12))
    smt = prepare_method(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        FinetuneConfig(method="smt", **opts),
        [{"input_ids": ids, "labels": ids}],
        torch.device("cpu"),
    )
    dora = prepare_method(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        FinetuneConfig(method="dora", **opts),
        [],
        torch.device("cpu"),
    )
    names = [n for n, p in dora.model.named_parameters() if p.requires_grad]
    magnitude = sum(p.numel() for n, p in dora.model.named_parameters() if "lora_magnitude_vector" in n)
    assert magnitude > 0 and any("lora_A" in n for n in names)
    n_smt, n_dora = trainable_parameters(smt.model)[0], trainable_parameters(dora.model)[0]
    per_rank = (n_dora - magnitude) // dora.lora_rank
    assert abs(n_dora - n_smt) <= per_rank / 2, (n_smt, n_dora, dora.lora_rank)


def test_dora_end_to_end(tiny_model_dir, tmp_path, capsys):
    """``--method dora`` trains (held-out loss drops), saves a DoRA adapter and merges into a plain HF model."""
    out, js = tmp_path / "out", tmp_path / "r.json"
    argv = ["finetune", "--model", str(tiny_model_dir), "--method", "dora", "--ratio", "0.1", *TINY_ADAPTER]
    argv += ["--output-dir", str(out), "--output-json", str(js), "--save-merged", "--lr", "1e-2"]
    assert main(argv) == 0, capsys.readouterr().err
    r = json.loads(js.read_text())
    assert r["method"] == "dora" and r["config"]["method"] == "dora" and r["lr"] == 1e-2
    assert r["eval_loss_after"] < r["eval_loss_before"]
    assert r["loss_curve"][-1]["loss"] < r["loss_curve"][0]["loss"]
    assert r["lora_rank"] >= 1
    assert json.loads((out / "lora_adapter" / "adapter_config.json").read_text())["use_dora"] is True
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = _tensors(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(base[k], v) for k, v in _tensors(out / "merged" / "model.safetensors").items())


def test_dora_default_lr_and_smt_only_options(capsys, tiny_model_dir):
    assert FinetuneConfig(method="dora").peak_lr == FinetuneConfig(method="lora").peak_lr
    assert main(["finetune", "--method", "dora", "--score", "l2"]) == 2
    assert "--score is not used by --method dora" in capsys.readouterr().err


def test_dora_resume_equals_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """As LoRA's: 4 steps == 2 steps, a crash, 2 more after --resume, bit for bit (magnitude vectors included)."""
    from smt_kernels.finetune import loop

    args = ["finetune", "--model", str(tiny_model_dir), "--method", "dora", *TINY_ADAPTER, "--steps", "4"]
    args += ["--save-merged", "--lr", "1e-2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*args, "--output-dir", str(a), "--output-json", str(a / "r.json")]) == 0, capsys.readouterr().err
    real_step = loop.TrainingRun._step

    def crash_at_third_step(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(loop.TrainingRun, "_step", crash_at_third_step)
    assert main([*args, "--output-dir", str(b), "--checkpoint-every", "2"]) == 130
    monkeypatch.undo()
    resume = ["--checkpoint-every", "2", "--resume", str(b / "checkpoint"), "--output-json", str(b / "r.json")]
    assert main([*args, "--output-dir", str(b), *resume]) == 0, capsys.readouterr().err
    ra, rb = json.loads((a / "r.json").read_text()), json.loads((b / "r.json").read_text())
    assert rb["resumed_from_step"] == 2 and ra["loss_curve"] == rb["loss_curve"]
    wa, wb = _tensors(a / "merged" / "model.safetensors"), _tensors(b / "merged" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
