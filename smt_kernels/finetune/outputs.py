"""Outputs: their names, the up-front checks (writable, clobbering no input, no earlier run's), the save."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

import smt_kernels
from smt_kernels.finetune.checkpoint import STATE_FILE
from smt_kernels.finetune.config import ADAPTER_METHODS, FinetuneConfig, FinetuneError, same_path
from smt_kernels.quant import merge_nf4
from smt_kernels.select import Selection

SELECTION_FILE = "selection.json"
LORA_DIR = "lora_adapter"
MERGED_DIR = "merged"
CHECKPOINT_DIR = "checkpoint"

log = logging.getLogger(__name__)


def checkpoint_dir(cfg: FinetuneConfig) -> Path | None:
    return Path(cfg.output_dir) / CHECKPOINT_DIR if cfg.checkpoint_every and cfg.output_dir else None


def check_outputs(cfg: FinetuneConfig, model_dir: Path | None = None) -> None:
    """FinetuneError unless every output can be created and none of them is (or holds) an input file."""
    inputs = {"--data": cfg.data, "--eval-data": cfg.eval_data}
    if model_dir is not None:
        inputs["--model"] = str(model_dir)
    if cfg.output_dir:
        out = Path(cfg.output_dir)
        _check_writable_dir(out, "--output-dir")
        if cfg.save_merged and model_dir is not None and same_path(out / MERGED_DIR, model_dir):
            raise FinetuneError(f"--save-merged would write over the --model directory {str(model_dir)!r}")
        for name, given in inputs.items():
            if given and Path(given).resolve().parent == out.resolve() and _owned(Path(given).name):
                raise FinetuneError(f"{name} {given!r} is a file --output-dir {cfg.output_dir!r} writes over")
        if not cfg.resume and not cfg.overwrite:
            _check_no_earlier_run(cfg.output_dir)
    if cfg.output_json:
        js = Path(cfg.output_json)
        if js.is_dir():
            raise FinetuneError(f"--output-json {cfg.output_json!r} is a directory; name a file")
        _check_writable_dir(js.parent, "--output-json's directory")
        for name, given in inputs.items():
            if given and same_path(js, Path(given)):
                raise FinetuneError(f"--output-json {cfg.output_json!r} is the {name} input; it would be overwritten")
            if given and name == "--model" and js.resolve().is_relative_to(Path(given).resolve()):
                raise FinetuneError(f"--output-json {cfg.output_json!r} lies inside the --model directory")
        if cfg.output_dir and js.resolve().parent == Path(cfg.output_dir).resolve() and _owned(js.name):
            raise FinetuneError(f"--output-json {cfg.output_json!r} is one of the files --output-dir holds")


def _owned(name: str) -> bool:
    # what this command writes directly in OUTPUT_DIR (save_blocks' files all start with "smt_blocks")
    return name in {SELECTION_FILE, LORA_DIR, MERGED_DIR, CHECKPOINT_DIR} or name.startswith("smt_blocks")


def _earlier_outputs(out: Path) -> list[Path]:
    """The entries of ``out`` this command writes (``_owned``), sorted; none if ``out`` is not a directory."""
    return sorted(p for p in out.iterdir() if _owned(p.name)) if out.is_dir() else []


def _check_no_earlier_run(output_dir: str) -> None:
    """FinetuneError if ``output_dir`` holds a checkpoint or outputs of an earlier run (no --resume/--overwrite)."""
    out = Path(output_dir)
    state = out / CHECKPOINT_DIR / STATE_FILE
    if state.is_file():
        raise FinetuneError(
            f"--output-dir {output_dir!r} holds the resumable checkpoint {str(state)!r} of an earlier run: "
            f"--resume {state.parent} continues it, --overwrite discards it"
        )
    earlier = _earlier_outputs(out)
    if earlier:
        raise FinetuneError(
            f"--output-dir {output_dir!r} holds the outputs of an earlier run ({', '.join(p.name for p in earlier)}): "
            "--overwrite replaces them, or choose another --output-dir"
        )


def _remove(path: Path) -> None:
    """Remove a file, a link (not what it points to) or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def discard_checkpoint(cfg: FinetuneConfig) -> None:
    """``--overwrite``: remove an earlier run's OUTPUT_DIR/checkpoint before this run starts (rank 0 only)."""
    if cfg.overwrite and cfg.output_dir and (directory := Path(cfg.output_dir) / CHECKPOINT_DIR).exists():
        _remove(directory)
        log.info("--overwrite: removed the earlier run's checkpoint %s", directory)


