"""Forward+backward time of dllab's scratch layers against their torch.nn twins, ResNet-18 CIFAR shapes.

    python benchmarks/layers.py                       # batch 64, fp32 and bf16 autocast, CPU
    python benchmarks/layers.py --quick --dtype fp32  # batch 16, fewer repeats
    python benchmarks/layers.py --device cuda --memory-format channels_last

Each row is one layer of a ResNet-18 with the CIFAR stem (He et al. 2016), batch 64 by default:
the 3x3 convolutions at 64x32x32, 128x16x16, 256x8x8 and 512x4x4, the stride-2 3x3 and 1x1
shortcut convolutions that enter each stage, the stem convolution, batch norm (training mode) at
each width, and torchvision's 3x3 stride-2 max-pool (ImageNet stem) applied at 64x32x32. Every
row computes the gradients of the input and the parameters, except the stem, whose input is the
images: as in training, only its weight gradient is computed (by both implementations).

Timing: one step is ``y = layer(x); y.backward(g)`` on the same input, weights and upstream
gradient for both implementations. Scratch and torch steps alternate (which goes first alternates
too) so that the load of a shared machine hits both alike; each figure is the median of
``--repeats`` steps after one warm-up step each. ``ratio`` = scratch / torch (below 1: scratch is
faster) of the medians; ``min`` is the same ratio of the fastest steps, the least disturbed by
other processes. ``overall`` weights each row by how often that layer occurs in one ResNet-18 forward
(column ``n``), i.e. the ratio of the total time these layers take in a ResNet-18 step;
``overall (rows)`` is the plain sum over the rows.

Memory: on CUDA, the peak of ``torch.cuda.max_memory_allocated`` during one step above what was
allocated before it. On CPU, the growth of the process's peak resident memory (Linux VmHWM,
reset through /proc/self/clear_refs) during one step, with glibc told to return every block of
64 KiB or more to the system on free (mallopt M_MMAP_THRESHOLD), so that the figure follows
the tensors alive; it includes the step's output, gradients and temporary buffers. That glibc
setting makes every large allocation fault its pages in afresh, which would slow the timed steps
(both implementations, by up to 2x for batch norm), so the CPU memory figures come from a
separate process (``_procmem.in_child``) and the timings from this one, with glibc's defaults.
The scratch layers' CPU workspace is emptied before the measured step, so the buffers it allocates
are counted, and ``ws`` is what the workspace holds after it (kept for the next call, see
``dllab/layers/_workspace.py``). ``saved`` is the memory autograd keeps between forward and
backward (distinct storages reached by saved-tensor hooks), measured on any device.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

import _procmem  # benchmarks/_procmem.py, next to this script
from dllab.layers import BatchNorm2d, Conv2d, MaxPool2d
from dllab.layers.functional import clear_workspace, set_workspace_limit, workspace_bytes, workspace_limit


@dataclass
class Case:
    """One benchmark row: a layer kind, its constructor arguments and its input (C, H, W)."""

    name: str
    kind: str  # "conv", "bn" or "pool"
    args: tuple
    kwargs: dict
    chw: tuple[int, int, int]
    count: int  # occurrences in one ResNet-18 (CIFAR stem) forward; 0: not in it
    input_grad: bool = True  # False for the stem: in training, the images need no gradient


def resnet18_cases() -> list[Case]:
    """The layers of a ResNet-18 with the CIFAR stem, one row per distinct shape."""
    def conv(cin, cout, k, s, hw, n, name, input_grad=True):
        return Case(name, "conv", (cin, cout, k), dict(stride=s, padding=k // 2, bias=False), (cin, hw, hw), n,
                    input_grad)

    return [
        conv(3, 64, 3, 1, 32, 1, "stem conv3x3 3->64 @32", input_grad=False),
        conv(64, 64, 3, 1, 32, 4, "conv3x3 64 @32"),
        conv(64, 128, 3, 2, 32, 1, "conv3x3 64->128 s2 @32"),
        conv(64, 128, 1, 2, 32, 1, "conv1x1 64->128 s2 @32"),
        conv(128, 128, 3, 1, 16, 3, "conv3x3 128 @16"),
        conv(128, 256, 3, 2, 16, 1, "conv3x3 128->256 s2 @16"),
        conv(128, 256, 1, 2, 16, 1, "conv1x1 128->256 s2 @16"),
        conv(256, 256, 3, 1, 8, 3, "conv3x3 256 @8"),
        conv(256, 512, 3, 2, 8, 1, "conv3x3 256->512 s2 @8"),
        conv(256, 512, 1, 2, 8, 1, "conv1x1 256->512 s2 @8"),
        conv(512, 512, 3, 1, 4, 3, "conv3x3 512 @4"),
        Case("bn 64 @32", "bn", (64,), {}, (64, 32, 32), 5),
        Case("bn 128 @16", "bn", (128,), {}, (128, 16, 16), 5),
        Case("bn 256 @8", "bn", (256,), {}, (256, 8, 8), 5),
        Case("bn 512 @4", "bn", (512,), {}, (512, 4, 4), 5),
        Case("maxpool 3x3 s2 p1 @64x32", "pool", (3, 2, 1), {}, (64, 32, 32), 0),
    ]


def build(case: Case, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(scratch layer, torch layer) with the same parameters, in training mode."""
    scratch_cls, torch_cls = {"conv": (Conv2d, nn.Conv2d), "bn": (BatchNorm2d, nn.BatchNorm2d),
                              "pool": (MaxPool2d, nn.MaxPool2d)}[case.kind]
    ours = scratch_cls(*case.args, **case.kwargs).to(device)
    ref = torch_cls(*case.args, **case.kwargs).to(device)
    ref.load_state_dict(ours.state_dict())
    return ours.train(), ref.train()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor | None, autocast: bool, device: torch.device):
    """One forward+backward; returns the upstream gradient used (made on the first call)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    if g is None:
        g = torch.randn_like(y)
    y.backward(g)
    return g


def prepare(case: Case, device: torch.device, batch: int, memory_format, autocast: bool):
    """(scratch layer, torch layer, input, upstream gradient) for a row, both layers warmed up."""
    torch.manual_seed(0)
    ours, ref = build(case, device)
    x = torch.randn(batch, *case.chw, device=device).contiguous(memory_format=memory_format)
    x.requires_grad_(case.input_grad)
    g = step(ours, x, None, autocast, device)  # warm-up (and the upstream gradient)
    step(ref, x, g, autocast, device)
    return ours, ref, x, g


def time_step(layer, x, g, autocast, device) -> float:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    sync(device)
    start = time.perf_counter()
    step(layer, x, g, autocast, device)
    sync(device)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------
# memory

def peak_step_memory(layer, x, g, autocast, device) -> float:
    """Peak memory (MiB) one step adds over what is allocated before it (on CPU: after ``_procmem.setup()``)."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(layer, x, g, autocast, device)
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return _procmem.step_peak_mib(lambda: step(layer, x, g, autocast, device))


