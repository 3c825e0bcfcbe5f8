"""SMT under PyTorch's data-parallel engines (DDP, FSDP2): one selection for all ranks, one writer for files.

Training itself needs nothing from here: ``block_weight`` is an ordinary parameter, so DDP averages its
gradient and FSDP2 shards it and reduce-scatters its gradient like any other; the frozen weights get no
gradient and no optimizer state. What does need care, and lives here:

- ``select_blocks_distributed``: every rank warms up on its own batches, the statistics are reduced across
  ranks, and rank 0's selection is broadcast, so every rank patches exactly the same blocks.
- ``save_blocks_distributed``, ``merged_state_dict``, ``save_merged``: gather full tensors (FSDP2 keeps only
  shards) and write once, on rank 0.
- ``wrap_ddp``: ``DistributedDataParallel`` without the per-forward buffer broadcast, which on a 4-bit base
  (``quantize_base``) would send the whole frozen NF4 base (buffers, not parameters) from rank 0 every forward.
- ``shard_nf4_base``: before ``fully_shard``, makes the 4-bit codes parameters, so that FSDP2 shards them too.
- ``shard_model``: FSDP2 for a patched decoder model in one call (units of decoder layers, embeddings, root,
  prefetch, the 4-bit codes).

A 4-bit base works with all of them. Its NF4 data are buffers, so DDP and FSDP2 keep them replicated on every
rank (FSDP2 shards only the parameters: ``block_weight`` and the 16-bit rest) unless ``shard_nf4_base`` is used.

All collectives use the default process group; "rank 0" is its rank 0. Without an initialised process group
(or with one rank) every function behaves like its single-process counterpart.
See docs/distributed.md.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from smt_kernels.kernels.backend import scatter_blocks
from smt_kernels.module import SparseBlockLinear
from smt_kernels.patch import CONFIG_ATTR, patched_modules, save_blocks
from smt_kernels.quant.dequant import dequantize_overlay_torch
from smt_kernels.quant.model import nf4_modules
from smt_kernels.quant.module import _BUFFER_NAMES as NF4_BUFFERS
from smt_kernels.quant.module import CODE_DTYPES as NF4_CODE_DTYPES
from smt_kernels.quant.module import CODE_NAMES as NF4_CODE_NAMES
from smt_kernels.quant.module import NF4Linear, NF4SparseBlockLinear
from smt_kernels.quant.nf4 import NF4Weight
from smt_kernels.select import DEFAULT_TARGETS, GRADIENT_SCORES, Selection, find_target_linears, select_blocks

logger = logging.getLogger(__name__)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 of the default process group, and in a process without one."""
    return _world() == 1 or dist.get_rank() == 0


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (FSDP2 shards in place: returned as is)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    """True if some parameter of ``model`` is a DTensor (FSDP2 ``fully_shard`` or tensor parallel)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


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


def _collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones
    if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------------------------ selection


@contextmanager
def _averaged_gradients(weights: Iterable[torch.Tensor]):
    """Average each weight's ``.grad`` over ranks as soon as it is accumulated.

    Post-accumulate-grad hooks run in registration order, so this one runs before the hook that
    ``select_blocks`` registers later and folds the gradient into its statistic: every rank then folds the
    same (all-ranks) gradient. A hook can only be registered while the tensor requires grad; it survives the
    flag being switched off and on again (``select_blocks`` does both).
    """
    world = _world()

    def average(param: torch.Tensor) -> None:
        dist.all_reduce(param.grad)  # gloo has no ReduceOp.AVG
        param.grad.div_(world)

    handles, flags = [], []
    try:
        for w in weights:
            flags.append((w, w.requires_grad))
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(average))
        for w, flag in flags:
            w.requires_grad_(flag)
        yield
    finally:
        for h in handles:
            h.remove()
        for w, flag in flags:
            w.requires_grad_(flag)


@contextmanager
def _averaged_nf4_gradients(modules: Iterable[NF4Linear]):
    """``_averaged_gradients`` for 4-bit targets, which have no weight Parameter: ``select_blocks`` hands their
    dense gradients to a fold function it installs as ``module.weight_grad_fold`` (``nf4_weight_gradients``) when
    the warm-up starts. A forward pre-hook wraps that function once, so that the gradient is averaged over ranks
    before it is folded (one all-reduce per target and batch, in backward order, the same on every rank)."""
    world = _world()
    wrapped: dict[int, tuple] = {}

    def wrap(module: NF4Linear, args: tuple) -> None:
        current = module.weight_grad_fold
        if current is None or wrapped.get(id(module)) is current:
            return  # not in a gradient warm-up, or wrapped already (gradient checkpointing re-runs forwards)
        fold, anchor = current

        def averaged(grad: torch.Tensor, fold=fold) -> None:
            dist.all_reduce(grad)
            fold(grad.div_(world))

        module.weight_grad_fold = wrapped[id(module)] = (averaged, anchor)

    handles = [m.register_forward_pre_hook(wrap) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _to_cpu(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def select_blocks_distributed(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]] | Mapping[str, Any],
    num_batches: int | None = None,
    progress: bool | None = None,
    **kwargs: Any,
) -> Selection:
    """``select_blocks`` with each rank's own warm-up batches; every rank returns the same selection.

    Args:
        model: the plain (unwrapped, unsharded) model, the same on every rank; select before wrapping it in
            DDP or ``fully_shard``.
        batches: this rank's warm-up batches (e.g. from a ``DistributedSampler``); at most ``num_batches`` of
            them are used and they are held in a list during the warm-up.
        num_batches: per rank.
        progress: a tqdm bar; default on rank 0 only.
        **kwargs: the other arguments of ``select_blocks`` (num_blocks or ratio, targets, score, strategy,
            block_size, ...).
    Returns:
        The selection made by rank 0, broadcast to all ranks. Its ``scores`` are this rank's (equal on every
        rank up to rounding) and ``num_batches`` counts the batches of all ranks.

    Gradient scores (abs_mean, mean_abs, l1, l2): each target weight's gradient is averaged over ranks after
    every backward (one all-reduce per target per batch, as DDP would do), so the scores equal those of one
    process whose batch t is the concatenation of every rank's batch t (equal local batch sizes, mean loss).
    Every rank must hold the same number of batches (checked first: ValueError on all ranks otherwise).
    The activation score: the batches of all ranks are gathered and every rank runs the forward passes on all
    of them (forward only, in rank order), so its scores equal one process run on all the batches.
    """
    if progress is None:
        progress = is_main_process()
    world = _world()
    if world == 1:
        return select_blocks(model, batches, num_batches=num_batches, progress=progress, **kwargs)
    if isinstance(model, nn.parallel.DistributedDataParallel) or is_sharded(model):
        raise ValueError(
            "select_blocks_distributed needs the plain model (the same on every rank): select the "
            "blocks before wrapping it in DistributedDataParallel or fully_shard"
        )
    if isinstance(batches, Mapping):
        batches = [batches]
    batches = list(islice(batches, num_batches) if num_batches is not None else batches)

    # every collective below must be reached by every rank: agree on the batch count before any of them
    counts = torch.tensor([len(batches), -len(batches)], device=_collective_device())
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    most, fewest = int(counts[0]), -int(counts[1])
    if most != fewest:
        raise ValueError(
            f"select_blocks_distributed: ranks hold between {fewest} and {most} warm-up batches; "
            "give every rank the same number (e.g. num_batches=)"
        )

    score = kwargs.get("score", "abs_mean")
    if score in GRADIENT_SCORES:
        targets = find_target_linears(model, kwargs.get("targets", DEFAULT_TARGETS)).values()
        nf4 = [m for m in targets if isinstance(m, NF4Linear)]
        with (
            _averaged_gradients(m.weight for m in targets if not isinstance(m, NF4Linear)),
            _averaged_nf4_gradients(nf4),
        ):
            local = select_blocks(model, batches, progress=progress, **kwargs)
    else:
        # a forward hook cannot reduce per-token statistics across ranks: run every rank's batches everywhere
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, [_to_cpu(b) for b in batches])
        local = select_blocks(
            model, [b for rank_batches in gathered for b in rank_batches], progress=progress, **kwargs
        )

    # the reductions make the scores equal on every rank up to rounding; rank 0's choice settles near ties
    payload = [local.to_json() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(payload, src=0, device=_collective_device())
    chosen = Selection.from_json(payload[0])
    chosen.num_batches = most * world
    chosen.scores = local.scores
    return chosen


# ------------------------------------------------------------------------------------------------- save and merge


def _full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict on rank 0 (gathered from shards under FSDP2), ``{}`` on the other ranks.

    Collective under FSDP2: every rank must call it.
    """
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # 4-bit codes sharded as a float bit view (shard_nf4_base) are gathered in that dtype: their uint8 bytes
        for name, m in nf4_modules(model).items():
            for b in _NF4_CODES:
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
    if is_sharded(model):
        state = _full_state_dict(model)
        if is_main_process():
            save_blocks(_GatheredModel(model, state), path)  # type: ignore[arg-type]
    elif is_main_process():
        save_blocks(model, path)
    _barrier()  # no rank reads the files before they exist
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
    if is_main_process():
        unwrap(model).save_pretrained(path, state_dict=state, **save_pretrained_kwargs)
    _barrier()
    return Path(path)
