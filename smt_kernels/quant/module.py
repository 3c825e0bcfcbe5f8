"""``NF4Linear`` (a frozen 4-bit linear layer) and ``NF4SparseBlockLinear`` (the same, with trainable b×b blocks)."""

from __future__ import annotations

import torch
from torch import nn

from smt_kernels.kernels import torch_blocks
from smt_kernels.layout import (
    BlockLayout,
    BlocksLike,
    covered_elements,
    indices_changed,
    indices_stamp,
    layout_of_buffer,
    tensor_changed,
    tensor_stamp,
)
from smt_kernels.ops import check_block_weight_shape, undo_unsupported_conversion
from smt_kernels.quant.dequant import block_slot_map, dequantize_overlay_torch, program_hit_flags
from smt_kernels.quant.nf4 import ABSMAX_GROUP, BLOCK, SUPPORTED_DTYPES, NF4Weight, quantize_nf4
from smt_kernels.quant.ops import nf4_block_linear, nf4_weight_grad_linear

# NF4Weight field -> buffer name on the module (state_dict keys "<module>.weight_packed", ...)
_BUFFER_NAMES = {
    "packed": "weight_packed",
    "absmax": "weight_absmax",
    "absmax_q": "weight_absmax_q",
    "absmax_scale": "weight_absmax_scale",
    "absmax_offset": "weight_absmax_offset",
    "absmax_code": "weight_absmax_code",
}
# the 4-bit codes: uint8 buffers, or frozen parameters after ``store_codes_as`` (FSDP2 sharding, shard_nf4_base)
CODE_NAMES = (_BUFFER_NAMES["packed"], _BUFFER_NAMES["absmax_q"])
# what ``store_codes_as`` may hold them in: uint8 itself, or a float32 bit view of the same bytes. Not a 16-bit
# view: CUDA's copy kernels may pass 16-bit floats through fp32, and fp32 -> bfloat16/float16 turns every NaN bit
# pattern into the one canonical NaN (seen on H200s: FSDP2 with a bfloat16 view trained on corrupted codes)
CODE_DTYPES = (torch.uint8, torch.float32)


