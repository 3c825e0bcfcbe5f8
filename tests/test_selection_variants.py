"""Method and selection variants for the quality sweep: DoRA at SMT's budget, the paper's warm-up selection, and
the activation score / per-matrix budget through ``FinetuneConfig`` and the CLI (tiny models, CPU)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from test_cli import TINY, run_interrupted
from tiny_models import B, assert_unchanged, make_batch, snapshot
from tiny_models import tiny as tiny_model
from transformers import AutoModelForCausalLM

from smt_kernels import Selection, select_blocks
from smt_kernels.cli import main
from smt_kernels.finetune import DEFAULT_LR, FinetuneConfig
from smt_kernels.select import DEFAULT_TARGETS, find_target_linears, score_gradient

TINY_ADAPTER = [a for a in TINY if a not in ("--select-batches", "2")]  # what LoRA/DoRA accept of TINY


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(path)


# --------------------------------------------------------------------------------------------- DoRA


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
    args = ["finetune", "--model", str(tiny_model_dir), "--method", "dora", *TINY_ADAPTER, "--steps", "4"]
    args += ["--save-merged", "--lr", "1e-2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*args, "--output-dir", str(a), "--output-json", str(a / "r.json")]) == 0, capsys.readouterr().err
    assert run_interrupted(args, b, monkeypatch) == 130
    resume = ["--checkpoint-every", "2", "--resume", str(b / "checkpoint"), "--output-json", str(b / "r.json")]
    assert main([*args, "--output-dir", str(b), *resume]) == 0, capsys.readouterr().err
    ra, rb = json.loads((a / "r.json").read_text()), json.loads((b / "r.json").read_text())
    assert rb["resumed_from_step"] == 2 and ra["loss_curve"] == rb["loss_curve"]
    wa, wb = _tensors(a / "merged" / "model.safetensors"), _tensors(b / "merged" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# --------------------------------------------------------------------------------------------- warm-up selection


def _warmup_batches():
    return [make_batch(s) for s in (1, 2)]


def test_warmup_zero_is_todays_selection():
    model = tiny_model()
    kw = dict(num_blocks=6, block_size=B, progress=False)
    a = select_blocks(model, _warmup_batches(), **kw)
    b = select_blocks(model, _warmup_batches(), warmup_steps=0, warmup_lr=1e-2, **kw)
    assert dict(a) == dict(b) and json.dumps(a.to_json()) == json.dumps(b.to_json())
    assert "warmup_steps" not in a.to_json() and b.warmup_steps == 0 and b.warmup_lr is None
    assert all(torch.equal(a.scores[n], b.scores[n]) for n in a.scores)


@pytest.mark.parametrize("score", ["abs_mean", "l1"])
def test_warmup_restores_the_weights_bit_for_bit(score):
    model = tiny_model()
    snap = snapshot(model)
    kw = dict(num_blocks=6, block_size=B, score=score, progress=False)
    plain = select_blocks(model, _warmup_batches(), **kw)
    warm = select_blocks(model, _warmup_batches(), warmup_steps=5, warmup_lr=1e-2, **kw)
    assert_unchanged(model, snap)
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(plain.scores[n], warm.scores[n]) for n in plain.scores)  # training moved them
    assert (warm.warmup_steps, warm.warmup_lr, warm.num_batches) == (5, 1e-2, 2)  # 2 batches cycled over 5 steps
    again = Selection.from_json(json.loads(json.dumps(warm.to_json())))
    assert (again.warmup_steps, again.warmup_lr, dict(again)) == (5, 1e-2, dict(warm))


def test_warmup_scores_the_summed_gradients_of_adamw_training():
    """Against a plain loop: AdamW steps on the targets after each backward, batches cycled, gradients summed."""
    model, steps, lr = tiny_model(), 5, 1e-2
    batches = _warmup_batches()
    ref = copy.deepcopy(model)
    targets = find_target_linears(ref, DEFAULT_TARGETS)
    ref.requires_grad_(False)
    weights = [m.weight.requires_grad_(True) for m in targets.values()]
    opt = torch.optim.AdamW(weights, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, foreach=False)
    sums = {n: torch.zeros_like(m.weight) for n, m in targets.items()}
    ref.eval()
    for t in range(steps):
        ref(**batches[t % len(batches)]).loss.backward()
        for n, m in targets.items():
            sums[n] += m.weight.grad
        opt.step()
        opt.zero_grad(set_to_none=True)

    kw = dict(num_blocks=6, block_size=B, score="l1", progress=False, warmup_steps=steps, warmup_lr=lr)
    sel = select_blocks(model, batches, **kw)
    for n in targets:
        torch.testing.assert_close(sel.scores[n], score_gradient(sums[n], "l1", B), rtol=1e-6, atol=0)
    # keep_warmup_updates: the paper's way, the model ends where the warm-up training left it
    kept = select_blocks(model, batches, keep_warmup_updates=True, **kw)
    assert dict(kept) == dict(sel)
    for n, m in find_target_linears(model, DEFAULT_TARGETS).items():
        torch.testing.assert_close(m.weight, targets[n].weight, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(warmup_steps=-1, warmup_lr=1e-3), "warmup_steps must be an int >= 0, got -1"),
        (dict(warmup_steps=2.5, warmup_lr=1e-3), "warmup_steps must be an int >= 0, got 2.5"),
        (dict(warmup_steps=True, warmup_lr=1e-3), "warmup_steps must be an int >= 0, got True"),
        (dict(warmup_steps=3), "warmup_steps=3 trains the targets: give its learning rate, warmup_lr"),
        (dict(warmup_steps=3, warmup_lr=0.0), "warmup_lr must be a finite number > 0, got 0.0"),
        (dict(warmup_steps=3, warmup_lr=float("nan")), "warmup_lr must be a finite number > 0, got nan"),
        (dict(warmup_steps=3, warmup_lr=1e-3, score="activation"), "score='activation' uses none"),
    ],
)
def test_warmup_bad_input(kw, needle):
    model = tiny_model()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=re.escape(needle)):
        select_blocks(model, _warmup_batches(), num_blocks=2, block_size=B, progress=False, **kw)
    assert_unchanged(model, snap)


def test_warmup_error_midway_restores_the_weights():
    model = tiny_model()
    snap = snapshot(model)
    bad = {"input_ids": make_batch(3)["input_ids"]}  # no labels: the second step fails after one AdamW step
    with pytest.raises(ValueError, match="produced no loss"):
        select_blocks(model, [make_batch(1), bad], num_blocks=2, block_size=B, progress=False, warmup_steps=2,
                      warmup_lr=1e-2)  # fmt: skip
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--select-warmup-steps", "-1"], "--select-warmup-steps must be >= 0, got -1"),
        (["--select-warmup-lr", "1e-3"], "--select-warmup-lr 0.001 has no effect without --select-warmup-steps"),
        (["--select-warmup-steps", "2", "--select-warmup-lr", "0"], "--select-warmup-lr must be > 0, got 0"),
        (["--select-warmup-steps", "2", "--score", "activation"], "--score activation uses none"),
        (["--method", "lora", "--select-warmup-steps", "2"], "--select-warmup-steps is not used by --method lora"),
        (["--method", "dora", "--select-warmup-lr", "1e-3"], "--select-warmup-lr is not used by --method dora"),
    ],
)
def test_warmup_bad_options(capsys, argv, needle):
    assert main(["finetune", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_warmup_config_defaults_to_the_runs_lr():
    assert FinetuneConfig().select_warmup == {"warmup_steps": 0}
    assert FinetuneConfig(select_warmup_steps=3).select_warmup == {"warmup_steps": 3, "warmup_lr": DEFAULT_LR["smt"]}
    cfg = FinetuneConfig(select_warmup_steps=3, lr=5e-3, select_warmup_lr=2e-4)
    assert cfg.select_warmup == {"warmup_steps": 3, "warmup_lr": 2e-4}


def test_warmup_end_to_end(tiny_model_dir, tmp_path, capsys):
    """``--select-warmup-steps``: recorded in the summary and selection.json; only the blocks differ after training."""
    out, js = tmp_path / "out", tmp_path / "r.json"
    argv = ["finetune", "--model", str(tiny_model_dir), "--ratio", "0.1", *TINY, "--lr", "1e-2"]
    argv += ["--select-warmup-steps", "3", "--output-dir", str(out), "--output-json", str(js), "--save-merged"]
    assert main(argv) == 0, capsys.readouterr().err
    r = json.loads(js.read_text())
    assert r["config"]["select_warmup_steps"] == 3 and r["config"]["select_warmup_lr"] is None
    selection = json.loads((out / "selection.json").read_text())
    assert (selection["warmup_steps"], selection["warmup_lr"], selection["num_batches"]) == (3, 1e-2, 2)
    base, merged = _tensors(tiny_model_dir / "model.safetensors"), _tensors(out / "merged" / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.rsplit(".", 1)[0] in selection["blocks"] for k in changed)
    for key in changed:
        mask = torch.zeros_like(base[key], dtype=torch.bool)
        for row, col in selection["blocks"][key.rsplit(".", 1)[0]]:
            mask[row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16] = True
        assert torch.equal(base[key][~mask], merged[key][~mask]), key  # the warm-up left no trace


# --------------------------------------------------------------------------------------------- activation, per_matrix


def _covered(blocks, shape, b=16):
    mask = torch.zeros(shape, dtype=torch.bool)
    for row, col in blocks:
        mask[row * b : (row + 1) * b, col * b : (col + 1) * b] = True
    return int(mask.sum())


def test_activation_per_matrix_ratio_end_to_end(tiny_model_dir, tmp_path):
    """``score="activation"`` with ``strategy="per_matrix"`` and a ratio through ``run_finetune``: every target
    gets at least the ratio of its own weights (less than one block more), and the settings travel with the blocks."""
    import smt_kernels
    from smt_kernels.finetune import run_finetune

    out = tmp_path / "o"
    cfg = FinetuneConfig(model=str(tiny_model_dir), task="reverse", steps=2, batch_size=4, num_train=8, num_eval=2,
                         eval_batch_size=2, block_size=16, select_batches=1, max_length=160, ratio=0.15,
                         score="activation", strategy="per_matrix", output_dir=str(out), progress=False,
                         show_examples=0, lr=1e-2, output_json=str(tmp_path / "r.json"))  # fmt: skip
    result = run_finetune(cfg)
    selection = json.loads((out / "selection.json").read_text())
    assert (selection["score"], selection["strategy"]) == ("activation", "per_matrix")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    targets = find_target_linears(model, cfg.targets)
    assert sorted(selection["blocks"]) == sorted(targets)  # per_matrix: every target has blocks
    for name, m in targets.items():
        covered, size = _covered(selection["blocks"][name], m.weight.shape), m.weight.numel()
        assert 0.15 * size <= covered < 0.15 * size + 256, name
    assert result.trainable_params == sum(_covered(v, targets[n].weight.shape) for n, v in selection["blocks"].items())
    assert smt_kernels.read_blocks(out).config == cfg.smt_config
    assert cfg.smt_config.score == "activation" and cfg.smt_config.strategy == "per_matrix"
    assert json.loads((tmp_path / "r.json").read_text())["config"]["score"] == "activation"


def test_per_matrix_num_blocks_cli(tiny_model_dir, tmp_path, capsys):
    js = tmp_path / "r.json"
    argv = ["finetune", "--model", str(tiny_model_dir), *TINY, "--strategy", "per_matrix", "--num-blocks", "2"]
    argv += ["--targets", "q_proj,k_proj,v_proj"]
    argv += ["--score", "l2", "--output-dir", "", "--output-json", str(js), "--lr", "1e-2"]
    assert main(argv) == 0, capsys.readouterr().err
    r = json.loads(js.read_text())
    assert r["num_blocks"] == 2 * 6 and r["blocks_per_kind"] == {"q_proj": 4, "k_proj": 4, "v_proj": 4}
    assert r["eval_loss_after"] < r["eval_loss_before"]