def memory_rows(device_name: str, dtype: str, batch: int, channels_last: bool, names: list[str],
                threads: int, workspace_limit: int | None) -> dict[str, tuple[float, float, float]] | None:
    """{row name: (scratch peak MiB, workspace MiB after it, torch peak MiB)} for the named rows.

    On CPU this runs in a child process (see ``main``), since it needs ``_procmem.setup()``; it
    returns None where that is unavailable (not Linux).
    """
    device = torch.device(device_name)
    torch.set_num_threads(threads)
    set_workspace_limit(workspace_limit)
    if device.type == "cpu" and not _procmem.setup():
        return None
    autocast = dtype == "bf16"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = {}
    for case in (c for c in resnet18_cases() if c.name in names):
        ours, ref, x, g = prepare(case, device, batch, memory_format, autocast)
        clear_workspace()  # the step below allocates the workspace it needs: counted in the peak
        m_s = peak_step_memory(ours, x, g, autocast, device)
        ws = workspace_bytes() / 2**20
        out[case.name] = (m_s, ws, peak_step_memory(ref, x, g, autocast, device))
    return out


def saved_bytes(layer, x, autocast, device) -> float:
    """MiB of distinct storages autograd saves for backward in one forward."""
    seen = {}

    def pack(t):
        try:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    params.add(x.untyped_storage().data_ptr())  # the input and weights exist anyway
    del y
    return sum(v for k, v in seen.items() if k not in params) / 2**20


# ------------------------------------------------------------------------------------------------

