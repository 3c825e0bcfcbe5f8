"""The training loop: AdamW, linear warm-up then cosine decay, clipping, loss curves, divergence checks, and the
state a checkpoint needs to continue bit for bit (trainable tensors, optimizer, step, data position, RNG).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from smt_kernels.finetune.config import FinetuneConfig, FinetuneError
from smt_kernels.finetune.data import BatchStream
from smt_kernels.finetune.evaluate import eval_loss
from smt_kernels.finetune.parallel import DataParallelLoss, Ranks

log = logging.getLogger(__name__)


def lr_at(step: int, steps: int, warmup: int, peak: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


@dataclass
class TrainLog:
    """What the loop has done so far (saved in checkpoints, so a resumed run reports the whole run)."""

    step: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)  # per step: loss, lr, grad_norm
    eval_curve: list[dict[str, float]] = field(default_factory=list)  # held-out loss at step 0, every N, the end
    tokens: int = 0
    train_seconds: float = 0.0

    def tail_means(self) -> tuple[float, float]:
        """Mean training loss of the first and of the last 10% of the steps (at least one step each)."""
        n = max(1, len(self.curve) // 10)
        losses = [c["loss"] for c in self.curve]
        return sum(losses[:n]) / n, sum(losses[-n:]) / n


class TrainingRun:
    """One method's training: ``run()`` does the steps left; ``state_dict``/``load_state_dict`` checkpoint it."""

    def __init__(
        self,
        model: nn.Module,
        cfg: FinetuneConfig,
        ranks: Ranks,
        stream: BatchStream,
        eval_batches: list[dict[str, torch.Tensor]],
        log_: TrainLog,
    ) -> None:
        self.model, self.cfg, self.ranks, self.stream, self.eval_batches, self.log = (
            model,
            cfg,
            ranks,
            stream,
            eval_batches,
            log_,
        )
        self.device = ranks.device
        self.set_model(model)

    def set_model(self, model: nn.Module) -> None:
        """Train ``model``'s trainable tensors from here on with a fresh AdamW (and a fresh DDP wrapper under
        torchrun); the learning rate follows the schedule at the current step."""
        self.model = model
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named:
            raise FinetuneError("nothing to train: no parameter requires grad after preparing the model")
        self.params = [p for _, p in self.named]
        cfg = self.cfg
        self.opt = torch.optim.AdamW(self.params, lr=cfg.peak_lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
        self.loss = DataParallelLoss(model, self.ranks)  # the model's own loss, or DDP's under torchrun

    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """AdamW's state of each trainable tensor by parameter name (empty before the first step)."""
        return {n: self.opt.state[p] for n, p in self.named if p in self.opt.state}

    def set_optimizer_state(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Give the named trainable tensors this AdamW state (``step``, ``exp_avg``, ``exp_avg_sq``)."""
        params = dict(self.named)
        for name, state in states.items():
            self.opt.state[params[name]] = state

    def run(
        self, on_step: Callable[[int], None] | None = None, before_step: Callable[[int], None] | None = None
    ) -> TrainLog:
        """Train from ``log.step`` to ``cfg.steps``; ``before_step(steps_done)`` before each step (e.g. to choose
        the blocks again), ``on_step(step)`` after each (e.g. to checkpoint)."""
        cfg, model = self.cfg, self.model
        model.train()
        model.config.use_cache = False
        bar = tqdm(
            range(self.log.step, cfg.steps),
            initial=self.log.step,
            total=cfg.steps,
            disable=not (cfg.progress and self.ranks.main),
            desc=f"train ({cfg.method})",
            unit="step",
        )
        t_start, t_other = time.perf_counter(), 0.0
        for step in bar:
            if before_step is not None:
                t0 = time.perf_counter()
                before_step(step)  # merge and patch work in place: ``model`` is still the model trained
                model.train()
                model.config.use_cache = False
                t_other += time.perf_counter() - t0  # re-selection is reported on its own
            loss, lr, grad_norm = self._step(step)
            if not math.isfinite(loss) and not cfg.allow_divergence:
                raise FinetuneError(
                    f"training diverged at step {step + 1} (loss {loss}); lower --lr "
                    f"(now {cfg.peak_lr:g}); nothing was saved"
                )
            self.log.curve.append({"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm})
            self.log.step = step + 1
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
            t0 = time.perf_counter()
            if cfg.eval_every and self.log.step % cfg.eval_every == 0 and self.log.step < cfg.steps:
                model.config.use_cache = True
                held_out = self.ranks.on_main(lambda: eval_loss(model, self.eval_batches, self.device))
                self.log.eval_curve.append({"step": self.log.step, "loss": held_out})
                model.config.use_cache = False
            if on_step is not None:
                on_step(self.log.step)
            t_other += time.perf_counter() - t0  # evaluation and checkpoints are not training time
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.log.train_seconds += time.perf_counter() - t_start - t_other
        model.config.use_cache = True
        return self.log

    def _step(self, step: int) -> tuple[float, float, float]:
        lr = lr_at(step, self.cfg.steps, self.cfg.warmup, self.cfg.peak_lr)
        for g in self.opt.param_groups:
            g["lr"] = lr
        batch = next(self.stream)  # the global batch: under torchrun each rank trains on its share
        loss, mean_loss = self.loss(batch)
        loss.backward()
        clip = self.cfg.max_grad_norm
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip)) if clip else float("nan")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.log.tokens += int(batch["attention_mask"].sum())
        return float(mean_loss), lr, grad_norm

    def state_dict(self) -> dict[str, Any]:
        """Everything the next step depends on, as tensors and plain values (``torch.load(weights_only=True)``)."""
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "trainable": {n: p.detach().to("cpu", copy=True) for n, p in self.named},
            "optimizer": self.opt.state_dict(),
            "data": self.stream.state_dict(),
            "rng": rng,
            "log": {
                "step": self.log.step,
                "curve": self.log.curve,
                "eval_curve": self.log.eval_curve,
                "tokens": self.log.tokens,
                "train_seconds": self.log.train_seconds,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["trainable"]
        names = [n for n, _ in self.named]
        if sorted(saved) != sorted(names):
            missing, extra = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
            raise FinetuneError(
                f"the checkpoint's trainable tensors do not match this model (missing {missing[:3]}, "
                f"unexpected {extra[:3]})"
            )
        with torch.no_grad():
            for n, p in self.named:
                if saved[n].shape != p.shape:
                    raise FinetuneError(
                        f"checkpoint tensor {n} has shape {tuple(saved[n].shape)}, the model's {tuple(p.shape)}"
                    )
                p.copy_(saved[n])
        self.opt.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.log = TrainLog(**state["log"])


def check_converged(train_log: TrainLog, loss_before: float, loss_after: float, cfg: FinetuneConfig) -> None:
    """FinetuneError if training diverged: a non-finite loss, or a held-out loss no lower than before training.

    The held-out loss is measured on the same examples before and after, so unlike the training loss of a few
    different batches it is free of batch-to-batch noise.
    """
    if cfg.allow_divergence:
        return
    first, last = train_log.tail_means()
    if not (math.isfinite(first) and math.isfinite(last) and math.isfinite(loss_after)) or loss_after >= loss_before:
        raise FinetuneError(
            f"training diverged: the held-out loss went from {loss_before:.4g} to {loss_after:.4g} (training loss "
            f"{first:.4g} -> {last:.4g}) in {cfg.steps} steps at --lr {cfg.peak_lr:g}; nothing was saved. Lower "
            "--lr, or pass --allow-divergence to keep the result anyway"
        )
