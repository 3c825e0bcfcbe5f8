"""The NF4 format against bitsandbytes (bit for bit, where installed) and against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from smt_kernels.quant import nf4
from smt_kernels.quant.nf4 import NF4_CODE, NF4Weight, dequantize_nf4, dynamic_code, quantize_nf4

try:  # optional: bitsandbytes' CPU functions are the reference for the packed layout
    import bitsandbytes.functional as bnbf
except ImportError:  # pragma: no cover - exercised where bitsandbytes is absent
    bnbf = None
needs_bnb = pytest.mark.skipif(bnbf is None, reason="bitsandbytes is not installed")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, K): aligned, a ragged last 64-block, an odd element count (padded nibble), several absmax groups
SHAPES = [(64, 64), (37, 70), (3, 5), (300, 257)]


def weight(shape, dtype, seed=0, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * scale
    w.view(-1)[::97] *= 30  # outliers: blocks with very different absmax
    return w.to(dtype)


def unpack(q: NF4Weight) -> torch.Tensor:
    codes = torch.stack([q.packed >> 4, q.packed & 15], dim=1).reshape(-1).long()
    return codes[: q.numel]


def test_code_tables():
    assert NF4_CODE.shape == (16,) and NF4_CODE[0] == -1 and NF4_CODE[7] == 0 and NF4_CODE[15] == 1
    assert (NF4_CODE[1:] > NF4_CODE[:-1]).all()
    code = dynamic_code()
    assert code.shape == (256,) and (code[1:] > code[:-1]).all() and code[-1] == 1 and (code == 0).sum() == 1


@needs_bnb
def test_code_tables_match_bitsandbytes():
    assert torch.equal(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnbf.create_dynamic_map())


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_single_quant_matches_bitsandbytes(shape, dtype):
    w = weight(shape, dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    q = quantize_nf4(w, double_quant=False)
    assert torch.equal(q.packed, packed.reshape(-1))
    assert torch.equal(q.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(q), bnbf.dequantize_4bit(packed, state))


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 70), (300, 257), (512, 640)])
def test_double_quant_matches_bitsandbytes(shape, dtype):
    """Packed codes, group scales, offset and code table are bit for bit bitsandbytes'. The 8-bit absmax codes are
    too, except where bitsandbytes' CPU quantizer does not return the nearest code (values within ~1e-4 of a
    midpoint between two codes, and some values near 0, go to the farther code there): ours is the nearest code,
    strictly nearer in every such case."""
    w = weight(shape, dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    q = quantize_nf4(w)
    assert torch.equal(q.packed, packed.reshape(-1))
    assert torch.equal(q.absmax_scale, state.state2.absmax)
    assert torch.equal(q.absmax_offset, state.offset)
    assert torch.equal(q.absmax_code, state.state2.code)
    raw = quantize_nf4(w, double_quant=False).absmax
    groups = torch.arange(raw.numel()) // 256
    normed = ((raw - q.absmax_offset) / q.absmax_scale[groups]).double()
    ours, theirs = q.absmax_q.long(), state.absmax.long()
    code = q.absmax_code.double()
    differ = ours != theirs
    assert differ.float().mean() < 0.01, f"{int(differ.sum())} of {differ.numel()} absmax codes differ"
    assert ((normed - code[ours]).abs()[differ] < (normed - code[theirs]).abs()[differ]).all()


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantizes_bitsandbytes_state_bit_for_bit(dtype, double_quant):
    """A weight bitsandbytes quantized (its bytes and quant state, as in a bitsandbytes checkpoint) dequantizes
    here exactly as bitsandbytes dequantizes it."""
    from smt_kernels.quant.bnb import nf4_from_bnb

    w = weight((300, 257), dtype, seed=3)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")

    class Layer:  # what nf4_from_bnb reads of a Linear4bit: weight.data and weight.quant_state
        pass

    layer = Layer()
    layer.weight = torch.nn.Parameter(packed, requires_grad=False)
    layer.weight.quant_state = state
    assert torch.equal(dequantize_nf4(nf4_from_bnb(layer)), bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_against_float64_definition(shape, dtype):
    """Each code is the nearest NF4 value to w/absmax (float64), absmax is the block's exact absmax, and the
    double-quantized absmax is within half an 8-bit step of it."""
    w = weight(shape, dtype)
    q = quantize_nf4(w, double_quant=False)
    flat = w.double().reshape(-1)
    n = flat.numel()
    pad = (-n) % 64
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 64)
    absmax = blocks.abs().amax(dim=1)
    assert torch.equal(q.absmax.double(), absmax)
    scaled = (blocks / absmax.view(-1, 1)).reshape(-1)[:n]
    dist = (scaled.view(-1, 1) - NF4_CODE.double().view(1, -1)).abs()
    chosen = dist.gather(1, unpack(q).view(-1, 1)).squeeze(1)
    assert (chosen <= dist.min(dim=1).values + 1e-6).all()
    if n % 2:
        assert int(q.packed[-1]) & 15 == nf4.ZERO_CODE
    expected = (NF4_CODE.double()[unpack(q)] * absmax.repeat_interleave(64)[:n]).view(shape)
    torch.testing.assert_close(dequantize_nf4(q, torch.float64), expected, rtol=1e-7, atol=0)

    dq = quantize_nf4(w)
    got = dq.absmax_fp32().double()
    step = (dq.absmax_code[1:] - dq.absmax_code[:-1]).double().max()
    bound = step / 2 * dq.absmax_scale.double().repeat_interleave(256)[: got.numel()] + 1e-6 * absmax.max()
    assert ((got - absmax).abs() <= bound).all()


def test_chunked_equals_unchunked(monkeypatch):
    w = weight((300, 257), torch.bfloat16, seed=5)
    whole = quantize_nf4(w)
    monkeypatch.setattr(nf4, "CHUNK", 64 * 256 * 2)  # several chunks, the last one ragged
    parts = quantize_nf4(w)
    for name, t in whole.tensors().items():
        assert torch.equal(t, parts.tensors()[name]), name
    assert torch.equal(dequantize_nf4(whole), dequantize_nf4(parts))


def test_zero_block_and_constant_weight():
    w = torch.zeros(4, 64)
    w[1:] = 0.5
    q = quantize_nf4(w, double_quant=False)
    assert torch.equal(dequantize_nf4(q), w)
    assert (unpack(q)[:64] == nf4.ZERO_CODE).all()
    # double quantization rounds the absmax 0.5 to 8 bits, but zeros stay exactly zero
    dq = dequantize_nf4(quantize_nf4(w))
    assert (dq[0] == 0).all() and ((dq[1:] - 0.5).abs() < 0.5 / 64).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        quantize_nf4(torch.zeros(4))
    with pytest.raises(TypeError, match="float64"):
        quantize_nf4(torch.zeros(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_nf4(torch.tensor([[1.0, float("inf")]]))
    q = quantize_nf4(torch.randn(8, 8))
    q.absmax_scale = q.absmax_scale[:0]
    with pytest.raises(ValueError, match="absmax_scale must be"):
        q.check()
