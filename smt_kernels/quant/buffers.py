"""The reusable buffers NF4 layers dequantize into: one per (device, dtype), grown to the largest weight seen.

A forward or backward of an NF4 layer dequantizes its weight (blocks in place) into this buffer, runs its GEMM on
it and is done with it before the next layer runs, so all layers of a model can share one buffer: the memory of
the largest dequantized weight, never one copy per layer. Nothing an autograd graph keeps refers to it (the
backward dequantizes again). Work on a device is assumed to run on one CUDA stream at a time, as in ordinary
training (the next layer's kernel, queued on the same stream, runs after the previous GEMM finished reading).
"""

from __future__ import annotations

import torch

_BUFFERS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _key(device: torch.device, dtype: torch.dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device, dtype


def shared_buffer(device: torch.device, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous (N, K) view of the shared buffer for (device, dtype); its contents are undefined."""
    n = shape[0] * shape[1]
    key = _key(device, dtype)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < n:
        _BUFFERS.pop(key, None)
        del buf  # free the smaller one before allocating (the caching allocator can then reuse its memory)
        buf = _BUFFERS[key] = torch.empty(n, device=key[0], dtype=dtype)
    return buf[:n].view(shape)


def release_buffers() -> int:
    """Drop every shared buffer (e.g. after training); returns the bytes released."""
    freed = sum(b.numel() * b.element_size() for b in _BUFFERS.values())
    _BUFFERS.clear()
    return freed


def buffer_bytes() -> int:
    """Bytes currently held by shared buffers, all devices and dtypes."""
    return sum(b.numel() * b.element_size() for b in _BUFFERS.values())
