"""Block selection: score every b×b block of the target projection weights and keep the top ones.

Gradient scores (as in the SMT paper) run warm-up batches forward and backward with only the target weights
requiring grad; a post-accumulate-grad hook on each target weight folds its gradient into what the score needs
and frees ``.grad`` at once, so no optimizer state and no gradient of any other parameter ever exists.
The activation score runs forward only (no gradients at all).

With ``warmup_steps`` > 0 (the paper's warm-up) the target weights also take an AdamW step on each warm-up batch,
inside the same hook, so the gradients are those of a short full fine-tuning of the targets; the weights are put
back bit for bit afterwards unless ``keep_warmup_updates``.

Notation, per target weight W (N × K) and warm-up batches (or steps) t = 1..T:
    G = Σ_t ∂L_t/∂W_t  (gradients summed over the batches, not averaged; the ranking is the same; W_t = W without
    warm-up training, the weight after t − 1 AdamW steps with it).
    A block B is the (clipped) set of elements [r·b, min((r+1)·b, N)) × [c·b, min((c+1)·b, K)); |B| its size.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from smt_kernels.layout import check_block_size, num_blocks_along
from smt_kernels.module import SparseBlockLinear
from smt_kernels.ops import SUPPORTED_DTYPES
from smt_kernels.quant.model import nf4_weight_gradients
from smt_kernels.quant.module import NF4Linear, NF4SparseBlockLinear

if TYPE_CHECKING:  # smt_kernels.config imports this module (SCORES, STRATEGIES): imported where it is used
    from smt_kernels.config import SMTConfig

GRADIENT_SCORES = ("abs_mean", "mean_abs", "l1", "l2")
SCORES = (*GRADIENT_SCORES, "activation")
STRATEGIES = ("global", "per_matrix")
# the linear layers of a LLaMA-family decoder layer, attention then MLP (their names in Hugging Face models)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = PROJECTIONS[:3]


class Selection(dict):
    """``{module_name: [(row_block, col_block), ...]}``, a plain dict (``json.dumps`` works on it) plus metadata.

    Attributes:
        block_size: b of the blocks.
        score, strategy, targets, num_batches: how the selection was made (informational).
        warmup_steps, warmup_lr: the warm-up training steps and their learning rate (0 and None: the gradient
            at the model's own weights); in the JSON only when warmup_steps > 0.
        scores: ``{module_name: float64 (R, C) tensor}`` of every target's block scores (not serialised), or {}.
        config: the ``SMTConfig`` that ``select_blocks`` made it with (``patch`` stores it; not serialised), or None.
    """

    config: SMTConfig | None = None

    def __init__(
        self,
        blocks: Mapping[str, Sequence[Sequence[int]]] = (),
        block_size: int = 256,
        score: str | None = None,
        strategy: str | None = None,
        targets: Sequence[str] | None = None,
        num_batches: int | None = None,
        scores: dict[str, torch.Tensor] | None = None,
        warmup_steps: int = 0,
        warmup_lr: float | None = None,
    ) -> None:
        super().__init__({str(k): [(int(r), int(c)) for r, c in v] for k, v in dict(blocks).items()})
        self.block_size = check_block_size(block_size)
        self.score = score
        self.strategy = strategy
        self.targets = tuple(targets) if targets is not None else None
        self.num_batches = num_batches
        self.scores = scores or {}
        self.warmup_steps = int(warmup_steps)
        self.warmup_lr = warmup_lr

    @property
    def num_blocks(self) -> int:
        return sum(len(v) for v in self.values())

    def to_json(self) -> dict[str, Any]:
        """The selection with its block size and provenance, for ``json.dump``."""
        out: dict[str, Any] = {
            "block_size": self.block_size,
            "score": self.score,
            "strategy": self.strategy,
            "targets": list(self.targets) if self.targets is not None else None,
            "num_batches": self.num_batches,
        }
        if self.warmup_steps:  # absent without warm-up training: such files stay as they were
            out.update(warmup_steps=self.warmup_steps, warmup_lr=self.warmup_lr)
        out["blocks"] = {k: [list(p) for p in v] for k, v in self.items()}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Selection:
        if "blocks" not in data or "block_size" not in data:
            raise ValueError(f"a selection JSON needs 'blocks' and 'block_size', got keys {sorted(data)}")
        return cls(
            data["blocks"],
            data["block_size"],
            data.get("score"),
            data.get("strategy"),
            data.get("targets"),
            data.get("num_batches"),
            warmup_steps=data.get("warmup_steps", 0),
            warmup_lr=data.get("warmup_lr"),
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Selection:
        return cls.from_json(json.loads(Path(path).read_text()))


def find_target_linears(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS) -> dict[str, nn.Module]:
    """``{name: module}`` of the nn.Linear modules whose last name component (or full name) is in ``targets``.

    Modules already patched into ``SparseBlockLinear`` match too (so summaries work on patched models), and so
    do the 4-bit ``NF4Linear`` layers of a ``quantize_base`` model.
    Raises ValueError listing the projection names the model has if a target matches nothing.
    """
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets:
        raise ValueError("targets is empty; name at least one projection, e.g. ('q_proj', 'k_proj', 'v_proj')")
    found = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | SparseBlockLinear | NF4Linear)
        and (name.rsplit(".", 1)[-1] in targets or name in targets)
    }
    # a target that matches nothing is a typo or another architecture's name: silently training fewer
    # projections than asked would be worse than stopping
    unmatched = [t for t in targets if not any(n == t or n.rsplit(".", 1)[-1] == t for n in found)]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        if not found:
            msg = f"no nn.Linear module of {type(model).__name__} matches targets {list(targets)}"
        else:
            msg = f"targets {unmatched} match no linear module of {type(model).__name__}"
        raise ValueError(f"{msg}; its linear modules are named {leaves}")
    return found


def _block_sum(t: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sum of t (N, K) over each b×b block: (ceil(N/b), ceil(K/b)); zero padding past the edges."""
    n, k = t.shape
    r, c = num_blocks_along(n, block_size), num_blocks_along(k, block_size)
    t = F.pad(t, (0, c * block_size - k, 0, r * block_size - n))
    return t.view(r, block_size, c, block_size).sum(dim=(1, 3))


def block_element_counts(out_features: int, in_features: int, block_size: int) -> torch.Tensor:
    """int64 (R, C): how many weight elements each (clipped) block covers."""
    rows = torch.full((num_blocks_along(out_features, block_size),), block_size, dtype=torch.int64)
    cols = torch.full((num_blocks_along(in_features, block_size),), block_size, dtype=torch.int64)
    rows[-1] = out_features - (rows.numel() - 1) * block_size
    cols[-1] = in_features - (cols.numel() - 1) * block_size
    return rows[:, None] * cols[None, :]


def score_gradient(grad_sum: torch.Tensor, score: str, block_size: int) -> torch.Tensor:
    """Block scores (R, C) float64 on the CPU of a summed gradient G (N, K), for one of ``GRADIENT_SCORES``.

    abs_mean = |Σ_B G| / |B|;  mean_abs = Σ_B |G| / |B|;  l1 = Σ_B |G|;  l2 = sqrt(Σ_B G²).
    """
    g = grad_sum.double()
    if score == "abs_mean":
        stat = _block_sum(g, block_size)
    elif score in ("mean_abs", "l1"):
        stat = _block_sum(g.abs(), block_size)
    elif score == "l2":
        stat = _block_sum(g.square(), block_size)
    else:
        raise ValueError(f"score must be one of {GRADIENT_SCORES}, got {score!r}")
    return _finish_score(stat.cpu(), score, *grad_sum.shape, block_size)


def _finish_score(stat: torch.Tensor, score: str, n: int, k: int, block_size: int) -> torch.Tensor:
    if score == "abs_mean":
        return stat.abs() / block_element_counts(n, k, block_size)
    if score == "mean_abs":
        return stat / block_element_counts(n, k, block_size)
    if score == "l2":
        return stat.sqrt()
    return stat


class _GradientAccumulator:
    """What one target keeps between batches: a block sum (abs_mean) or the running dense gradient sum."""

    def __init__(self, weight: torch.Tensor, score: str, block_size: int, device: torch.device | None) -> None:
        self.shape = tuple(weight.shape)
        self.score = score
        self.block_size = block_size
        self.steps = 0
        if score == "abs_mean":
            # Σ_B G = Σ_t Σ_B g_t: the block sums decompose over steps, so (R, C) numbers are all we keep
            r, c = (num_blocks_along(s, block_size) for s in self.shape)
            self.acc = torch.zeros(r, c, dtype=torch.float64, device=weight.device)
        else:
            # |·|, L1 and L2 of the summed gradient do not decompose: keep G itself (fp32, optionally on the CPU)
            self.acc = torch.zeros(self.shape, dtype=torch.float32, device=device or weight.device)

    def fold(self, grad: torch.Tensor) -> None:
        if self.score == "abs_mean":
            self.acc += _block_sum(grad.double(), self.block_size)
        else:
            self.acc += grad.to(self.acc.device, torch.float32)
        self.steps += 1

    def scores(self) -> torch.Tensor:
        if self.score == "abs_mean":
            return _finish_score(self.acc.cpu(), "abs_mean", *self.shape, self.block_size)
        return score_gradient(self.acc, self.score, self.block_size)


class _ActivationAccumulator:
    """Σ over real tokens of x_j² for every input feature j of one target (forward hook)."""

    def __init__(self, module: nn.Module) -> None:
        device = (module.weight_packed if isinstance(module, NF4Linear) else module.weight).device
        self.sq = torch.zeros(module.in_features, dtype=torch.float64, device=device)
        self.mask: torch.Tensor | None = None  # (batch, seq) attention mask of the batch being run

    def hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        x = args[0].detach()
        m = self.mask
        if m is not None and x.dim() == 3 and tuple(m.shape) == tuple(x.shape[:2]):
            x = x * m.to(x.device, x.dtype)[..., None]  # padding tokens do not count
        self.sq += x.reshape(-1, x.shape[-1]).double().square().sum(0)

    def scores(self, weight: torch.Tensor, block_size: int) -> torch.Tensor:
        """mean over each block of |W_ij| · ‖x_j‖₂ (Wanda's importance), float64 (R, C) on the CPU."""
        imp = weight.detach().double().abs() * self.sq.sqrt()[None, :]
        stat = _block_sum(imp, block_size).cpu()
        return stat / block_element_counts(*weight.shape, block_size)


def _move(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _loss_of(output: Any, i: int) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None and isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        loss = output[0] if output[0].dim() == 0 else None
    if loss is None:
        raise ValueError(f"batch {i} produced no loss: gradient scores need batches with 'labels'")
    if loss.dim() != 0:
        raise ValueError(f"batch {i} produced a loss of shape {tuple(loss.shape)}; expected a scalar")
    return loss


def _take(
    order: torch.Tensor, sizes: torch.Tensor, ratio: float | None, num_blocks: int | None, what: str, block_size: int
) -> torch.Tensor:
    """The first blocks of ``order`` (flat block ids, best first) that the budget allows (see ``_count``)."""
    return order[: _count(sizes[order], ratio, num_blocks, what, block_size)]


def _count(ordered_sizes: torch.Tensor, ratio: float | None, num_blocks: int | None, what: str, block_size: int) -> int:
    """How many blocks, taken in this order (``ordered_sizes``: elements each covers), the budget allows.

    ``num_blocks``: exactly that many. ``ratio``: the shortest prefix whose covered elements (clipped edge blocks
    count clipped) reach ratio · all elements, so the trained fraction is at least ``ratio`` and overshoots by
    less than one block.
    """
    if num_blocks is not None:
        if num_blocks > ordered_sizes.numel():
            raise ValueError(
                f"num_blocks={num_blocks} but {what} has only {ordered_sizes.numel()} blocks of {block_size}"
            )
        return num_blocks
    budget = max(1, round(ratio * int(ordered_sizes.sum())))
    covered = ordered_sizes.cumsum(0)
    k = int(torch.searchsorted(covered, torch.tensor(budget, dtype=covered.dtype))) + 1
    return min(k, ordered_sizes.numel())


def budget_elements(
    model: nn.Module,
    num_blocks: int | None = None,
    ratio: float | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    strategy: str = "global",
    block_size: int = 256,
) -> int:
    """Weight elements that ``select_blocks`` with these settings trains, known before any warm-up.

    It applies ``select_blocks``' own budget rule with whole b×b blocks taken before clipped edge blocks: exact
    when the target dimensions are multiples of ``block_size``, otherwise within one block per budget group
    (all targets, or each matrix for ``per_matrix``) of the real count. Use it to give another method (e.g. LoRA)
    the same parameter budget. Raises the same ValueError as ``select_blocks`` when the budget does not fit.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    check_block_size(block_size)
    if (num_blocks is None) == (ratio is None):
        raise ValueError(f"give exactly one of num_blocks or ratio (got num_blocks={num_blocks}, ratio={ratio})")
    found = find_target_linears(model, targets)
    sizes = {n: block_element_counts(m.out_features, m.in_features, block_size).reshape(-1) for n, m in found.items()}
    groups = [("all targets together", torch.cat(list(sizes.values())))] if strategy == "global" else sizes.items()
    total = 0
    for what, group in groups:
        ordered = torch.sort(group, descending=True, stable=True).values
        total += int(ordered[: _count(ordered, ratio, num_blocks, what, block_size)].sum())
    return total


def select_blocks(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]] | Mapping[str, Any],
    num_blocks: int | None = None,
    ratio: float | None = None,
    targets: Sequence[str] | None = None,
    score: str | None = None,
    strategy: str | None = None,
    block_size: int | None = None,
    num_batches: int | None = None,
    accumulate_device: torch.device | str | None = None,
    training: bool = False,
    progress: bool = True,
    config: SMTConfig | None = None,
    warmup_steps: int = 0,
    warmup_lr: float | None = None,
    keep_warmup_updates: bool = False,
) -> Selection:
    """Score every b×b block of the target weights on warm-up batches and keep the best ones.

    Args:
        model: a causal LM (any nn.Module) whose ``model(**batch)`` returns ``.loss`` (gradient scores) or runs
            (``score="activation"``). Its parameters' ``requires_grad``, ``.grad`` and train/eval modes are
            restored afterwards.
        batches: iterable of dicts such as {input_ids, attention_mask, labels} (B, T) tensors, or one such dict;
            tensors are moved to the device of the model's first parameter.
        num_blocks: blocks to keep, in total (``strategy="global"``) or per matrix (``"per_matrix"``).
        ratio: instead of ``num_blocks``, the fraction of target weight elements to train (global: of all
            targets together; per_matrix: of each matrix): the best blocks until they cover at least
            ratio · elements (clipped edge blocks counted clipped), at least one block.
        targets: projection names (last component of the module name), e.g. q_proj, k_proj, v_proj, o_proj,
            gate_proj, up_proj, down_proj; a full module name also works. Default q_proj, k_proj, v_proj.
        score: "abs_mean" (default) | "mean_abs" | "l1" | "l2" of the summed gradient G per block (see module
            docstring and docs/patching.md), or "activation": mean over the block of |W_ij|·‖x_j‖₂ from forward hooks.
        strategy: "global" (default) top-k over all targets together, or "per_matrix" top-k in each target.
        block_size: b, a power of two in [16, 256]; default 256.
        num_batches: use at most this many batches (for endless loaders).
        accumulate_device: where the running gradient sum lives for mean_abs/l1/l2 (e.g. "cpu" to keep GPU
            memory at an SMT step's); abs_mean keeps only (R, C) block sums and ignores it.
        training: run the warm-up in train mode (dropout, gradient checkpointing) instead of eval mode.
        progress: show a tqdm bar.
        config: an ``SMTConfig`` holding targets, budget, score, strategy and block size instead of (or agreeing
            with) those keywords; a keyword that differs from it is a ValueError.
        warmup_steps: 0 (default): score the gradient at the model's weights. N > 0, the paper's warm-up: train the
            target weights (only them) for N AdamW steps, one per warm-up batch (cycling through the batches if
            there are fewer than N; batches past the N-th are not used), and score the gradients summed over those
            steps. Gradient scores only. Each target steps as soon as its gradient is complete (inside backward),
            so one dense target gradient exists at a time, but AdamW's two moments of every target weight (the
            weight's dtype) and a copy of the target weights live until the end: full fine-tuning memory for the
            targets. 4-bit (NF4) targets cannot be warm-up trained.
        warmup_lr: the warm-up's learning rate (constant; AdamW betas (0.9, 0.999), no weight decay, no
            clipping); required when warmup_steps > 0.
        keep_warmup_updates: keep the warm-up's updates in the weights, as the paper does (its warm-up is full
            fine-tuning of the targets, so its trained parameters exceed the budget). Default False: the target
            weights are restored bit for bit, so only the selected blocks differ from the base model after
            training, and block files and ``--resume`` stay exact.
    Returns:
        ``Selection``: {module_name: sorted [(row_block, col_block), ...]} for modules with at least one block,
        in model order, with ``.config`` the settings used. Ties in score go to the earlier module, then the
        lower (row, col): deterministic. ``num_batches``: distinct batches used (with warm-up at most N).
    """
    from smt_kernels.config import SMTConfig, resolve_config

    keywords = dict(num_blocks=num_blocks, ratio=ratio, targets=targets, score=score, strategy=strategy)
    # builds and validates the config (a ValueError naming the setting), or checks the keywords against it
    cfg = resolve_config(config, "select_blocks", block_size=block_size, **keywords)
    if cfg is None:  # nothing given: SMTConfig() says that the budget is missing
        cfg = SMTConfig()
    num_blocks, ratio, targets, score = cfg.num_blocks, cfg.ratio, cfg.targets, cfg.score
    strategy, block_size = cfg.strategy, cfg.block_size
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    _check_warmup(warmup_steps, warmup_lr, score)

    found = find_target_linears(model, targets)
    patched = [n for n, m in found.items() if isinstance(m, SparseBlockLinear | NF4SparseBlockLinear)]
    if patched:
        raise ValueError(
            f"select_blocks needs an unpatched model; {patched[0]} is already a "
            f"{type(found[patched[0]]).__name__} (merge it first)"
        )
    if warmup_steps:
        nf4 = [n for n, m in found.items() if isinstance(m, NF4Linear)]
        if nf4:
            raise ValueError(f"warmup_steps={warmup_steps} trains the target weights; {nf4[0]} is 4-bit (NF4)")
    if isinstance(batches, Mapping):
        batches = [batches]
    if num_batches is not None:
        total = num_batches
        batches = islice(batches, num_batches)
    else:
        total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    distinct = None
    if warmup_steps:
        pool = list(islice(batches, warmup_steps))  # at most N batches are held, even from an endless loader
        distinct, total = len(pool), warmup_steps
        batches = [pool[t % len(pool)] for t in range(warmup_steps)] if pool else []

    if score == "activation":
        raw, used = _activation_scores(model, found, batches, block_size, total, training, progress)
    else:
        warmup = (warmup_lr, keep_warmup_updates) if warmup_steps else None
        raw, used = _gradient_scores(
            model, found, batches, score, block_size, accumulate_device, total, training, progress, warmup
        )
    if used == 0:
        raise ValueError("batches is empty: selection needs at least one warm-up batch")
    for name, s in raw.items():
        if not bool(torch.isfinite(s).all()):
            raise ValueError(
                f"non-finite {score} scores in {name} (loss or activations overflowed?); "
                "try fp32 or fewer/smaller batches"
            )

    blocks = _top_k(found, raw, num_blocks, ratio, strategy, block_size)
    selection = Selection(
        blocks,
        block_size,
        score=score,
        strategy=strategy,
        targets=tuple(targets),
        num_batches=used if distinct is None else distinct,
        scores=raw,
        warmup_steps=warmup_steps,
        warmup_lr=float(warmup_lr) if warmup_steps else None,
    )
    selection.config = cfg
    return selection


def _check_warmup(warmup_steps: Any, warmup_lr: Any, score: str) -> None:
    """ValueError naming the value unless warmup_steps is an int >= 0 and, when > 0, warmup_lr a number > 0."""
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    lr_ok = not isinstance(warmup_lr, bool) and isinstance(warmup_lr, numbers.Real) and math.isfinite(warmup_lr)
    if warmup_lr is not None and not (lr_ok and warmup_lr > 0):
        raise ValueError(f"warmup_lr must be a finite number > 0, got {warmup_lr!r}")
    if warmup_steps and warmup_lr is None:
        raise ValueError(f"warmup_steps={warmup_steps} trains the targets: give its learning rate, warmup_lr")
    if warmup_steps and score not in GRADIENT_SCORES:
        raise ValueError(
            f"warmup_steps={warmup_steps} accumulates gradients over training steps; score={score!r} uses none "
            f"(use one of {GRADIENT_SCORES})"
        )


def _top_k(found, raw, num_blocks, ratio, strategy, block_size) -> dict[str, list[tuple[int, int]]]:
    names = list(found)
    out: dict[str, list[tuple[int, int]]] = {}
    sizes = {
        n: block_element_counts(found[n].out_features, found[n].in_features, block_size).reshape(-1) for n in names
    }
    if strategy == "global":
        flat = torch.cat([raw[n].reshape(-1) for n in names])
        # stable sort: equal scores keep model order, then row-major block order
        order = torch.sort(flat, descending=True, stable=True).indices
        order = _take(
            order, torch.cat([sizes[n] for n in names]), ratio, num_blocks, "all targets together", block_size
        )
        offsets = torch.tensor([0] + [raw[n].numel() for n in names]).cumsum(0)
        for n_i, name in enumerate(names):
            lo, hi = int(offsets[n_i]), int(offsets[n_i + 1])
            mine = order[(order >= lo) & (order < hi)] - lo
            if mine.numel():
                out[name] = _to_pairs(mine, raw[name].shape[1])
    else:
        for name in names:
            order = torch.sort(raw[name].reshape(-1), descending=True, stable=True).indices
            out[name] = _to_pairs(_take(order, sizes[name], ratio, num_blocks, name, block_size), raw[name].shape[1])
    return out


def _to_pairs(flat_idx: torch.Tensor, cols: int) -> list[tuple[int, int]]:
    return sorted((int(i) // cols, int(i) % cols) for i in flat_idx.tolist())


class _ModelState:
    """Saves and restores requires_grad, .grad and train/eval flags of a model around a warm-up."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> _ModelState:
        self.flags = [(p, p.requires_grad, p.grad) for p in self.model.parameters()]
        self.modes = [(m, m.training) for m in self.model.modules()]
        return self

    def __exit__(self, *exc) -> None:
        for p, flag, grad in self.flags:
            p.requires_grad_(flag)
            p.grad = grad
        for m, mode in self.modes:
            m.training = mode


def _batches_bar(batches, total, progress, desc):
    return tqdm(batches, total=total, disable=not progress, desc=desc, unit="batch")


def _gradient_scores(
    model, found, batches, score, block_size, accumulate_device, total, training, progress, warmup=None
):
    """Block scores of the summed gradients; ``warmup``: (lr, keep_updates) to take an AdamW step per batch."""
    device = next(model.parameters()).device
    acc: dict[str, _GradientAccumulator] = {}
    handles = []
    used = 0
    backup: dict[str, torch.Tensor] = {}  # the target weights before warm-up training
    restore = True
    # 4-bit targets have no weight Parameter: their backward hands each dense dL/dW to the accumulator's fold and
    # drops it, so one target's dense gradient exists at a time, as with the hooks below (an NF4Weight has the
    # .shape and .device the accumulator reads)
    for name, m in found.items():
        if isinstance(m, NF4Linear):
            acc[name] = _GradientAccumulator(m.nf4, score, block_size, accumulate_device)
    with _ModelState(model), nf4_weight_gradients(model, {n: a.fold for n, a in acc.items()}):
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        # every check before the first hook: an error after some were registered would leave them on the weights
        seen: dict[int, str] = {}
        for name, m in found.items():
            if name in acc:
                continue
            w = m.weight
            if id(w) in seen:
                raise ValueError(f"{name} and {seen[id(w)]} share one weight tensor; select one of them only")
            seen[id(w)] = name
            if w.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"{name}.weight has dtype {w.dtype}; gradient scores need a float weight")
        for name, m in found.items():
            if name in acc:
                continue
            w = m.weight
            a = acc[name] = _GradientAccumulator(w, score, block_size, accumulate_device)
            w.requires_grad_(True)
            opt = None
            if warmup is not None:
                backup[name] = w.detach().to(accumulate_device or w.device, copy=True)
                opt = torch.optim.AdamW([w], lr=warmup[0], betas=(0.9, 0.999), weight_decay=0.0, foreach=False)

            def fold(param: torch.Tensor, a: _GradientAccumulator = a, opt: torch.optim.Optimizer | None = opt):
                a.fold(param.grad)
                if opt is not None:  # warm-up training: this target's gradient is complete, step it now
                    opt.step()
                param.grad = None  # at most one dense target gradient is alive at a time

            handles.append(w.register_post_accumulate_grad_hook(fold))
        model.train(training)
        desc = f"SMT selection ({score}{', warm-up training' if warmup else ''})"
        try:
            with torch.enable_grad():
                for i, batch in enumerate(_batches_bar(batches, total, progress, desc)):
                    loss = _loss_of(model(**_move(batch, device)), i)
                    loss.backward()
                    used += 1
            restore = warmup is None or not warmup[1]
        finally:
            for h in handles:
                h.remove()
            if restore:  # also after an error: a failed call leaves the weights as they were
                with torch.no_grad():
                    for name, saved in backup.items():
                        found[name].weight.copy_(saved)
    missing = [n for n, a in acc.items() if a.steps == 0 and used]
    if missing:
        raise ValueError(
            f"no gradient reached {missing[:3]}{' ...' if len(missing) > 3 else ''}: "
            "is the loss connected to these modules?"
        )
    return {n: a.scores() for n, a in acc.items()}, used


