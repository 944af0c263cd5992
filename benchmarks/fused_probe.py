"""Would fusing the scratch batch norm and max-pool close their channels-last gap? A probe.

    python benchmarks/fused_probe.py            # ~1 min on 2 CPU cores, compilation included

In channels-last the scratch ``BatchNorm2d`` and ``MaxPool2d`` are 1.7-2.9x torch's kernels
(docs/layers.md): each is a sequence of separate tensor operations, so it passes over the tensor
several times where torch's kernel passes once. This script writes the same arithmetic as plain
functions (batch norm: one-pass statistics, affine, and the closed-form backward; max-pool: the
running maximum over the 3x3/2 taps with the chosen tap's offset) and times them compiled by
``torch.compile`` (TorchInductor fuses them into a few loops) against torch's own layers, on
the channels-last ResNet shapes. It only measures; ``dllab.layers`` does not compile anything.
The first call of each compiled function includes its compilation (printed separately).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def bn_forward(x, w, b, eps: float):
    mean = x.mean((0, 2, 3))
    var = (x * x).mean((0, 2, 3)) - mean * mean
    invstd = torch.rsqrt(var + eps)
    scale = invstd * w
    y = x * scale.view(1, -1, 1, 1) + (b - mean * scale).view(1, -1, 1, 1)
    return y, mean, invstd


def bn_backward(g, x, w, mean, invstd):
    n = x.numel() // x.shape[1]
    sum_g = g.sum((0, 2, 3))
    sum_g_xhat = ((g * x).sum((0, 2, 3)) - mean * sum_g) * invstd
    a = invstd * w
    b = -a * invstd * sum_g_xhat / n
    c = -a * sum_g / n - b * mean
    return g * a.view(1, -1, 1, 1) + x * b.view(1, -1, 1, 1) + c.view(1, -1, 1, 1), sum_g_xhat, sum_g


def pool_forward(x):
    """3x3, stride 2, padding 1 max-pool: values and the chosen cell's offset in its window."""
    w = x.shape[3]
    ho, wo = (x.shape[2] - 1) // 2 + 1, (w - 1) // 2 + 1
    xp = F.pad(x, (1, 1, 1, 1), value=float("-inf"))

    def tap(i, j):
        return xp[:, :, i:i + 2 * (ho - 1) + 1:2, j:j + 2 * (wo - 1) + 1:2]

    values, offset = tap(0, 0), torch.zeros_like(tap(0, 0))
    for t in range(1, 9):
        i, j = divmod(t, 3)
        v = tap(i, j)
        greater = (v > values).to(x.dtype)
        values = torch.maximum(values, v)
        offset = torch.lerp(offset, torch.full_like(offset, float(i * w + j)), greater)
    return values, offset


def median_ms(fn, repeats: int = 21) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def first_call_s(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    torch.manual_seed(0)
    fwd, bwd, pool = (torch.compile(f, dynamic=False) for f in (bn_forward, bn_backward, pool_forward))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, channels-last, batch 64")
    print(f"{'layer':<26}{'compiled ms':>12}{'torch ms':>10}{'ratio':>7}{'compile s':>11}")
    for c, hw in ((64, 32), (128, 16), (256, 8), (512, 4)):
        x = torch.randn(64, c, hw, hw).contiguous(memory_format=torch.channels_last)
        g = torch.randn_like(x)
        w, b = torch.rand(c) + 0.5, torch.randn(c)

        def ours():
            _, mean, invstd = fwd(x, w, b, 1e-5)
            return bwd(g, x, w, mean, invstd)

        xr, wr, br = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()

        def ref():
            xr.grad = wr.grad = br.grad = None
            F.batch_norm(xr, None, None, wr, br, True).backward(g)

        build = first_call_s(ours)
        ms, mt = median_ms(ours), median_ms(ref)
        print(f"{f'bn {c} @{hw} fwd+bwd':<26}{ms:>12.2f}{mt:>10.2f}{ms / mt:>7.2f}{build:>11.1f}", flush=True)
    x = torch.randn(64, 64, 32, 32).contiguous(memory_format=torch.channels_last)
    build = first_call_s(lambda: pool(x))
    ms, mt = median_ms(lambda: pool(x)), median_ms(lambda: F.max_pool2d(x, 3, 2, 1, return_indices=True))
    print(f"{'maxpool 3x3 s2 @64x32 fwd':<26}{ms:>12.2f}{mt:>10.2f}{ms / mt:>7.2f}{build:>11.1f}")


if __name__ == "__main__":
    main()
