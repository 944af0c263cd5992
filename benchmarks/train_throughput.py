"""Training throughput of dllab's trainers against textbook loops, measured side by side.

    python benchmarks/train_throughput.py              # about 4-5 minutes on 2 busy CPU cores
    python benchmarks/train_throughput.py --quick      # about 1 minute
    python benchmarks/train_throughput.py --compile    # also torch.compile variants (slow to build)
    python benchmarks/train_throughput.py --compile --compile-modes default reduce-overhead  # GPU: CUDA graphs
    python benchmarks/train_throughput.py --bf16       # also bf16 autocast
    python benchmarks/train_throughput.py --kinds vae --threads 2 --json out.json

For each kind (classifier = ResNet-18 at width 64 with the CIFAR stem, VAE, DCGAN), on the
bundled MNIST-5k digits (1 x 28 x 28) at the same batch size, it times one training step loop:

- ``reference``: the loop as tutorials write it (pytorch/examples ``mnist``, ``vae``, ``dcgan``,
  the CIFAR-10 tutorial): fp32, default memory format, a ``torch.utils.data.DataLoader`` over a
  Dataset that turns each image into a PIL image and runs per-image torchvision transforms
  (random crop, ``ToTensor``, ``Normalize``), the optimiser with its default (for-loop) kernel and
  ``loss.item()`` every step. The classifier is ``torchvision.models.resnet18`` with a 3x3
  stride-1 first convolution and no max-pool; the VAE and the DCGAN use dllab's models (no
  torchvision equivalent), so only the loop differs.
- ``dllab``: the kind's real ``Trainer.train_step`` as ``dllab train`` runs it (the engine's
  per-step work included), fed by dllab's in-memory ``BatchLoader`` (whole-batch augmentation),
  no host syncs in the loop.
  Its optimisers are fused (one kernel per step for all parameters, what
  ``dllab.utils.optimizer_options`` gives), as in ``dllab train``.
- ``dllab-loopopt``: the same with the optimisers' default for-loop kernel, to show what fusing
  is worth. ``+cl``: channels_last (the classifier's ``--channels-last``). ``+bf16``: bf16
  autocast (``--bf16``). ``+compile``: ``torch.compile`` of the models, as ``dllab train
  --compile`` does (only with ``--compile``: each model takes one to three minutes to build on a
  2-core CPU). With ``--bf16``, the classifier also gets ``+cl+bf16``; with both flags, every kind
  gets ``+bf16+compile``. ``--compile-modes`` names torch.compile's modes to time (``dllab train
  --compile-mode``; default ``default`` only): each mode other than ``default`` adds its own
  variants, named ``+compile:MODE`` (``reduce-overhead`` replays CUDA graphs on a GPU).

Every variant is built once; then each round times every variant in turn (the order rotates), for
``--seconds`` (at least ``--min-steps`` steps) after ``--warmup`` steps, and the figure is the
median of the rounds, so the load of a shared machine hits all alike. ``ratio`` = images/s over
the reference's. ``step MiB``: the peak memory one step adds over what is allocated before it
(CUDA: ``max_memory_allocated``; CPU: growth of the process's peak resident memory, Linux VmHWM
reset through /proc/self/clear_refs, with glibc returning blocks of 64 KiB or more to the system on
free; measured in a separate process, since that glibc setting slows every large allocation and
must not touch the timings, so ``--compile`` builds its models twice); it includes the batch,
activations, gradients, optimiser temporaries and, for the reference, its DataLoader.
``state MiB``: parameters + optimiser state. The loader table times each data pipeline alone
(no model) against the step rate it has to feed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import _procmem  # benchmarks/_procmem.py, next to this script
from dllab.config import COMPILE_MODES, DefaultsHelpFormatter, nonnegative_int, positive_float, positive_int

KINDS = ("classifier", "vae", "dcgan")
BATCH = {"classifier": 32, "vae": 128, "dcgan": 64}  # CPU defaults; dllab's own for VAE and DCGAN


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- memory --------------------------------------------------------------------------------------
def step_memory(runner, device: torch.device) -> float:
    """MiB one step adds at its peak over what is allocated before it (on CPU: after ``_procmem.setup()``)."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        runner.step()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return _procmem.step_peak_mib(runner.step)


