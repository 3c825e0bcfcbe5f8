"""Wrapping a patched model for the data-parallel engines: DDP without the per-forward buffer broadcast
(``wrap_ddp``), FSDP2 in one call (``shard_model``), and the 4-bit codes made shardable (``shard_nf4_base``)."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from smt_kernels.distributed.ranks import is_sharded
from smt_kernels.quant.model import nf4_modules
from smt_kernels.quant.module import CODE_DTYPES as NF4_CODE_DTYPES
from smt_kernels.quant.module import CODE_NAMES as NF4_CODE_NAMES

logger = logging.getLogger(__name__)


def wrap_ddp(model: nn.Module, **ddp_kwargs: Any) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(model, **ddp_kwargs)`` with the per-forward buffer broadcast off.

    DDP broadcasts every buffer from rank 0 at the start of every forward by default. A patched model's buffers
    never change in training (``block_indices`` and its derived index; on a 4-bit base also the whole NF4
    weight: ``weight_packed``, the absmax scales), so that broadcast only costs time: on a 4-bit base it sends
    the whole 4-bit model every forward (about 0.52 byte per base weight: ~35 GB for LLaMA-3-70B). The buffers
    are still broadcast once when DDP is built, so every rank starts from rank 0's base. Uses
    ``forward_sync_buffers=False`` where torch has it (2.13+), else ``broadcast_buffers=False``; a value the
    caller passes for either wins. Models with buffers that do change in training (BatchNorm running
    statistics) need the default DDP instead.
    """
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" not in ddp_kwargs and "broadcast_buffers" not in ddp_kwargs:
        ddp_kwargs["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = False
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


# the 4-bit codes of an NF4 layer: they are 99.9 % of a double-quantized base (the fp32 scales, 4 bytes per 16384
# weights, stay replicated buffers: FSDP2's mixed precision would cast them)
_NF4_CODES = NF4_CODE_NAMES


def shard_nf4_base(model: nn.Module, codes_dtype: torch.dtype | None = None) -> nn.Module:
    """Let FSDP2 shard the 4-bit base too: call it on the patched 4-bit model right before ``fully_shard``.

    ``fully_shard`` shards parameters only, and an NF4 layer keeps its 4-bit data in buffers, so by default every
    rank holds the whole 4-bit base. This turns each NF4 layer's uint8 codes (``weight_packed`` and, with double
    quantization, ``weight_absmax_q``) into frozen ``nn.Parameter`` s (``NF4Linear.store_codes_as``): FSDP2 then
    shards them (``Shard(0)``), all-gathers a layer's codes before its forward and backward with its other
    parameters and frees them after, as it does for a 16-bit weight. The fp32 scales stay replicated buffers (with
    double quantization 4 bytes per 16384 weights; without it the fp32 absmax, 1/8 of the packed codes).

    Args:
        model: the patched model with NF4 layers (``quantize_base`` / ``load_nf4_pretrained``, then ``patch``),
            not yet ``fully_shard``-ed.
        codes_dtype: what the codes are held in. ``torch.uint8``: as they are; needs a torch whose FSDP2 shards
            integer parameters (``fsdp2_shards_integer_parameters``: 2.13; 2.11's ``fully_shard`` creates the sharded
            parameter requiring grad, which fails for integers, pytorch/pytorch#177844). ``torch.float32``: a bit
            view of the same bytes (uint8 (n,) as (ceil(n / 4),), zero-padded at the end), which the layers view
            back to uint8 (detached) wherever they read the codes, so every kernel sees the same bytes; FSDP2's
            shard copies and all-gathers move it bit for bit (checked on two H200s with torch 2.11 at the
            LLaMA-3-70B shape: logits equal to one GPU's before training; and on gloo with NaN and denormal patterns).
            No 16-bit view: CUDA's copy kernels may pass bfloat16/float16 through fp32, which makes every NaN
            pattern the canonical NaN (a bfloat16 view trained on corrupted codes on the H200s). 2.11's FSDP2 sets
            the sharded view to the original's ``requires_grad`` (False), so no optimizer or trainable count picks
            it up. FSDP2's ``MixedPrecisionPolicy(param_dtype=...)`` casts every floating parameter of another dtype
            when it all-gathers, which would destroy the codes: use no param_dtype other than float32 on these
            modules (a layer that reads cast codes raises). Default: uint8 where FSDP2 can shard it, else float32.
    Returns:
        The same model. State-dict keys and values are unchanged (uint8 codes, unpadded), so saving, merging and
        ``load_blocks`` work as before; only a sharded model's own state (``model.state_dict()``,
        ``get_model_state_dict``) holds a float view in its dtype, which ``save_blocks_distributed`` and
        ``merged_state_dict`` turn back into the codes. Afterwards ``model.parameters()`` includes the codes
        (frozen; ``trainable_parameters`` counts them as the weights they are, not as more parameters), so call it after
        ``patch``; ``.to(dtype)`` / ``.half()`` leave the codes alone in any dtype.
    """
    layers = nf4_modules(model)
    if not layers:
        raise ValueError(
            f"shard_nf4_base: this {type(model).__name__} has no NF4 layers; quantize_base(model, 'nf4') first"
        )
    if is_sharded(model):
        raise ValueError(
            "shard_nf4_base must run before fully_shard: FSDP2 only shards the parameters that exist when it wraps "
            f"a module, and {sum(isinstance(p, DTensor) for p in model.parameters())} parameters are sharded already"
        )
    integers = fsdp2_shards_integer_parameters()
    if codes_dtype is None:
        codes_dtype = torch.uint8 if integers else torch.float32
        if not integers:
            logger.info(
                "shard_nf4_base: FSDP2 in torch %s cannot shard integer parameters (pytorch/pytorch#177844): the "
                "4-bit codes are held as a float32 bit view (a MixedPrecisionPolicy param_dtype other than float32 "
                "would cast them: the layers then raise)",
                torch.__version__,
            )
    if codes_dtype not in NF4_CODE_DTYPES:
        raise TypeError(
            f"shard_nf4_base: codes_dtype {codes_dtype} is not one of {', '.join(map(str, NF4_CODE_DTYPES))}"
        )
    if codes_dtype == torch.uint8 and not integers:
        raise RuntimeError(
            f"shard_nf4_base: FSDP2 in torch {torch.__version__} cannot shard integer parameters (fully_shard fails "
            "with 'only Tensors of floating point dtype can require gradients', pytorch/pytorch#177844; seen with "
            "torch 2.11 on an H200, fixed in 2.13): leave codes_dtype=None or pass torch.float32 (a float32 bit "
            "view of the codes)"
        )
    for m in layers.values():
        m.store_codes_as(codes_dtype)
    return model


def fsdp2_shards_integer_parameters() -> bool:
    """Whether this torch's FSDP2 can shard a frozen uint8 parameter: it creates its sharded parameter with the
    original's ``requires_grad`` (torch 2.13 does; 2.11 creates it requiring grad, which integer tensors cannot)."""
    if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13):
        return True
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

        return "requires_grad=param.requires_grad" in inspect.getsource(FSDPParam._init_sharded_param)
    except (ImportError, AttributeError, OSError, TypeError):
        return False


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face decoder model (``model.model.layers`` for the LLaMA family)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"{type(model).__name__} has no decoder layers at .model.layers (a Hugging Face decoder model has them)"
        )
    return layers


