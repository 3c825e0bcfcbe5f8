"""Statistics of a quality sweep: learning rate chosen on the dev split, eval accuracy with 95 % bootstrap intervals,
paired differences SMT − LoRA / DoRA / full at equal budget, averages over tasks, a table and a plot.

    python -m benchmarks.quality_stats $OUT/sweep [MORE_DIRS_OR_CSVS ...] --out $OUT/sweep/stats

Reads every ``quality.csv`` and ``examples.csv`` under the given paths (a run key seen twice is used once). For
each (task, spec) — a spec is the method, budget and options without the lr (``quality.py``'s ``spec`` column) —
the lr with the highest mean dev accuracy over seeds is kept (ties: lower dev loss, then the smaller lr), among
the lrs run on the most seeds (a one-seed screen's other lrs have fewer); the eval split is never looked at for
that choice. Intervals are a hierarchical bootstrap: seeds are resampled with replacement, then the eval examples
within each drawn seed. Differences are paired: the same seeds and examples (a seed's eval examples are the same
for every method) are resampled for both sides. Averages over tasks average the tasks' bootstrap replicates
(tasks resampled independently). Pure numpy; deterministic (``--seed``).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

COLORS = {"smt": "#2ca02c", "lora": "#1f77b4", "dora": "#9467bd", "full": "#d62728"}
QUANTIZE = ("nf4",)  # spec options naming the base's format (quality_specs.QUANTIZE): part of the baseline too
BASELINES = ("lora", "dora", "full")
AVERAGE = "average"


@dataclass
class Group:
    """One (task, spec) at its dev-chosen lr: the 0/1 eval results per seed, and what the choice saw."""

    task: str
    spec: str
    method: str
    budget: str
    variant: str
    targets: str
    lr: float
    lrs: dict[float, tuple[float, int]]  # every lr tried -> (mean dev accuracy, seeds)
    params: float  # mean trainable parameters
    pct: float  # mean % of the model
    dev: float  # mean dev accuracy at the chosen lr
    eval: dict[int, np.ndarray] = field(default_factory=dict)  # seed -> 0/1 per eval example

    @property
    def seeds(self) -> list[int]:
        return sorted(self.eval)


def read_rows(paths: Sequence[Path]) -> tuple[list[dict], dict[tuple[str, str], np.ndarray]]:
    """Rows of every quality.csv and the 0/1 arrays of every examples.csv under ``paths`` (deduplicated by run key)."""
    rows, seen, examples = [], set(), {}
    for p in paths:
        qs = [p] if p.is_file() else sorted(p.rglob("quality.csv"))
        for q in qs:
            with q.open(newline="") as f:
                for r in csv.DictReader(f):
                    if r.get("run_key") and r["run_key"] not in seen:
                        seen.add(r["run_key"])
                        rows.append(r)
            ex = q.parent / "examples.csv"
            if ex.is_file():
                with ex.open(newline="") as f:
                    for e in csv.DictReader(f):
                        examples.setdefault((e["run_key"], e["split"]), _bits(e["correct"]))
    return rows, examples


def _bits(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8) - ord("0")


def _float(x: str | None, default: float = math.nan) -> float:
    try:
        return float(x) if x not in (None, "") else default
    except ValueError:
        return default


def choose_lrs(rows: list[dict], examples: dict[tuple[str, str], np.ndarray]) -> dict[tuple[str, str], Group]:
    """(task, spec) -> its group at the lr with the best mean dev accuracy (dev loss, then smaller lr, on ties).

    Runs without per-example eval results are left out (they cannot be bootstrapped); a spec whose runs have no
    dev accuracy is left out as well, rather than chosen on the eval split.
    """
    by: dict[tuple[str, str], dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if (r["run_key"], "eval") not in examples:
            continue
        spec = r.get("spec") or r["label"].split(" lr=")[0]
        by[(r["task"], spec)][_float(r["lr"])].append(r)
    out = {}
    for (task, spec), per_lr in sorted(by.items()):

        def rank(lr: float, per_lr: dict = per_lr) -> tuple[float, float, float]:
            rs = per_lr[lr]
            dev = [_float(r.get("accuracy_dev")) for r in rs]
            loss = [_float(r.get("dev_loss"), math.inf) for r in rs]
            return (-float(np.mean(dev)), float(np.mean(loss)), lr)

        scored = {lr: rank(lr) for lr in per_lr}
        usable = [lr for lr, s in scored.items() if not math.isnan(s[0])]
        # an lr only screened on fewer seeds (quality.py --lr-from) is not chosen over one run on all of them
        most = max((len(per_lr[lr]) for lr in usable), default=0)
        usable = [lr for lr in usable if len(per_lr[lr]) == most]
        if not usable:
            print(f"note: {task} {spec} has no dev accuracy; left out", file=sys.stderr)
            continue
        best = min(usable, key=lambda lr: scored[lr])
        rs = per_lr[best]
        first = rs[0]
        out[(task, spec)] = Group(
            task=task,
            spec=spec,
            method=first["method"],
            budget=first.get("budget") or (f"{_float(first['ratio']):g}" if first.get("ratio") else ""),
            variant=first.get("variant", ""),
            targets=first.get("targets", ""),
            lr=best,
            lrs={lr: (-scored[lr][0], len(per_lr[lr])) for lr in sorted(per_lr)},
            params=float(np.mean([_float(r["trainable_params"]) for r in rs])),
            pct=float(np.mean([_float(r["trainable_pct"]) for r in rs])),
            dev=-scored[best][0],
            eval={int(r["seed"]): examples[(r["run_key"], "eval")] for r in rs},
        )
    return out


def _matrix(per_seed: dict[int, np.ndarray], seeds: list[int]) -> np.ndarray:
    """Seeds × examples (float32); seeds with fewer examples cut the others to the shortest."""
    n = min(len(per_seed[s]) for s in seeds)
    return np.stack([per_seed[s][:n] for s in seeds]).astype(np.float32)


def bootstrap(x: np.ndarray, reps: int, rng: np.random.Generator) -> np.ndarray:
    """Hierarchical bootstrap replicates of the mean of ``x`` (seeds × examples): resample seeds, then examples
    within each drawn seed. Returns ``reps`` means.

    Resampling n examples with replacement only matters through how many of each value are drawn, which is
    multinomial(n, the seed's value frequencies); drawing those counts is the same distribution as drawing
    indices, without a reps × seeds × n array (x holds few values: 0/1, or -1/0/1 for paired differences).
    """
    s, n = x.shape
    levels, inverse = np.unique(x, return_inverse=True)
    inverse = inverse.reshape(x.shape)
    freq = np.stack([np.bincount(inverse[i], minlength=len(levels)) for i in range(s)]) / n
    seed_idx = rng.integers(0, s, size=(reps, s))
    counts = rng.multinomial(n, freq[seed_idx])  # reps × s × levels
    return (counts @ levels).mean(axis=1) / n


def _rng(base: int, *key: str) -> np.random.Generator:
    """A generator per quantity, seeded from its name: the same numbers whatever else is computed."""
    return np.random.default_rng([base, zlib.crc32("\0".join(key).encode())])


def interval(reps: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return float(lo), float(hi)


@dataclass
class Stat:
    """A mean with its 95 % interval and the bootstrap replicates (for averaging over tasks)."""

    mean: float
    lo: float
    hi: float
    reps: np.ndarray
    seeds: int
    n: int


def accuracy_stat(g: Group, reps: int, base: int) -> Stat:
    x = _matrix(g.eval, g.seeds)
    r = bootstrap(x, reps, _rng(base, "acc", g.task, g.spec))
    return Stat(float(x.mean()), *interval(r), r, x.shape[0], x.shape[1])


def diff_stat(a: Group, b: Group, reps: int, base: int) -> Stat | None:
    """Paired a − b on the seeds both have (same seed = same eval examples); None without a common seed."""
    seeds = sorted(set(a.eval) & set(b.eval))
    if not seeds:
        return None
    xa, xb = _matrix(a.eval, seeds), _matrix(b.eval, seeds)
    n = min(xa.shape[1], xb.shape[1])
    d = xa[:, :n] - xb[:, :n]
    r = bootstrap(d, reps, _rng(base, "diff", a.task, a.spec, b.spec))
    return Stat(float(d.mean()), *interval(r), r, len(seeds), n)


def average(stats: list[Stat]) -> Stat:
    r = np.mean([s.reps for s in stats], axis=0)
    return Stat(float(np.mean([s.mean for s in stats])), *interval(r), r, min(s.seeds for s in stats), 0)


def baseline_spec(g: Group, method: str, strategy: bool = False) -> str:
    """The spec ``method`` is compared with ``g`` under: same budget, targets and base (``:nf4``: QLoRA), no
    selection options (``strategy``: but the same ``:pm``/``:gl``, which sizes an adapter's rank)."""
    if method == "full":
        return "full"
    keep = ("pm", "gl", *QUANTIZE) if strategy else QUANTIZE
    same = [o for o in g.variant.split(":") if o.startswith("t=") or o in keep]
    return f"{method}@{g.budget}" + "".join(":" + o for o in same)


@dataclass
class Summary:
    groups: dict[tuple[str, str], Group]
    acc: dict[tuple[str, str], Stat]  # (task or "average", spec)
    diffs: dict[tuple[str, str, str], Stat]  # (task or "average", smt spec, baseline spec)
    tasks: list[str]


def summarize(rows: list[dict], examples: dict, reps: int = 4000, seed: int = 0) -> Summary:
    groups = choose_lrs(rows, examples)
    tasks = sorted({t for t, _ in groups})
    acc = {k: accuracy_stat(g, reps, seed) for k, g in groups.items()}
    specs = sorted({s for _, s in groups})
    for spec in specs:  # the average over tasks, only where every task has the spec
        if all((t, spec) in acc for t in tasks):
            acc[(AVERAGE, spec)] = average([acc[(t, spec)] for t in tasks])
    diffs: dict[tuple[str, str, str], Stat] = {}
    for (task, spec), g in groups.items():
        if g.method != "smt":
            continue
        for m in BASELINES:
            other = groups.get((task, baseline_spec(g, m, strategy=True))) or groups.get((task, baseline_spec(g, m)))
            if other is not None and (d := diff_stat(g, other, reps, seed)) is not None:
                diffs[(task, spec, other.spec)] = d
    pairs = {(s, b) for _, s, b in diffs}
    for s, b in sorted(pairs):
        if all((t, s, b) in diffs for t in tasks):
            diffs[(AVERAGE, s, b)] = average([diffs[(t, s, b)] for t in tasks])
    return Summary(groups, acc, diffs, tasks)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(s: Stat) -> str:
    return f"{_pct(s.mean)} [{_pct(s.lo)}, {_pct(s.hi)}]"


def _diff(s: Stat) -> str:
    mark = " **>0**" if s.lo > 0 else " **<0**" if s.hi < 0 else ""
    return f"{100 * s.mean:+.1f} [{100 * s.lo:+.1f}, {100 * s.hi:+.1f}]{mark}"


def _order(spec: str, groups: dict) -> tuple:
    g = next(g for (_, s), g in groups.items() if s == spec)
    return ("smt", "lora", "dora", "full").index(g.method) if g.method in COLORS else 9, g.params, g.variant


def write_markdown(s: Summary, path: Path) -> str:
    specs = sorted({sp for _, sp in s.groups}, key=lambda sp: _order(sp, s.groups))
    lines = [
        "# Quality sweep: eval accuracy at the dev-chosen learning rate",
        "",
        "Accuracy % (95 % hierarchical bootstrap interval over seeds and eval examples). The lr of each task and "
        "spec is the one with the highest mean dev accuracy (never chosen on eval), among the lrs run on the most "
        "seeds; `lrs (dev %, seeds)` lists every lr tried with its mean dev accuracy and number of seeds.",
        "",
        "| task | spec | trainable params | % of model | lr | dev % | eval % [95 % CI] | seeds × examples "
        "| lrs (dev %, seeds) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task in s.tasks:
        for spec in specs:
            g = s.groups.get((task, spec))
            if g is None:
                continue
            a = s.acc[(task, spec)]
            tried = ", ".join(f"{lr:g} ({_pct(d)}, {k}s)" for lr, (d, k) in g.lrs.items())
            lines.append(
                f"| {task} | {spec} | {g.params:,.0f} | {g.pct:.3f} | {g.lr:g} | {_pct(g.dev)} | {_ci(a)} "
                f"| {a.seeds} × {a.n} | {tried} |"
            )
    avg = [sp for sp in specs if (AVERAGE, sp) in s.acc]
    if avg:
        lines += ["", f"## Average over tasks ({', '.join(s.tasks)})", "", "| spec | eval % [95 % CI] |", "|---|---|"]
        lines += [f"| {sp} | {_ci(s.acc[(AVERAGE, sp)])} |" for sp in avg]
    if s.diffs:
        lines += [
            "",
            "## Paired differences (points; SMT minus baseline at equal budget, each at its dev-chosen lr)",
            "",
            "**>0** / **<0**: the 95 % interval excludes 0.",
            "",
            "| task | SMT spec | baseline | difference [95 % CI] | seeds × examples |",
            "|---|---|---|---|---|",
        ]
        for task in [*s.tasks, AVERAGE]:
            for (t, a, b), d in sorted(s.diffs.items(), key=lambda kv: (_order(kv[0][1], s.groups), kv[0][2])):
                if t == task:
                    n = f"{d.seeds} × {d.n}" if d.n else f"{d.seeds} seeds × tasks"
                    lines.append(f"| {t} | {a} | {b} | {_diff(d)} | {n} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def write_csv(s: Summary, path: Path) -> None:
    cols = ["kind", "task", "spec", "baseline", "method", "budget", "variant", "lr", "trainable_params"]
    cols += ["pct_of_model", "dev", "mean", "lo", "hi", "seeds", "examples"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for (task, spec), a in s.acc.items():
            g = s.groups.get((task, spec)) or next(g for (_, sp), g in s.groups.items() if sp == spec)
            per_task = task != AVERAGE
            w.writerow(
                dict(kind="accuracy", task=task, spec=spec, baseline="", method=g.method, budget=g.budget,
                     variant=g.variant, lr=g.lr if per_task else "", trainable_params=round(g.params),
                     pct_of_model=f"{g.pct:.4f}", dev=f"{g.dev:.4f}" if per_task else "", mean=f"{a.mean:.4f}",
                     lo=f"{a.lo:.4f}", hi=f"{a.hi:.4f}", seeds=a.seeds, examples=a.n)
            )  # fmt: skip
        for (task, spec, base), d in s.diffs.items():
            g = next(g for (_, sp), g in s.groups.items() if sp == spec)
            w.writerow(
                dict(kind="difference", task=task, spec=spec, baseline=base, method=g.method, budget=g.budget,
                     variant=g.variant, lr="", trainable_params=round(g.params), pct_of_model=f"{g.pct:.4f}",
                     dev="", mean=f"{d.mean:.4f}", lo=f"{d.lo:.4f}", hi=f"{d.hi:.4f}", seeds=d.seeds, examples=d.n)
            )  # fmt: skip


def plot(s: Summary, path: Path) -> None:
    """Eval accuracy against trainable parameters (log x), a line per method over its plain budgets, error bars
    = 95 % CI; SMT selection variants as separate markers; a panel per task and one for the average."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = s.tasks + ([AVERAGE] if any(t == AVERAGE for t, _ in s.acc) else [])
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5.2 * cols, 4.2 * rows))
    FigureCanvasAgg(fig)
    markers = ["s", "^", "v", "D", "P", "X", "*"]
    variants = sorted({g.variant for g in s.groups.values() if g.variant})
    for i, task in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for method, color in COLORS.items():
            pts = []
            for (t, spec), a in s.acc.items():
                g = next(g for (_, sp), g in s.groups.items() if sp == spec)
                if t == task and g.method == method:
                    pts.append((g.params, a, g.variant))
            plain = sorted((p for p in pts if not p[2]), key=lambda p: p[0])
            if plain:
                x = [p[0] for p in plain]
                y = np.array([100 * p[1].mean for p in plain])
                err = np.array(
                    [[100 * (p[1].mean - p[1].lo) for p in plain], [100 * (p[1].hi - p[1].mean) for p in plain]]
                )
                ax.errorbar(x, y, yerr=err, color=color, marker="o", capsize=3, label=method)
            for params, a, var in (p for p in pts if p[2]):
                m = markers[variants.index(var) % len(markers)]
                ax.errorbar([params], [100 * a.mean], yerr=[[100 * (a.mean - a.lo)], [100 * (a.hi - a.mean)]],
                            color=color, marker=m, linestyle="none", capsize=2, alpha=0.7,
                            label=f"{method}{var}")  # fmt: skip
        ax.set_xscale("log")
        ax.set_title(task if task != AVERAGE else f"average over {len(s.tasks)} tasks")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("eval accuracy % (95 % CI)")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=True))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", type=Path, help="quality.csv files or directories searched recursively")
    p.add_argument("--out", type=Path, required=True, help="directory for summary.md, summary.csv, the plot")
    p.add_argument("--reps", type=int, default=4000, help="bootstrap replicates")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    rows, examples = read_rows(args.paths)
    if not rows:
        print("error: no quality.csv rows with run keys under " + ", ".join(map(str, args.paths)), file=sys.stderr)
        return 2
    s = summarize(rows, examples, args.reps, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    text = write_markdown(s, args.out / "summary.md")
    write_csv(s, args.out / "summary.csv")
    if not args.no_plot and s.acc:
        plot(s, args.out / "accuracy_vs_params.png")
    print(text)
    print(f"{len(rows)} runs, {len(s.groups)} task × spec groups; wrote {args.out}/summary.md, summary.csv"
          + ("" if args.no_plot else ", accuracy_vs_params.png"))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
