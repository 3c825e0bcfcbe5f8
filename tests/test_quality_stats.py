"""The quality sweep's harness (benchmarks/quality.py specs, budgets, resume) and statistics (quality_stats)."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import quality, quality_specs, quality_stats  # noqa: E402
from benchmarks.quality import Run  # noqa: E402
from benchmarks.quality_specs import Spec, parse_spec  # noqa: E402
from smt_kernels.finetune import FinetuneConfig  # noqa: E402

# ------------------------------------------------------------------------------------------ spec syntax


def test_spec_parsing_and_canonical_text():
    s = parse_spec("smt@1%:act:pm:wu20lr3e-3:t=ovq/1e-2")
    assert (s.method, s.pct, s.ratio, s.lr) == ("smt", 1.0, None, 1e-2)
    assert (s.score, s.strategy, s.warmup_steps, s.warmup_lr) == ("activation", "per_matrix", 20, 3e-3)
    assert s.targets == ("q_proj", "v_proj", "o_proj")  # letters in the model's order
    assert s.key == "smt@1%:act:pm:wu20lr0.003:t=qvo" and s.variant == ":act:pm:wu20lr0.003:t=qvo"
    assert s.label == s.key + " lr=0.01" and parse_spec(s.key + "/1e-2") == s
    # the first grid's items keep their labels
    assert parse_spec("smt@0.05/1e-2").label == "smt@0.05 lr=0.01"
    assert parse_spec("lora@0.01").label == "lora@0.01" and parse_spec("full").label == "full"
    assert parse_spec("dora@3%:pm/3e-3").key == "dora@3%:pm"
    assert parse_spec("smt@1%:score=l2:gl:wu5").variant == ":score=l2:gl:wu5"
    for bad in ["smt", "full@1%", "lora@1%:act", "dora@1%:wu20", "smt@1%:zz", "smt@1%:t=qx", "adam@1%", "smt@x%"]:
        with pytest.raises(SystemExit):
            parse_spec(bad)
    assert quality_specs.parse_targets("qkvogud") == tuple(quality_specs.TARGET_LETTERS[c] for c in "qkvogud")
    assert quality_specs.parse_targets("q_proj,v_proj") == ("q_proj", "v_proj")


def test_reselect_and_nf4_options():
    """``:rsN[,M...]`` -> reselect_at, ``:nf4`` -> quantize: in the variant, key and label (never colliding with the
    item without them), in the FinetuneConfig keywords, and refused where finetune refuses them."""
    rs = parse_spec("smt@1%:pm:rs50/1e-2")
    assert rs.reselect_at == (50,) and rs.variant == ":pm:rs50" and rs.label == "smt@1%:pm:rs50 lr=0.01"
    assert parse_spec(rs.key + "/1e-2") == rs and rs.key != parse_spec("smt@1%:pm/1e-2").key
    # a comma followed by a digit stays in the item
    specs = quality_specs.parse_methods("smt@1%:pm:rs50,100/1e-2, lora@1%:pm:nf4/3e-3,smt@1%:pm:nf4/1e-2,full")
    assert [s.key for s in specs] == ["smt@1%:pm:rs50,100", "lora@1%:pm:nf4", "smt@1%:pm:nf4", "full"]
    assert specs[0].reselect_at == (50, 100) and (specs[1].quantize, specs[2].quantize) == ("nf4", "nf4")
    assert specs[1].key != "lora@1%:pm" and specs[2].quantize and specs[2].reselect_at is None
    targets = quality_specs.parse_targets("qkvogud")
    opts = quality_specs.spec_options(dataclasses.replace(specs[0], ratio=0.1), targets, 64, "abs_mean")
    assert opts["reselect_at"] == (50, 100) and "quantize" not in opts
    opts = quality_specs.spec_options(dataclasses.replace(specs[1], ratio=0.1), targets, 64, "abs_mean")
    assert opts["quantize"] == "nf4" and "reselect_at" not in opts and "score" not in opts
    FinetuneConfig(**opts)  # what quality.py builds
    assert "quantize" not in quality_specs.spec_options(parse_spec("smt@0.1"), targets, 64, "abs_mean")
    for bad, needle in [
        ("lora@1%:rs50", "apply to smt only"),
        ("smt@1%:rs", "rs takes steps"),
        ("smt@1%:rs50,x", "rs takes steps"),
        ("smt@1%:rs0", ">= 1"),
        ("smt@1%:rs50,50", "increasing"),
        ("smt@1%:rs100,50", "increasing"),
        ("dora@1%:nf4", "DoRA on a 4-bit base"),
        ("smt@1%:nf4:rs50", "leave one out"),
        ("smt@1%:wu5:nf4", "leave one out"),
        ("full:nf4", "no budget or options"),
        ("smt@1%:nf8", "unknown option 'nf8'"),
    ]:
        with pytest.raises(SystemExit, match=re.escape(needle)):
            parse_spec(bad)
    # stats compare an SMT spec on the 4-bit base with QLoRA, and a re-selecting one with plain LoRA
    fake = type("G", (), {"budget": "1%", "variant": ":pm:nf4"})  # baseline_spec reads these two of a Group
    assert quality_stats.baseline_spec(fake, "lora") == "lora@1%:nf4"
    assert quality_stats.baseline_spec(fake, "lora", strategy=True) == "lora@1%:pm:nf4"
    fake.variant = ":act:pm:rs50:t=qv"
    assert quality_stats.baseline_spec(fake, "lora") == "lora@1%:t=qv"


def test_budget_in_percent_of_the_model_becomes_a_ratio_of_the_targets():
    from tiny_models import tiny

    model = tiny()
    total = sum(p.numel() for p in model.parameters())
    targets = tuple(quality_specs.TARGET_LETTERS[c] for c in "qkvogud")
    elements = quality_specs.target_elements(model, targets)
    assert elements == 2 * (80 * 80 * 2 + 40 * 80 * 2 + 136 * 80 * 3)  # 2 layers of q,o + k,v + gate,up,down
    s = parse_spec("smt@5%").resolve(total, elements)
    assert s.ratio == pytest.approx(0.05 * total / elements) and s.key == "smt@5%"
    assert parse_spec("lora@0.05").resolve(total, elements).ratio == 0.05  # a ratio stays as written
    with pytest.raises(SystemExit):  # more than all the target weights
        parse_spec("smt@90%").resolve(total, elements)
    # SmolLM2-135M (30 layers, hidden 576, k/v 192, MLP 1536): LoRA rank 1 on all 7 targets is 0.227 %
    per_rank = 30 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
    assert per_rank == 305_280 and 100 * per_rank / 134_515_008 == pytest.approx(0.227, abs=1e-3)


def test_plan_order_shards_and_lr_from(tmp_path):
    specs = [parse_spec(x) for x in ["smt@1%:act/1e-2", "smt@1%/1e-2", "smt@1%/3e-2", "full/1e-4"]]
    plan = quality.make_plan(specs, ["a", "b"], [0, 1])
    # plain items of every seed before the variants; seed-major
    assert [r.key for r in plan[:3]] == ["smt@1% lr=0.01/a/seed0", "smt@1% lr=0.03/a/seed0", "full lr=0.0001/a/seed0"]
    assert all(r.spec.variant for r in plan[-4:]) and not any(r.spec.variant for r in plan[:-4])
    assert len(plan[0::2]) + len(plan[1::2]) == len(plan)
    # --lr-from: per task, the lr with the best dev accuracy; specs with one lr (or unknown) keep theirs
    path = tmp_path / "quality.csv"
    rows = [("a", 1e-2, 0.2), ("a", 3e-2, 0.6), ("b", 1e-2, 0.7), ("b", 3e-2, 0.1)]
    with path.open("w", newline="") as f:
        cols = ["task", "spec", "lr", "accuracy_dev", "dev_loss", "steps", "batch_size", "num_eval"]
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for task, lr, dev in rows:
            w.writerow(dict(task=task, spec="smt@1%", lr=lr, accuracy_dev=dev, dev_loss=1, steps=150, batch_size=16,
                            num_eval=500))  # fmt: skip
    args = quality.build_parser().parse_args(["--out", str(tmp_path)])
    best = quality.best_lrs([tmp_path], args)
    assert best == {("a", "smt@1%"): 3e-2, ("b", "smt@1%"): 1e-2}
    kept = {r.key for r in quality.keep_best_lrs(plan, best)}
    assert "smt@1% lr=0.03/a/seed1" in kept and "smt@1% lr=0.01/a/seed1" not in kept
    assert "smt@1% lr=0.01/b/seed0" in kept and "smt@1% lr=0.03/b/seed0" not in kept
    assert "smt@1%:act lr=0.01/a/seed1" in kept and "full lr=0.0001/b/seed1" in kept
    assert isinstance(plan[0], Run) and isinstance(plan[0].spec, Spec)


# ------------------------------------------------------------------------------------------ statistics


def _write_sweep(d: Path, runs: list[dict]) -> None:
    """quality.csv + examples.csv as benchmarks.quality writes them, from {spec, method, lr, seed, eval, dev}."""
    d.mkdir(parents=True, exist_ok=True)
    fields = ["run_key", "task", "seed", "method", "spec", "label", "variant", "budget", "ratio", "lr"]
    fields += ["trainable_params", "trainable_pct", "targets", "accuracy_after", "accuracy_dev", "dev_loss"]
    with (d / "quality.csv").open("w", newline="") as f, (d / "examples.csv").open("w", newline="") as g:
        w = csv.DictWriter(f, fieldnames=fields)
        e = csv.DictWriter(g, fieldnames=quality.EXAMPLE_FIELDS)
        w.writeheader()
        e.writeheader()
        for r in runs:
            label = f"{r['spec']} lr={r['lr']:g}"
            key = f"{label}/{r.get('task', 't')}/seed{r['seed']}"
            method = r["spec"].split("@")[0]
            w.writerow(
                dict(run_key=key, task=r.get("task", "t"), seed=r["seed"], method=method, spec=r["spec"], label=label,
                     variant="", budget=r["spec"].partition("@")[2], ratio="", lr=r["lr"],
                     trainable_params=r.get("params", 1000), trainable_pct=0.1, targets="",
                     accuracy_after=float(np.mean(r["eval"])), accuracy_dev=float(np.mean(r["dev"])), dev_loss=1.0)
            )  # fmt: skip
            for split in ("eval", "dev"):
                e.writerow(quality.example_row(key, r.get("task", "t"), r["seed"], split, list(r[split])))


def _bernoulli(p: float, n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(int)


def _summary(path: Path) -> dict[tuple[str, str, str], dict]:
    with path.open(newline="") as f:
        return {(r["task"], r["spec"], r["baseline"]): r for r in csv.DictReader(f)}


def test_bootstrap_intervals_cover_known_differences(tmp_path):
    n, seeds = 2000, [0, 1, 2]
    runs = []
    for task, offset in (("t", 0), ("u", 100)):
        for s in seeds:
            smt = _bernoulli(0.7, n, 10 + s + offset)
            runs += [
                dict(task=task, spec="smt@1%", lr=1e-2, seed=s, eval=smt, dev=smt[:200]),
                # LoRA: 10 points lower in truth, independent examples' luck
                dict(task=task, spec="lora@1%", lr=1e-3, seed=s, eval=_bernoulli(0.6, n, 20 + s + offset),
                     dev=smt[:200]),
                # DoRA: exactly SMT's answers: the paired difference is 0 with no spread at all
                dict(task=task, spec="dora@1%", lr=1e-3, seed=s, eval=smt, dev=smt[:200]),
                # full: the same accuracy as SMT, independent answers
                dict(task=task, spec="full", lr=1e-4, seed=s, eval=_bernoulli(0.7, n, 30 + s + offset), dev=smt[:200]),
            ]  # fmt: skip
    _write_sweep(tmp_path / "sweep", runs)
    assert quality_stats.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "stats"), "--no-plot"]) == 0
    got = _summary(tmp_path / "stats" / "summary.csv")
    for task in ("t", "u", "average"):
        d = got[(task, "smt@1%", "lora@1%")]
        assert float(d["lo"]) < 0.10 < float(d["hi"]) and float(d["lo"]) > 0  # contains the truth, excludes 0
        same = got[(task, "smt@1%", "dora@1%")]
        assert float(same["lo"]) == float(same["hi"]) == 0.0
        eq = got[(task, "smt@1%", "full")]
        assert float(eq["lo"]) < 0 < float(eq["hi"])
        acc = got[(task, "smt@1%", "")]
        assert float(acc["lo"]) < 0.7 < float(acc["hi"])
    # paired: the difference's interval is narrower than an unpaired one would be (same examples resampled)
    text = (tmp_path / "stats" / "summary.md").read_text()
    assert "| average | smt@1% | lora@1% |" in text and "**>0**" in text
    # deterministic
    quality_stats.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "again"), "--no-plot"])
    assert (tmp_path / "again" / "summary.csv").read_text() == (tmp_path / "stats" / "summary.csv").read_text()


def test_learning_rate_is_chosen_on_dev_never_on_eval(tmp_path):
    runs = []
    for s in range(3):
        good_dev_bad_eval = dict(spec="smt@1%", lr=1e-2, seed=s, eval=[1] * 2 + [0] * 8, dev=[1] * 9 + [0])
        bad_dev_good_eval = dict(spec="smt@1%", lr=3e-2, seed=s, eval=[1] * 10, dev=[1] * 3 + [0] * 7)
        runs += [good_dev_bad_eval, bad_dev_good_eval]
        # an lr screened on one seed only with a perfect dev score does not beat lrs run on all seeds
        if s == 0:
            runs.append(dict(spec="smt@1%", lr=1e-1, seed=s, eval=[1] * 10, dev=[1] * 10))
    _write_sweep(tmp_path / "sweep", runs)
    rows, examples = quality_stats.read_rows([tmp_path / "sweep"])
    groups = quality_stats.choose_lrs(rows, examples)
    g = groups[("t", "smt@1%")]
    assert g.lr == 1e-2 and g.dev == pytest.approx(0.9) and g.seeds == [0, 1, 2]
    assert quality_stats.accuracy_stat(g, 1000, 0).mean == pytest.approx(0.2)


def test_bootstrap_matches_resampling_indices():
    """The multinomial shortcut has the spread of resampling seeds then example indices."""
    rng = np.random.default_rng(1)
    x = (rng.random((3, 400)) < np.array([[0.4], [0.6], [0.7]])).astype(np.float32)
    fast = quality_stats.bootstrap(x, 4000, np.random.default_rng(0))
    g = np.random.default_rng(2)
    si, ei = g.integers(0, 3, (4000, 3)), g.integers(0, 400, (4000, 3, 400))
    slow = x[si[:, :, None], ei].mean(axis=(1, 2))
    assert fast.mean() == pytest.approx(slow.mean(), abs=0.005)
    assert fast.std() == pytest.approx(slow.std(), rel=0.08)


# ------------------------------------------------------------------------------------------ the harness, tiny model


def test_quality_harness_tiny_resume_and_stats(tmp_path, monkeypatch):
    """Two methods on the tiny model: rows with dev accuracy and per-example files, a second call skips them, and
    the statistics run on the output. The dev split is replaced by the eval split here, so the dev evaluation of
    the model trained in place must reproduce run_finetune's own eval exactly (SMT patched, LoRA injected)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_cli import save_tiny_llama

    from smt_kernels.finetune import build_task

    model_dir = save_tiny_llama(tmp_path / "model")
    monkeypatch.setattr(quality, "dev_examples", lambda cfg, n: (build_task(cfg).eval, "eval (test)"))
    argv = ["--model-dir", str(model_dir), "--steps", "2", "--batch-size", "4", "--num-train", "16", "--num-eval", "3",
            "--num-dev", "3", "--block-size", "16", "--seeds", "0", "--eval-every", "0", "--tasks", "reverse",
            "--targets", "qkvogud", "--methods", "smt@5%/1e-2,lora@5%/1e-2", "--out", str(tmp_path / "out"),
            "--claims", str(tmp_path / "claims")]  # fmt: skip
    assert quality.main(argv) == 0
    rows = list(csv.DictReader((tmp_path / "out" / "quality.csv").open()))
    assert [r["spec"] for r in rows] == ["smt@5%", "lora@5%"]
    for r in rows:
        assert r["budget"] == "5%" and r["run_key"].endswith("/reverse/seed0")
        assert float(r["trainable_pct"]) == pytest.approx(5, rel=0.3)  # rank/blocks granularity on a tiny model
        assert float(r["dev_loss"]) == pytest.approx(float(r["eval_loss_after"]), abs=1e-6)
        assert float(r["eval_loss_after"]) != pytest.approx(float(r["eval_loss_before"]), abs=1e-6)
        assert float(r["accuracy_dev"]) == float(r["accuracy_after"])
    ex = list(csv.DictReader((tmp_path / "out" / "examples.csv").open()))
    assert [(e["split"], len(e["correct"])) for e in ex] == [("eval", 3), ("dev", 3)] * 2
    assert list((tmp_path / "claims").glob("before_*.json"))  # the base model's eval, shared
    # a second call with the same plan runs nothing
    assert quality.main([*argv[:-2], "--claims", str(tmp_path / "claims2")]) == 0
    assert len(list(csv.DictReader((tmp_path / "out" / "quality.csv").open()))) == 2
    assert quality_stats.main([str(tmp_path / "out"), "--out", str(tmp_path / "stats"), "--reps", "200"]) == 0
    assert (tmp_path / "stats" / "accuracy_vs_params.png").stat().st_size > 0
    assert "smt@5% | lora@5%" in (tmp_path / "stats" / "summary.md").read_text()


