"""The ``--methods`` item syntax of benchmarks/quality.py: ``METHOD[@BUDGET][:OPTION...][/LR]`` parsed into a
``Spec``, and a spec turned into ``FinetuneConfig`` keywords (budgets as % of the model converted to the ratio of the
target weights). The syntax itself is documented in benchmarks/quality.py's module docstring.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from smt_kernels.finetune import DEFAULT_LR, FinetuneConfig
from smt_kernels.finetune import config as finetune_config
from smt_kernels.select import PROJECTIONS

TARGET_LETTERS = {name[0]: name for name in PROJECTIONS}  # q k v o g(ate) u(p) d(own)
SHORT_SCORES = {"act": "activation", "abs": "abs_mean"}
SHORT_STRATEGIES = {"pm": "per_matrix", "gl": "global"}
BUDGET_METHODS = ("smt", "lora", "dora")
_WARMUP = re.compile(r"^wu(\d+)(?:lr([0-9.eE+-]+))?$")
_RESELECT = re.compile(r"^rs(.*)$")
QUANTIZE = ("nf4",)  # :nf4 = FinetuneConfig.quantize (a 4-bit frozen base: SMT on it, or LoRA = QLoRA)


@dataclass(frozen=True)
class Spec:
    """One column of the grid: a method, its budget, selection options and an optional own lr.

    The budget is ``ratio`` (of the target weights) or ``pct`` (percent of the whole model; :meth:`resolve`
    turns it into a ratio once the model's parameter counts are known).
    """

    method: str
    ratio: float | None = None
    lr: float | None = None
    pct: float | None = None
    score: str | None = None
    strategy: str | None = None
    warmup_steps: int | None = None
    warmup_lr: float | None = None
    targets: tuple[str, ...] | None = None
    reselect_at: tuple[int, ...] | None = None
    quantize: str | None = None

    @property
    def budget(self) -> str:
        """The budget as written: '0.05' (of the targets), '1%' (of the model) or '' (full)."""
        if self.pct is not None:
            return f"{self.pct:g}%"
        return "" if self.ratio is None else f"{self.ratio:g}"

    @property
    def variant(self) -> str:
        """The options as written (':act:pm:wu20'), '' for the plain method."""
        out = []
        if self.score is not None:
            short = {v: k for k, v in SHORT_SCORES.items()}
            out.append(short.get(self.score, f"score={self.score}"))
        if self.strategy is not None:
            out.append({v: k for k, v in SHORT_STRATEGIES.items()}[self.strategy])
        if self.warmup_steps is not None:
            out.append(f"wu{self.warmup_steps}" + ("" if self.warmup_lr is None else f"lr{self.warmup_lr:g}"))
        if self.targets is not None:
            letters = {v: k for k, v in TARGET_LETTERS.items()}
            out.append("t=" + "".join(letters[t] for t in self.targets))
        if self.reselect_at is not None:
            out.append("rs" + ",".join(map(str, self.reselect_at)))
        if self.quantize is not None:
            out.append(self.quantize)
        return "".join(":" + o for o in out)

    @property
    def key(self) -> str:
        """The item without its lr: what a learning rate is chosen over."""
        budget = self.budget
        return self.method + (f"@{budget}" if budget else "") + self.variant

    @property
    def label(self) -> str:
        return self.key if self.lr is None else f"{self.key} lr={self.lr:g}"

    def resolve(self, total_params: int, target_elements: int) -> Spec:
        """This spec with ``ratio`` set from ``pct`` (percent of ``total_params``, over ``target_elements``)."""
        if self.pct is None:
            return self
        ratio = self.pct / 100 * total_params / target_elements
        if not 0 < ratio <= 1:
            raise SystemExit(
                f"{self.key}: {self.pct:g}% of the model is {ratio:.3g} of its target weights "
                f"({target_elements:,} of {total_params:,}); it must be in (0, 1] — more targets or a smaller budget"
            )
        return dataclasses.replace(self, ratio=ratio)


def parse_spec(item: str) -> Spec:
    """One --methods item (see the module docstring) -> Spec; SystemExit naming the item if malformed."""
    head, _, lr = item.strip().partition("/")
    first, *options = head.split(":")
    name, at, budget = first.partition("@")

    def bad(why: str) -> SystemExit:
        return SystemExit(f"--methods item {item!r}: {why} (syntax: METHOD[@BUDGET][:OPTION...][/LR])")

    if name not in ("smt", "lora", "dora", "full"):
        raise bad(f"unknown method {name!r}; use smt, lora, dora or full")
    if name == "full" and (at or options):
        raise bad("full takes no budget or options")
    if name != "full" and not budget:
        raise bad(f"{name} needs a budget, e.g. {name}@0.01 (of the targets) or {name}@1% (of the model)")
    kw: dict = {}
    try:
        if budget.endswith("%"):
            kw["pct"] = float(budget[:-1])
        elif budget:
            kw["ratio"] = float(budget)
        if lr:
            kw["lr"] = float(lr)
    except ValueError:
        raise bad("bad number") from None
    if any(v <= 0 for k, v in kw.items()):
        raise bad("budget and lr must be > 0")
    for opt in options:
        m = _WARMUP.match(opt)
        if opt in SHORT_SCORES or opt.startswith("score="):
            kw["score"] = SHORT_SCORES.get(opt) or opt.partition("=")[2]
            from smt_kernels.select import SCORES

            if kw["score"] not in SCORES:
                raise bad(f"unknown score {kw['score']!r}; choose from {', '.join(SCORES)}")
        elif opt in SHORT_STRATEGIES:
            kw["strategy"] = SHORT_STRATEGIES[opt]
        elif m:
            kw["warmup_steps"] = int(m.group(1))
            try:
                kw["warmup_lr"] = float(m.group(2)) if m.group(2) else None
            except ValueError:
                raise bad(f"bad warm-up lr in {opt!r}") from None
        elif opt in QUANTIZE:
            kw["quantize"] = opt
        elif (rs := _RESELECT.match(opt)) is not None:
            try:
                steps = tuple(int(x) for x in rs.group(1).split(","))
            except ValueError:
                raise bad(f"{opt!r}: rs takes steps, e.g. rs50 or rs50,100") from None
            if any(x < 1 for x in steps) or any(a >= b for a, b in zip(steps, steps[1:], strict=False)):
                raise bad(f"{opt!r}: re-selection steps must be >= 1, increasing, each once")
            kw["reselect_at"] = steps
        elif opt.startswith("t="):
            letters = opt[2:]
            if not letters or any(c not in TARGET_LETTERS for c in letters) or len(set(letters)) != len(letters):
                raise bad(f"t= takes letters of {''.join(TARGET_LETTERS)} (q k v o gate up down), got {letters!r}")
            kw["targets"] = tuple(TARGET_LETTERS[c] for c in "qkvogud" if c in letters)
        else:
            raise bad(f"unknown option {opt!r} (act, abs, score=NAME, pm, gl, wuN, wuNlrX, t=LETTERS, rsN[,M...], nf4)")
    smt_only = [k for k in ("score", "warmup_steps", "reselect_at") if k in kw]
    if name != "smt" and smt_only:
        raise bad(f"{', '.join(smt_only)} apply to smt only")
    if "quantize" in kw and name == "dora":
        raise bad(f"{kw['quantize']}: DoRA on a 4-bit base is not implemented (smt and lora only)")
    for k, what in (("reselect_at", "re-selection folds blocks into"), ("warmup_steps", "warm-up trains")):
        if "quantize" in kw and k in kw:
            raise bad(f"{kw['quantize']}: {what} the base weights, which stay frozen in 4 bits; leave one out")
    return Spec(name, **kw)


def parse_methods(text: str) -> list[Spec]:
    """'smt@0.01,smt@1%:act/3e-3,lora@1%,dora@1%,full/1e-4' -> specs (see the module docstring). A comma followed
    by a digit continues the item (the steps of ``:rs50,100``)."""
    return [parse_spec(s) for s in re.split(r",(?!\s*\d)", text) if s.strip()]


def parse_targets(text: str) -> tuple[str, ...]:
    """'q_proj,k_proj' or the letters 'qkvogud' -> projection names."""
    text = text.strip()
    if text and "," not in text and "_" not in text and all(c in TARGET_LETTERS for c in text):
        return tuple(TARGET_LETTERS[c] for c in "qkvogud" if c in text)
    return tuple(t.strip() for t in text.split(",") if t.strip())


def parse_lrs(text: str | None) -> dict[str, float]:
    """'smt=1e-3,full=3e-5' -> {"smt": 1e-3, "full": 3e-5} on top of the command's defaults."""
    lrs = dict(DEFAULT_LR)
    lrs.setdefault("dora", lrs["lora"])
    for item in (s.strip() for s in (text or "").split(",")):
        if item:
            k, _, v = item.partition("=")
            if k not in lrs or not v:
                raise SystemExit(f"--lr items look like smt=1e-3, got {item!r}")
            lrs[k] = float(v)
    return lrs


def parse_fraction(text: str | None, what: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"{what} looks like 0/2, got {text!r}") from None
    if not 0 <= i < n:
        raise SystemExit(f"{what} {text!r}: need 0 <= i < n")
    return i, n


def config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(FinetuneConfig)}