def _check_dtype(dtype: torch.dtype, what: str) -> torch.dtype:
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what} {dtype} is not supported; use float32, float16 or bfloat16")
    return dtype


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (bitsandbytes' layout, see ``smt_kernels.quant.nf4``).

    Buffers: ``weight_packed`` uint8 (ceil(N·K/2),) and either ``weight_absmax`` float32 (ceil(N·K/64),) or, with
    double quantization, ``weight_absmax_q`` uint8, ``weight_absmax_scale`` float32, ``weight_absmax_offset``
    float32 () and ``weight_absmax_code`` float32 (256,). ``bias`` (N,) is a frozen parameter or None.
    The forward dequantizes into a buffer shared by all NF4 layers and computes in ``compute_dtype`` (or the
    autocast dtype); ``weight_dtype`` is the dtype the weight had before quantization.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        weight_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"NF4Linear needs positive features, got {out_features}×{in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = _check_dtype(compute_dtype, "compute_dtype")
        self.weight_dtype = _check_dtype(weight_dtype or compute_dtype, "weight_dtype")
        n = in_features * out_features
        blocks = -(-n // BLOCK)
        empty = {"packed": torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device)}
        if double_quant:
            empty.update(
                absmax_q=torch.zeros(blocks, dtype=torch.uint8, device=device),
                absmax_scale=torch.zeros(-(-blocks // ABSMAX_GROUP), device=device),
                absmax_offset=torch.zeros((), device=device),
                absmax_code=torch.zeros(256, device=device),
            )
        else:
            empty["absmax"] = torch.zeros(blocks, device=device)
        for field, t in empty.items():
            self.register_buffer(_BUFFER_NAMES[field], t.float() if t.is_floating_point() else t)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=device, dtype=self.weight_dtype), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, double_quant: bool = True, compute_dtype: torch.dtype | None = None
    ) -> NF4Linear:
        """Quantize ``linear`` (on its own device); compute dtype defaults to the linear's dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        q = quantize_nf4(linear.weight.detach(), double_quant=double_quant)
        return cls.from_nf4(q, linear.bias, compute_dtype or linear.weight.dtype)

    @classmethod
    def from_nf4(
        cls, q: NF4Weight, bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.bfloat16
    ) -> NF4Linear:
        """Wrap an existing ``NF4Weight`` (no copy) and an optional bias (copied)."""
        q.check()
        layer = cls(
            q.shape[1],
            q.shape[0],
            bias=bias is not None,
            double_quant=q.double_quant,
            compute_dtype=compute_dtype,
            weight_dtype=q.dtype,
            device="meta",
        )
        layer.set_nf4(q)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def set_nf4(self, q: NF4Weight) -> None:
        """Replace the stored weight by ``q`` (same shape; with or without double quantization)."""
        q.check()
        if q.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"NF4 weight of shape {q.shape} does not fit a {self.out_features}×{self.in_features} layer"
            )
        for name in _BUFFER_NAMES.values():
            self._buffers.pop(name, None)
            self._parameters.pop(name, None)  # codes held as parameters (store_codes_as) become buffers again
        for field, t in q.tensors().items():
            self.register_buffer(_BUFFER_NAMES[field], t)
        self.weight_dtype = q.dtype
        self.codes_view_dtype = None

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) / .half() must not round the fp32 scales (nor touch the codes, least of all codes held
        # as a float bit view, which a cast would destroy): the quantized weight moves to the device fn maps to and
        # keeps its dtypes; the bias (and any blocks) follow fn as usual
        quant = {name: self._buffers.pop(name) for name in _BUFFER_NAMES.values() if name in self._buffers}
        codes = {name: self._parameters.pop(name) for name in CODE_NAMES if self._parameters.get(name) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in quant.items():
                self._buffers[name] = _moved(buf, fn)
            for name, p in codes.items():
                moved = _moved(p, fn)
                self._parameters[name] = p if moved is p else nn.Parameter(moved, requires_grad=False)
        return self

    @property
    def double_quant(self) -> bool:
        return not hasattr(self, "weight_absmax")

    @property
    def nf4(self) -> NF4Weight:
        """The weight as an ``NF4Weight`` over this module's tensors (no copy; codes held as a float bit view are
        viewed back to uint8, detached)."""
        fields = {f: getattr(self, name) for f, name in _BUFFER_NAMES.items() if hasattr(self, name)}
        for f in ("packed", "absmax_q"):
            if f in fields:
                fields[f] = self.codes_as_uint8(_BUFFER_NAMES[f], fields[f])
        return NF4Weight(shape=(self.out_features, self.in_features), dtype=self.weight_dtype, **fields)

    # the float dtype the codes are held in as a bit view of their bytes (store_codes_as), None while uint8
    codes_view_dtype: torch.dtype | None = None

    def store_codes_as(self, dtype: torch.dtype) -> None:
        """Hold the 4-bit codes (``weight_packed`` and, with double quantization, ``weight_absmax_q``) as frozen
        ``nn.Parameter`` s of ``dtype``, so that FSDP2 shards them (``shard_nf4_base``).

        ``torch.uint8`` keeps the codes as they are. A float dtype (``CODE_DTYPES``) holds a bit view of the same
        bytes, zero-padded at the end to whole elements: uint8 (n,) becomes (ceil(n / itemsize),) of ``dtype``.
        Every reader (``nf4``, so the forward and every kernel, and ``state_dict``, which gives the uint8 codes
        without the padding, as before) views it back to uint8; ``load_state_dict`` takes uint8 codes. Nothing may
        cast the view (``.to(dtype)`` / ``.half()`` leave it alone); a read of a cast one raises.
        """
        if dtype not in CODE_DTYPES:
            raise TypeError(f"store_codes_as: {dtype} is not one of {', '.join(map(str, CODE_DTYPES))}")
        for name in CODE_NAMES:
            t = getattr(self, name, None)
            if t is None:
                continue
            codes = self.codes_as_uint8(name, t).detach()
            self._buffers.pop(name, None)
            self._parameters.pop(name, None)
            self.register_parameter(name, nn.Parameter(_bit_view(codes, dtype), requires_grad=False))
        self.codes_view_dtype = None if dtype == torch.uint8 else dtype
        if not getattr(self, "_codes_hooks", None):
            self._codes_hooks = (
                self.register_state_dict_post_hook(_codes_state_dict_hook),
                self.register_load_state_dict_pre_hook(_codes_load_hook),
            )

    def codes_as_uint8(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The uint8 codes ``name`` (``CODE_NAMES``) that ``t`` holds: ``t`` itself if uint8, else its bytes
        (detached view, padding dropped). Raises if ``t`` is not in the dtype ``store_codes_as`` chose: whatever
        cast it (FSDP2's ``MixedPrecisionPolicy(param_dtype=...)`` casts every floating parameter of another dtype
        in its all-gather) destroyed the codes."""
        if t.dtype == torch.uint8:
            return t
        if t.dtype != self.codes_view_dtype:
            raise RuntimeError(
                f"{name} of this {self.out_features}×{self.in_features} {type(self).__name__} holds the 4-bit codes "
                f"as a {self.codes_view_dtype} bit view but arrived as {t.dtype}: something cast it, which destroys "
                f"the codes (FSDP2's MixedPrecisionPolicy(param_dtype={t.dtype}) casts every floating parameter of "
                f"another dtype when it all-gathers): give these modules no MixedPrecisionPolicy param_dtype other "
                f"than {self.codes_view_dtype}, or use a torch whose FSDP2 shards uint8 parameters (2.13)"
            )
        return t.detach().view(torch.uint8)[: self._code_bytes(name)]

    def _code_bytes(self, name: str) -> int:
        n = self.in_features * self.out_features
        return (n + 1) // 2 if name == _BUFFER_NAMES["packed"] else -(-n // BLOCK)

    # (fold, anchor) while ``smt_kernels.quant.model.nf4_weight_gradients`` is active on this layer, else None
    weight_grad_fold = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_grad_fold is not None:
            fold, anchor = self.weight_grad_fold
            return nf4_weight_grad_linear(x, self.nf4, self.compute_dtype, self.bias, anchor, fold)
        return nf4_block_linear(x, self.nf4, self.compute_dtype, self.bias)

    @torch.no_grad()
    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new (N, K) tensor (default dtype: compute dtype) of the weight as the forward uses it."""
        q = self.nf4
        out = torch.empty(q.shape, device=q.device, dtype=dtype or self.compute_dtype)
        return self._overlay(q, out)

    def _overlay(self, q: NF4Weight, out: torch.Tensor) -> torch.Tensor:
        return dequantize_overlay_torch(q, out)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` in the compute dtype, same device, with the dequantized weight."""
        w = self.dequantized_weight()
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype
        )
        linear.weight.copy_(w)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def nbytes(self) -> int:
        """Bytes of the quantized weight (packed codes and scales), bias excluded."""
        return self.nf4.nbytes()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nf4, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )


