"""bitsandbytes interop, without requantizing: a live ``Linear4bit`` layer, or the tensors bitsandbytes writes into a
state dict / checkpoint (which are read without bitsandbytes installed).

A serialized bitsandbytes 4-bit linear ``<m>`` has ``<m>.weight`` (packed uint8, (n/2, 1)), ``<m>.weight.absmax``,
``<m>.weight.quant_map`` (the 16 NF4 values), ``<m>.weight.quant_state.bitsandbytes__nf4`` (a JSON dict packed as
uint8: quant_type, blocksize, dtype, shape and, with double quantization, nested_blocksize, nested_dtype,
nested_offset) and with double quantization ``<m>.weight.nested_absmax`` and ``<m>.weight.nested_quant_map``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from torch import nn

from smt_kernels.quant.nf4 import ABSMAX_GROUP, BLOCK, NF4_CODE, NF4Weight

QUANT_STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"
STATE_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", QUANT_STATE_SUFFIX[1:])


def is_bnb_linear4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` (checked by name: bitsandbytes need not be importable)."""
    cls = type(module)
    return cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes")


def _check_format(where: str, quant_type: str, blocksize: int, code: torch.Tensor, nested_blocksize=None) -> None:
    if quant_type != "nf4" or blocksize != BLOCK:
        raise ValueError(
            f"{where}: only NF4 with blocksize {BLOCK} is supported, got quant_type={quant_type!r} "
            f"blocksize={blocksize}"
        )
    if not torch.equal(code.detach().float().cpu().reshape(-1), NF4_CODE):
        raise ValueError(f"{where}: the 4-bit code book is not the NF4 one")
    if nested_blocksize is not None and nested_blocksize != ABSMAX_GROUP:
        raise ValueError(
            f"{where}: double-quantized absmax in groups of {nested_blocksize}; only {ABSMAX_GROUP} is supported"
        )


def nf4_from_bnb(module: nn.Module) -> NF4Weight:
    """The ``NF4Weight`` of a live bitsandbytes ``Linear4bit`` (its packed bytes and quant state, shared)."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        raise ValueError(
            "this bitsandbytes Linear4bit has no quant_state (it was never moved to a device, so it is "
            "not quantized yet); call .to(device) on the model first"
        )
    _check_format(
        "Linear4bit", state.quant_type, state.blocksize, state.code, state.state2.blocksize if state.nested else None
    )
    packed = weight.data.reshape(-1)
    if packed.dtype != torch.uint8:  # a quant_storage other than uint8 holds the same bytes
        packed = packed.view(torch.uint8)
    q = NF4Weight(packed=packed, shape=tuple(int(s) for s in state.shape), dtype=state.dtype)
    if state.nested:
        q.absmax_q = state.absmax.reshape(-1)
        q.absmax_scale = state.state2.absmax.float().reshape(-1)
        q.absmax_offset = torch.as_tensor(state.offset, dtype=torch.float32, device=packed.device).reshape(())
        q.absmax_code = state.state2.code.float().to(packed.device)
    else:
        q.absmax = state.absmax.float().reshape(-1)
    return q.check()


def nf4_from_bnb_state(tensors: Mapping[str, torch.Tensor], weight_key: str) -> NF4Weight:
    """The ``NF4Weight`` of the serialized bitsandbytes linear whose packed weight is ``tensors[weight_key]``.

    ``tensors`` holds at least ``weight_key`` and its ``weight_key + ".absmax"`` etc. (see the module docstring).
    """
    missing = [
        f"{weight_key}.{p}"
        for p in ("absmax", "quant_map", QUANT_STATE_SUFFIX[1:])
        if f"{weight_key}.{p}" not in tensors
    ]
    if weight_key not in tensors or missing:
        raise ValueError(f"{weight_key}: not a complete bitsandbytes 4-bit weight, missing {missing or [weight_key]}")
    raw = tensors[weight_key + QUANT_STATE_SUFFIX]
    try:
        meta = json.loads(bytes(raw.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{weight_key}{QUANT_STATE_SUFFIX} is not bitsandbytes' packed JSON: {err}") from None
    nested = "nested_offset" in meta
    _check_format(
        weight_key,
        meta.get("quant_type"),
        meta.get("blocksize"),
        tensors[weight_key + ".quant_map"],
        meta.get("nested_blocksize") if nested else None,
    )
    packed = tensors[weight_key].reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    dtype = getattr(torch, meta["dtype"])
    q = NF4Weight(packed=packed, shape=tuple(int(s) for s in meta["shape"]), dtype=dtype)
    absmax = tensors[weight_key + ".absmax"].reshape(-1).to(packed.device)
    if nested:
        for part in ("nested_absmax", "nested_quant_map"):
            if f"{weight_key}.{part}" not in tensors:
                raise ValueError(f"{weight_key}: double-quantized but {weight_key}.{part} is missing")
        q.absmax_q = absmax
        q.absmax_scale = tensors[weight_key + ".nested_absmax"].float().reshape(-1).to(packed.device)
        # bitsandbytes writes the fp32 offset as a JSON (double) number: converting back is exact
        q.absmax_offset = torch.tensor(meta["nested_offset"], dtype=torch.float32, device=packed.device)
        q.absmax_code = tensors[weight_key + ".nested_quant_map"].float().to(packed.device)
    else:
        q.absmax = absmax.float()
    return q.check()


def bnb_state_keys(weight_key: str) -> list[str]:
    """Every key a serialized bitsandbytes 4-bit weight may add next to ``weight_key``."""
    return [f"{weight_key}.{p}" for p in STATE_PARTS]
