"""Big checkpoints, shard by shard: load a sharded 16-bit Hugging Face directory straight into a 4-bit model, and
fold trained SMT blocks into the original 16-bit checkpoint.

Neither ever holds more than one tensor (loading) or one shard (folding) of the 16-bit checkpoint in memory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from smt_kernels.kernels import torch_blocks
from smt_kernels.layout import BlockLayout
from smt_kernels.quant.bnb import bnb_state_keys, nf4_from_bnb_state
from smt_kernels.quant.model import ALWAYS_SKIPPED, _matches
from smt_kernels.quant.module import NF4Linear
from smt_kernels.quant.nf4 import quantize_nf4

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def checkpoint_shards(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a Hugging Face checkpoint directory, in index order (or the single file)."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / f for f in dict.fromkeys(weight_map.values())]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    raise FileNotFoundError(
        f"{directory} has neither {INDEX_FILE} nor {SINGLE_FILE} (only safetensors checkpoints are read)"
    )


def _shell_model(
    directory: Path, compute_dtype: torch.dtype, skip: Sequence[str], double_quant: bool, model_class
) -> nn.Module:
    """The model with every parameter on the meta device (no memory), NF4Linear shells in place of the targets."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    cls = model_class or AutoModelForCausalLM
    # buffers (rotary inv_freq) are computed at construction and not saved: keep them real (and in their own
    # dtype, as from_pretrained does); parameters get their dtype when they are loaded
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config)
    modules = dict(model.named_modules())
    for name, m in list(modules.items()):
        if isinstance(m, nn.Linear) and not _matches(name, ALWAYS_SKIPPED) and not _matches(name, skip):
            shell = NF4Linear(
                m.in_features,
                m.out_features,
                bias=m.bias is not None,
                double_quant=double_quant,
                compute_dtype=compute_dtype,
                device="meta",
            )
            parent, _, attr = name.rpartition(".")
            setattr(modules[parent] if parent else model, attr, shell)
    return model


@torch.no_grad()
def load_nf4_pretrained(
    directory: str | os.PathLike,
    device: torch.device | str = "cuda",
    compute_dtype: torch.dtype = torch.bfloat16,
    skip: Sequence[str] = (),
    double_quant: bool = True,
    model_class=None,
) -> nn.Module:
    """Load a (sharded) 16-bit Hugging Face safetensors checkpoint as a model whose linears are ``NF4Linear``.

    A checkpoint that bitsandbytes already quantized to NF4 (saved from a ``load_in_4bit`` model) loads too: its
    packed weights and quant states are adopted without requantizing (bitsandbytes need not be installed).

    Tensors are read one at a time from each shard (memory-mapped), moved to ``device`` and, for the linears,
    quantized there; so the 16-bit model is never whole in CPU or GPU memory (peak: the 4-bit model plus one
    16-bit tensor and its quantization temporaries). Every linear except ``lm_head`` and ``skip`` is quantized
    (the same choice as ``quantize_base``); everything else is kept in ``compute_dtype``. A checkpoint wider than
    ``compute_dtype`` (fp32 for a bf16 run) is read as the model loaded in ``compute_dtype`` holds it, the linears
    too, before they are quantized.

    Args:
        model_class: the transformers class to build (default ``AutoModelForCausalLM``); needs ``accelerate``.
    Returns:
        the model in eval mode, on ``device``; equal, bit for bit, to ``quantize_base`` applied to the model
        loaded in full.
    """
    directory = Path(directory)
    device = torch.device(device)
    shards = checkpoint_shards(directory)
    model = _shell_model(directory, compute_dtype, skip, double_quant, model_class)
    modules = dict(model.named_modules())
    expected = set(model.state_dict())
    nf4_weights = {f"{n}.weight": m for n, m in modules.items() if isinstance(m, NF4Linear)}
    # an NF4 layer's weight arrives as one checkpoint tensor but lives in several buffers
    expected -= {f"{n}.{b}" for n, m in modules.items() if isinstance(m, NF4Linear) for b, _ in m.named_buffers()}
    expected |= set(nf4_weights)
    # a checkpoint bitsandbytes quantized: packed weights and their quant state, adopted without requantizing
    bnb_parts = {k: w for w in nf4_weights for k in bnb_state_keys(w)}
    prequantized: dict[str, dict[str, torch.Tensor]] = {}
    seen, unexpected = set(), []
    for shard in shards:
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key in bnb_parts:
                    prequantized.setdefault(bnb_parts[key], {})[key] = f.get_tensor(key).to(device)
                    continue
                if key not in expected:
                    unexpected.append(key)
                    continue
                t = f.get_tensor(key).to(device)
                if key in nf4_weights and not t.is_floating_point():
                    prequantized.setdefault(key, {})[key] = t  # packed bytes; the quant state may follow
                elif key in nf4_weights:
                    if t.element_size() > torch.tensor([], dtype=compute_dtype).element_size():
                        # a wider checkpoint (fp32 for a bf16 run) is read as the model loaded in compute_dtype
                        # would hold it, like every other tensor: the same codes as quantize_base on that model
                        t = t.to(compute_dtype)
                    nf4_weights[key].set_nf4(quantize_nf4(t, double_quant=double_quant))
                elif not t.is_floating_point() and t.dtype == torch.uint8 and key.endswith(".weight"):
                    raise ValueError(
                        f"{key} is 4-bit packed in the checkpoint but its module is not quantized here "
                        "(is it in `skip`?)"
                    )
                else:
                    _assign(model, key, t if not t.is_floating_point() else t.to(compute_dtype))
                del t
                seen.add(key)
        logger.info("load_nf4_pretrained: %s done (%d/%d tensors)", shard.name, len(seen), len(expected))
    for key, parts in prequantized.items():
        nf4_weights[key].set_nf4(nf4_from_bnb_state(parts, key))
    if prequantized:
        logger.info(
            "load_nf4_pretrained: %d weights were 4-bit (bitsandbytes) in the checkpoint, adopted as they are",
            len(prequantized),
        )
    tied = _tie(model)
    missing = sorted(expected - seen - tied)
    if missing:
        raise ValueError(
            f"{directory}: the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}"
        )
    if unexpected:
        logger.warning(
            "load_nf4_pretrained: %d checkpoint tensors the model does not use, e.g. %s",
            len(unexpected),
            unexpected[:3],
        )
    for name, buf in list(model.named_buffers()):
        if buf.device != device:
            _assign(model, name, buf.to(device), buffer=True)
    return model.eval()


