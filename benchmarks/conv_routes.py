"""Which convolution route is fastest on this CPU? The evidence behind ``_conv.py``'s thresholds.

    python benchmarks/conv_routes.py routes          # the scratch Conv2d's routes, per ResNet-18 row (~2 min)
    python benchmarks/conv_routes.py weight-grad     # oneDNN's weight gradient against one GEMM (~1 min)
    python benchmarks/conv_routes.py torch-conv      # TorchConv2d's bf16 routes, forward+backward (~2 min)
    python benchmarks/conv_routes.py step            # the classifier's bf16 step with the tiny route on/off (~2 min)
    python benchmarks/conv_routes.py winograd        # the scratch 3x3 stride-1 rows by Winograd and by im2col (~1 min)

``routes``: the scratch ``Conv2d`` (NCHW fp32, forward+backward) with each route forced in turn,
as a ratio to ``torch.nn.Conv2d`` timed alongside: the planar im2col or the NHWC one
(``PLANAR_NCHW_MIN_PIXELS``, ``PLANAR_1X1_MIN_PIXELS``), and GEMMs straight into NCHW or one
transposing copy (``NCHW_GEMM_MIN_PIXELS``). ``chosen`` is the route the thresholds pick. With
``--memory-format channels_last`` it compares the per-image GEMMs against one tall GEMM
(``ROWS_GEMM_MIN_PIXELS``) instead.

``weight-grad``: the time of the weight gradient alone, torch's ``convolution_backward`` (oneDNN)
against ``_conv.conv_weight_grad`` (im2col + one GEMM), channels-last, at the ResNet-18 shapes of
28x28 inputs, in bf16 and fp32. ``TorchConv2d`` uses the GEMM for bf16 outputs of at most
``GEMM_WEIGHT_GRAD_MAX_PIXELS`` pixels on CPUs that multiply bf16 natively.

``torch-conv``: forward+backward of one ``TorchConv2d`` under bf16 autocast, channels-last (or
NCHW with ``--memory-format contiguous``), batch 128, at the same shapes, with each of
``_conv.gemm_route``'s answers forced in turn, as a ratio to ``nn.Conv2d`` (oneDNN's forward and
backward) timed alongside: "weight-grad" (the GEMM weight gradient only) and "all"
(``conv_forward``, ``conv_input_grad`` and the GEMM weight gradient). ``chosen`` is what the
thresholds (``GEMM_WEIGHT_GRAD_MAX_PIXELS``, ``GEMM_CONV_MAX_PIXELS``) pick.

``step``: the classifier's real bf16 training step (``train_throughput.py``'s ``dllab+bf16``
runner, ResNet-18 width 64 on MNIST-5k, batch 128, channels-last unless ``--memory-format
contiguous``) with ``TorchConv2d``'s rule as it is, and with its "all" answers demoted to
"weight-grad" (the rule before the tiny route), alternating in one process for ``--repeats``
rounds of 5 s each, so that the machine's load hits both alike.

``winograd``: the scratch ``Conv2d``'s 3x3 stride-1 rows of ResNet-18 on 32x32 and on 28x28
images (fp32, forward+backward, batch 32, NCHW unless ``--memory-format channels_last``), by
Winograd's F(2x2, 3x3) (``_winograd.py``: the forward pass and the input gradient) and by
im2col (``_winograd.WINOGRAD`` off), alternating with ``torch.nn.Conv2d``.

Timings are medians of interleaved repeats; on a shared machine read the ratios, not the ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dllab.layers import Conv2d, _conv, _winograd

NEVER = 10**9
# (c_in, c_out, kernel, stride, H): ResNet-18's CIFAR-shape convolutions (benchmarks/layers.py's rows)
RESNET_32 = [(3, 64, 3, 1, 32), (64, 64, 3, 1, 32), (64, 128, 3, 2, 32), (64, 128, 1, 2, 32), (128, 128, 3, 1, 16),
             (128, 256, 3, 2, 16), (128, 256, 1, 2, 16), (256, 256, 3, 1, 8), (256, 512, 3, 2, 8),
             (256, 512, 1, 2, 8), (512, 512, 3, 1, 4)]
# the same network on 28x28 images (MNIST / Fashion-MNIST)
RESNET_28 = [(1, 64, 3, 1, 28), (64, 64, 3, 1, 28), (64, 128, 3, 2, 28), (64, 128, 1, 2, 28), (128, 128, 3, 1, 14),
             (128, 256, 3, 2, 14), (128, 256, 1, 2, 14), (256, 256, 3, 1, 7), (256, 512, 3, 2, 7),
             (256, 512, 1, 2, 7), (512, 512, 3, 1, 4)]
NCHW_ROUTES = {  # name: (PLANAR_NCHW_MIN_PIXELS, NCHW_GEMM_MIN_PIXELS, PLANAR_1X1_MIN_PIXELS)
    "planar, gemm": (0, 0, 0), "planar, copy": (0, NEVER, 0),
    "nhwc, gemm": (NEVER, 0, NEVER), "nhwc, copy": (NEVER, NEVER, NEVER),
}
CL_ROUTES = {"per-image gemms": 0, "one gemm": NEVER}


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def step_time(module, x, g) -> float:
    module.zero_grad(set_to_none=True)
    x.grad = None
    start = time.perf_counter()
    module(x).backward(g)
    return time.perf_counter() - start


def set_route(name: str, channels_last: bool) -> None:
    if channels_last:
        _conv.ROWS_GEMM_MIN_PIXELS = CL_ROUTES[name]
    else:
        _conv.PLANAR_NCHW_MIN_PIXELS, _conv.NCHW_GEMM_MIN_PIXELS, _conv.PLANAR_1X1_MIN_PIXELS = NCHW_ROUTES[name]


def routes(batch: int, repeats: int, channels_last: bool) -> None:
    saved = (_conv.PLANAR_NCHW_MIN_PIXELS, _conv.NCHW_GEMM_MIN_PIXELS, _conv.PLANAR_1X1_MIN_PIXELS,
             _conv.ROWS_GEMM_MIN_PIXELS)
    table = CL_ROUTES if channels_last else NCHW_ROUTES
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    print(f"== each route: scratch Conv2d time / torch.nn.Conv2d time (forward+backward, fp32), batch {batch}, {fmt}, "
          f"{repeats} repeats, torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads ==")
    print(f"{'row':<28}{'torch ms':>9}" + "".join(f"{name:>17}" for name in table) + "  chosen")
    for c_in, c_out, k, s, h in RESNET_32:
        torch.manual_seed(0)
        x = torch.randn(batch, c_in, h, h).contiguous(memory_format=fmt).requires_grad_(c_in > 3)
        ours = Conv2d(c_in, c_out, k, stride=s, padding=k // 2, bias=False)
        ref = torch.nn.Conv2d(c_in, c_out, k, stride=s, padding=k // 2, bias=False)
        ref.load_state_dict(ours.state_dict())
        g = torch.randn_like(ref(x))
        times = {name: [] for name in table}
        ref_times = []
        for name in table:  # warm-up, every route (workspace buffers of every size)
            set_route(name, channels_last)
            step_time(ours, x, g)
        step_time(ref, x, g)
        for _ in range(repeats):
            for name in table:
                set_route(name, channels_last)
                times[name].append(step_time(ours, x, g))
            ref_times.append(step_time(ref, x, g))
        (_conv.PLANAR_NCHW_MIN_PIXELS, _conv.NCHW_GEMM_MIN_PIXELS, _conv.PLANAR_1X1_MIN_PIXELS,
         _conv.ROWS_GEMM_MIN_PIXELS) = saved
        ratios = {name: median_ms(t) / median_ms(ref_times) for name, t in times.items()}
        chosen = chosen_route(x, k, s, h, channels_last)
        best = min(ratios.values())
        print(f"{f'conv{k}x{k} {c_in}->{c_out} s{s} @{h}':<28}{median_ms(ref_times):>9.1f}"
              + "".join(f"{r:>17.2f}" for r in ratios.values())
              + f"  {chosen} ({ratios[chosen] / best:.2f}x the best)", flush=True)


def chosen_route(x, k: int, s: int, h: int, channels_last: bool) -> str:
    """The route the thresholds pick for this row, named as in the table."""
    out_pixels = ((h + 2 * (k // 2) - k) // s + 1) ** 2
    if channels_last:
        return "per-image gemms" if out_pixels >= _conv.ROWS_GEMM_MIN_PIXELS else "one gemm"
    planar = _conv.uses_planar(x, (k, k), 1, out_pixels)
    gemm = out_pixels >= _conv.NCHW_GEMM_MIN_PIXELS
    return f"{'planar' if planar else 'nhwc'}, {'gemm' if gemm else 'copy'}"


def weight_grad(batch: int, repeats: int) -> None:
    print(f"== weight gradient alone, channels-last, batch {batch}: torch's convolution_backward and "
          f"_conv.conv_weight_grad (ratio = gemm / torch); torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16 GEMM: {_conv._cpu_has_native(torch.bfloat16)}, "
          f"{torch.get_num_threads()} threads ==")
    print(f"{'row':<28}{'out px':>7}" + "".join(f"{f'{d} torch ms':>14}{f'{d} gemm ms':>13}{f'{d} ratio':>11}"
                                             for d in ("bf16", "fp32")) + f"{'TorchConv2d (bf16)':>20}")
    for c_in, c_out, k, s, h in RESNET_28:
        cells = ""
        for dtype in (torch.bfloat16, torch.float32):
            torch.manual_seed(0)
            x = torch.randn(batch, c_in, h, h, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = (torch.randn(c_out, c_in, k, k) * 0.05).to(dtype).contiguous(memory_format=torch.channels_last)
            p = k // 2
            g = torch.randn_like(F.conv2d(x, w, None, s, p))
            rows = g.permute(0, 2, 3, 1)

            def theirs():
                torch.ops.aten.convolution_backward(g, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], 1,
                                                    [False, True, False])

            def ours():
                _conv.conv_weight_grad(x, g, rows, w.shape, (s, s), (p, p, p, p), (1, 1), 1, dtype, dtype)

            t_t, t_o = [], []
            theirs(), ours()
            for _ in range(repeats):
                for fn, acc in ((theirs, t_t), (ours, t_o)):
                    start = time.perf_counter()
                    fn()
                    acc.append(time.perf_counter() - start)
            cells += f"{median_ms(t_t):>14.2f}{median_ms(t_o):>13.2f}{median_ms(t_o) / median_ms(t_t):>11.2f}"
        out_pixels = g.shape[2] * g.shape[3]
        used = "gemm" if _conv.gemm_route(torch.bfloat16, x.device, 1, out_pixels) else "torch"
        print(f"{f'conv{k}x{k} {c_in}->{c_out} s{s} @{h}':<28}{out_pixels:>7}{cells}{used:>20}", flush=True)


def torch_conv(batch: int, repeats: int, channels_last: bool) -> None:
    from dllab.layers import TorchConv2d

    native = _conv._cpu_has_native(torch.bfloat16)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    print(f"== TorchConv2d forward+backward, bf16 autocast, {'channels-last' if channels_last else 'NCHW'}, "
          f"batch {batch}, each route forced "
          f"(ratio to nn.Conv2d); torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16 GEMM: {native}, "
          f"{torch.get_num_threads()} threads ==")
    routes = ("weight-grad", "all")
    print(f"{'row':<28}{'out px':>7}{'nn.Conv2d ms':>14}" + "".join(f"{r:>13}" for r in routes) + "  chosen")
    real = _conv.gemm_route
    for c_in, c_out, k, s, h in RESNET_28:
        torch.manual_seed(0)
        x = torch.randn(batch, c_in, h, h).contiguous(memory_format=fmt).requires_grad_()
        ref = torch.nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False).to(memory_format=fmt)
        ours = TorchConv2d(c_in, c_out, k, s, k // 2, bias=False).to(memory_format=fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            g = torch.randn_like(ref(x))
        out_pixels = g.shape[2] * g.shape[3]

        def step(module, route):
            _conv.gemm_route = lambda *a, **kw: route
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = module(x)
                y.backward(g)
            finally:
                _conv.gemm_route = real

        variants = [(ref, None)] + [(ours, r) for r in routes]
        times: list[list[float]] = [[] for _ in variants]
        for m, r in variants:
            step(m, r)
        for _ in range(repeats):
            for (m, r), acc in zip(variants, times):
                start = time.perf_counter()
                step(m, r)
                acc.append(time.perf_counter() - start)
        base = median_ms(times[0])
        chosen = real(torch.bfloat16, x.device, 1, out_pixels) or "torch"
        print(f"{f'conv{k}x{k} {c_in}->{c_out} s{s} @{h}':<28}{out_pixels:>7}{base:>14.2f}"
              + "".join(f"{median_ms(t) / base:>13.2f}" for t in times[1:]) + f"  {chosen}", flush=True)


def step(batch: int, repeats: int, channels_last: bool) -> None:
    import statistics

    from train_throughput import Dllab  # benchmarks/, next to this script

    from dllab.data import load

    real = _conv.gemm_route

    def before(*args):
        route = real(*args)
        return "weight-grad" if route == "all" else route

    runner = Dllab("classifier", load("mnist5k"), batch, torch.device("cpu"), channels_last=channels_last,
                   precision="bf16")
    rates: dict[str, list[float]] = {"tiny route off": [], "tiny route on": []}
    rules = {"tiny route off": before, "tiny route on": real}
    print(f"== classifier step, bf16 autocast, {'channels-last' if channels_last else 'NCHW'}, batch {batch}, "
          f"{repeats} alternating rounds of 5 s; torch {torch.__version__}, native bf16 GEMM: "
          f"{_conv._cpu_has_native(torch.bfloat16)}, {torch.get_num_threads()} threads ==")
    try:
        for i in range(repeats):
            for name in (list(rules) if i % 2 == 0 else list(rules)[::-1]):
                _conv.gemm_route = rules[name]
                runner.step()  # a step of the new rule before timing it
                start, steps = time.perf_counter(), 0
                while steps < 2 or time.perf_counter() - start < 5:
                    runner.step()
                    steps += 1
                rates[name].append(steps * batch / (time.perf_counter() - start))
    finally:
        _conv.gemm_route = real
    for name, r in rates.items():
        print(f"{name:<16} median {statistics.median(r):7.1f} img/s  rounds " + " ".join(f"{x:.0f}" for x in r))
    print(f"on / off: {statistics.median(rates['tiny route on']) / statistics.median(rates['tiny route off']):.2f}")


MAX_BATCH = 4096  # more images than any row here needs (and than MNIST-5k has for ``step``)


def winograd(batch: int, repeats: int, channels_last: bool) -> None:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    saved = _winograd.WINOGRAD
    print(f"== scratch Conv2d 3x3 stride 1, fp32, forward+backward, batch {batch}, {fmt}, {repeats} repeats, "
          f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads ==")
    print(f"{'row':<24}{'torch ms':>9}{'im2col ms':>10}{'winograd ms':>12}{'im2col/torch':>13}"
          f"{'winograd/torch':>15}{'winograd/im2col':>16}")
    try:
        for c_in, c_out, k, s, h in RESNET_32 + RESNET_28:
            if k != 3 or s != 1 or c_in < _winograd.MIN_CHANNELS:
                continue
            torch.manual_seed(0)
            x = torch.randn(batch, c_in, h, h).contiguous(memory_format=fmt).requires_grad_()
            ours = Conv2d(c_in, c_out, 3, padding=1, bias=False)
            ref = torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
            ref.load_state_dict(ours.state_dict())
            g = torch.randn_like(ref(x))
            times: dict[str, list[float]] = {"torch": [], "im2col": [], "winograd": []}
            for _ in range(repeats + 1):  # the first round warms up (workspace buffers)
                for name in times:
                    _winograd.WINOGRAD = name == "winograd"
                    times[name].append(step_time(ref if name == "torch" else ours, x, g))
            ms = {name: median_ms(t[1:]) for name, t in times.items()}
            print(f"{f'{c_in}->{c_out} @{h}':<24}{ms['torch']:>9.1f}{ms['im2col']:>10.1f}{ms['winograd']:>12.1f}"
                  f"{ms['im2col'] / ms['torch']:>13.2f}{ms['winograd'] / ms['torch']:>15.2f}"
                  f"{ms['winograd'] / ms['im2col']:>16.2f}", flush=True)
    finally:
        _winograd.WINOGRAD = saved


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("routes", "weight-grad", "torch-conv", "step", "winograd"),
                   help="routes: the scratch Conv2d's routes against nn.Conv2d; weight-grad: oneDNN's weight "
                        "gradient against one GEMM; torch-conv: TorchConv2d's bf16 routes; step: the classifier's "
                        "bf16 step with the tiny route on and off; winograd: the scratch 3x3 stride-1 rows by "
                        "Winograd and by im2col (see the module docstring)")
    p.add_argument("--batch", type=positive, default=None,
                   help=f"batch size, at most {MAX_BATCH} (default: 32 for routes and winograd, 128 for the others)")
    p.add_argument("--repeats", type=positive, default=7,
                   help="timed repeats per row (step: alternating rounds of 5 s per rule) (default: 7)")
    p.add_argument("--memory-format", choices=("contiguous", "channels_last"), default=None,
                   help="the layout of the inputs (default: contiguous for routes and winograd, channels_last for "
                        "the others)")
    p.add_argument("--threads", type=positive, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.batch is not None and args.batch > MAX_BATCH:
        p.error(f"--batch {args.batch} is above {MAX_BATCH}")
    if args.what == "step" and args.batch is not None and args.batch > 4000:
        p.error(f"--batch {args.batch}: step trains on MNIST-5k's 4000 training images, so at most 4000")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "routes":
        routes(args.batch or 32, args.repeats, args.memory_format == "channels_last")
    elif args.what == "weight-grad":
        weight_grad(args.batch or 128, args.repeats)
    elif args.what == "winograd":
        winograd(args.batch or 32, args.repeats, args.memory_format == "channels_last")
    elif args.what == "torch-conv":
        torch_conv(args.batch or 128, args.repeats, args.memory_format != "contiguous")
    else:
        step(args.batch or 128, args.repeats, args.memory_format != "contiguous")


if __name__ == "__main__":
    main()