def test_quality_harness_reselect_nf4_and_old_csv(tmp_path, monkeypatch):
    """A quality.csv from before the reselect_at/quantize columns is still read (its plain run is skipped, its
    header widened); ``:rs1`` and ``:nf4`` runs get their own keys, columns, 4-bit baseline evaluation and stats."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_cli import save_tiny_llama

    from smt_kernels.finetune import build_task

    model_dir = save_tiny_llama(tmp_path / "model")
    monkeypatch.setattr(quality, "dev_examples", lambda cfg, n: (build_task(cfg).eval, "eval (test)"))
    out, claims = tmp_path / "out", tmp_path / "claims"
    argv = ["--model-dir", str(model_dir), "--steps", "2", "--batch-size", "4", "--num-train", "16", "--num-eval", "3",
            "--num-dev", "3", "--block-size", "16", "--seeds", "0", "--eval-every", "0", "--tasks", "reverse",
            "--targets", "qkvogud", "--out", str(out), "--claims", str(claims)]  # fmt: skip
    assert quality.main([*argv, "--methods", "smt@5%:pm/1e-2"]) == 0
    # the file as an older harness wrote it: without the new columns
    path = out / "quality.csv"
    rows = list(csv.DictReader(path.open()))
    new = ("reselect_at", "quantize", "reselections")
    old_fields = [k for k in rows[0] if k not in new]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(SystemExit, match="below --steps 2"):
        quality.main([*argv, "--methods", "smt@5%:pm:rs2/1e-2"])
    methods = "smt@5%:pm/1e-2,smt@5%:pm:rs1/1e-2,smt@5%:pm:nf4/1e-2,lora@5%:pm:nf4/1e-2"
    assert quality.main([*argv, "--methods", methods]) == 0
    listed = list(csv.DictReader(path.open()))
    rows = {r["spec"]: r for r in listed}  # the plain run is not run again
    assert [r["spec"] for r in listed] == ["smt@5%:pm", "smt@5%:pm:rs1", "smt@5%:pm:nf4", "lora@5%:pm:nf4"]
    assert len({r["run_key"] for r in rows.values()}) == 4
    assert [(r["reselect_at"], r["quantize"]) for r in rows.values()] == [("", ""), ("1", ""), ("", "nf4"), ("", "nf4")]
    [[step, kept, changed]] = json.loads(rows["smt@5%:pm:rs1"]["reselections"])
    assert step == 1 and kept + changed == int(rows["smt@5%:pm:rs1"]["num_blocks"])
    # the 4-bit base is evaluated on its own (not the 16-bit base's cached result)
    assert len(list(claims.glob("before_*.json"))) == 2
    assert rows["smt@5%:pm:nf4"]["eval_loss_before"] == rows["lora@5%:pm:nf4"]["eval_loss_before"]
    assert rows["smt@5%:pm:nf4"]["eval_loss_before"] != rows["smt@5%:pm"]["eval_loss_before"]
    assert quality_stats.main([str(out), "--out", str(tmp_path / "stats"), "--reps", "100", "--no-plot"]) == 0
    got = _summary(tmp_path / "stats" / "summary.csv")
    assert ("reverse", "smt@5%:pm:nf4", "lora@5%:pm:nf4") in got and ("reverse", "smt@5%:pm:rs1", "") in got


def test_claims_say_who_took_a_run(tmp_path, monkeypatch, capsys):
    """A process past its time budget reports as skipped only the runs no other process has claimed (a follow-up
    call's log named 8 runs as skipped that other processes had run)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_cli import save_tiny_llama

    from smt_kernels.finetune import build_task

    claims = tmp_path / "claims"
    claims.mkdir()
    assert not quality.claimed(claims, "k") and quality.claim(claims, "k") and quality.claimed(claims, "k")
    assert not quality.claim(claims, "k") and not quality.claimed(None, "k")

    model_dir = save_tiny_llama(tmp_path / "model")
    monkeypatch.setattr(quality, "dev_examples", lambda cfg, n: (build_task(cfg).eval, "eval (test)"))
    methods = "smt@5%/1e-2,lora@5%/1e-2,lora@5%/3e-3"
    plan = quality.make_plan(quality_specs.parse_methods(methods), ["reverse"], [0])
    quality.claim(claims, plan[2].key)  # another process has the third run
    argv = ["--model-dir", str(model_dir), "--steps", "1", "--batch-size", "4", "--num-train", "8", "--num-eval", "2",
            "--num-dev", "2", "--block-size", "16", "--seeds", "0", "--eval-every", "0", "--tasks", "reverse",
            "--targets", "qkvogud", "--methods", methods, "--out", str(tmp_path / "out"), "--claims", str(claims),
            "--time-budget", "0.001"]  # fmt: skip
    assert quality.main(argv) == 0  # the first run always runs; the budget is past for the others
    out = capsys.readouterr().out
    assert f"skipped (1, out of time budget or failed): {plan[1].key}" in out, out[-2000:]