def build_runners(kind: str, data, batch: int, device, args) -> dict[str, object]:
    """The reference loop and every dllab variant of ``kind``, built (not yet run)."""
    runners: dict[str, object] = {"reference": Reference(kind, data, batch, device, args.workers)}
    for name, opts in variants_for(kind, args.compile, args.bf16, args.compile_modes):
        if name == "dllab" or not args.only or any(text in name for text in args.only):
            runners[name] = Dllab(kind, data, batch, device, **opts)
    return runners


def memory_for_kind(kind: str, batch: int, args) -> dict[str, float] | None:
    """{variant: step MiB} for ``kind``, measured in a child process on CPU (see ``bench_kind``).

    Needs ``_procmem.setup()``, whose allocator setting would slow any timing run after it in the
    same process; returns None where it is unavailable (not Linux).
    """
    from dllab.data import load
    from dllab.utils import resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cpu" and not _procmem.setup():
        return None
    runners = build_runners(kind, load(args.dataset, data_dir=args.data_dir), batch, device, args)
    for r in runners.values():  # warm-up (and compilation), as in the timed process
        for _ in range(args.warmup):
            r.step()
    return {name: step_memory(r, device) for name, r in runners.items()}


def state_mib(modules, optimizers) -> float:
    """Parameters, buffers and optimiser state, in MiB."""
    seen, total = set(), 0
    tensors = [t for m in modules for t in [*m.parameters(), *m.buffers()]]
    for opt in optimizers:
        for st in opt.state.values():
            tensors += [v for v in st.values() if torch.is_tensor(v)]
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total / 2**20