def _activation_scores(model, found, batches, block_size, total, training, progress):
    device = next(model.parameters()).device
    acc = {name: _ActivationAccumulator(m) for name, m in found.items()}
    handles = [m.register_forward_hook(acc[name].hook) for name, m in found.items()]
    used = 0
    with _ModelState(model):
        model.train(training)
        try:
            with torch.no_grad():
                for batch in _batches_bar(batches, total, progress, "SMT selection (activation)"):
                    batch = _move(batch, device)
                    mask = batch.get("attention_mask")
                    for a in acc.values():
                        a.mask = mask
                    model(**batch)
                    used += 1
        finally:
            for h in handles:
                h.remove()
            for a in acc.values():
                a.mask = None
    # a 4-bit target is dequantized (fp32) for its score, one target at a time
    return {
        n: acc[n].scores(m.dequantized_weight(torch.float32) if isinstance(m, NF4Linear) else m.weight, block_size)
        for n, m in found.items()
    }, used


_SUMMARY_NAMES = ("ModuleChoice", "SelectionSummary", "summarize_selection")


def __getattr__(name: str) -> Any:
    # the summary lives in smt_kernels.selection_summary (it imports this module); the old import path still works
    if name in _SUMMARY_NAMES:
        from smt_kernels import selection_summary

        return getattr(selection_summary, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