def unavailable(specs: Iterable[Spec]) -> list[tuple[Spec, str]]:
    """The specs that need a method or option this checkout's FinetuneConfig lacks, and what is missing."""
    have, methods = config_fields(), set(getattr(finetune_config, "METHODS", ()))
    out = []
    for s in specs:
        if s.method not in methods:
            out.append((s, f"FinetuneConfig has no method {s.method!r} (has {', '.join(sorted(methods))})"))
        elif s.warmup_steps is not None and "select_warmup_steps" not in have:
            out.append((s, "FinetuneConfig has no select_warmup_steps"))
        elif s.warmup_lr is not None and "select_warmup_lr" not in have:
            out.append((s, "FinetuneConfig has no select_warmup_lr"))
        elif s.reselect_at is not None and "reselect_at" not in have:
            out.append((s, "FinetuneConfig has no reselect_at"))
        elif s.quantize is not None and "quantize" not in have:
            out.append((s, "FinetuneConfig has no quantize"))
    return out


def method_options(method: str, targets: tuple[str, ...], block_size: int, score: str) -> dict:
    """The budget options ``method`` uses (FinetuneConfig refuses options a method ignores)."""
    if method == "full":
        return {}
    opts = {"targets": targets, "block_size": block_size}
    return {**opts, "score": score} if method == "smt" else opts


def spec_options(spec: Spec, targets: tuple[str, ...], block_size: int, score: str) -> dict:
    """FinetuneConfig keywords of ``spec`` (a resolved one: ``ratio`` set)."""
    opts = method_options(spec.method, spec.targets or targets, block_size, spec.score or score)
    if spec.method == "full":
        return opts
    if spec.quantize is not None:
        opts["quantize"] = spec.quantize
    if spec.reselect_at is not None:
        opts["reselect_at"] = spec.reselect_at
    opts["ratio"] = spec.ratio
    # an item without :pm/:gl is a global budget, as in the recorded sweeps (the command's default is per_matrix)
    opts["strategy"] = spec.strategy if spec.strategy is not None else "global"
    if spec.warmup_steps is not None:
        opts["select_warmup_steps"] = spec.warmup_steps
    if spec.warmup_lr is not None:
        opts["select_warmup_lr"] = spec.warmup_lr
    return opts


def target_elements(model: torch.nn.Module, targets: tuple[str, ...]) -> int:
    """Weight elements of the target projections (what FinetuneConfig.ratio is a fraction of)."""
    from smt_kernels.select import find_target_linears

    return sum(m.out_features * m.in_features for m in find_target_linears(model, targets).values())
