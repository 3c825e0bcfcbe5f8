"""Where NF4 layers dequantize their weight: a fresh tensor per call (default) or one pooled buffer.

A forward or backward of an NF4 layer dequantizes its weight (blocks in place), runs its GEMM on it and is done
with it before the next layer runs; nothing an autograd graph keeps refers to it (the backward dequantizes again).
So at most one dequantized weight is alive at a time, in either policy:

- transient (default): each call takes a new tensor from PyTorch's caching allocator and drops it after its GEMM.
  Between layers, and while the loss or the embeddings run, that memory serves other tensors, as with
  bitsandbytes. Measured on an H200 it peaks lower than the pooled buffer by about the largest weight
  (docs/quantization.md).
- pooled (``use_pooled_buffer(True)``): one buffer per (device, dtype), grown to the largest weight seen and kept
  until ``release_buffers``: no allocator call per layer, at the price of holding that memory all the time. Work on
  a device is then assumed to run on one CUDA stream at a time, as in ordinary training (the next layer's kernel,
  queued on the same stream, runs after the previous GEMM finished reading).
"""

from __future__ import annotations

import torch

_BUFFERS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_POOLED = False


def _key(device: torch.device, dtype: torch.dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device, dtype


def use_pooled_buffer(on: bool) -> bool:
    """Switch between the pooled buffer (True) and a fresh tensor per call (False, the default); returns the
    previous setting. Switching the pool off releases it."""
    global _POOLED
    previous, _POOLED = _POOLED, bool(on)
    if not on:
        release_buffers()
    return previous


def dequant_buffer(device: torch.device, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous (N, K) tensor for one dequantization; its contents are undefined. Pooled: a view of the
    buffer for (device, dtype), valid until the next NF4 layer runs."""
    if not _POOLED:
        return torch.empty(shape, device=device, dtype=dtype)
    n = shape[0] * shape[1]
    key = _key(device, dtype)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < n:
        _BUFFERS.pop(key, None)
        del buf  # free the smaller one before allocating (the caching allocator can then reuse its memory)
        buf = _BUFFERS[key] = torch.empty(n, device=key[0], dtype=dtype)
    return buf[:n].view(shape)


def release_buffers() -> int:
    """Drop every pooled buffer (e.g. after training); returns the bytes released."""
    freed = sum(b.numel() * b.element_size() for b in _BUFFERS.values())
    _BUFFERS.clear()
    return freed


def buffer_bytes() -> int:
    """Bytes currently held by pooled buffers, all devices and dtypes."""
    return sum(b.numel() * b.element_size() for b in _BUFFERS.values())
