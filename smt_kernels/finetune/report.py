"""The result of a fine-tuning run: one dataclass, its JSON form and the human-readable summary."""

from __future__ import annotations

import json
import math
import resource
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from smt_kernels.finetune.evaluate import EvalResult


@dataclass
class FinetuneResult:
    """What one run did and measured. ``as_dict()`` is the ``--output-json`` content."""

    method: str
    task: str
    model: str
    device: str
    ranks: int  # data-parallel processes (torchrun); 1 for one process
    seed: int
    steps: int
    lr: float
    trainable_params: int
    total_params: int  # of the base model (no LoRA adapters, no SMT block copies)
    target_params: int | None
    num_blocks: int | None
    blocks_per_kind: dict[str, int] | None
    blocks_per_layer: dict[str, dict[str, int]] | None
    lora_rank: int | None
    train_loss_first: float  # mean over the first 10% of the steps
    train_loss_last: float  # mean over the last 10%
    eval_loss_before: float
    eval_loss_after: float
    accuracy_before: float
    accuracy_after: float
    num_eval: int
    metric: str
    data_sha256: str
    peak_memory_mib: float
    peak_memory_kind: str
    tokens_per_second: float
    train_seconds: float
    select_seconds: float | None
    load_seconds: float
    total_seconds: float
    resumed_from_step: int | None
    saved: dict[str, str]
    examples: list[dict[str, str]]
    loss_curve: list[dict[str, float]]
    eval_loss_curve: list[dict[str, float]]
    config: dict[str, Any]
    quantize: str | None = None  # the base's 4-bit format (--quantize), None for a 16-bit base
    reselections: list[dict[str, Any]] | None = None  # --reselect-at: per re-selection step, kept, changed, seconds
    before: EvalResult | None = field(default=None, repr=False)  # for reuse by later runs; not in the JSON

    @property
    def trainable_pct(self) -> float:
        return 100 * self.trainable_params / self.total_params

    @property
    def trainable_pct_of_targets(self) -> float | None:
        return 100 * self.trainable_params / self.target_params if self.target_params else None

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "before"}
        d.update(trainable_pct=self.trainable_pct, trainable_pct_of_targets=self.trainable_pct_of_targets)
        return d

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=1, default=str) + "\n")
        return path


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MiB, what it measures): CUDA max_memory_allocated since the last reset, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max_memory_allocated (training)"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss_kib / 1024, "CPU peak RSS of the process"


def format_summary(r: FinetuneResult) -> str:
    """The human-readable end-of-run report."""

    def pct(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"

    of_targets = r.trainable_pct_of_targets
    lines = [
        f"== {r.method} on {r.task} ({r.model}, {r.device}{f' × {r.ranks} ranks' if r.ranks > 1 else ''}, "
        f"seed {r.seed}{f', 4-bit {r.quantize.upper()} base' if r.quantize else ''}) ==",
        f"trainable      {r.trainable_params:,} of {r.total_params:,} parameters ({r.trainable_pct:.3f}%)"
        + (f"; {of_targets:.2f}% of the target weights" if of_targets else ""),
    ]
    if r.num_blocks is not None:
        kinds = ", ".join(f"{k} {v}" for k, v in (r.blocks_per_kind or {}).items())
        lines.append(f"blocks chosen  {r.num_blocks} ({kinds})")
    if r.reselections:
        moves = ", ".join(f"step {x['step']}: {x['changed']} changed, {x['kept']} kept" for x in r.reselections)
        lines.append(f"re-selected    {moves}")
    if r.lora_rank is not None:
        lines.append(f"LoRA rank      {r.lora_rank}")
    metric = "exact match of the final number" if r.metric == "final_number" else "exact match"
    lines += [
        f"train loss     {r.train_loss_first:.4f} -> {r.train_loss_last:.4f} (mean of first/last 10% of "
        f"{r.steps} steps, lr {r.lr:g})" + (f"; resumed at step {r.resumed_from_step}" if r.resumed_from_step else ""),
        f"held-out loss  {r.eval_loss_before:.4f} -> {r.eval_loss_after:.4f}",
        f"accuracy       {pct(r.accuracy_before)} -> {pct(r.accuracy_after)} ({metric}, {r.num_eval} held-out "
        "examples, greedy)",
        f"peak memory    {r.peak_memory_mib:.0f} MiB ({r.peak_memory_kind}{', rank 0' if r.ranks > 1 else ''})",
        f"throughput     {r.tokens_per_second:.0f} tokens/s ({r.train_seconds:.1f} s training, "
        f"{r.total_seconds:.0f} s total)",
    ]
    lines += [f"saved {k:<8} {v}" for k, v in r.saved.items()]
    return "\n".join(lines)
