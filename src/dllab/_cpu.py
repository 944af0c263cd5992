"""What this CPU multiplies natively, asked in one place.

``dllab.utils.cpu_supports_bf16`` (what ``--precision auto`` picks) and ``dllab.layers`` (which
dtype a GEMM runs in, and where ``TorchConv2d`` takes its GEMM weight gradient) must agree, and
both sit in the package's lowest layer, where neither may import the other: so both ask here.
"""

from __future__ import annotations

import torch


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux), or None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def bf16_flags() -> list[str]:
    """The CPU's bf16 matrix-instruction flags (``amx_bf16``, ``avx512_bf16``) that Linux reports."""
    return sorted({"amx_bf16", "avx512_bf16"} & (cpu_flags() or frozenset()))


def native_bf16() -> bool:
    """True where the CPU has bf16 matrix instructions (AMX-BF16 or AVX512-BF16).

    The kernel's flags where Linux gives them; else torch's own probes (torch 2.4 has none, which is
    why the flags come first); else the CPU capability torch reports.
    """
    flags = cpu_flags()
    if flags is not None:
        return bool({"amx_bf16", "avx512_bf16"} & flags)
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(probes):
        return any(bool(p()) for p in probes)
    cpu = getattr(torch.backends, "cpu", None)
    capability = cpu.get_cpu_capability() if cpu is not None else ""
    return "AMX" in capability or "BF16" in capability


def native_fp16() -> bool:
    """True where the CPU has fp16 matrix instructions (AMX-FP16)."""
    flags = cpu_flags()
    if flags is not None:
        return "amx_fp16" in flags
    probe = getattr(torch.cpu, "_is_amx_fp16_supported", None)
    return bool(probe()) if probe is not None else False


def cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), or ``platform.processor()``, or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or None