class NF4SparseBlockLinear(NF4Linear):
    """An ``NF4Linear`` with trainable b×b blocks written over its frozen 4-bit weight (SMT on a 4-bit base).

    Adds ``block_weight`` (n, b, b), the only trainable tensor (``block_dtype``, default the compute dtype;
    entries past the weight's edge are zero and get zero gradient) and ``block_indices`` int64 (n, 2). The same
    attribute names as ``SparseBlockLinear``, so block files and selections carry over. Derived from block_indices
    once, not saved, rebuilt by ``load_state_dict``: ``col_blocks``, ``col_slot``, ``block_map`` (``block_slot_map``)
    and ``program_hits`` (uint8 (P,), ``program_hit_flags``: which programs of the Triton overlay meet a block).
    """

    @classmethod
    def from_nf4_linear(
        cls,
        base: NF4Linear,
        blocks: BlocksLike | BlockLayout,
        block_size: int = 256,
        block_dtype: torch.dtype | None = None,
    ) -> NF4SparseBlockLinear:
        """Make ``blocks`` (pairs, an (n, 2) int tensor, or a ``BlockLayout`` already validated for this shape) of
        ``base`` trainable; shares base's buffers (no copy of the 4-bit weight).

        The blocks start at the dequantized base values, so the layer computes what ``base`` computes.
        """
        if not isinstance(base, NF4Linear) or isinstance(base, NF4SparseBlockLinear):
            raise TypeError(f"from_nf4_linear expects a frozen NF4Linear, got {type(base).__name__}")
        want = (base.out_features, base.in_features, block_size)
        if isinstance(blocks, BlockLayout):  # validated by the caller (patch plans every module first)
            have = (blocks.out_features, blocks.in_features, blocks.block_size)
            if have != want:
                raise ValueError(
                    f"the layout is for a {have[0]}×{have[1]} weight with block_size {have[2]}, not "
                    f"{want[0]}×{want[1]} with block_size {want[2]}"
                )
            layout = blocks
        else:
            layout = BlockLayout.build(blocks, *want)
        layer = cls(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            double_quant=base.double_quant,
            compute_dtype=base.compute_dtype,
            weight_dtype=base.weight_dtype,
            device="meta",
        )
        layer.set_nf4(base.nf4)
        layer.bias = base.bias
        dtype = _check_dtype(block_dtype or base.compute_dtype, "block_dtype")
        layer._install_blocks(layout, dtype)
        return layer

    def _apply(self, fn, recurse=True):
        # the blocks follow fn as a 16-bit layer's do, but only to a dtype the layer (and a block file) supports
        before = {n: p.dtype for n, p in self.named_parameters(recurse=False)}
        super()._apply(fn, recurse)
        if self._parameters.get("block_weight") is not None:  # not yet while from_nf4_linear builds the layer
            undo_unsupported_conversion(self, before, ("block_weight",))
        return self

    def _install_blocks(self, layout: BlockLayout, dtype: torch.dtype) -> None:
        device = self.weight_packed.device
        self.block_size = layout.block_size
        self.register_buffer("block_indices", layout.indices.to(device))
        # derived from block_indices (not saved); rebuilt after load_state_dict
        self._derive_index(layout)
        self.block_weight = nn.Parameter(self._base_blocks(dtype))
        self.register_load_state_dict_pre_hook(_note_codes_without_blocks)
        self.register_load_state_dict_post_hook(_rebuild_index)

    def _base_blocks(self, dtype: torch.dtype) -> torch.Tensor:
        """The base's values at ``block_indices`` as a new (n, b, b) tensor: an fp32 dequantization rounded once to
        ``dtype``, so the overlay then reproduces the base exactly."""
        w = torch.empty(self.nf4.shape, device=self.weight_packed.device, dtype=torch.float32)
        dequantize_overlay_torch(self.nf4, w)
        return torch_blocks.extract_blocks(w, self.block_indices, self.block_size).to(dtype).contiguous()

    def _derive_index(self, layout: BlockLayout) -> None:
        device = self.weight_packed.device
        self.register_buffer("col_blocks", layout.col_blocks.to(device), persistent=False)
        self.register_buffer("col_slot", layout.col_slot.to(device), persistent=False)
        # the layer's shape: self.nf4 would view the codes (a sharded DTensor under FSDP2) only to give it
        shape = (self.out_features, self.in_features)
        block_map = block_slot_map(self.block_indices, shape, layout.block_size)
        self.register_buffer("block_map", block_map, persistent=False)
        # which programs of the Triton overlay meet a block: the rest skip the map (stale flags would drop blocks)
        self.register_buffer("program_hits", program_hit_flags(block_map, shape, layout.block_size), persistent=False)
        # the indices these were derived from (tensor and version): a write to block_indices, or another tensor
        # assigned to it, is seen at the next eager forward and everything is derived again (``_refresh_layout``)
        self._indices_seen = indices_stamp(self.block_indices)

    @torch.inference_mode(False)
    def _refresh_layout(self) -> None:
        """Validate ``block_indices`` after it was written or replaced; derive the column index, slot map and
        program flags again (outside inference mode even when called from it: they serve training too)."""
        idx = self.block_indices
        layout = layout_of_buffer(idx, self.out_features, self.in_features, self.block_size, self.weight_packed.device)
        if not idx.is_contiguous() or idx.is_inference():
            self.block_indices = idx.clone(memory_format=torch.contiguous_format)
        self._derive_index(layout)

    @property
    def num_blocks(self) -> int:
        return int(self.block_indices.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and indices_changed(
            getattr(self, "_indices_seen", None), self.block_indices
        ):
            self._refresh_layout()
        # the kernels index block_weight as (n, b, b) by the map's slots: another n would read past its end
        check_block_weight_shape(self.block_weight, self.block_indices.shape[0], self.block_size)
        return nf4_block_linear(
            x,
            self.nf4,
            self.compute_dtype,
            self.bias,
            self.block_weight,
            self.block_indices,
            self.block_map,
            self.col_blocks,
            self.col_slot,
            self.block_size,
            self.program_hits,
        )

    def _overlay(self, q: NF4Weight, out: torch.Tensor) -> torch.Tensor:
        return dequantize_overlay_torch(q, out, self.block_weight.detach(), self.block_indices)

    def trainable_elements(self) -> int:
        """Weight elements the blocks cover (clipped edge blocks counted clipped)."""
        return covered_elements(self.block_indices.cpu(), self.out_features, self.in_features, self.block_size)

    def extra_repr(self) -> str:
        pct = 100.0 * self.trainable_elements() / (self.out_features * self.in_features)
        return (
            f"{super().extra_repr()}, block_size={self.block_size}, num_blocks={self.num_blocks} "
            f"({pct:.2f}% of the weight), block_dtype={self.block_weight.dtype}"
        )


def _moved(t: torch.Tensor, fn) -> torch.Tensor:
    """``t`` on the device ``fn`` maps its device to, in its own dtype (a meta shell, as ``to_empty`` makes it, gets
    uninitialised memory); ``t`` itself if it is there already."""
    target = fn(torch.empty(0, device=t.device)).device
    if t.device == target:
        return t
    return torch.empty_like(t, device=target) if t.is_meta else t.to(target)


def _bit_view(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (n,) codes as (ceil(n / itemsize),) ``dtype`` over the same bytes, zero-padded at the end; a copy only
    where padding or the storage offset needs one."""
    size = dtype.itemsize
    pad = -codes.numel() % size
    if pad or codes.storage_offset() % size:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    return codes.view(dtype)


def _codes_state_dict_hook(module: NF4Linear, state_dict, prefix: str, local_metadata) -> None:
    # codes held as a float bit view are saved as the uint8 codes, unpadded, as before; FSDP2 shards (DTensor) are
    # left as they are: smt_kernels.distributed converts the gathered full tensor
    from torch.distributed.tensor import DTensor

    for name in CODE_NAMES:
        t = state_dict.get(prefix + name)
        if t is not None and t.dtype != torch.uint8 and not isinstance(t, DTensor):
            state_dict[prefix + name] = module.codes_as_uint8(name, t)


def _codes_load_hook(module: NF4Linear, state_dict, prefix: str, *args) -> None:
    # uint8 codes (as state_dict gives them) into codes held as a float bit view: the same view of them
    for name in CODE_NAMES:
        t, p = state_dict.get(prefix + name), module._parameters.get(name)
        if t is not None and p is not None and t.dtype == torch.uint8 and p.dtype != torch.uint8:
            state_dict[prefix + name] = _bit_view(t, p.dtype)


def _note_codes_without_blocks(layer: NF4SparseBlockLinear, state_dict, prefix: str, *args) -> None:
    # new 4-bit codes without blocks (strict=False, e.g. another base): the blocks are then read from them, or the
    # next forward would overlay the old blocks on the loaded base
    # (only if the codes are really written: a refused load, e.g. a size mismatch, still runs the post-hook)
    loads_codes = prefix + "weight_packed" in state_dict and prefix + "block_weight" not in state_dict
    layer._codes_before_load = tensor_stamp(layer.weight_packed) if loads_codes else None


def _rebuild_index(layer: NF4SparseBlockLinear, incompatible_keys) -> None:
    layer._refresh_layout()
    before = layer.__dict__.pop("_codes_before_load", None)
    if before is not None and tensor_changed(before, layer.weight_packed):
        with torch.no_grad():
            layer.block_weight.copy_(layer._base_blocks(layer.block_weight.dtype))
