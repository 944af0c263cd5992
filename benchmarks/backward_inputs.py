"""What naming each update's parameters in its backward is worth: the engine's rule against a plain backward.

    python benchmarks/backward_inputs.py                        # the DCGAN, fp32 and bf16 (~2 min)
    python benchmarks/backward_inputs.py --kinds dcgan vae --precisions fp32

``Trainer._backward`` calls ``loss.backward(inputs=<the update's own parameters>)``. A loss that
runs through another model (the DCGAN's generator loss runs through D) then computes no gradient
for that model's weights, and an R1 step none for the real images. This script times a kind's
real training step (``train_throughput.py``'s ``dllab`` runner: ``Trainer.train_step`` fed by
dllab's loader, fused optimisers) with the rule as it is and with a plain ``loss.backward()``,
alternating in one process for ``--rounds`` rounds of ``--seconds`` each (the order alternates
too), so that the load of a shared machine hits both alike. ``ratio`` = the rule's images/s over
the plain backward's, of the medians. ``GFLOP/step`` is what one step of each computes
(``torch.utils.flop_counter``: matrix products and convolutions, forward and backward), which
no machine's noise moves.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import train_throughput  # benchmarks/train_throughput.py, next to this script
from dllab.config import positive_float, positive_int
from dllab.data import load
from dllab.engine import Trainer


def measure(kind: str, precision: str, data, rounds: int, seconds: float) -> tuple[dict, dict]:
    """(images/s, GFLOP per step) of each rule."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = train_throughput.BATCH[kind]
    runner = train_throughput.Dllab(kind, data, batch, torch.device("cpu"), precision=precision)
    rules = {"own parameters": Trainer._backward, "plain": lambda self, loss, update: loss.backward()}
    rates: dict[str, list[float]] = {name: [] for name in rules}
    flops: dict[str, float] = {}
    try:
        for name, rule in rules.items():  # warm-up, then one counted step
            Trainer._backward = rule
            for _ in range(3):
                runner.step()
            with FlopCounterMode(display=False) as counter:
                runner.step()
            flops[name] = counter.get_total_flops() / 1e9
        for rnd in range(rounds):
            for name in (list(rules) if rnd % 2 == 0 else list(rules)[::-1]):
                Trainer._backward = rules[name]
                start, steps = time.perf_counter(), 0
                while time.perf_counter() - start < seconds or steps < 2:
                    runner.step()
                    steps += 1
                rates[name].append(steps * batch / (time.perf_counter() - start))
    finally:
        Trainer._backward = rules["own parameters"]
    return {name: statistics.median(r) for name, r in rates.items()}, flops


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", nargs="+", choices=list(train_throughput.BATCH), default=["dcgan"],
                   help="the trainers to time (default: dcgan)")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                   help="--precision of the runs (default: fp32 bf16)")
    p.add_argument("--rounds", type=positive_int, default=8, help="alternating rounds (default 8)")
    p.add_argument("--seconds", type=positive_float, default=3.0, help="seconds per rule per round (default 3)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load("mnist5k")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, mnist5k, CPU")
    print("| kind | precision | own parameters img/s | plain backward img/s | ratio | GFLOP/step own / plain |")
    print("|---|---|---:|---:|---:|---:|")
    for kind in args.kinds:
        for precision in args.precisions:
            r, f = measure(kind, precision, data, args.rounds, args.seconds)
            print(f"| {kind} | {precision} | {r['own parameters']:.1f} | {r['plain']:.1f} | "
                  f"{r['own parameters'] / r['plain']:.3f} | {f['own parameters']:.2f} / {f['plain']:.2f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