def shard_model(
    model: nn.Module,
    *,
    layers_per_unit: int = 1,
    shard_embeddings: bool = False,
    shard_4bit_base: bool = False,
    prefetch: int = 0,
    **fully_shard_kwargs: Any,
) -> nn.Module:
    """FSDP2 for a patched decoder model, in the order it needs: with ``shard_embeddings`` the input embeddings and
    ``lm_head`` as units of their own (freed between uses instead of staying gathered with the root; needs untied
    embeddings), then every ``layers_per_unit`` consecutive decoder layers as one unit (one all-gather for all of
    them), then the root. ``shard_4bit_base``: ``shard_nf4_base`` first, so the 4-bit
    codes are sharded too. ``prefetch`` > 0: each unit all-gathers the next ``prefetch`` units before its forward
    (and the previous ones before its backward) instead of FSDP2's implicit one-ahead. Other keyword arguments
    (``mesh``, ``reshard_after_forward``, ``mp_policy``, ...) go to every ``fully_shard`` call. Call it after
    ``patch`` on every rank; returns the same model.
    """
    from torch.distributed.fsdp import fully_shard

    if layers_per_unit < 1:
        raise ValueError(f"layers_per_unit must be at least 1, got {layers_per_unit}")
    if prefetch < 0:
        raise ValueError(f"prefetch must be at least 0, got {prefetch}")
    if is_sharded(model):
        raise ValueError("shard_model: the model is sharded already (some parameters are DTensors)")
    layers = list(decoder_layers(model))
    if shard_embeddings:
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        if head is None or embed is None:
            raise ValueError(f"shard_embeddings: {type(model).__name__} has no separate input and output embeddings")
        if head.weight is embed.weight:
            raise ValueError("shard_embeddings needs untied embeddings: lm_head and embed_tokens share one weight here")
    if shard_4bit_base:
        shard_nf4_base(model)
    if shard_embeddings:
        fully_shard(embed, **fully_shard_kwargs)
        fully_shard(head, **fully_shard_kwargs)
    units = [layers[i : i + layers_per_unit] for i in range(0, len(layers), layers_per_unit)]
    for unit in units:
        fully_shard(unit if len(unit) > 1 else unit[0], **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    if prefetch:
        heads = [unit[0] for unit in units]  # a unit's modules share one FSDP state: prefetch through its first
        for i, unit_head in enumerate(heads):
            unit_head.set_modules_to_forward_prefetch(heads[i + 1 : i + 1 + prefetch])
            unit_head.set_modules_to_backward_prefetch(heads[max(0, i - prefetch) : i][::-1])
    return model