# ---- the textbook reference loops ----------------------------------------------------------------
class TextbookDataset(torch.utils.data.Dataset):
    """uint8 images handed out one at a time as PIL images through ``transform``, the way
    ``torchvision.datasets.MNIST`` / ``CIFAR10`` do."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        self.x, self.y, self.transform = x.numpy(), y.tolist(), transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image

        img = self.x[i]  # (C, H, W) uint8
        if img.shape[0] == 1:
            img = Image.fromarray(img[0], mode="L")
        else:
            img = Image.fromarray(img.transpose(1, 2, 0))  # (H, W, C)
        return self.transform(img), self.y[i]


def textbook_loader(data, batch: int, kind: str, workers: int, seed: int, device):
    from torchvision import transforms as T

    size = data.image_size
    if kind == "classifier":  # crop + normalise, as the CIFAR-10 / MNIST examples
        pad = data.augment.pad or 2
        steps = [T.RandomCrop(size, padding=pad)]
        if data.augment.flip:
            steps.append(T.RandomHorizontalFlip())
        transform = T.Compose([*steps, T.ToTensor(), T.Normalize(data.mean, data.std)])
    elif kind == "vae":  # pytorch/examples vae: ToTensor only
        transform = T.ToTensor()
    else:  # pytorch/examples dcgan: to [-1, 1]
        c = data.in_channels
        transform = T.Compose([T.ToTensor(), T.Normalize((0.5,) * c, (0.5,) * c)])
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(TextbookDataset(data.train_x, data.train_y, transform),
                                       batch_size=batch, shuffle=True, drop_last=True,
                                       num_workers=workers, generator=g,
                                       pin_memory=device.type == "cuda")


class Cycle:
    """Endless batches from a DataLoader-like iterable (a new epoch when one ends)."""

    def __init__(self, loader):
        self.loader, self.it = loader, iter(loader)

    def next(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)


def torchvision_resnet18(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with the usual small-image stem: 3x3 stride-1 conv, no max-pool."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class Reference:
    """The textbook loop of one kind (see the module docstring)."""

    def __init__(self, kind: str, data, batch: int, device, workers: int, seed: int = 0):
        torch.manual_seed(seed)
        self.kind, self.device, self.batch = kind, device, batch
        self.loader = textbook_loader(data, batch, kind, workers, seed, device)
        self.batches = Cycle(self.loader)
        self.running = 0.0
        if kind == "classifier":
            self.model = torchvision_resnet18(data.in_channels, data.num_classes).to(device)
            self.opts = [torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                         weight_decay=5e-4)]
            self.modules = [self.model]
        elif kind == "vae":
            from dllab.models.vae import VAE
            from dllab.train.vae import VAETrainConfig, model_config

            self.cfg = model_config(VAETrainConfig(), data)
            self.model = VAE(self.cfg).to(device)
            self.opts = [torch.optim.Adam(self.model.parameters(), lr=1e-3)]
            self.modules = [self.model]
        else:
            from dllab.models.dcgan import Discriminator, Generator
            from dllab.train.dcgan import DCGANTrainConfig, model_config

            cfg = model_config(DCGANTrainConfig(), data)
            self.netG, self.netD = Generator(cfg).to(device), Discriminator(cfg).to(device)
            self.nz = cfg.nz
            self.opts = [torch.optim.Adam(self.netD.parameters(), lr=2e-4, betas=(0.5, 0.999)),
                         torch.optim.Adam(self.netG.parameters(), lr=2e-4, betas=(0.5, 0.999))]
            self.modules = [self.netG, self.netD]
        self.step_count = 0

    def step(self) -> None:
        x, y = self.batches.next()
        x, y = x.to(self.device), y.to(self.device)
        if self.kind == "classifier":
            self.model.train()
            opt = self.opts[0]
            out = self.model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            self.running += loss.item()
            self.correct = (out.argmax(1) == y).sum().item()
        elif self.kind == "vae":
            from dllab.losses.vae import vae_loss

            self.model.train()
            opt = self.opts[0]
            opt.zero_grad()
            loss = vae_loss(self.model(x), x, self.cfg, step=self.step_count)["loss"]
            loss.backward()
            self.running += loss.item()
            opt.step()
        else:  # pytorch/examples dcgan/main.py, with logits
            opt_d, opt_g = self.opts
            criterion = nn.BCEWithLogitsLoss()
            n = x.shape[0]
            self.netD.zero_grad()
            out = self.netD(x)
            err_real = criterion(out, torch.ones(n, device=self.device))
            err_real.backward()
            d_x = torch.sigmoid(out).mean().item()
            noise = torch.randn(n, self.nz, device=self.device)
            fake = self.netG(noise)
            out = self.netD(fake.detach())
            err_fake = criterion(out, torch.zeros(n, device=self.device))
            err_fake.backward()
            d_g_z1 = torch.sigmoid(out).mean().item()
            opt_d.step()
            self.netG.zero_grad()
            out = self.netD(fake)
            err_g = criterion(out, torch.ones(n, device=self.device))
            err_g.backward()
            d_g_z2 = torch.sigmoid(out).mean().item()
            opt_g.step()
            self.running += (err_real + err_fake).item() + err_g.item() + d_x + d_g_z1 + d_g_z2
        self.step_count += 1

    def state_mib(self) -> float:
        return state_mib(self.modules, self.opts)


# ---- dllab's trainers -----------------------------------------------------------------------------
@contextlib.contextmanager
def loop_optimizers():
    """While building a trainer, make ``torch.optim.SGD/Adam/AdamW`` ignore ``fused=True`` and use
    their default for-loop kernel: the trainers ask for fused kernels (``optimizer_options``), and
    this shows what that is worth."""
    names = ("SGD", "Adam", "AdamW")
    saved = {n: getattr(torch.optim, n) for n in names}

    def unfused(cls):
        return lambda *args, **kwargs: cls(*args, **{**kwargs, "fused": None})

    try:
        for n, cls in saved.items():
            setattr(torch.optim, n, unfused(cls))
        yield
    finally:
        for n, cls in saved.items():
            setattr(torch.optim, n, cls)


class Dllab:
    """A dllab trainer's ``train_step`` driven as ``Trainer.fit`` drives it (no logging I/O)."""

    def __init__(self, kind: str, data, batch: int, device, *, fused=True, channels_last=False,
                 compile=False, compile_mode="default", precision="fp32", seed: int = 0):
        from dllab.runs import Run
        from dllab.train import defaults, kind_module
        from dllab.utils import seed_everything

        seed_everything(seed)
        config = {**defaults(kind), "dataset": data.name, "batch_size": batch, "device": device.type,
                  "precision": precision, "channels_last": channels_last, "seed": seed,
                  "compile": compile, "compile_mode": compile_mode, "out": tempfile.gettempdir()}
        run = Run(Path(tempfile.gettempdir()) / "dllab-bench-unused", config, writer=False)
        trainer = kind_module(kind).TRAINER(config, data, run, device, quiet=True)
        with contextlib.nullcontext() if fused else loop_optimizers():
            trainer.build()
        self.trainer, self.kind, self.batch = trainer, kind, batch
        self.loader = trainer.loader("train", shuffle=True, augment=bool(config["augment"]), drop_last=True)
        self.epoch = 0
        self.it = self._epoch()
        self.sums: dict[str, torch.Tensor] = {}

    def _epoch(self):
        self.loader.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)

    def step(self) -> None:
        try:
            x, y = next(self.it)
        except StopIteration:
            self.it = self._epoch()
            x, y = next(self.it)
        t = self.trainer
        metrics = t.train_step(x, y)
        t.step += 1
        for k, v in metrics.items():  # as Trainer.fit: tensors summed on the device, no .item()
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()

    def state_mib(self) -> float:
        from dllab.engine import unwrap

        return state_mib([unwrap(m) for m in self.trainer.modules().values()],
                         list(self.trainer.optimizers().values()))


