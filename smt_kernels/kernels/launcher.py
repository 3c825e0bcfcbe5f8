"""Launching Triton kernels: on the device of their tensors, with little host time per call.

``DirectLauncher`` keeps the compiled kernel a first JIT call returned and launches it through its launcher,
skipping Triton's per-call re-specialisation. It uses Triton internals (``CompiledKernel.run`` and its argument
order), so it is on only for the Triton versions in ``TESTED_TRITON_VERSIONS``; every other version, the
interpreter, an attached profiler (launch hooks) and ``SMT_KERNELS_DIRECT_LAUNCH=0`` take the plain JIT call.
Either way the launch runs with the kernel's tensors' device as the current CUDA device.
"""

from __future__ import annotations

import logging
import os

import torch
import triton

logger = logging.getLogger(__name__)

# Triton releases (major.minor) whose compiled-kernel launcher this module was run against on a GPU
TESTED_TRITON_VERSIONS = ("3.6",)
DIRECT_LAUNCH_ENV = "SMT_KERNELS_DIRECT_LAUNCH"

_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_MISSING = object()


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET, read when this module is imported)."""
    return _INTERPRETING


def triton_release(version: str | None = None) -> str:
    """``"3.6"`` for Triton ``3.6.0`` (or the given version string)."""
    parts = (version or triton.__version__).split(".")
    return ".".join(parts[:2])


def direct_launch_supported(version: str | None = None) -> bool:
    """Whether the direct launch path may be used with this Triton (tested release, not disabled, not interpreted)."""
    if os.environ.get(DIRECT_LAUNCH_ENV, "1") == "0" or _INTERPRETING:
        return False
    return triton_release(version) in TESTED_TRITON_VERSIONS


def _arg_key(arg) -> tuple:
    # at least as fine as Triton's own specialisation: dtype and 16-byte alignment of tensors; for integers
    # ==1, divisibility by 16 and 32/64-bit width
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if isinstance(arg, int) and not isinstance(arg, bool):
        return (arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31)
    return (type(arg), arg)


class _OnDevice:
    """Make CUDA device ``index`` current for a block, only when it is not already (the common case costs a lookup)."""

    __slots__ = ("index", "previous")

    def __init__(self, index: int):
        self.index = index
        self.previous = -1

    def __enter__(self):
        current = torch.cuda.current_device()
        if current != self.index:
            self.previous = current
            torch.cuda.set_device(self.index)

    def __exit__(self, *exc):
        if self.previous >= 0:
            torch.cuda.set_device(self.previous)


class DirectLauncher:
    """``launch(grid, *args, **meta)`` == ``kernel[grid](*args, **meta)`` on the device of ``args[0]``.

    The compiled kernel a JIT call returned is kept under a key at least as fine as Triton's (``_arg_key``, the
    constexpr/launch options, the device) and launched through its launcher directly. A new key goes through the
    JIT once; so does every launch while a launch hook (a profiler) is installed. Versions of Triton outside
    ``TESTED_TRITON_VERSIONS``, or a launcher that takes other arguments, fall back to the JIT call for good.
    """

    def __init__(self, kernel, enabled: bool | None = None):
        self.kernel = kernel
        self.compiled: dict[tuple, tuple] = {}
        self.enabled = direct_launch_supported() if enabled is None else enabled
        self.checked = False  # one direct launch went through

    def __call__(self, grid: tuple[int, ...], *args, **meta) -> None:
        first = args[0]
        if _INTERPRETING or first.device.type != "cuda":
            self.kernel[grid](*args, **meta)
            return
        device = first.device.index
        if device is None:
            device = torch.cuda.current_device()
        if not self.enabled:
            with _OnDevice(device):
                self.kernel[grid](*args, **meta)
            return
        key = (device, tuple(meta.items()), *map(_arg_key, args))
        hit = self.compiled.get(key)
        enter, leave = _launch_hooks()
        if hit is None or _hooks_active(enter, leave):
            with _OnDevice(device):
                compiled = self.kernel[grid](*args, **meta)
            if hit is None:
                self._remember(key, compiled, args, meta)
            return
        run, function, packed_metadata, constexprs = hit
        # the stream of the tensors' device; the launcher takes the function handle loaded on that device
        stream = _current_stream(device)
        gx, gy, gz = grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1
        if self.checked:
            with _OnDevice(device):
                run(gx, gy, gz, stream, function, packed_metadata, None, enter, leave, *args, *constexprs)
            return
        try:
            with _OnDevice(device):
                run(gx, gy, gz, stream, function, packed_metadata, None, enter, leave, *args, *constexprs)
        except TypeError:
            logger.warning("Triton %s: direct kernel launch failed; using the JIT launch", triton.__version__)
            self.enabled = False
            with _OnDevice(device):
                self.kernel[grid](*args, **meta)
            return
        self.checked = True

    def _remember(self, key: tuple, compiled, args: tuple, meta: dict) -> None:
        # the launcher takes every parameter in signature order, constexprs included
        names = getattr(self.kernel, "arg_names", ())
        constexprs = tuple(meta.get(names[i], _MISSING) for i in getattr(self.kernel, "constexprs", ()))
        parts = [getattr(compiled, a, None) for a in ("run", "function", "packed_metadata")]
        if _MISSING in constexprs or len(args) + len(constexprs) != len(names) or None in parts[:2]:
            self.enabled = False  # a default constexpr, or a Triton this was not written for
            return
        self.compiled[key] = (*parts, constexprs)


_knobs = getattr(triton, "knobs", None)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _launch_hooks() -> tuple:
    runtime = getattr(_knobs, "runtime", None)
    return getattr(runtime, "launch_enter_hook", None), getattr(runtime, "launch_exit_hook", None)


def _hooks_active(*hooks) -> bool:
    # Triton's hooks are None or a chain of callbacks (empty unless a profiler is attached)
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


def _current_stream(device: int) -> int:
    if _raw_stream is not None:
        return _raw_stream(device)
    return torch.cuda.current_stream(device).cuda_stream
