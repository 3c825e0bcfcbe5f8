"""Checkpoints of a fine-tuning run: one file, written atomically, that ``--resume`` continues bit for bit.

``OUTPUT_DIR/checkpoint/state.pt`` holds the training state (``TrainingRun.state_dict``: trainable tensors,
optimizer, step, data position, RNG), the SMT selection (after ``--reselect-at`` the current one, and the
values of the earlier selections' blocks, folded into the weights), the baseline evaluation and the options that
decide the result; resuming with other such options is refused. It is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from smt_kernels.finetune.config import DEFAULT_NUM_EVAL, DEFAULT_TASK, FinetuneConfig, FinetuneError, flag
from smt_kernels.finetune.evaluate import EvalResult
from smt_kernels.select import Selection

FORMAT = "smt-kernels-finetune-checkpoint"
VERSION = 1
STATE_FILE = "state.pt"
# options that may differ on resume: where things go and how the run is shown, not what it computes
FREE_OPTIONS = {
    "resume",
    "checkpoint_every",
    "output_dir",
    "output_json",
    "save_merged",
    "progress",
    "show_examples",
    "device",
    "eval_every",
    "allow_divergence",
    "overwrite",
}


@dataclass
class Checkpoint:
    """A loaded checkpoint: the training state, the SMT selection (or None) and the baseline evaluation."""

    path: Path
    step: int
    training: dict[str, Any]
    selection: Selection | None
    before: EvalResult
    data_sha256: str
    reselect: dict[str, Any] | None = None  # --reselect-at: folded blocks and records (``Reselector.state_dict``)


def save_checkpoint(
    directory: Path,
    cfg: FinetuneConfig,
    training: dict[str, Any],
    selection: Selection | None,
    before: EvalResult,
    data_sha256: str,
    reselect: dict[str, Any] | None = None,
) -> Path:
    """Write ``directory/state.pt`` through a temporary file and a rename: a crash leaves the old or the new one."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "version": VERSION,
        "config": cfg.to_dict(),
        "data_sha256": data_sha256,
        "training": training,
        "selection": selection.to_json() if selection is not None else None,
        "reselect": reselect,
        "before": {"loss": before.loss, "accuracy": before.accuracy, "predictions": list(before.predictions)},
    }
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".state-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return directory / STATE_FILE


def load_checkpoint(path: str | os.PathLike, cfg: FinetuneConfig) -> Checkpoint:
    """Read a checkpoint (its directory or its state.pt) made with the same result-deciding options as ``cfg``."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise FinetuneError(f"--resume {str(path)!r}: no checkpoint there (expected {file})")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file is an input error
        raise FinetuneError(f"--resume: {file} is not a readable checkpoint ({str(err).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise FinetuneError(f"--resume: {file} is not an smt-kernels finetune checkpoint")
    if state.get("version") != VERSION:
        raise FinetuneError(
            f"--resume: {file} has checkpoint version {state.get('version')}; this smt-kernels reads version {VERSION}"
        )
    # an option added since the checkpoint was written has its default there
    saved = _effective(FinetuneConfig().to_dict() | state["config"])
    now = _effective(cfg.to_dict())
    for name in sorted(set(saved) | set(now)):
        if name not in FREE_OPTIONS and saved.get(name) != now.get(name):
            raise FinetuneError(
                f"--resume: the checkpoint was made with {flag(name)} {_shown(saved.get(name))}, this run "
                f"has {_shown(now.get(name))}; resume with the same options"
            )
    training = state["training"]
    if not 0 < training["log"]["step"] < cfg.steps:
        raise FinetuneError(f"--resume: the checkpoint is at step {training['log']['step']} of {cfg.steps}")
    before = EvalResult(**state["before"])
    selection = Selection.from_json(state["selection"]) if state["selection"] is not None else None
    return Checkpoint(
        file, training["log"]["step"], training, selection, before, state["data_sha256"], state.get("reselect")
    )


def _effective(options: dict[str, Any]) -> dict[str, Any]:
    """The options with the defaults a generated task resolves to written out: a checkpoint saved when
    ``--task``/``--num-eval`` defaulted to "arithmetic"/48 and one saved with None mean the same run. With
    ``--data`` both are left to the data fingerprint, which covers the held-out split."""
    if options.get("data") is None:
        if options.get("task") is None:
            options = options | {"task": DEFAULT_TASK}
        if options.get("num_eval") is None:
            options = options | {"num_eval": DEFAULT_NUM_EVAL}
    else:  # a --data run: the data fingerprint (checked next) covers the split; older checkpoints spelled these out
        options = options | {"task": None, "num_eval": None}
    return options


def _shown(value: Any) -> str:
    return "its default" if value is None else repr(value)
