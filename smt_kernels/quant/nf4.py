"""The NF4 format of QLoRA / bitsandbytes: a weight as packed 4-bit codes with per-block absmax scales.

Layout (identical to bitsandbytes ``quantize_4bit(quant_type="nf4", blocksize=64)``):
- the weight is read row-major as one flat vector of n = N·K values, cut into blocks of 64 consecutive values
  (the last block may be shorter); each block is divided by its absmax and every value is mapped to the
  nearest of the 16 NF4 code values (ties to the lower code), so value ≈ ``NF4_CODE[q] * absmax[block]``;
- two codes per byte: value 2i in the high nibble, value 2i+1 in the low nibble (an odd n pads with code 7, 0.0);
- double quantization (on by default, as in QLoRA): the fp32 absmaxes minus their mean (``offset``) are
  quantized to 8 bits with bitsandbytes' signed dynamic code in groups of 256, each group scaled by its own
  fp32 absmax, so absmax ≈ ``code8[q8] * scale[group] + offset``.

The reference quantize/dequantize here are plain torch on any device; they reproduce bitsandbytes' CPU
functions bit for bit (tests/test_nf4_format.py). Dequantization with trained blocks written in place is in
``smt_kernels.quant.dequant``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

BLOCK = 64  # values per absmax block (QLoRA's choice; bitsandbytes' default)
ABSMAX_GROUP = 256  # absmaxes per second-level scale under double quantization
# elements quantized/dequantized per step: bounds the fp32/int temporaries (a 28672×8192 weight would
# otherwise take ~3 GB of them); a multiple of BLOCK·ABSMAX_GROUP so chunks never split a block or a group
CHUNK = 1 << 24
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# the 16 NF4 values (QLoRA, Dettmers et al. 2023, appendix E): quantiles of N(0, 1) normalised to [-1, 1], with an
# exact zero; the float32 values bitsandbytes uses
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
ZERO_CODE = 7


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (256 sorted float32 values in [-0.993, 1]).

    Dettmers 2015 (arXiv 1511.04561): for exponent e = 0..6 the values ±10^(e-6)·m, where m runs over the
    midpoints of 2^e + 1 evenly spaced points in [0.1, 1]; plus 0 and 1. Computed in float32 as bitsandbytes does.
    """
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10 ** (e - 6)) * mids  # python float times float32 tensor: rounded to float32
        values += scaled.tolist() + (-scaled).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


