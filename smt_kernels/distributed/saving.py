"""Saving from a DDP or FSDP2 model: gather full tensors (FSDP2 keeps only shards) and write once, on rank 0."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smt_kernels.distributed.ranks import is_main_process, is_sharded, run_on_main, unwrap
from smt_kernels.kernels.backend import scatter_blocks
from smt_kernels.module import SparseBlockLinear
from smt_kernels.patch import CONFIG_ATTR, patched_modules, require_patched, save_blocks
from smt_kernels.quant.dequant import dequantize_overlay_torch
from smt_kernels.quant.model import nf4_modules
from smt_kernels.quant.module import _BUFFER_NAMES as NF4_BUFFERS
from smt_kernels.quant.module import CODE_NAMES as NF4_CODE_NAMES
from smt_kernels.quant.module import NF4Linear, NF4SparseBlockLinear
from smt_kernels.quant.nf4 import NF4Weight


def _full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict on rank 0 (gathered from shards under FSDP2), ``{}`` on the other ranks.

    Collective under FSDP2: every rank must call it.
    """
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # 4-bit codes sharded as a float bit view (shard_nf4_base) are gathered in that dtype: their uint8 bytes
        for name, m in nf4_modules(model).items():
            for b in NF4_CODE_NAMES:
                t = state.get(f"{name}.{b}")
                if t is not None and t.dtype != torch.uint8:
                    state[f"{name}.{b}"] = m.codes_as_uint8(b, t).clone()
        return state
    if not is_main_process():
        return {}
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class _GatheredModel:
    """What ``save_blocks`` reads of a patched model (``smt_config``, its SparseBlockLinear layers' blocks and
    shapes, ``state_dict()``), served from a full state dict, so that a sharded model saves like a plain one."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        setattr(self, CONFIG_ATTR, getattr(model, CONFIG_ATTR))
        self._state = state
        self._layers = {}
        for name, m in patched_modules(model).items():
            # a shell on the meta device: only the blocks, their indices and the shape are real (the type tells
            # the fingerprint which state keys are blocks, not base)
            if isinstance(m, NF4SparseBlockLinear):
                shell = NF4SparseBlockLinear(m.in_features, m.out_features, bias=False, device="meta")
            else:
                shell = SparseBlockLinear(
                    m.in_features, m.out_features, [], m.block_size, bias=False, device="meta", dtype=m.weight.dtype
                )
            shell.block_weight = nn.Parameter(state[f"{name}.block_weight"], requires_grad=False)
            shell.block_indices = state[f"{name}.block_indices"]
            self._layers[name] = shell

    def named_modules(self):
        return iter(self._layers.items())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def save_blocks_distributed(model: nn.Module, path: str | os.PathLike) -> Path:
    """``save_blocks`` for a DDP-wrapped or FSDP2-sharded model: gathers the blocks (and, sharded, the base
    tensors the fingerprint samples) and writes the files once, on rank 0. Call it on every rank.

    Under FSDP2 rank 0 holds a full CPU copy of the state dict while saving, as any full-state-dict checkpoint
    does. The files equal what ``save_blocks`` writes for the same model trained in one process.
    """
    model = unwrap(model)
    require_patched(model, "save_blocks_distributed")  # on every rank, before any collective
    if is_sharded(model):
        state = _full_state_dict(model)
        run_on_main(lambda: save_blocks(_GatheredModel(model, state), path))  # type: ignore[arg-type]
    else:
        run_on_main(lambda: save_blocks(model, path))
    # run_on_main returns on every rank once rank 0 wrote the files (or raises everywhere if it could not)
    return Path(path)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The merged model's full state dict (blocks folded into the weights, keys as in the unpatched 16-bit model,
    on the CPU) on rank 0; ``{}`` on the other ranks. Call it on every rank (it gathers shards under FSDP2).

    What ``merge(model)`` would give, tensor for tensor: a 4-bit layer (``quantize_base``) becomes a ``weight`` in
    its compute dtype, the dequantized NF4 base with the trained blocks in place (and its bias in that dtype);
    the frozen 4-bit layers are dequantized too. The model itself is left as it is (``merge`` would swap modules
    of a sharded model in place).
    """
    model = unwrap(model)
    mods = patched_modules(model)
    if not mods:
        raise ValueError(
            f"merged_state_dict needs a model patched with smt_kernels.patch; this "
            f"{type(model).__name__} has no SparseBlockLinear (or NF4SparseBlockLinear) modules"
        )
    quantized = nf4_modules(model)
    state = _full_state_dict(model)
    if not is_main_process():
        return {}
    for name, m in mods.items():
        if isinstance(m, NF4SparseBlockLinear):
            continue
        # the gathered FSDP2 weight comes from shards that never saw the blocks: write them in
        w = state[f"{name}.weight"].clone()
        scatter_blocks(w, state.pop(f"{name}.block_weight"), state.pop(f"{name}.block_indices"))
        state[f"{name}.weight"] = w
    # 4-bit layers: one dequantized weight first among the module's keys (where nn.Linear has it), the NF4 buffers
    # and blocks dropped, the bias in the compute dtype as merge's nn.Linear has it
    drop = {f"{n}.{b}" for n in quantized for b in (*NF4_BUFFERS.values(), "block_weight", "block_indices")}
    out = {}
    for key, t in state.items():
        name = key.rpartition(".")[0]
        m = quantized.get(name)
        if m is not None and f"{name}.weight" not in out:
            out[f"{name}.weight"] = _dequantized(name, m, state)
        if key not in drop:
            out[key] = t if m is None else t.to(m.compute_dtype)
    return out


def _dequantized(name: str, m: NF4Linear, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Layer ``name``'s weight as ``merge`` makes it (``NF4Linear.to_linear``), from the (gathered) state dict."""
    fields = {f: state[f"{name}.{b}"] for f, b in NF4_BUFFERS.items() if f"{name}.{b}" in state}
    q = NF4Weight(shape=(m.out_features, m.in_features), dtype=m.weight_dtype, **fields)
    out = torch.empty(q.shape, dtype=m.compute_dtype)
    if isinstance(m, NF4SparseBlockLinear):
        return dequantize_overlay_torch(q, out, state[f"{name}.block_weight"], state[f"{name}.block_indices"])
    return dequantize_overlay_torch(q, out)


def save_merged(model: nn.Module, path: str | os.PathLike, **save_pretrained_kwargs: Any) -> Path:
    """Write the merged model as a Hugging Face checkpoint (``save_pretrained``) once, on rank 0.

    Call it on every rank. ``AutoModelForCausalLM.from_pretrained(path)`` then loads a plain model with the
    trained blocks folded in; the model being trained is left as it is.
    """
    state = merged_state_dict(model)
    run_on_main(lambda: unwrap(model).save_pretrained(path, state_dict=state, **save_pretrained_kwargs))
    return Path(path)
