"""PNG plots of the benchmark CSV files (the kind of each file is told by its columns).

- layer CSV: per (M, layout), time relative to the frozen floor for every shape, block count and method, and a
  memory figure (bytes saved for backward, peak memory of one step);
- block-gradient CSV: TFLOP/s of block_weight_grad and torch's bmm against the dense GEMMs;
- model CSV: tokens/s and peak memory per model, method and gradient-checkpointing setting.

By default only rows of the GPU of the file's last row are drawn, the latest row winning for each configuration,
so several runs of complementary commands on one GPU merge into one picture.

    python -m benchmarks.plot                                # every CSV in benchmarks/results
    python -m benchmarks.plot $OUT/*.csv --out $OUT
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR  # noqa: E402

LAYER_METHODS = ("frozen", "full", "smt", "paper_loop", "gather_bmm", "lora")
MODEL_METHODS = ("frozen", "smt", "lora", "full")
COLORS = {
    "frozen": "#7f7f7f",
    "full": "#d62728",
    "smt": "#2ca02c",
    "paper_loop": "#ff7f0e",
    "gather_bmm": "#9467bd",
    "lora": "#1f77b4",
    "block_weight_grad": "#2ca02c",
    "torch_bmm_gathered": "#9467bd",
}
KEYS = {
    "layer": ("shape", "M", "blocks", "layout", "method", "dtype", "block_size"),
    "kernel": ("shape", "M", "n_blocks", "method", "dtype", "block_size"),
    "model": ("model", "method", "grad_ckpt", "layers", "seq", "batch", "dtype"),
}


def num(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def kind_of(fields: Sequence[str]) -> str | None:
    if "tokens_per_s" in fields:
        return "model"
    if "tflops" in fields:
        return "kernel"
    if "ratio_to_floor" in fields and "layout" in fields:
        return "layer"
    return None


def load(path: Path, run_id: str | None) -> tuple[str | None, list[dict]]:
    """(kind, rows): one run (``run_id``) or the last row's GPU with the latest row per configuration."""
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        kind = kind_of(reader.fieldnames or [])
        rows = list(reader)
    if kind is None or not rows:
        return kind, []
    if run_id:
        return kind, [r for r in rows if r.get("run_id") == run_id]
    gpu = rows[-1].get("gpu")
    latest: dict[tuple, dict] = {}
    for r in rows:
        if r.get("gpu") == gpu:
            latest[tuple(r.get(k) for k in KEYS[kind])] = r
    return kind, list(latest.values())


def _title(rows: list[dict]) -> str:
    r = rows[-1]
    return f"{r.get('gpu', '')} · torch {r.get('torch', '')} · triton {r.get('triton', '')} · {r.get('date', '')[:10]}"


def _bars(ax, groups: list[str], series: dict[str, list[float | None]], labels: dict[str, list[str]] | None = None):
    """Grouped bars: one group per x label, one bar per series; missing values leave a gap with its label."""
    names = [s for s in series if any(v is not None for v in series[s]) or labels]
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        vals = series[name]
        # missing values as zero-height bars: the legend keeps the series' colour
        ax.bar(xs, [0.0 if v is None else v for v in vals], width, label=name, color=COLORS.get(name))
        for x, v, text in zip(xs, vals, (labels or {}).get(name, [""] * len(vals)), strict=True):
            if v is None and text:
                ax.text(x, 0, text, rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)