def run(device: torch.device, dtype: str, batch: int, repeats: int, memory_format, cases: list[Case],
        out=sys.stdout) -> dict:
    autocast = dtype == "bf16"
    args = (str(device), dtype, batch, memory_format == torch.channels_last, [c.name for c in cases],
            torch.get_num_threads(), workspace_limit())
    # CPU: in a child process, so that this one times with glibc's default allocator (_procmem)
    memory = _procmem.in_child(memory_rows, *args) if device.type == "cpu" else memory_rows(*args)
    cap = workspace_limit()
    print(f"\n== {dtype}{' autocast' if autocast else ''}, batch {batch}, {memory_format}, {device}, "
          f"{repeats} repeats, torch {torch.__version__}, {torch.get_num_threads()} threads"
          f"{'' if cap is None else f', workspace limit {cap / 2**20:g} MiB'} ==", file=out)
    head = (f"{'layer':<28}{'n':>3}{'scratch ms':>12}{'torch ms':>10}{'ratio':>7}{'min':>6}"
            f"{'peak MiB s/t':>15}{'saved MiB s/t':>15}{'ws MiB':>8}")
    print(head, file=out)
    rows = []
    for case in cases:
        ours, ref, x, g = prepare(case, device, batch, memory_format, autocast)
        t_s, t_t = [], []
        for r in range(repeats):
            pair = [(ours, t_s), (ref, t_t)]
            for layer, acc in (pair if r % 2 == 0 else pair[::-1]):
                acc.append(time_step(layer, x, g, autocast, device))
        sv_s, sv_t = saved_bytes(ours, x, autocast, device), saved_bytes(ref, x, autocast, device)
        ms, mt = statistics.median(t_s) * 1e3, statistics.median(t_t) * 1e3
        rows.append((case, ms, mt))
        m_s, ws, m_t = memory[case.name] if memory else (None, None, None)
        peak = "n/a" if m_s is None else f"{m_s:.0f}/{m_t:.0f}"
        ws = "n/a" if ws is None else f"{ws:.0f}"
        best = min(t_s) / min(t_t)
        print(f"{case.name:<28}{case.count:>3}{ms:>12.2f}{mt:>10.2f}{ms / mt:>7.2f}{best:>6.2f}{peak:>15}"
              f"{f'{sv_s:.0f}/{sv_t:.0f}':>15}{ws:>8}", file=out, flush=True)
    weighted_s = sum(c.count * s for c, s, _ in rows)
    weighted_t = sum(c.count * t for c, _, t in rows)
    overall = weighted_s / weighted_t if weighted_t else float("nan")
    plain = sum(s for _, s, _ in rows) / sum(t for _, _, t in rows)
    worst = max(rows, key=lambda r: r[1] / r[2])
    weighted = f"{overall:.2f}" if weighted_t else "n/a (no selected row occurs in a CIFAR-stem ResNet-18)"
    print(f"overall (ResNet-18 weighted): {weighted}   overall (rows): {plain:.2f}   "
          f"worst: {worst[0].name} {worst[1] / worst[2]:.2f}", file=out)
    return {"overall": overall, "rows": plain, "worst": worst[1] / worst[2]}


def resnet_step_ratio(device: torch.device, dtype: str, batch: int, repeats: int, memory_format, out=sys.stdout):
    """Time one ResNet-18 (CIFAR stem) forward+backward with layers="scratch" against layers="torch"."""
    from dllab.models.resnet import resnet18  # the model that uses these layers

    autocast = dtype == "bf16"
    torch.manual_seed(0)
    ours, ref = resnet18(layers="scratch").to(device), resnet18(layers="torch").to(device)
    ref.load_state_dict(ours.state_dict())
    ours, ref = ours.to(memory_format=memory_format).train(), ref.to(memory_format=memory_format).train()
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,), device=device)

    def step(model):
        model.zero_grad(set_to_none=True)
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        sync(device)
        return time.perf_counter() - start, loss.item()

    (_, loss_s), (_, loss_t) = step(ours), step(ref)
    t_s, t_t = [], []
    for r in range(repeats):
        pair = [(ours, t_s), (ref, t_t)]
        for model, acc in (pair if r % 2 == 0 else pair[::-1]):
            acc.append(step(model)[0])
    ms, mt = statistics.median(t_s) * 1e3, statistics.median(t_t) * 1e3
    print(f"ResNet-18 train step (fwd+bwd, {dtype}{' autocast' if autocast else ''}, batch {batch}, {memory_format}): "
          f"scratch {ms:.0f} ms, torch {mt:.0f} ms, ratio {ms / mt:.2f} (min {min(t_s) / min(t_t):.2f}); "
          f"first-step losses {loss_s:.6f} / {loss_t:.6f}", file=out, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="both",
                        help="fp32, bf16 autocast, or both (default)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 64; --quick: 16)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per layer (default 7; --quick: 3)")
    parser.add_argument("--memory-format", choices=("contiguous", "channels_last"), default="contiguous",
                        help="layout of the inputs (default contiguous NCHW)")
    parser.add_argument("--only", default=None, help="run only rows whose name contains this text")
    parser.add_argument("--quick", action="store_true", help="batch 16 and 3 repeats")
    parser.add_argument("--workspace-limit-mb", type=float, default=None,
                        help="cap the scratch layers' CPU workspace (dllab.layers.functional.set_workspace_limit)")
    parser.add_argument("--resnet", action="store_true",
                        help="also time a whole ResNet-18 forward+backward, layers='scratch' vs 'torch'")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    batch = args.batch or (16 if args.quick else 64)
    repeats = args.repeats or (3 if args.quick else 7)
    if batch < 1 or repeats < 1:
        raise SystemExit(f"--batch and --repeats must be positive, got {batch} and {repeats}")
    memory_format = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    if args.workspace_limit_mb is not None:
        if args.workspace_limit_mb < 0:
            raise SystemExit(f"--workspace-limit-mb must be >= 0, got {args.workspace_limit_mb}")
        set_workspace_limit(int(args.workspace_limit_mb * 2**20))
    cases = [c for c in resnet18_cases() if args.only is None or args.only in c.name]
    print("command: python benchmarks/layers.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    dtypes = ("fp32", "bf16") if args.dtype == "both" else (args.dtype,)
    for dt in dtypes:
        if cases:
            run(device, dt, batch, repeats, memory_format, cases)
        if args.resnet:
            resnet_step_ratio(device, dt, batch, repeats, memory_format)


if __name__ == "__main__":
    main()
