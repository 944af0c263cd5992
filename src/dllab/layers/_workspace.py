"""Reusable scratch buffers for the temporaries of the CPU layers (im2col matrices, padded copies).

A fresh CPU tensor of a hundred megabytes costs more than the copy that fills it: the operating
system hands its pages over one by one (a page fault each) the first time they are written, and
glibc returns them on free, so an im2col buffer allocated per call is paid for again on every
call. Here each named *slot* keeps one byte buffer per thread and hands out views of it, growing
it when a larger one is asked for. A view is valid until the next request for the same slot, so
slots hold only temporaries that die inside one forward or backward call: never an output and
never a tensor saved for backward.

CUDA (and any other device) needs none of this: its caching allocator already reuses memory, so
there ``buffer`` is just ``torch.empty``. ``workspace_bytes()`` reports what the slots hold and
``clear_workspace()`` frees it.

The workspace trades memory for speed: in a ResNet-18 step at batch 64 it keeps about 170 MiB (the
largest ``col`` matrix) between calls. ``set_workspace_limit(max_bytes)`` caps what each thread
keeps: a request that would take the workspace past the cap gets a fresh tensor, freed after use
(slower, as above, but the memory goes back); ``0`` turns the reuse off, ``None`` (the default)
removes the cap. The environment variable ``DLLAB_WORKSPACE_LIMIT_MB`` sets the cap at import.
"""

from __future__ import annotations

import functools
import math
import os
import threading

import torch


MAX_PADDED = 16  # zero-bordered buffers kept per thread (least recently used dropped first)


def uses_cpu_paths(device: torch.device) -> bool:
    """Whether the layers take their CPU-specific paths for tensors on ``device``.

    Some choices are made for the CPU only: this workspace, the one-pass variance and the
    sums-of-squares formulation in batch norm, bf16 GEMMs emulated in float32, max-pool's
    cache-sized chunks of images. Every such choice
    asks this function, so that tests can make it answer False and run the paths that CUDA takes
    on CPU tensors (tests/test_layers.py, ``device_paths``), on a machine with no GPU.
    """
    return device.type == "cpu"


_SCALARS: dict[tuple, torch.Tensor] = {}


def scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-d tensor holding ``value``, cached (never written to).

    An operation with a Python number first wraps it in a tensor and converts that: multiplying
    512 values in place took 17 us with ``0.5`` and 5.5 us with a 0-d tensor here. Layers of a
    few hundred thousand values do several such operations per call and feel it.
    """
    key = (value, dtype, device, torch.is_inference_mode_enabled())  # see ``buffer`` on inference mode
    t = _SCALARS.get(key)
    if t is None:
        if len(_SCALARS) >= 256:
            _SCALARS.clear()
        t = _SCALARS[key] = torch.tensor(value, dtype=dtype, device=device)
    return t


def _limit_from_env() -> int | None:
    text = os.environ.get("DLLAB_WORKSPACE_LIMIT_MB", "").strip()
    if not text:
        return None
    try:
        mb = float(text)
    except ValueError:
        raise ValueError(f"DLLAB_WORKSPACE_LIMIT_MB must be a number of MiB, got {text!r}") from None
    if mb < 0:
        raise ValueError(f"DLLAB_WORKSPACE_LIMIT_MB must be >= 0, got {text!r}")
    return int(mb * 2**20)


_LIMIT: list[int | None] = [_limit_from_env()]  # bytes each thread's workspace may keep; None: no cap


def set_workspace_limit(max_bytes: int | None) -> None:
    """Cap the bytes each thread's CPU workspace keeps between calls (None: no cap; 0: keep nothing).

    Requests that do not fit get fresh tensors instead; what is already held above the new cap is
    freed now.
    """
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
        raise ValueError(f"max_bytes must be a non-negative int or None, got {max_bytes!r}")
    _LIMIT[0] = max_bytes
    if max_bytes is not None and workspace_bytes() > max_bytes:
        clear_workspace()


def workspace_limit() -> int | None:
    """The cap set by :func:`set_workspace_limit` (or ``DLLAB_WORKSPACE_LIMIT_MB``), in bytes."""
    return _LIMIT[0]


def _fits(nbytes: int, replacing: int = 0) -> bool:
    """Whether the workspace may keep ``nbytes`` more, after freeing ``replacing`` bytes it holds."""
    limit = _LIMIT[0]
    return limit is None or workspace_bytes() - replacing + nbytes <= limit


class _Slots(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}  # slot -> uint8 buffer (a multiple of 64 bytes)
        self.typed: dict[tuple, torch.Tensor] = {}  # (slot, dtype, inference mode) -> buffer as dtype
        self.padded: dict[tuple, torch.Tensor] = {}  # insertion order = recency


_SLOTS = _Slots()


@functools.lru_cache(maxsize=1024)
def _contiguous_strides(shape: tuple) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def buffer(slot: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` and ``dtype``; on the CPU a view of slot ``slot``.

    The view is one ``as_strided`` of a cached typed view of the slot: small layers call this
    several times a step, and each Python-level tensor operation costs microseconds.
    """
    if not uses_cpu_paths(device):
        return torch.empty(shape, dtype=dtype, device=device)
    shape = tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    buf = _SLOTS.buffers.get(slot)
    if buf is None or buf.numel() < nbytes:
        size = max(-(-nbytes // 64) * 64, 64)
        if not _fits(size, 0 if buf is None else buf.numel()):
            return torch.empty(shape, dtype=dtype)  # over the cap: a temporary freed after use
        buf = torch.empty(size, dtype=torch.uint8)
        _SLOTS.buffers[slot] = buf
        for key in [k for k in _SLOTS.typed if k[0] == slot]:
            del _SLOTS.typed[key]
    # A view made under torch.inference_mode() is an inference tensor, which may not be written
    # outside it (a training step after an evaluation), so each mode has its own typed view.
    key = (slot, dtype, torch.is_inference_mode_enabled())
    typed = _SLOTS.typed.get(key)
    if typed is None:
        typed = _SLOTS.typed[key] = buf.view(dtype)
    return typed.as_strided(shape, _contiguous_strides(shape))


def buffer_like(slot: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A workspace tensor of x's shape and ``dtype``, channels-last if x is (so elementwise ops stream)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = x.shape
        return buffer(slot, (n, h, w, c), dtype, x.device).permute(0, 3, 1, 2)
    return buffer(slot, tuple(x.shape), dtype, x.device)


def bordered(slot: str, shape, border: tuple, dtype: torch.dtype, device: torch.device,
             fill: float = 0.0) -> torch.Tensor:
    """A padded buffer of ``shape`` whose ``border`` (e.g. (top, bottom, left, right)) holds ``fill``.

    Callers write only the interior, so the ``fill`` written when the buffer was made stays in the
    border and padding costs no fill on later calls. One buffer per (slot, shape, border, dtype,
    fill), at most ``MAX_PADDED`` per thread. Elsewhere than on the CPU: a fresh filled tensor.
    """
    if not uses_cpu_paths(device):
        return torch.full(shape, fill, dtype=dtype, device=device)
    key = (slot, tuple(shape), tuple(border), dtype, fill)
    buf = _SLOTS.padded.pop(key, None)
    if buf is None:
        # made as a normal tensor even under torch.inference_mode(): an inference tensor may not be
        # written outside it, and the next training step reuses this buffer
        with torch.inference_mode(False):
            buf = torch.full(shape, fill, dtype=dtype)
        if not _fits(buf.numel() * buf.element_size()):
            return buf  # over the cap: not kept
        if len(_SLOTS.padded) >= MAX_PADDED:
            _SLOTS.padded.pop(next(iter(_SLOTS.padded)))
    _SLOTS.padded[key] = buf  # most recently used last
    return buf


def workspace_bytes() -> int:
    """Bytes held by this thread's CPU workspace (scratch slots and zero-bordered buffers)."""
    return (sum(b.numel() for b in _SLOTS.buffers.values())
            + sum(b.numel() * b.element_size() for b in _SLOTS.padded.values()))


def clear_workspace() -> None:
    """Free this thread's CPU workspace (it is rebuilt on the next call that needs it)."""
    _SLOTS.buffers.clear()
    _SLOTS.typed.clear()
    _SLOTS.padded.clear()
