"""``--reselect-at``: choosing the SMT blocks again during training (smt_kernels.finetune.reselect)."""

import json

import pytest
import torch
from test_cli import TINY, _fails, _tensors, run_interrupted

import smt_kernels
from smt_kernels.cli import main
from smt_kernels.finetune import FinetuneConfig, run_finetune
from smt_kernels.finetune.config import FinetuneError, check_config
from smt_kernels.select import Selection

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(model_dir, **change) -> FinetuneConfig:
    opts = dict(
        model=str(model_dir),
        task="reverse",
        steps=4,
        batch_size=4,
        num_train=24,
        num_eval=4,
        eval_batch_size=4,
        block_size=16,
        select_batches=2,
        max_length=160,
        ratio=0.1,
        output_dir=None,
        progress=False,
        show_examples=0,
        lr=1e-2,
        allow_divergence=True,
    )
    return FinetuneConfig(**(opts | change))


def _blocks(selection) -> set:
    return {(n, tuple(p)) for n, pairs in selection.items() for p in pairs}


def test_reselection_equals_doing_it_by_hand(tiny_model_dir):
    """Train 2 steps, merge, select on fresh batches, patch, train 2 more (AdamW state kept for the matrices whose
    blocks did not change): the same weights bit for bit; weights outside every block trained are the base's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smt_kernels.finetune.data import TokenizedTask, build_task
    from smt_kernels.finetune.loop import TrainingRun, TrainLog
    from smt_kernels.finetune.methods import prepare_method
    from smt_kernels.finetune.parallel import Ranks

    cfg = _cfg(tiny_model_dir, reselect_at=(2,), ratio=0.5)  # a budget where some matrices keep their blocks
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    result = run_finetune(cfg, model=model, tokenizer=tok)
    [record] = result.reselections
    assert record["step"] == 2 and record["kept"] + record["changed"] == result.num_blocks

    # by hand
    cpu = torch.device("cpu")
    hand = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    data = TokenizedTask.build(build_task(cfg), tok, cfg)
    warm = data.stream(cfg.batch_size, cfg.seed + 1)
    torch.manual_seed(cfg.seed)
    first = prepare_method(hand, cfg, [next(warm) for _ in range(cfg.select_batches)], cpu)
    run = TrainingRun(hand, cfg, Ranks(cpu), data.stream(cfg.batch_size, cfg.seed), data.eval_batches, TrainLog())
    run._step(0), run._step(1)
    states = {n: run.opt.state[p] for n, p in run.named}
    smt_kernels.merge(hand)
    fresh = data.stream(cfg.batch_size, cfg.seed + 1 + 2)
    second = smt_kernels.select_blocks(
        hand,
        [next(fresh) for _ in range(cfg.select_batches)],
        targets=cfg.targets,
        score=cfg.score,
        strategy=cfg.strategy,
        block_size=cfg.block_size,
        progress=False,
        **cfg.budget,
    )
    smt_kernels.patch(hand, second, config=cfg.smt_config, verbose=False)
    run.set_model(hand)
    unchanged = [n for n in second if second[n] and sorted(second[n]) == sorted(first.selection.get(n, []))]
    assert unchanged and len(unchanged) < len(second)  # both cases happen in this run
    for n, p in run.named:
        module = n.removesuffix(".block_weight")
        if module in unchanged:
            order = [first.selection[module].index(pair) for pair in second[module]]
            s = states[n]
            run.opt.state[p] = {"step": s["step"], "exp_avg": s["exp_avg"][order], "exp_avg_sq": s["exp_avg_sq"][order]}
    run._step(2), run._step(3)

    assert _blocks(second) == _blocks(model.smt_config["selection"])
    a, b = smt_kernels.merge(model).state_dict(), smt_kernels.merge(hand).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # outside the blocks of both selections every weight is the base model's
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    trained = _blocks(first.selection) | _blocks(second)
    touched = {n for n, _ in trained}
    bs = cfg.block_size
    for name in touched:
        inside = torch.zeros_like(a[f"{name}.weight"], dtype=torch.bool)
        for n, (r, c) in trained:
            if n == name:
                inside[r * bs : (r + 1) * bs, c * bs : (c + 1) * bs] = True
        diff = a[f"{name}.weight"] != base[f"{name}.weight"]
        assert not (diff & ~inside).any()
    assert all(torch.equal(a[k], base[k]) for k in a if k.removesuffix(".weight") not in touched)
    assert any(not torch.equal(a[k], base[k]) for k in a)


def test_same_blocks_again_changes_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """A re-selection that picks the same blocks keeps every matrix's AdamW state: the run equals one without it."""
    from smt_kernels.finetune import reselect

    plain = run_finetune(_cfg(tiny_model_dir, output_dir=str(tmp_path / "plain"), save_merged=True))
    same = Selection.from_json(json.loads((tmp_path / "plain" / "selection.json").read_text()))
    monkeypatch.setattr(reselect, "select_smt", lambda model, cfg, batches, device: (same, 0.0))
    again = run_finetune(_cfg(tiny_model_dir, reselect_at=(1, 3), output_dir=str(tmp_path / "again"), save_merged=True))
    assert [(r["step"], r["changed"]) for r in again.reselections] == [(1, 0), (3, 0)]
    assert again.loss_curve == plain.loss_curve
    wa, wb = (_tensors(tmp_path / d / "merged" / "model.safetensors") for d in ("plain", "again"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_after_a_reselection(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A checkpoint after the re-selection at step 1 holds the new blocks and the folded old ones; the re-selection
    at step 2 runs after resuming from the step-2 checkpoint: both equal the uninterrupted run, bit for bit. The
    saved blocks (every block trained) reload onto the base model as the merged model."""
    from transformers import AutoModelForCausalLM

    args = ["finetune", "--model", str(tiny_model_dir), *TINY, "--steps", "4", "--lr", "1e-2", "--ratio", "0.1",
            "--reselect-at", "1,2", "--save-merged", "--allow-divergence"]  # fmt: skip
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*args, "--output-dir", str(a), "--output-json", str(a / "r.json")]) == 0, capsys.readouterr().err
    assert run_interrupted(args, b, monkeypatch) == 130
    resumed = [*args, "--output-dir", str(b), "--checkpoint-every", "2", "--resume", str(b / "checkpoint")]
    assert main([*resumed, "--output-json", str(b / "r.json")]) == 0, capsys.readouterr().err

    ra, rb = json.loads((a / "r.json").read_text()), json.loads((b / "r.json").read_text())
    assert rb["resumed_from_step"] == 2 and [r["step"] for r in ra["reselections"]] == [1, 2]
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in ra["reselections"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in rb["reselections"]]
    assert ra["loss_curve"] == rb["loss_curve"]
    wa, wb = _tensors(a / "merged" / "model.safetensors"), _tensors(b / "merged" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    loaded = smt_kernels.load_blocks(AutoModelForCausalLM.from_pretrained(tiny_model_dir), a)
    merged = AutoModelForCausalLM.from_pretrained(a / "merged")
    ids = torch.randint(7, 60, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, merged(ids).logits, rtol=1e-5, atol=1e-5)
    union = json.loads((a / "selection.json").read_text())
    assert sum(len(v) for v in union["blocks"].values()) >= ra["num_blocks"]


@pytest.mark.parametrize(
    "change, needles",
    [
        (dict(reselect_at=(0,)), ["--reselect-at 0", "outside 1..3"]),
        (dict(reselect_at=(2, 4)), ["--reselect-at 2,4", "step(s) 4 outside 1..3"]),
        (dict(reselect_at=(2, 1)), ["--reselect-at 2,1", "increasing order"]),
        (dict(reselect_at=(2, 2)), ["--reselect-at 2,2", "each once"]),
        (dict(reselect_at=(2,), quantize="nf4"), ["--reselect-at 2", "--quantize nf4", "4 bits"]),
        (dict(reselect_at=(2,), method="lora", select_batches=4), ["--reselect-at", "--method lora", "only by smt"]),
    ],
)
def test_bad_reselect_steps_are_refused(tiny_model_dir, change, needles):
    with pytest.raises(FinetuneError) as err:
        check_config(_cfg(tiny_model_dir, **change))
    assert all(n in str(err.value) for n in needles), str(err.value)


def test_cli_parses_the_steps(tiny_model_dir, capsys):
    from smt_kernels.cli import build_parser

    args = build_parser().parse_args(["finetune", "--reselect-at", "5, 10"])
    assert args.reselect_at == (5, 10)
    _fails(capsys, ["--model", str(tiny_model_dir), *TINY, "--reselect-at", "2,x"], "not an integer: 'x'")


def test_two_ranks_reselect_like_one_process(tiny_model_dir, tmp_path, capsys):
    """Under torchrun (2 gloo ranks) the re-selection is rank 0's, on every rank: the same blocks, losses and
    saved blocks as one process."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    from test_cli_torchrun import one_process_and_two_ranks

    r1, r2, _ = one_process_and_two_ranks(tiny_model_dir, "smt", tmp_path, capsys, "--reselect-at", "2")
    assert [(r["kept"], r["changed"]) for r in r2["reselections"]] == [
        (r["kept"], r["changed"]) for r in r1["reselections"]
    ]
    selection = [json.loads((tmp_path / d / "selection.json").read_text()) for d in ("one", "two")]
    assert selection[0] == selection[1]