# ---- measurement ---------------------------------------------------------------------------------
def images_per_second(runner, device, seconds: float, min_steps: int) -> float:
    sync(device)
    start = time.perf_counter()
    steps = 0
    while steps < min_steps or time.perf_counter() - start < seconds:
        runner.step()
        steps += 1
    sync(device)
    return steps * runner.batch / (time.perf_counter() - start)


def loader_rates(ref: Reference, ours: Dllab, device, n_batches: int) -> tuple[float, float]:
    """Images/s of each data pipeline alone (batches produced and moved to ``device``)."""
    from dllab.data import loader_throughput

    ours_rate = loader_throughput(ours.loader, n_batches)
    batches = Cycle(ref.loader)
    sync(device)
    start = time.perf_counter()
    for _ in range(n_batches):
        x, _ = batches.next()
        x = x.to(device)
    sync(device)
    return n_batches * ref.batch / (time.perf_counter() - start), ours_rate


def variants_for(kind: str, compile: bool, bf16: bool, compile_modes=("default",)) -> list[tuple[str, dict]]:
    out = [("dllab-loopopt", {"fused": False}), ("dllab", {})]
    if kind == "classifier":
        out.append(("dllab+cl", {"channels_last": True}))
    if bf16:
        out.append(("dllab+bf16", {"precision": "bf16"}))
        if kind == "classifier":
            out.append(("dllab+cl+bf16", {"channels_last": True, "precision": "bf16"}))
    for mode in dict.fromkeys(compile_modes) if compile else ():  # each mode once
        tag = "" if mode == "default" else f":{mode}"
        out.append((f"dllab+compile{tag}", {"compile": True, "compile_mode": mode}))
        if bf16:
            out.append((f"dllab+bf16+compile{tag}", {"precision": "bf16", "compile": True, "compile_mode": mode}))
    return out