def _assign(model: nn.Module, key: str, value: torch.Tensor, buffer: bool = False) -> None:
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    if buffer or attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        # an NF4 layer's bias is frozen like its weight
        trainable = value.is_floating_point() and not isinstance(owner, NF4Linear)
        owner._parameters[attr] = nn.Parameter(value, requires_grad=trainable)


def _tie(model: nn.Module) -> set[str]:
    """Tie the output embedding to the input one when the config says so; returns the keys that tying filled."""
    cfg = getattr(model, "config", None)
    if not getattr(cfg, "tie_word_embeddings", False):
        return set()
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or isinstance(out, NF4Linear):
        return set()
    out.weight = inp.weight
    name = next(n for n, m in model.named_modules() if m is out)
    return {f"{name}.weight"}


# ------------------------------------------------------------------------------------------------ fold blocks

# dtypes a checkpoint tensor may have been loaded in for training (torch_dtype=...): its sampled values are cast to
# each before hashing, so a bf16 checkpoint trained in fp32 (or the reverse) still matches
_LOAD_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_base(saved, shapes: Mapping[str, tuple[Path, tuple[int, ...]]], checkpoint_dir: Path) -> None:
    """Raise ValueError unless every fingerprinted tensor the checkpoint holds has the saved digest in some dtype
    it can be loaded in; at least one must be comparable."""
    from smt_kernels.fingerprint import DEVICE_ROUNDED, sample_positions, values_digest

    selection = {n: idx.tolist() for n, (idx, _) in saved.blocks.items()}
    compared, differ = 0, []
    keys = [k for k in saved.fingerprint if k in shapes and not k.endswith(DEVICE_ROUNDED)]
    for key in keys:
        shard, shape = shapes[key]
        with safe_open(str(shard), framework="pt") as f:
            tensor = f.get_tensor(key)
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        blocks = selection.get(module) if len(shape) == 2 else None
        pos = sample_positions(shape, blocks, saved.block_size, saved.fingerprint_scheme)
        values = tensor.reshape(-1)[pos]
        del tensor
        dtypes = dict.fromkeys((values.dtype, *_LOAD_DTYPES)) if values.is_floating_point() else (values.dtype,)
        compared += 1
        if not any(values_digest(key, shape, d, values.to(d)) == saved.fingerprint[key] for d in dtypes):
            differ.append(key)
    if differ:
        raise ValueError(
            f"the blocks were trained on a different base model than the checkpoint in {checkpoint_dir}: "
            f"{len(differ)} of {compared} compared tensors differ, e.g. {differ[:4]}; nothing was written "
            "(pass strict=False to fold them anyway)"
        )
    if compared == 0:
        raise ValueError(
            f"none of the {len(saved.fingerprint)} base tensors the blocks' fingerprint covers is in the checkpoint "
            f"in {checkpoint_dir} (e.g. {list(saved.fingerprint)[:3]}), so it cannot be checked as their base; "
            "nothing was written (pass strict=False to fold anyway)"
        )
    logger.info("fold_blocks_into_checkpoint: base checked on %d tensors", compared)


