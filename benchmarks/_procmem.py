"""Peak CPU memory of one step, read from Linux's /proc (shared by the benchmarks here).

glibc's malloc keeps freed blocks for reuse, so a process's resident memory would follow the
largest allocation ever made rather than what is live. :func:`setup` makes glibc return blocks of
64 KiB or more to the system on free (``mallopt(M_MMAP_THRESHOLD)``), and :func:`step_peak_mib`
resets the process's peak resident size (``VmHWM``, through ``/proc/self/clear_refs``) before a
step, so ``VmHWM - VmRSS before`` is what that step added at its peak.

That setting cannot be undone, and it slows a process down: every large tensor then comes from a
fresh mapping whose pages fault in one by one when first written (about 1.5 ms per 4 MiB here,
several times the arithmetic of a batch-norm step on it). So the timings must not run under it:
:func:`in_child` runs the memory measurements in a separate (spawned) process, which calls
:func:`setup` itself, while the benchmark times in its own process with glibc's defaults.
"""

from __future__ import annotations

import ctypes
import multiprocessing
from typing import Callable

_M_MMAP_THRESHOLD = -3


def setup() -> bool:
    """Prepare the process for :func:`step_peak_mib`; False where that cannot work (not Linux)."""
    try:
        ok = ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 16) == 1
        _reset_peak()
        return ok
    except OSError:
        return False


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # 5: reset the peak resident set size (VmHWM) to the current one


def proc_kb(field: str) -> int:
    """A ``kB`` field of /proc/self/status, e.g. ``proc_kb("VmRSS:")``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def step_peak_mib(step: Callable[[], object]) -> float:
    """MiB that ``step()`` adds at its peak over the memory resident before it."""
    _reset_peak()
    base = proc_kb("VmRSS:")
    step()
    return (proc_kb("VmHWM:") - base) / 1024


def in_child(fn: Callable, *args):
    """``fn(*args)`` run in a fresh spawned Python process; its return value (picklable) comes back.

    ``fn`` must be a module-level function of an importable module (the benchmark script itself
    is fine: spawn re-imports it without running its ``__main__`` block).
    """
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)