def plot_layer(rows: list[dict], stem: str, out: Path, plt) -> list[Path]:
    written = []
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    methods = [m for m in LAYER_METHODS if any(r["method"] == m for r in rows)]
    combos = list(dict.fromkeys((r["M"], r["layout"]) for r in rows if r["layout"] != "-"))
    for tokens, layout in combos:

        def pick(shape: str, label: str, method: str, *, _t=tokens, _l=layout) -> dict | None:
            for r in rows:
                if r["shape"] != shape or r["M"] != _t or r["method"] != method:
                    continue
                if (
                    method in ("frozen", "full")
                    or (method == "lora" and r["blocks"] == label)
                    or (r["blocks"] == label and r["layout"] == _l)
                ):
                    return r
            return None

        def labels_for(shape: str, *, _t=tokens, _l=layout) -> list[str]:
            return list(
                dict.fromkeys(r["blocks"] for r in rows if r["shape"] == shape and r["M"] == _t and r["layout"] == _l)
            )

        for what, metrics in (
            ("time", [("ratio_to_floor", "time / frozen floor")]),
            ("memory", [("saved_mib", "saved for backward (MiB)"), ("peak_mem_mib", "peak of one step (MiB)")]),
        ):
            ncols = min(3, len(shapes))
            nrows_per = -(-len(shapes) // ncols)
            fig, axes = plt.subplots(
                nrows_per * len(metrics), ncols, squeeze=False, figsize=(6 * ncols, 3.6 * nrows_per * len(metrics))
            )
            for mi, (metric, ylabel) in enumerate(metrics):
                for si, shape in enumerate(shapes):
                    ax = axes[mi * nrows_per + si // ncols][si % ncols]
                    groups = labels_for(shape)
                    series: dict[str, list[float | None]] = {}
                    notes: dict[str, list[str]] = {}
                    for m in methods:
                        picked = [pick(shape, g, m) for g in groups]
                        series[m] = [num(p.get(metric)) if p and p.get("status") == "ok" else None for p in picked]
                        notes[m] = [p.get("status", "") if p and p.get("status") != "ok" else "" for p in picked]
                    _bars(ax, groups, series, notes)
                    ax.set_title(f"{shape} (N×K)", fontsize=10)
                    ax.set_ylabel(ylabel)
                    if metric == "ratio_to_floor":
                        ax.axhline(1.0, color="black", linewidth=0.8)
                        ax.axhline(1.05, color="black", linewidth=0.8, linestyle="--")
                    elif any(v for s in series.values() for v in s):
                        ax.set_yscale("symlog", linthresh=0.01)
                    else:
                        ax.text(
                            0.5,
                            0.5,
                            "not measured (peak memory needs CUDA)",
                            transform=ax.transAxes,
                            ha="center",
                            va="center",
                        )
                for si in range(len(shapes), nrows_per * ncols):
                    axes[mi * nrows_per + si // ncols][si % ncols].axis("off")
            axes[0][0].legend(fontsize=8)
            fig.suptitle(f"forward+backward, M={tokens} tokens, {layout} layout — {_title(rows)}", fontsize=11)
            fig.tight_layout()
            path = out / f"{stem}_M{tokens}_{layout}_{what}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def plot_kernel(rows: list[dict], stem: str, out: Path, plt) -> list[Path]:
    shapes = list(dict.fromkeys((r["shape"], r["M"]) for r in rows))
    fig, axes = plt.subplots(1, len(shapes), squeeze=False, figsize=(6 * len(shapes), 4))
    for ax, (shape, tokens) in zip(axes[0], shapes, strict=True):
        sub = [r for r in rows if r["shape"] == shape and r["M"] == tokens and r.get("status") == "ok"]
        ns = sorted({int(r["n_blocks"]) for r in sub if r["n_blocks"] not in ("", "0")})
        series = {
            m: [next((num(r["tflops"]) for r in sub if r["method"] == m and int(r["n_blocks"]) == n), None) for n in ns]
            for m in ("block_weight_grad", "torch_bmm_gathered")
        }
        _bars(ax, [str(n) for n in ns], series)
        for r, style in zip([r for r in sub if r["method"].startswith("dense")], ("-", ":"), strict=False):
            ax.axhline(
                num(r["tflops"]),
                color="black",
                linestyle=style,
                linewidth=0.9,
                label=f"{r['method']} {num(r['tflops']):.0f}",
            )
        ax.set_xlabel("blocks")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"block gradient, {shape}, M={tokens}", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(_title(rows), fontsize=10)
    fig.tight_layout()
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_model(rows: list[dict], stem: str, out: Path, plt) -> list[Path]:
    groups = list(dict.fromkeys((r["model"], r["grad_ckpt"]) for r in rows if r["method"] in MODEL_METHODS))
    labels = [f"{m}\nckpt {c}" for m, c in groups]
    methods = [m for m in MODEL_METHODS if any(r["method"] == m for r in rows)]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(groups)), 8))
    for ax, metric, ylabel in ((axes[0], "tokens_per_s", "tokens / s"), (axes[1], "peak_mem_gib", "peak GiB")):
        series, notes = {}, {}
        for m in methods:
            picked = [
                next((r for r in rows if (r["model"], r["grad_ckpt"], r["method"]) == (*g, m)), None) for g in groups
            ]
            series[m] = [num(p.get(metric)) if p and p.get("status") == "ok" else None for p in picked]
            notes[m] = [p.get("status", "") if p and p.get("status") != "ok" else "" for p in picked]
        _bars(ax, labels, series, notes)
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    r = rows[-1]
    fig.suptitle(f"training step, batch {r.get('batch')}×{r.get('seq')} tokens — {_title(rows)}", fontsize=10)
    fig.tight_layout()
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("csv", nargs="*", type=Path, help=f"CSV files (default: every *.csv in {RESULTS_DIR})")
    p.add_argument("--out", type=Path, default=None, help="folder for the PNG files (default: next to each CSV)")
    p.add_argument("--run-id", default=None, help="draw only this run (the run_id column)")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = args.csv or sorted(RESULTS_DIR.glob("*.csv"))
    if not paths:
        print(f"no CSV files given or found in {RESULTS_DIR}", file=sys.stderr)
        return 1
    plotters = {"layer": plot_layer, "kernel": plot_kernel, "model": plot_model}
    for path in paths:
        kind, rows = load(path, args.run_id)
        if kind is None:
            print(f"skip {path}: not a benchmark CSV")
            continue
        if not rows:
            print(f"skip {path}: no rows to draw")
            continue
        out = args.out or path.parent
        out.mkdir(parents=True, exist_ok=True)
        for png in plotters[kind](rows, path.stem, out, plt):
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