@dataclass
class NF4Weight:
    """A 2-D weight in NF4, as plain tensors (all on one device).

    Attributes:
        packed: uint8 (ceil(n/2),), two codes per byte, n = shape[0]·shape[1].
        shape: (N, K) of the original weight; dtype: its dtype (what dequantization returns by default).
        absmax: float32 (ceil(n/64),) per-block scales, or None under double quantization, which has instead
        absmax_q: uint8 (ceil(n/64),) 8-bit codes of absmax - offset;
        absmax_scale: float32 (ceil(n/64/256),) per-group scale of those codes;
        absmax_offset: float32 () the mean absmax that was subtracted;
        absmax_code: float32 (256,) the 8-bit code table (travels with the weight, as in bitsandbytes).
    """

    packed: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    absmax: torch.Tensor | None = None
    absmax_q: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None
    absmax_code: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.absmax is None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields that are set, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def to(self, device: torch.device | str) -> NF4Weight:
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return NF4Weight(shape=self.shape, dtype=self.dtype, **moved)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def absmax_fp32(self) -> torch.Tensor:
        """float32 (ceil(n/64),) block scales; undoes double quantization as bitsandbytes does (multiply, then add)."""
        if self.absmax is not None:
            return self.absmax
        n = self.absmax_q.numel()
        codes = self.absmax_code.index_select(0, self.absmax_q.int())
        codes = torch.cat([codes, codes.new_zeros((-n) % ABSMAX_GROUP)]).view(-1, ABSMAX_GROUP)
        # two roundings (product, then sum), never a fused multiply-add: bitsandbytes' values exactly
        scaled = (codes * self.absmax_scale.view(-1, 1)).view(-1)[:n]
        return scaled + self.absmax_offset

    def check(self) -> NF4Weight:
        """Raise ValueError naming the numbers if the tensors do not fit ``shape``; returns self."""
        n = self.numel
        blocks = -(-n // BLOCK)
        want = {
            "packed": ((n + 1) // 2,),
            "absmax": (blocks,),
            "absmax_q": (blocks,),
            "absmax_scale": (-(-blocks // ABSMAX_GROUP),),
            "absmax_offset": (),
            "absmax_code": (256,),
        }
        kinds = {"packed": torch.uint8, "absmax_q": torch.uint8}
        got = self.tensors()
        needed = (
            ("packed", "absmax")
            if self.absmax is not None
            else ("packed", "absmax_q", "absmax_scale", "absmax_offset", "absmax_code")
        )
        missing = [k for k in needed if k not in got]
        if missing:
            raise ValueError(f"NF4 weight of shape {self.shape} misses {missing}")
        for name, t in got.items():
            if tuple(t.shape) != want[name] or t.dtype != kinds.get(name, torch.float32):
                raise ValueError(
                    f"NF4 weight of shape {self.shape}: {name} must be {kinds.get(name, torch.float32)} "
                    f"{want[name]}, got {t.dtype} {tuple(t.shape)}"
                )
            if t.device != self.device:
                raise ValueError(f"NF4 weight: {name} is on {t.device}, packed on {self.device}")
        return self


def _nearest_nf4(scaled: torch.Tensor) -> torch.Tensor:
    # the boundaries are the float32 midpoints of neighbouring codes; a value on a boundary takes the lower code
    code = NF4_CODE.to(scaled.device)
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True)


def _quantize_chunk(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """flat float32 (m,), m even or the tail -> (packed uint8 (ceil(m/2),), absmax float32 (ceil(m/64),))."""
    m = flat.numel()
    full = m - m % BLOCK
    absmax = flat[:full].view(-1, BLOCK).abs().amax(dim=1)
    # multiply by the reciprocal, as bitsandbytes does (not a division: the rounding differs); an all-zero
    # block gets scale 1e-38 here and stores absmax 0
    scaled = (flat[:full].view(-1, BLOCK) * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp_(-1, 1).view(-1)
    if full < m:
        tail_max = flat[full:].abs().amax()
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, (flat[full:] / tail_max.clamp(min=1e-38)).clamp_(-1, 1)])
    q = _nearest_nf4(scaled).to(torch.uint8)
    if m % 2:
        q = torch.cat([q, q.new_full((1,), ZERO_CODE)])
    return (q[0::2] << 4) | q[1::2], absmax


def quantize_blockwise_8bit(
    values: torch.Tensor, code: torch.Tensor, group: int = ABSMAX_GROUP
) -> tuple[torch.Tensor, torch.Tensor]:
    """values float32 (m,) -> (codes uint8 (m,), scales float32 (ceil(m/group),)), nearest code, ties to the lower.

    As bitsandbytes' CPU ``quantize_blockwise``: each group is divided (true division) by its absmax and its values
    searched in ``code`` with the first entry taken as -1 (bitsandbytes' search does that to cover [-1, 1]).
    """
    m = values.numel()
    pad = (-m) % group
    v = torch.cat([values, values.new_zeros(pad)]).view(-1, group)
    scales = v.abs().amax(dim=1)  # zero padding never raises an absmax
    # an all-zero group (bitsandbytes divides by 0 there) maps to the code nearest 0
    normed = (v / scales.clamp(min=1e-38).view(-1, 1)).view(-1)[:m]
    table = code.clone()
    table[0] = -1.0
    left = (torch.searchsorted(table, normed, right=True) - 1).clamp_(0, table.numel() - 1)
    right = (left + 1).clamp_(max=table.numel() - 1)
    take_right = ((normed - table[right]).abs() < (normed - table[left]).abs()) & (left < table.numel() - 1)
    return (left + take_right.long()).to(torch.uint8), scales


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor, double_quant: bool = True) -> NF4Weight:
    """Quantize a 2-D fp32/fp16/bf16 weight (N, K) to NF4 on its own device; returns an ``NF4Weight``.

    Equal, bit for bit, to bitsandbytes ``quantize_4bit(weight, blocksize=64, quant_type="nf4",
    compress_statistics=double_quant)`` on the CPU. Works in chunks of ``CHUNK`` values, so the temporaries stay
    small next to the weight.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"quantize_nf4 expects a 2-D weight (out_features, in_features), got {got}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"quantize_nf4: weight dtype {weight.dtype} is not float32/float16/bfloat16")
    if weight.numel() == 0:
        raise ValueError(f"quantize_nf4: the weight of shape {tuple(weight.shape)} is empty")
    if not torch.isfinite(weight).all():
        raise ValueError("quantize_nf4: the weight has non-finite values (inf/NaN); NF4 cannot represent them")
    flat = weight.detach().reshape(-1)
    packed, absmax = [], []
    for start in range(0, flat.numel(), CHUNK):
        p, a = _quantize_chunk(flat[start : start + CHUNK].float())
        packed.append(p)
        absmax.append(a)
    out = NF4Weight(packed=torch.cat(packed), shape=(weight.shape[0], weight.shape[1]), dtype=weight.dtype)
    absmax = torch.cat(absmax)
    if not double_quant:
        out.absmax = absmax
        return out
    offset = absmax.mean()
    code = dynamic_code().to(weight.device)
    out.absmax_q, out.absmax_scale = quantize_blockwise_8bit(absmax - offset, code)
    out.absmax_offset, out.absmax_code = offset, code
    return out


_PAIR_TABLES: dict[torch.device, torch.Tensor] = {}


def _pair_table(device: torch.device) -> torch.Tensor:
    """float32 (256, 2): the two NF4 values a packed byte holds (high nibble first); one lookup per byte."""
    t = _PAIR_TABLES.get(device)
    if t is None:
        byte = torch.arange(256)
        t = _PAIR_TABLES[device] = torch.stack([NF4_CODE[byte >> 4], NF4_CODE[byte & 15]], dim=1).to(device)
    return t


@torch.no_grad()
def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The reference dequantization: (N, K) in ``dtype`` (default the original), value = code[q]·absmax in fp32,
    rounded once to ``dtype``. Writes into ``out`` (contiguous (N, K)) when given."""
    dtype = dtype if dtype is not None else q.dtype
    if out is None:
        out = torch.empty(q.shape, device=q.device, dtype=dtype)
    flat_out = out.view(-1)
    absmax = q.absmax_fp32()
    table = _pair_table(q.device)
    n = q.numel
    for start in range(0, n, CHUNK):  # start is a multiple of 64: chunks hold whole absmax blocks
        stop = min(start + CHUNK, n)
        values = table.index_select(0, q.packed[start // 2 : (stop + 1) // 2].int()).view(-1)[: stop - start]
        scale = absmax[start // BLOCK : -(-stop // BLOCK)]
        full = (stop - start) // BLOCK * BLOCK
        flat_out[start : start + full] = (values[:full].view(-1, BLOCK) * scale[: full // BLOCK].view(-1, 1)).view(-1)
        if full < stop - start:
            flat_out[start + full : stop] = values[full:] * scale[-1]
    return out
