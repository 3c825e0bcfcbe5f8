"""Outputs: their names, the checks that they can be written and clobber no input (before any work), the save."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from torch import nn

import smt_kernels
from smt_kernels.finetune.config import ADAPTER_METHODS, FinetuneConfig, FinetuneError, same_path
from smt_kernels.quant import merge_nf4
from smt_kernels.select import Selection

SELECTION_FILE = "selection.json"
LORA_DIR = "lora_adapter"
MERGED_DIR = "merged"
CHECKPOINT_DIR = "checkpoint"


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