def _remove_earlier_outputs(cfg: FinetuneConfig, out: Path) -> None:
    """``--overwrite``, just before saving: remove the earlier outputs save_outputs does not replace in place.

    Kept: this run's checkpoint (the earlier one was discarded at the start) and, for SMT, the block files and
    selection that ``save_blocks`` and the save replace atomically. ``merged/`` and ``lora_adapter/`` are
    removed even when written again, so no file of the earlier save (e.g. a shard) stays in them.
    """
    kept = {CHECKPOINT_DIR} | ({SELECTION_FILE} if cfg.method == "smt" else set())
    removed = [
        p
        for p in _earlier_outputs(out)
        if p.name not in kept and not (cfg.method == "smt" and p.name.startswith("smt_blocks"))
    ]
    for path in removed:
        _remove(path)
    if removed:
        log.info("--overwrite: removed the earlier outputs %s from %s", ", ".join(p.name for p in removed), out)


def _check_writable_dir(path: Path, what: str) -> None:
    """The directory exists and takes a file, or its nearest existing ancestor does (it will be created)."""
    probe = path if str(path) else Path(".")
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise FinetuneError(f"{what} {str(path)!r} cannot be created: {str(probe)!r} is a file, not a directory")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".smt-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise FinetuneError(f"{what} {str(path)!r} is not writable ({err.strerror} in {str(probe)!r})") from None


def save_outputs(model: nn.Module, tokenizer, cfg: FinetuneConfig, selection: Selection | None) -> dict[str, str]:
    """Write what the method trained (SMT blocks / PEFT adapter) and, with ``save_merged``, a plain HF model."""
    out = Path(cfg.output_dir)
    if cfg.overwrite:
        _remove_earlier_outputs(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    saved: dict[str, str] = {}
    if cfg.method == "smt":
        saved["blocks"] = str(smt_kernels.save_blocks(model, out))  # safetensors + JSON layout and fingerprint
        (out / SELECTION_FILE).write_text(json.dumps(selection.to_json(), indent=1) + "\n")
        saved["selection"] = str(out / SELECTION_FILE)
    elif cfg.method in ADAPTER_METHODS:
        model.save_pretrained(out / LORA_DIR)
        saved["adapter"] = str(out / LORA_DIR)
    if cfg.save_merged:
        if cfg.method == "smt":
            merged = smt_kernels.merge(model)  # a 4-bit base: dequantized, nn.Linear in its compute dtype
        elif cfg.method in ADAPTER_METHODS:
            merged = model.merge_and_unload()
            if cfg.quantize:
                # each adapted layer is now an fp32 nn.Linear (dequantized weight + B·A·scaling,
                # smt_kernels.quant.lora); layers outside --targets are still 4-bit: dequantize them too
                merged = merge_nf4(merged)
        else:
            merged = model
        if cfg.quantize:
            # bf16 linears (a CUDA run) among fp32 norms and embeddings: one dtype for the saved model
            # (exact: bf16 values are fp32 values)
            merged.to(merged.get_input_embeddings().weight.dtype)
        merged.save_pretrained(out / MERGED_DIR)
        tokenizer.save_pretrained(out / MERGED_DIR)
        saved["merged"] = str(out / MERGED_DIR)
    return saved
