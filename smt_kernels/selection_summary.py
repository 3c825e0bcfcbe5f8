"""What a block selection trains, per module and per layer: a printable table and a heat map (PNG)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from smt_kernels.config import SMTConfig
from smt_kernels.layout import check_block_size
from smt_kernels.module import SparseBlockLinear
from smt_kernels.patch import CONFIG_ATTR
from smt_kernels.quant.module import NF4Linear
from smt_kernels.select import block_element_counts, find_target_linears

_LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class ModuleChoice:
    """One target module: its shape, block grid and how many blocks were chosen."""

    name: str
    layer: int | None
    kind: str
    out_features: int
    in_features: int
    grid: tuple[int, int]
    num_blocks: int
    trainable: int


@dataclass
class SelectionSummary:
    """What a selection trains, per module and per layer. ``print(summary)`` or ``summary.plot("map.png")``."""

    block_size: int
    modules: list[ModuleChoice]
    model_params: int

    @property
    def kinds(self) -> list[str]:
        return list(dict.fromkeys(m.kind for m in self.modules))

    @property
    def num_blocks(self) -> int:
        return sum(m.num_blocks for m in self.modules)

    @property
    def trainable(self) -> int:
        return sum(m.trainable for m in self.modules)

    @property
    def target_params(self) -> int:
        return sum(m.out_features * m.in_features for m in self.modules)

    def per_layer(self) -> dict[int | None, dict[str, int]]:
        """{layer index (None for modules outside numbered layers): {kind: blocks}}."""
        table: dict[int | None, dict[str, int]] = {}
        for m in self.modules:
            row = table.setdefault(m.layer, dict.fromkeys(self.kinds, 0))
            row[m.kind] += m.num_blocks
        return table

    def per_kind(self) -> dict[str, int]:
        return {k: sum(m.num_blocks for m in self.modules if m.kind == k) for k in self.kinds}

    def __str__(self) -> str:
        kinds = self.kinds
        w = max([6, *(len(k) for k in kinds)])
        lines = [
            f"SMT selection: {self.num_blocks} blocks of {self.block_size}×{self.block_size}, "
            f"{self.trainable:,} trainable weights = {100 * self.trainable / max(self.target_params, 1):.3f}% "
            f"of the target weights, {100 * self.trainable / max(self.model_params, 1):.4f}% of all "
            f"{self.model_params:,} parameters"
        ]
        lines.append("layer  " + " ".join(f"{k:>{w}}" for k in kinds) + f" {'total':>{w}}")
        for layer, row in self.per_layer().items():
            label = "-" if layer is None else str(layer)
            lines.append(f"{label:<6} " + " ".join(f"{row[k]:>{w}}" for k in kinds) + f" {sum(row.values()):>{w}}")
        per_kind = self.per_kind()
        lines.append("all    " + " ".join(f"{per_kind[k]:>{w}}" for k in kinds) + f" {self.num_blocks:>{w}}")
        return "\n".join(lines)

    def heatmap(self) -> tuple[torch.Tensor, list[int | None], list[str]]:
        """(layers × kinds) int64 block counts, with the row (layer) and column (kind) labels."""
        table = self.per_layer()
        layers = list(table)
        return torch.tensor([[table[lay][k] for k in self.kinds] for lay in layers]), layers, self.kinds

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Save a heat map of chosen blocks per layer (rows) and projection (columns) as a PNG; returns the path."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        counts, layers, kinds = self.heatmap()
        fig = Figure(figsize=(1.6 + 1.1 * len(kinds), 1.4 + 0.28 * len(layers)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        im = ax.imshow(counts.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(kinds)), kinds)
        ax.set_yticks(range(len(layers)), ["-" if lay is None else str(lay) for lay in layers])
        ax.set_xlabel("projection")
        ax.set_ylabel("layer")
        if len(layers) * len(kinds) <= 400:
            top = max(int(counts.max()) if counts.numel() else 0, 1)
            for i in range(len(layers)):
                for j in range(len(kinds)):
                    v = int(counts[i, j])  # dark text on the bright end of viridis, light on the dark end
                    ax.text(j, i, v, ha="center", va="center", fontsize=7, color="k" if v > 0.6 * top else "w")
        fig.colorbar(im, ax=ax, label=f"blocks of {self.block_size}×{self.block_size}")
        ax.set_title(
            title
            or f"{self.num_blocks} blocks, {100 * self.trainable / max(self.target_params, 1):.2f}% of target weights",
            fontsize=9,
        )
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        return path


def summarize_selection(
    model: nn.Module,
    selection: Mapping[str, Sequence[Sequence[int]]],
    block_size: int | None = None,
    targets: Sequence[str] | None = None,
) -> SelectionSummary:
    """Summary of ``selection`` on ``model`` (patched or not; 16-bit, 4-bit NF4 or mixed targets).

    The target modules (the denominator of "trainable % of the target weights") are ``targets``, else the
    selection's own ``targets``, else every linear whose projection name appears in the selection. The block size
    is ``block_size``, else the selection's, else the patched model's (``model.smt_config``), else ``SMTConfig``'s
    default; ValueError if the given ones disagree.
    """
    block_size = _block_size(model, selection, block_size)
    modules = dict(model.named_modules())
    unknown = [n for n in selection if n not in modules]
    if unknown:
        raise ValueError(f"selection names modules the model does not have: {unknown[:5]}")
    targets = targets or getattr(selection, "targets", None) or sorted({n.rsplit(".", 1)[-1] for n in selection})
    found = find_target_linears(model, targets)
    for n in selection:
        found.setdefault(n, modules[n])
    choices = []
    for name, m in found.items():
        # shapes only: a 4-bit NF4Linear (patched or not) is summarised like the nn.Linear it stands for
        if not isinstance(m, nn.Linear | SparseBlockLinear | NF4Linear):
            raise ValueError(f"{name} is a {type(m).__name__}, not an nn.Linear (or a 4-bit NF4Linear)")
        blocks = torch.tensor([list(p) for p in selection.get(name, [])], dtype=torch.int64).reshape(-1, 2)
        counts = block_element_counts(m.out_features, m.in_features, block_size)
        if blocks.numel() and (
            (blocks < 0).any() or (blocks[:, 0] >= counts.shape[0]).any() or (blocks[:, 1] >= counts.shape[1]).any()
        ):
            raise ValueError(
                f"{name}: blocks out of range for a {m.out_features}×{m.in_features} weight "
                f"with block_size {block_size}"
            )
        hit = _LAYER.search(f".{name}.")
        choices.append(
            ModuleChoice(
                name=name,
                layer=int(hit.group(1)) if hit else None,
                kind=name.rsplit(".", 1)[-1],
                out_features=m.out_features,
                in_features=m.in_features,
                grid=tuple(counts.shape),
                num_blocks=int(blocks.shape[0]),
                trainable=int(counts[blocks[:, 0], blocks[:, 1]].sum()) if blocks.numel() else 0,
            )
        )
    order = {n: i for i, n in enumerate(modules)}
    choices.sort(key=lambda c: order[c.name])
    model_params = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("block_weight"))
    # a 4-bit weight lives in buffers: count its out × in elements, as trainable_parameters does
    model_params += sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, NF4Linear))
    return SelectionSummary(block_size=block_size, modules=choices, model_params=model_params)


def _block_size(model: nn.Module, selection: object, block_size: int | None) -> int:
    """The one block size that ``block_size``, the Selection's and the patched model's agree on."""
    patched = getattr(model, CONFIG_ATTR, None)
    known = {
        "block_size": block_size,
        "the selection's block_size": getattr(selection, "block_size", None),
        "the patched model's block_size": patched.get("block_size") if isinstance(patched, Mapping) else None,
    }
    known = {what: b for what, b in known.items() if b is not None}
    if len(set(known.values())) > 1:
        raise ValueError("block sizes disagree: " + ", ".join(f"{what} {b}" for what, b in known.items()))
    return check_block_size(next(iter(known.values()), SMTConfig.block_size))