def bench_kind(kind: str, data, args, device) -> dict:
    batch = args.batch_size or BATCH[kind]
    print(f"\n## {kind}  (batch {batch}, {data.name} {tuple(data.train_x.shape[1:])}, "
          f"{torch.get_num_threads()} thread(s), {device})", flush=True)
    # CPU memory first, in a child process: its allocator setting must not slow the timings here
    memory = _procmem.in_child(memory_for_kind, kind, batch, args) if device.type == "cpu" else None
    runners = build_runners(kind, data, batch, device, args)
    warm_s = {}
    for name, r in runners.items():  # warm-up (and compilation)
        t = time.perf_counter()
        for _ in range(args.warmup):
            r.step()
        sync(device)
        warm_s[name] = time.perf_counter() - t
    rates: dict[str, list[float]] = {n: [] for n in runners}
    names = list(runners)
    for rnd in range(args.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            rates[name].append(images_per_second(runners[name], device, args.seconds, args.min_steps))
    if device.type != "cpu":
        memory = {n: step_memory(r, device) for n, r in runners.items()}
    ref_loader, our_loader = loader_rates(runners["reference"], runners["dllab"], device, args.loader_batches)
    rows = []
    base = statistics.median(rates["reference"])
    for name in names:
        med = statistics.median(rates[name])
        rows.append({"variant": name, "images_per_s": med, "ratio": med / base,
                     "spread": (min(rates[name]), max(rates[name])), "step_mib": memory[name] if memory else None,
                     "state_mib": runners[name].state_mib(), "warmup_s": warm_s[name]})
    print(f"| variant | images/s | ratio | min-max img/s | step MiB | state MiB | warm-up s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mem = "n/a" if r["step_mib"] is None else f"{r['step_mib']:.0f}"
        print(f"| {r['variant']} | {r['images_per_s']:.1f} | {r['ratio']:.2f}x | "
              f"{r['spread'][0]:.1f}-{r['spread'][1]:.1f} | {mem} | {r['state_mib']:.0f} | "
              f"{r['warmup_s']:.1f} |")
    best = max(rows[1:], key=lambda r: r["images_per_s"])
    print(f"\nloader alone: textbook DataLoader {ref_loader:,.0f} img/s "
          f"(feeds the reference's {base:.1f} img/s: {100 * base / ref_loader:.1f}% of its step time); "
          f"dllab BatchLoader {our_loader:,.0f} img/s ({100 * best['images_per_s'] / our_loader:.2f}% "
          f"of the best dllab step rate, {best['images_per_s']:.1f} img/s)", flush=True)
    return {"kind": kind, "batch_size": batch, "rows": rows, "rounds": {n: rates[n] for n in names},
            "loader_images_per_s": {"reference_dataloader": ref_loader, "dllab_batchloader": our_loader}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="the trainers to time")
    p.add_argument("--dataset", default="mnist5k", help="any dllab dataset name")
    p.add_argument("--data-dir", default=None, help="where the dataset's files are (dllab's default folder)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"one batch size for every kind (per kind when not given: {BATCH})")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch intra-op threads (1: stable ratios on a shared machine)")
    p.add_argument("--workers", type=nonnegative_int, default=0,
                   help="DataLoader workers of the reference (0: no process competes for the cores)")
    p.add_argument("--rounds", type=positive_int, default=3, help="timed rounds over all variants")
    p.add_argument("--seconds", type=positive_float, default=4.0, help="time per variant per round")
    p.add_argument("--min-steps", type=positive_int, default=2, help="steps per variant per round, at least")
    p.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed steps of each variant first")
    p.add_argument("--loader-batches", type=positive_int, default=30, help="batches of the loader-alone timing")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    p.add_argument("--compile-modes", nargs="+", choices=COMPILE_MODES, default=["default"], metavar="MODE",
                   help=f"with --compile, torch.compile's modes to time, each its own variants "
                        f"({', '.join(COMPILE_MODES)})")
    p.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                   help="time only the dllab variants whose name contains one of these texts (with the "
                        "reference and plain dllab), e.g. --only bf16")
    p.add_argument("--bf16", action="store_true",
                   help="also time bf16 autocast (fast only with AMX/AVX512-BF16 or on GPUs)")
    p.add_argument("--quick", action="store_true", help="1 round, shorter timings, smaller classifier batch")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.compile_modes != ["default"] and not args.compile:
        p.error("--compile-modes names the modes of the compiled variants: add --compile")
    if args.json and (Path(args.json).is_dir() or not Path(args.json).resolve().parent.is_dir()):
        p.error(f"--json {args.json}: " + ("a folder, not a file" if Path(args.json).is_dir()
                                             else "its folder does not exist"))
    if args.quick:
        args.rounds, args.seconds, args.min_steps, args.warmup = 1, 2.0, 2, 1
        args.loader_batches = 10
        BATCH["classifier"] = 16
    from dllab.data import load
    from dllab.utils import resolve_device

    torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        data = load(args.dataset, data_dir=args.data_dir)
    except (ValueError, RuntimeError, OSError) as e:  # an unknown device or dataset, missing files
        p.error(str(e))
    for kind in args.kinds:
        if (args.batch_size or BATCH[kind]) > len(data.train_y):
            p.error(f"--batch-size {args.batch_size or BATCH[kind]} is larger than {data.name}'s "
                    f"{len(data.train_y)} training images")
    print(f"# dllab training throughput: torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{'GPU ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}")
    t0 = time.perf_counter()
    results = [bench_kind(kind, data, args, device) for kind in args.kinds]
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv[1:], "torch": torch.__version__,
                                               "device": str(device), "threads": args.threads,
                                               "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