BlocksLike = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def fold_blocks_into_checkpoint(
    blocks: str | os.PathLike | BlocksLike,
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    block_size: int | None = None,
    strict: bool = True,
) -> Path:
    """Write a copy of a 16-bit Hugging Face checkpoint with trained SMT blocks written into its weights.

    SMT stores absolute block values, so this is exact (in the checkpoint's dtype): the result is the original
    model with only the trained blocks changed, whatever base (bf16 or NF4) they were trained on.

    Args:
        blocks: a directory written by ``save_blocks`` (or ``read_blocks``' result), or {module name:
            (block_indices (n, 2), block_weight (n, b, b))} with ``block_size`` (``trained_blocks(model)``).
        checkpoint_dir: the original checkpoint (``model.safetensors``, or shards and their index JSON).
        out_dir: where the folded checkpoint goes (created; must not be checkpoint_dir). Every other file of the
            checkpoint (config, tokenizer, index) is copied unchanged.
        strict: with blocks from a file, check that the checkpoint is the base they were trained on: the saved
            fingerprint against the checkpoint's tensors (those of the fingerprint the checkpoint holds: all of
            them for a 16-bit base; the 16-bit norms and embeddings for a 4-bit one). Reads every such tensor
            once, one at a time, before the first write.
    One shard is in memory at a time. Raises ValueError, before writing anything, if a module of the blocks is
    not in the checkpoint, its weight shape is not the one the blocks were trained in (a file) or does not fit
    the blocks (a mapping), or (``strict``) the checkpoint is not the blocks' base.
    """
    from smt_kernels.block_files import SavedBlocks, read_blocks  # block_files imports this package (patch)

    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {strict!r}")
    if isinstance(blocks, (str, os.PathLike)):
        blocks = read_blocks(blocks)
    saved = blocks if isinstance(blocks, SavedBlocks) else None
    if saved is not None:
        if block_size is not None and block_size != saved.block_size:
            raise ValueError(f"block_size={block_size} but the block file has block_size {saved.block_size}")
        block_size, blocks = saved.block_size, saved.blocks
    if block_size is None:
        raise ValueError("block_size is needed when blocks are given as a mapping")
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if out_dir.resolve() == checkpoint_dir.resolve():
        raise ValueError("out_dir must differ from checkpoint_dir (the original checkpoint is kept)")
    shards = checkpoint_shards(checkpoint_dir)
    # plan: which shard holds each weight, and do the blocks fit it (headers only, nothing loaded)
    where, shapes, problems = {}, {}, []
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                shapes[key] = (shard, tuple(f.get_slice(key).get_shape()))
                if key.endswith(".weight") and key[: -len(".weight")] in blocks:
                    where[key[: -len(".weight")]] = shapes[key]
    for name, (indices, weight) in blocks.items():
        if name not in where:
            problems.append(f"{name!r}: no {name}.weight in the checkpoint")
            continue
        shape = where[name][1]
        trained_in = saved.shapes.get(name) if saved is not None else None
        try:
            if len(shape) != 2:
                raise ValueError(f"the checkpoint's weight has shape {shape}")
            if trained_in is not None and tuple(trained_in) != shape:
                raise ValueError(
                    f"the blocks were trained in a {trained_in[0]}×{trained_in[1]} weight, the checkpoint's is "
                    f"{shape[0]}×{shape[1]}"
                )
            BlockLayout.build(indices, shape[0], shape[1], block_size)
        except (TypeError, ValueError) as err:
            problems.append(f"{name!r}: {err}")
        if tuple(weight.shape) != (indices.shape[0], block_size, block_size):
            problems.append(
                f"{name!r}: block_weight {tuple(weight.shape)} does not match {indices.shape[0]} blocks "
                f"of {block_size}×{block_size}"
            )
    if problems:
        raise ValueError(
            f"the blocks do not fit the checkpoint in {checkpoint_dir}; nothing was written:\n"
            + "\n".join(f"  - {p}" for p in problems[:10])
        )
    if strict and saved is not None:
        _check_base(saved, shapes, checkpoint_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shard_names = {s.name for s in shards}
    for item in checkpoint_dir.iterdir():
        if item.name not in shard_names and item.is_file():
            shutil.copy2(item, out_dir / item.name)
    for shard in shards:
        targets = [n for n, (s, _) in where.items() if s == shard]
        if not targets:
            shutil.copy2(shard, out_dir / shard.name)
            continue
        with safe_open(str(shard), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(shard))
        for name in targets:
            indices, weight = blocks[name]
            torch_blocks.scatter_blocks(tensors[f"{name}.weight"], weight, indices)
        save_file(tensors, str(out_dir / shard.name), metadata=metadata or {"format": "pt"})
        del tensors
        logger.info("fold_blocks_into_checkpoint: %s (%d modules)", shard.name, len(targets))
    return out_dir
