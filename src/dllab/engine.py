"""The training driver shared by every model kind.

A model kind subclasses :class:`Trainer` and writes only what is its own: ``build`` (models,
optimisers, fixed batches), ``updates`` (its losses, each with the optimiser that minimises it,
in order: :class:`Update`), ``evaluate`` (test metrics), ``epoch_end`` (figures) and ``finish``
(final analysis). The engine owns everything else:

- the step (:meth:`Trainer.train_step`): for each update in turn, zero_grad, the finite check,
  backward, gradient clipping (``--grad-clip``), the optimiser and scheduler steps and the
  weight average (:class:`EMA`), and the bookkeeping of skipped steps;
- :meth:`Trainer.fit`: epochs and steps, metrics logging, checkpoints (last, best, on
  SIGINT/SIGTERM), exact resume (mid-epoch included), timing, the summary with the run's status
  (complete, interrupted or failed), and the torch.distributed plumbing.

Distributed training (``torchrun --nproc_per_node=N -m dllab train ...``):

- the process group is nccl on GPUs and gloo on CPUs; models are wrapped in
  ``DistributedDataParallel`` (:meth:`Trainer.wrap`), which averages gradients over ranks;
- each rank reads its own shard of the same ``(seed, epoch)`` permutation (the data loader deals
  it out like ``DistributedSampler``), so N ranks with batch B each step on the same examples as one
  process with batch N*B;
- rank 0 keeps the random stream of a single-process run; every other rank reseeds its own
  stream, so noise (GAN latents, VAE samples) differs between ranks; every rank's RNG state is
  saved in the checkpoint, so a resumed distributed run continues exactly;
- logged training metrics are averaged over ranks; the test set is evaluated on rank 0 and its
  numbers are broadcast, so every rank takes the same best-checkpoint decision;
- only rank 0 writes files (the :class:`dllab.runs.Run` of other ranks is read-only);
- a SIGINT/SIGTERM on any rank, and a non-finite loss on any rank, is agreed on by all ranks
  at the same step (a rank that stopped alone would leave the others waiting forever).
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import datetime as _dt
import errno
import inspect
import math
import signal
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dllab.checkpoint import CheckpointError
from dllab.config import CUDA_GRAPH_MODES, TrainConfig, from_mapping
from dllab.runs import Run, unfinished_summary
from dllab.utils import (autocast, dist_info, get_rng_state, precision_name, progress, progress_lines, rank_seed,
                         resolve_precision, seed_everything, set_rng_state)


#: the fewest steps between two reads of the device's skip counts at log points (each read is a
#: host sync; checkpoints and epoch ends read them too)
SETTLE_EVERY = 50
#: the weight of a step in the logged means: 0 for a step skipped on the device (see
#: :meth:`Trainer.train_step`), whose metrics are zeroed rather than left out
STEP_KEPT = "_kept"
STEPS_OF = "_steps:"  # + a metric's name: the kept steps that gave it, summed beside it


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss; the last good checkpoint is kept."""


class OutOfMemory(OSError):
    """The model, a batch or an optimiser state did not fit in memory (an ``OSError``, errno
    ENOMEM, so the CLI reports it on one line with exit code 1)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOMEM


def is_out_of_memory(error: BaseException) -> bool:
    """True for torch's CPU/GPU allocation failures and Python's MemoryError."""
    if isinstance(error, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


class AlarmStop(Exception):
    """An alarm fired under ``--on-alarm stop``; last.pt holds the epoch it fired after."""

    def __init__(self, name: str, message: str, run_path, kind: str = "KIND"):
        self.name, self.message, self.run_path = name, message, run_path
        super().__init__(f"stopped by the {name} alarm: {message}. The run is kept in {run_path} "
                         f"(continue it with: dllab train {kind} --resume --out {run_path} --on-alarm warn)")


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved and the run can be resumed.

    The message names the command that continues the run, ``dllab train KIND --resume --out RUN``
    unless ``command`` says otherwise: a command that trains runs of its own (the demo) names
    itself with :meth:`continued_by`.
    """

    def __init__(self, signum: int, run_path, kind: str = "KIND", saved: bool = True,
                 command: str | None = None):
        self.signum = signum
        self.run_path = run_path
        self.kind, self.saved = kind, saved
        self.command = command or f"dllab train {kind} --resume --out {run_path}"
        where = (f"checkpoint saved in {run_path}/checkpoints/last.pt" if saved else
                 f"before the first checkpoint of {run_path}, so it starts again from the beginning")
        super().__init__(f"interrupted by {signal.Signals(signum).name}; {where} (continue with: {self.command})")

    def continued_by(self, command: str) -> Interrupted:
        """The same interruption, its message naming ``command`` as what continues the run."""
        return Interrupted(self.signum, self.run_path, self.kind, self.saved, command)


def init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun set up (nccl on GPUs, gloo on CPU); False if not launched."""
    _, _, world = dist_info()
    if world <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        atexit.register(_destroy_process_group)
    return True


def control_group():
    """The process group for the engine's host-side agreements (stop now? skip this step?): the
    default group when it is gloo, else a gloo group over the same ranks. Its flags are CPU tensors,
    so agreeing on one never waits for a GPU (with nccl, reading an all-reduced CUDA flag is a
    device sync). Collective: every rank must call it, in the same order."""
    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def _destroy_process_group() -> None:
    try:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - at exit, a peer may already be gone
        pass


def validate_config(config: TrainConfig, device: torch.device) -> None:
    """Refuse, before any run folder is written, settings the engine would refuse later.

    ``--precision`` must be possible on ``device`` (fp16 needs CUDA); ``--sync-bn`` under
    torchrun needs GPUs (torch's SyncBatchNorm has no CPU kernel). Raises ValueError naming the
    setting. (A kind checks its own settings in its ``validate``.)
    """
    resolve_precision(config.precision, device)
    _, _, world = dist_info()
    if config.sync_bn and world > 1 and device.type == "cpu":
        raise ValueError("--sync-bn needs GPUs: torch's SyncBatchNorm does not run on CPU tensors; "
                         "leave it off (each rank then normalises over its own batch)")


def create_run(path, config: dict, *, resume: bool = False) -> Run:
    """:meth:`Run.create` for every rank of a run: only rank 0 checks and writes the folder.

    Rank 0 creates (or reopens) the folder first; the other ranks wait for it and then open the
    same folder read-only, so a check like "this folder already holds a run" never sees rank 0's
    fresh config.json, and no rank but 0 ever writes. Outside torchrun this is ``Run.create``.
    """
    rank, _, world = dist_info()
    if world <= 1 or not dist.is_initialized():
        return Run.create(path, config, resume=resume)
    run = Run.create(path, config, resume=resume, writer=True) if rank == 0 else None
    dist.barrier()  # rank 0 failing above never gets here; torchrun then stops the others
    if rank != 0:
        run = Run.create(path, config, resume=True, writer=False) if resume else Run(path, dict(config),
                                                                                      writer=False)
    return run


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


@torch.no_grad()
def ema_update(ema_model: nn.Module, model: nn.Module, decay: float,
               skip: torch.Tensor | None = None) -> None:
    """In place: theta_ema <- decay * theta_ema + (1 - decay) * theta, for every parameter and
    every floating-point buffer (batch-norm running mean/var); integer buffers
    (``num_batches_tracked``) are copied.

    Yazici et al. (2019), "The Unusual Effectiveness of Averaging in GAN Training" (ICLR): an
    exponential moving average of the generator's weights gives better samples (lower FID) than
    the last iterate, at no training cost; Polyak & Juditsky (1992) for averaging in general.
    decay=0 copies ``model``; decay=1 leaves the EMA unchanged. ``skip``, a 0-d tensor that is 1
    when the step was skipped and 0 otherwise, is applied on the device (no host sync): the float
    entries move by ``(1 - decay) * (1 - skip)``, the integer ones are copied either way.
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay={decay!r} must be a number in [0, 1]")
    ema_state, state = ema_model.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
    if ema_state.keys() != state.keys():
        missing = sorted(set(state) ^ set(ema_state))[:5]
        raise ValueError(f"ema_model and model have different state dict keys, e.g. {missing}")
    floats, targets = [], []
    for name, ema_t in ema_state.items():
        t = state[name].detach()
        if ema_t.shape != t.shape:
            raise ValueError(f"{name}: ema shape {tuple(ema_t.shape)} != "
                             f"model shape {tuple(t.shape)}")
        if ema_t.dtype.is_floating_point:
            floats.append(ema_t.detach())
            targets.append(t.to(ema_t.dtype))
        else:
            ema_t.copy_(t)
    if floats and skip is None:
        torch._foreach_lerp_(floats, targets, 1.0 - decay)
    elif floats:  # ema += (1 - decay) * (1 - skip) * (model - ema)
        deltas = torch._foreach_sub(targets, floats)
        torch._foreach_mul_(deltas, (1.0 - skip) * (1.0 - decay))
        torch._foreach_add_(floats, deltas)


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` to hold its exponential moving average (see :func:`ema_update`)."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema


class EMA:
    """The exponential moving average of a model's weights: dllab's one implementation, used for
    the classifier's evaluation weights and the DCGAN's sampling generator.

    ``EMA(model, decay).module`` is a frozen copy of ``model`` (a model of the same class, whose
    ``state_dict`` loads into a fresh model as it is); :meth:`update` moves it towards ``model``
    after each optimiser step (:func:`ema_update`). The decay warms up as
    ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (the ``num_updates`` rule of
    TensorFlow's ``ExponentialMovingAverage``, also timm's ``ModelEmaV3(use_warmup=True)``), so
    a short run averages its recent weights rather than its random initialisation: with 0.999
    and no warm-up, 0.999^250 = 78 % of the weights would still be the initial ones after 250
    steps.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay={decay!r} must be in (0, 1)")
        self.module = make_ema(model)
        self.decay = float(decay)
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    def update(self, model: nn.Module, skip: torch.Tensor | None = None) -> None:
        """One step towards ``model``; ``skip`` as in :func:`ema_update` (the step still counts
        for the warm-up when it was skipped on the device)."""
        ema_update(self.module, unwrap(model), self.current_decay(), skip)
        self.updates += 1


def plain_state_dict(state_dict: dict) -> dict:
    """A saved model state dict as a plain model's: the weight average of runs saved before dllab
    had one EMA (torch's ``AveragedModel``: keys ``module.<name>`` and ``n_averaged``) loses its
    wrapper; any other state dict is returned as it is."""
    if "n_averaged" not in state_dict:
        return state_dict
    return {k[len("module."):]: v for k, v in state_dict.items() if k.startswith("module.")}


def grad_norm(module: nn.Module) -> torch.Tensor:
    """L2 norm of all gradients of ``module`` (a 0-d tensor; no host sync)."""
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


@dataclasses.dataclass
class Update:
    """One optimiser's share of a training step, as a kind declares it (:meth:`Trainer.updates`).

    ``loss(batch)`` computes the loss that ``optimizer`` minimises, from the step's ``batch``
    dict (:meth:`Trainer.prepare`; a loss may leave values in it for the updates after it), and
    returns ``(loss, metrics)``: a 0-d tensor and detached scalar tensors to log. ``module`` owns
    the parameters that ``optimizer`` steps (clipped by ``--grad-clip``; its gradient norm is
    logged as ``grad_norm_key`` when given; ``ema`` averages it). ``scheduler`` steps after the
    optimiser, and also when the step is skipped, so the schedule stays aligned with the steps.
    """

    name: str
    loss: Callable[[dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    optimizer: torch.optim.Optimizer
    module: nn.Module
    scheduler: Any = None
    ema: EMA | None = None
    grad_norm_key: str | None = None


#: names that checkpoints written before the engine owned the step used (new name: old name)
_OLD_NAMES = {"model_ema": "ema", "model": ("optimizer", "scheduler")}


def _saved(entries: dict, name: str, what: str):
    """The checkpoint's entry ``name`` of ``entries`` (models, optimisers or schedulers), or the one
    an older dllab saved under another name; CheckpointError when there is none."""
    if name in entries:
        return entries[name]
    old = _OLD_NAMES.get(name, ())
    for key in (old,) if isinstance(old, str) else old:
        if key in entries:
            return entries[key]
    raise CheckpointError(f"the checkpoint has no {what} for {name!r} (it has {', '.join(entries) or 'none'})")


class Trainer:
    """Base class of the per-kind trainers. See the module docstring for the division of work."""

    kind = "base"
    #: the kind's typed configuration (a :class:`dllab.config.TrainConfig` subclass)
    config_class: type[TrainConfig] = TrainConfig
    #: key of the test metrics that picks best.pt, and whether lower or higher is better
    best_metric = "test_loss"
    best_mode = "min"
    #: the test metrics worth a look after each epoch, most important first (the kind's
    #: ``METRICS.headline``): what the per-epoch line shows where no progress bar is drawn
    headline: tuple[str, ...] = ()
    #: the value scale the data loader hands to ``train_step`` ("standard", "unit" or "tanh")
    scale = "standard"
    #: the flags that set the model's size, named when it does not fit in memory
    size_flags: tuple[str, ...] = ()
    #: train metrics that only some steps give (lazy R1's penalty): logged as the mean over those
    #: steps, not over every step (which would count the others as zeros)
    sparse_metrics: tuple[str, ...] = ()

    def __init__(self, config: TrainConfig | dict, data, run: Run, device: torch.device, *,
                 quiet: bool = False):
        self.config = config if isinstance(config, TrainConfig) else from_mapping(self.config_class, config)
        self.data = data
        self.run = run
        self.device = device
        self.quiet = quiet
        self.rank, self.local_rank, self.world_size = dist_info()
        self.distributed = self.world_size > 1
        self._control = control_group() if self.distributed and dist.is_initialized() else None
        self.amp_dtype = None  # set by subclasses from config.precision
        self.epoch = 0  # epochs completed
        self.step = 0  # optimiser steps taken (all epochs)
        self.batch_in_epoch = 0  # batches done in the current epoch (mid-epoch resume)
        self.best: dict[str, Any] = {}
        self.train_seconds = 0.0
        self.images_seen = 0
        self.nonfinite_total = 0
        self.history: list[dict] = []  # per epoch: test metrics and train_* epoch means (alarms)
        self.alarms_fired: list[dict] = []  # {"alarm", "epoch", "message"}, each alarm once
        self._nonfinite_run = 0
        self._step_skipped = False
        self._buffers: dict[tuple, list[torch.Tensor]] | None = None  # see _backup_buffers
        self._buffer_copies: list[torch.Tensor] = []
        self._skips: torch.Tensor | None = None  # see _step_on_device
        self._settled_at = 0  # the step of the last _settle_skips
        self._stop_signal: int | None = None
        self._built = False
        self._last_test: dict = {}  # the last epoch's test metrics, for an unfinished run's summary
        self._resuming = self._loaded = False  # see _write_unfinished
        self._updates: list[Update] | None = None
        self._wrapped: list[nn.Module] = []
        self.max_nonfinite = self.config.max_nonfinite

    # ---- to be written by each kind -------------------------------------------------------
    def build(self) -> None:
        raise NotImplementedError

    def updates(self) -> list[Update]:
        """The step's losses, each with its optimiser, in the order they are taken (built once,
        after :meth:`build`). The DCGAN declares two: the discriminator's, then the generator's."""
        raise NotImplementedError

    def prepare(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """The step's ``batch`` dict handed to every update's loss; the models (as :meth:`wrap`
        returned them) are put in training mode."""
        for m in self._wrapped:
            m.train()
        return {"x": x, "y": y}

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def epoch_end(self, epoch: int, test_metrics: dict) -> None:
        """Per-epoch figures (rank 0 only)."""

    def finish(self, test_metrics: dict) -> dict:
        """Final figures and analyses; returns extra summary entries."""
        return {}

    def modules(self) -> dict[str, nn.Module]:
        """The trained models by name (their weights are checkpointed, and so are the updates'
        weight averages, as ``<update>_ema``)."""
        raise NotImplementedError

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {u.name: u.optimizer for u in self.declared_updates()}

    def schedulers(self) -> dict[str, Any]:
        return {u.name: u.scheduler for u in self.declared_updates() if u.scheduler is not None}

    def averages(self) -> dict[str, EMA]:
        """The weight averages by checkpoint name (``model_ema``, ``generator_ema``)."""
        return {f"{u.name}_ema": u.ema for u in self.declared_updates() if u.ema is not None}

    def declared_updates(self) -> list[Update]:
        """The kind's :meth:`updates`, built once and kept (a kind may swap a scheduler in them)."""
        if self._updates is None:
            self._updates = list(self.updates())
        return self._updates

    def alarms(self, history: list[dict]) -> list[tuple[str, str | None]]:
        """The kind's alarm rules (:mod:`dllab.metrics.alarms`) on the per-epoch ``history``:
        ``(name, message or None)`` pairs, run after every epoch."""
        return []

    def extra_state(self) -> dict:
        """Kind-specific state to checkpoint (tensors and plain values only)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # ---- helpers for subclasses -----------------------------------------------------------
    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    def wrap(self, model: nn.Module, *, broadcast_buffers: bool = True) -> nn.Module:
        """DistributedDataParallel under torchrun; the model itself otherwise (either compiled with
        ``config.compile``).

        DDP copies rank 0's parameters and buffers to every rank here and averages gradients in
        ``backward``. With ``broadcast_buffers`` (DDP's own flag, on by default) it also re-sends
        rank 0's buffers (batch-norm running statistics) before every forward call; False saves
        that collective for a module called several times per step whose buffers need not agree
        across ranks (the DCGAN's discriminator, called three times per step, whose statistics are
        never used).

        With ``config.sync_bn`` torch's BatchNorm layers become ``SyncBatchNorm``, which
        normalises with the statistics of the global batch (torch implements it for GPUs only).
        Without it each rank normalises over its own ``batch_size`` examples: N ranks x B is then
        N separate BatchNorm batches of B, not one of N*B. dllab's from-scratch ``BatchNorm2d``
        (``--layers scratch``) is never converted.
        """
        self._wrapped.append(self._wrap(model, broadcast_buffers))
        return self._wrapped[-1]

    def _wrap(self, model: nn.Module, broadcast_buffers: bool) -> nn.Module:
        if not self.distributed:
            return self._compiled(model)
        if self.config.sync_bn:
            from dllab.layers import BatchNorm2d as ScratchBatchNorm2d

            if self.device.type == "cpu":
                raise ValueError("--sync-bn needs GPUs: torch's SyncBatchNorm does not run on CPU "
                                 "tensors; leave it off (each rank then normalises over its own batch)")
            if any(isinstance(m, ScratchBatchNorm2d) for m in model.modules()):
                raise ValueError("--sync-bn converts torch.nn BatchNorm layers only; the model uses "
                                 "dllab's from-scratch BatchNorm2d (--layers scratch), which would stay "
                                 "per-rank: use --layers torch or leave --sync-bn off")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        kwargs = {}
        if not broadcast_buffers:  # newer torch renamed the flag (the old name warns)
            ddp_args = inspect.signature(nn.parallel.DistributedDataParallel).parameters
            flag = "forward_sync_buffers" if "forward_sync_buffers" in ddp_args else "broadcast_buffers"
            kwargs[flag] = False
        return self._compiled(nn.parallel.DistributedDataParallel(model, device_ids=ids, **kwargs))

    def plain(self, model: nn.Module) -> nn.Module:
        """``model`` (a module :meth:`wrap` was given) to call in another model's update, one whose
        optimiser does not step it: the DCGAN's D in G's loss. Outside DDP that is the wrapped
        model itself; under DDP, the module without the DDP wrapper (compiled like it), so that
        its gradients are neither expected nor averaged over the ranks there (:meth:`_backward`
        computes none: D's next update zeroes them anyway)."""
        return self._compiled(model) if self.distributed else self._wrapped[self._plain_index(model)]

    def _plain_index(self, model: nn.Module) -> int:
        for i, wrapped in enumerate(self._wrapped):
            if unwrap(wrapped) is model:
                return i
        raise ValueError(f"plain(): {type(model).__name__} was not given to wrap()")

    def _compiled(self, model: nn.Module) -> nn.Module:
        """``torch.compile(model, mode=config.compile_mode)`` when ``config.compile`` is set. Off
        by default: on this project's 2-core CPU it took one to three minutes per model to build,
        then made a step 1.9x faster for the ResNet-18 classifier, 1.25x for the DCGAN and no
        faster for the VAE (benchmarks/train_throughput.py --compile). Checkpoints hold the plain
        modules' weights. For the modes that record CUDA graphs see :meth:`uses_cuda_graphs`."""
        return torch.compile(model, mode=self.config.compile_mode) if self.config.compile else model

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether the compiled models replay CUDA graphs (``--compile`` with a mode of
        :data:`dllab.config.CUDA_GRAPH_MODES` on a CUDA device).

        torch then keeps each graph's outputs in memory that the graph's next replay overwrites.
        :meth:`train_step` therefore tells torch where each step begins
        (``torch.compiler.cudagraph_mark_step_begin``), so that the outputs of the several calls of
        one step (the DCGAN calls its discriminator three times) stay valid until that step's
        backward passes and metrics are done, and no step reads a model output of an earlier one.
        The models are trained on batches of one shape (the training loaders drop the last partial
        batch), so each graph is recorded once; evaluation runs the plain modules.
        """
        return bool(self.config.compile) and self.config.compile_mode in CUDA_GRAPH_MODES \
            and self.device.type == "cuda"

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (identity when not distributed)."""
        if self.distributed:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training step: each :class:`Update` in turn. Returns detached scalar tensors to log
        (no host sync), or ``{}`` for a step known to be skipped.

        For each update: zero_grad, its loss, the finite check, backward, gradient clipping, the
        optimiser step, the scheduler step and the weight average. A non-finite loss skips that
        update and every update after it (their schedulers still step); updates before it keep
        their step.

        The finite check is made in one of two ways, with the same outcome:

        - on the device (:meth:`_step_on_device`), when every optimiser is fused and has taken a
          step: a flag tensor goes to the fused kernels as ``found_inf`` (the mechanism of torch's
          GradScaler), which leave the weights and the optimiser's state untouched when it is
          set; the buffers, the weight average and the logged metrics are masked by it. The host
          never waits for the device, so a GPU runs ahead of Python. The skips are counted on
          the device and read now and then (:meth:`_settle_skips`), which is also when too many
          in a row, at any time since the last read, stop the run;
        - on the host (:meth:`finite`, one host sync per update), for the first step (fused SGD
          must not start its momentum from a skipped step) and for unfused optimisers.
        """
        if self.uses_cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        self._backup_buffers()  # a skipped step restores them
        self._step_skipped = False
        batch = self.prepare(x, y)
        updates = self.declared_updates()
        if self._skip_on_device(updates):
            return self._step_on_device(batch, updates)
        logged: dict[str, torch.Tensor] = {}
        for i, update in enumerate(updates):
            update.optimizer.zero_grad(set_to_none=True)
            loss, metrics = update.loss(batch)
            if not self.finite(loss):
                self._skipped(updates[i:])
                return {}
            self._backward(loss, update)
            norm = self._clip(update)
            update.optimizer.step()
            if update.scheduler is not None:
                update.scheduler.step()
            if update.ema is not None:
                update.ema.update(update.module)
            logged.update(metrics)
            if update.grad_norm_key:
                logged[update.grad_norm_key] = norm.detach()
        return logged

    def _step_on_device(self, batch: dict, updates: list[Update]) -> dict[str, torch.Tensor]:
        """:meth:`train_step` with no host sync: see there."""
        logged: dict[str, torch.Tensor] = {}
        skip = None  # 1.0 from the first non-finite loss on (float32, as the fused kernels want it)
        skips = []  # each update's flag
        for update in updates:
            update.optimizer.zero_grad(set_to_none=True)
            loss, metrics = update.loss(batch)
            flat = loss.detach() if loss.dim() == 0 else loss.detach().sum()
            bad = torch.ne(flat * 0.0, 0.0).float()  # 0 * inf and 0 * nan are nan
            if self.distributed:  # every rank skips if any rank must
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            skip = bad if skip is None else torch.maximum(skip, bad)
            skips.append(skip)
            self._backward(loss, update)
            norm = self._clip(update)
            update.optimizer.found_inf = skip  # read by the fused kernels, as GradScaler sets it
            try:
                update.optimizer.step()
            finally:
                del update.optimizer.found_inf
            if update.scheduler is not None:
                update.scheduler.step()
            logged.update(metrics)
            if update.grad_norm_key:
                logged[update.grad_norm_key] = norm.detach()
        skipped = skip > 0
        self._restore_buffers(where=skipped)
        for update, flag in zip(updates, skips):  # after the buffers are restored: none is NaN
            if update.ema is not None:
                update.ema.update(update.module, skip=flag)
        if self._skips is None:  # skipped since the last read; in a row now; longest row since the read
            self._skips = torch.zeros(3, device=self.device)
        self._skips[:2].add_(skip)
        self._skips[1].mul_(skip)  # a good step ends the row
        torch.maximum(self._skips[2], self._skips[1], out=self._skips[2])
        if not logged:
            return {}
        keys = list(logged)
        values = torch.where(skipped, 0.0, torch.stack([logged[k].float().reshape(()) for k in keys]))
        return {**dict(zip(keys, values.unbind())), STEP_KEPT: 1.0 - skip}

    def _backward(self, loss: torch.Tensor, update: Update) -> None:
        """``loss.backward()``, computing gradients only for what the update's optimiser steps.

        A loss may run through another model: the DCGAN's generator loss runs through D. A plain
        backward would also compute D's weight gradients there, which D's next update throws away
        (the textbook loop does that work), and an R1 step would fill the real images' gradient.
        Naming the optimiser's parameters as ``inputs`` lets autograd skip both where torch's
        own backward kernels are told which gradients are wanted (the from-scratch layers'
        functions compute theirs regardless): 8 % fewer FLOPs in a DCGAN step
        (``benchmarks/backward_inputs.py``, docs/speed.md). Under DDP the same holds, provided
        that an update's loss runs through another update's model by that model's plain module
        (:meth:`plain`), not its DDP wrapper: a wrapper that ran expects a gradient for every
        parameter it used, and would wait for them in the next step.
        """
        params = [p for group in update.optimizer.param_groups for p in group["params"] if p.requires_grad]
        if params:
            loss.backward(inputs=params)
        else:
            loss.backward()

    def _skip_on_device(self, updates: list[Update]) -> bool:
        """Whether this step checks its losses on the device (see :meth:`train_step`)."""
        return all(u.optimizer.defaults.get("fused") and u.optimizer.state for u in updates)

    def _clip(self, update: Update) -> torch.Tensor | None:
        """``--grad-clip`` on the update's module; returns the gradient norm (before clipping,
        as torch returns it) when it is clipped or logged."""
        if self.config.grad_clip:
            return torch.nn.utils.clip_grad_norm_(update.module.parameters(), self.config.grad_clip)
        if update.grad_norm_key:
            return grad_norm(update.module)
        return None

    @staticmethod
    def _skipped(updates: list[Update]) -> None:
        """What a skipped update still does: its scheduler steps, to keep the schedule aligned
        with the step count, and its weight average counts the step for its warm-up (as on the
        device, where the average is updated with a zero weight)."""
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": meant
            warnings.simplefilter("ignore", UserWarning)
            for update in updates:
                if update.scheduler is not None:
                    update.scheduler.step()
                if update.ema is not None:
                    update.ema.updates += 1

    def _settle_skips(self) -> None:
        """Count the steps skipped on the device since the last call (one host sync), and stop
        the run when ``max_nonfinite`` steps in a row were skipped at any time since then.
        Called before every checkpoint, at the epoch's last step, and at log points at least
        :data:`SETTLE_EVERY` steps apart."""
        self._settled_at = self.step
        if self._skips is None:
            return
        skipped, streak, longest = (int(v) for v in self._skips.tolist())
        self._skips[0] = 0
        self._skips[2] = streak
        self.nonfinite_total += skipped
        self._nonfinite_run = max(streak, longest)
        self._raise_if_streak()
        self._nonfinite_run = streak

    def _raise_if_streak(self) -> None:
        if self._nonfinite_run >= self.max_nonfinite:
            raise NonFiniteLossError(
                f"{self._nonfinite_run} steps in a row had a non-finite loss (counted at step {self.step}); "
                "stopping. The last good checkpoint is kept; try a lower --lr or --precision fp32"
            )

    def finite(self, loss: torch.Tensor) -> bool:
        """False (and counted) for a NaN/inf loss, whose step the caller must then skip.

        A skipped step leaves the weights and optimiser state as they were, and the forward
        pass's changes to buffers (BatchNorm running statistics, which a NaN batch would poison)
        are undone. A step with several updates skips only what comes after the failed check:
        when the DCGAN's G loss is not finite, D has already taken its step of that batch and
        keeps it (its buffers are restored too); only G's step is skipped (the step still counts
        as one skipped step). Raises
        :class:`NonFiniteLossError` once ``max_nonfinite`` steps in a row were skipped. Under
        torchrun all ranks skip together if any rank's loss is not finite.
        """
        ok = bool(torch.isfinite(loss.detach()).all())
        if self.distributed:  # every rank must agree to skip, or DDP deadlocks
            ok = not self._any_rank(not ok)
        if ok:
            return True
        self._restore_buffers()
        if not self._step_skipped:  # count steps, not calls (a GAN step checks two losses)
            self._step_skipped = True
            self.nonfinite_total += 1
            self._nonfinite_run += 1
        if self._nonfinite_run >= self.max_nonfinite:
            raise NonFiniteLossError(
                f"{self._nonfinite_run} steps in a row had a non-finite loss (at step {self.step + 1}); "
                "stopping. The last good checkpoint is kept; try a lower --lr or --precision fp32"
            )
        return False

    def _backup_buffers(self) -> None:
        """Copy every module's buffers aside before a step (cheap: BatchNorm statistics only),
        into one flat tensor per dtype (one kernel each)."""
        if self._buffers is None:
            buffers = [b for m in self.modules().values() for b in unwrap(m).buffers()]
            buffers += [b for a in self.averages().values() for b in a.module.buffers()]
            self._buffers = {}
            for b in buffers:
                self._buffers.setdefault((b.dtype, b.device), []).append(b)
        self._buffer_copies = [torch.cat([b.detach().reshape(-1) for b in group])
                               for group in self._buffers.values()]

    @torch.no_grad()
    def _restore_buffers(self, where: torch.Tensor | None = None) -> None:
        """Put the buffers back as :meth:`_backup_buffers` found them: always, or where the 0-d
        boolean tensor ``where`` is true (decided on the device)."""
        for group, copy in zip(self._buffers.values(), self._buffer_copies):
            if where is not None:
                now = torch.cat([b.reshape(-1) for b in group])
                copy = torch.where(where, copy, now)
            torch._foreach_copy_(group, [c.view(b.shape) for c, b in zip(copy.split([b.numel() for b in group]), group)])

    def _any_rank(self, flag: bool) -> bool:
        """True if ``flag`` is True on any rank (one tiny all-reduce; just ``flag`` alone)."""
        if not self.distributed:
            return bool(flag)
        return self._max_over_ranks(1.0 if flag else 0.0) > 0

    def _max_over_ranks(self, value: float) -> float:
        """The largest ``value`` of all ranks: one all-reduce of a CPU flag on ``control_group()``,
        so that agreeing never waits for a GPU."""
        t = torch.tensor([value])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control)
        return t.item()

    def _mean_over_ranks(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """Means of the summed metrics over the kept steps (``sums[STEP_KEPT]``) of every rank, as
        Python floats (one host sync); ``{}`` when no step was kept. A metric of
        :attr:`sparse_metrics` is averaged over the kept steps that gave it (``sums[STEPS_OF + key]``)."""
        if not sums:
            return {}
        keys = [k for k in sums if k != STEP_KEPT and not k.startswith(STEPS_OF)]
        counted = [STEPS_OF + k for k in keys if STEPS_OF + k in sums]
        values = torch.stack([torch.as_tensor(sums[k], device=self.device).float().reshape(())
                              for k in (*keys, *counted, STEP_KEPT)])
        if self.distributed:  # values live on self.device already
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        *numbers, kept = values.tolist()
        steps = dict(zip(counted, numbers[len(keys):]))
        if not kept:
            return {}
        means = {}
        for k, total in zip(keys, numbers):
            n = steps.get(STEPS_OF + k, kept)
            if n:
                means[k] = total / n
        return means

    def _evaluate_on_rank0(self) -> dict:
        """``evaluate()`` on rank 0, its numbers sent to every rank (so all decide alike)."""
        if not self.distributed:
            return self.evaluate()
        box = [self.evaluate() if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def loader(self, split: str, *, shuffle: bool, augment: bool, drop_last: bool,
               batch_size: int | None = None):
        return self.data.loader(
            split, batch_size=batch_size or self.config.batch_size, shuffle=shuffle,
            augment=augment, scale=self.scale, device=self.device, drop_last=drop_last,
            seed=self.config.seed, rank=self.rank, world_size=self.world_size,
            channels_last=self.config.channels_last,
        )

    # ---- checkpointing --------------------------------------------------------------------
    def state(self) -> dict:
        """Everything a resume needs. Under torchrun every rank must call it (it gathers RNG states)."""
        rng = get_rng_state()
        rng_ranks = None
        if self.distributed:
            rng_ranks = [None] * self.world_size
            dist.all_gather_object(rng_ranks, rng)
        return {
            "kind": self.kind,
            "models": {**{k: unwrap(m).state_dict() for k, m in self.modules().items()},
                       **{k: a.module.state_dict() for k, a in self.averages().items()}},
            "ema_updates": {k: a.updates for k, a in self.averages().items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers().items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers().items()},
            "extra": self.extra_state(),
            "rng": rng,
            **({"rng_ranks": rng_ranks} if rng_ranks is not None else {}),
            "world_size": self.world_size,
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "best": self.best,
            "train_seconds": self.train_seconds,
            "images_seen": self.images_seen,
            "nonfinite_total": self.nonfinite_total,
            "history": self.history,
            "alarms": self.alarms_fired,
        }

    def load_state(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise CheckpointError(f"checkpoint is for a {state.get('kind')!r} run, not {self.kind!r}")
        for k, m in self.modules().items():
            unwrap(m).load_state_dict(state["models"][k])
        for k, a in self.averages().items():
            a.module.load_state_dict(plain_state_dict(_saved(state["models"], k, "weights")))
            a.updates = int(state.get("ema_updates", {}).get(k, state["step"]))
        for k, o in self.optimizers().items():
            o.load_state_dict(_saved(state["optimizers"], k, "optimiser state"))
        for k, s in self.schedulers().items():
            if state["schedulers"]:  # a kind may re-plan its schedule instead (see classifier)
                s.load_state_dict(_saved(state["schedulers"], k, "schedule"))
        self.load_extra_state(state.get("extra", {}))
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world_size and state["batch_in_epoch"] > 0:
            raise CheckpointError(
                f"the checkpoint was saved mid-epoch by {saved_world} process(es); resume it with "
                f"{saved_world} (now {self.world_size}), since the epoch's shards depend on that number")
        ranks = state.get("rng_ranks")
        if ranks is not None and len(ranks) == self.world_size:
            set_rng_state(ranks[self.rank])
        else:
            set_rng_state(state["rng"])
            if self.rank > 0:  # a different number of processes: fresh, distinct streams
                seed_everything(rank_seed(self.config.seed, self.rank, state["step"]))
        self.epoch = state["epoch"]
        self.step = state["step"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.best = state.get("best", {})
        self.train_seconds = state.get("train_seconds", 0.0)
        self.images_seen = state.get("images_seen", 0)
        self.nonfinite_total = state.get("nonfinite_total", 0)
        # a checkpoint from before the alarms has no history: its epochs count, with no numbers
        self.history = list(state.get("history", [{}] * int(state["epoch"])))
        self.alarms_fired = list(state.get("alarms", []))
        if self.history:  # an interrupted resume still reports the last epoch's test metrics
            self._last_test = {k: v for k, v in self.history[-1].items() if not k.startswith("train_")}

    def save(self, name: str = "last") -> None:
        """Write checkpoints/NAME.pt (rank 0; every rank must call it under torchrun).

        Refuses to write weights that are no longer finite (that would replace a good checkpoint
        with a useless one): raises :class:`NonFiniteLossError` instead.
        """
        self._settle_skips()
        state = self.state()
        bad = next((f"{module_name}.{key}" for module_name, sd in state["models"].items()
                    for key, value in sd.items()
                    if torch.is_tensor(value) and value.is_floating_point()
                    and not bool(torch.isfinite(value).all())), None)
        if self._any_rank(bad is not None):  # all ranks stop together
            raise NonFiniteLossError(
                f"{bad or 'a weight on another rank'} is no longer finite at step {self.step}; not "
                f"writing checkpoints/{name}.pt, the last good checkpoint is kept; try a lower --lr")
        self.run.save_checkpoint(name, state)

    # ---- the loop -------------------------------------------------------------------------
    def _on_signal(self, signum, frame):  # noqa: ARG002
        self._stop_signal = signum

    def _interrupt_now(self, signum, frame):  # noqa: ARG002
        # remembered too: the exception may land where it is swallowed (a weakref callback, a
        # library's `except Exception`), and the run must not then be written complete
        self._stop_signal = signum
        raise Interrupted(signum, self.run.path, self.kind)

    def _check_stop(self) -> None:
        signum = self._stop_signal
        if self.distributed:  # a signal may reach the ranks at different steps: stop together
            signum = int(self._max_over_ranks(float(signum or 0))) or None
        if signum is not None:
            self.save("last")
            raise Interrupted(signum, self.run.path, self.kind)

    def fit(self, resume: bool = False) -> dict:
        """Train for ``config.epochs`` epochs (continuing from last.pt with ``resume``).

        Returns the summary dict that is also written to summary.json, with ``status``
        "complete". A run that stops early still writes summary.json, with ``status``
        "interrupted" (SIGINT/SIGTERM: :class:`Interrupted`) or "failed" (any other error, named
        in ``error``), the epochs reached and planned, and the last test metrics; the exception
        is raised again. Running out of memory (a model or batch too large) raises
        :class:`OutOfMemory` with a one-line message; the last checkpoint, if any, is kept (a run
        without one begins again from the same command: :func:`dllab.runs.never_trained`).
        """
        try:
            return self._fit(resume)
        except Interrupted:
            self._write_unfinished("interrupted")
            raise
        except AlarmStop as e:
            self._write_unfinished("stopped", e)
            raise
        except KeyboardInterrupt as e:  # a signal while the models are built, before our handlers
            self._write_unfinished("interrupted")
            signum = getattr(e, "signum", signal.SIGINT)
            raise Interrupted(signum, self.run.path, self.kind, saved=self.run.has_checkpoint("last")) from None
        except Exception as e:
            if not is_out_of_memory(e):
                self._write_unfinished("failed", e)
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            where = f"at step {self.step + 1}" if self._built else "building the model"
            size = f" ({', '.join(self.size_flags)})" if self.size_flags else ""
            kept = ("the last checkpoint is kept" if self.run.has_checkpoint("last") else "the run has no "
                    "checkpoint, so the same command with them lower begins it again")
            error = OutOfMemory(
                f"out of memory {where} on {self.device} ({first[:200]}); lower --batch-size or the "
                f"model's size{size}; {kept}")
            self._write_unfinished("failed", error)
            raise error from e

    def _write_unfinished(self, status: str, error: BaseException | None = None) -> None:
        """summary.json of a run that stopped early: its status, how far it got, and why.

        What an earlier summary of the run held (the final numbers of a complete run resumed for
        more epochs, say) is kept, under the new status; a run that stopped before its checkpoint
        was read keeps the epochs and steps that summary gave.
        """
        if self.rank != 0 or (self._resuming and not self._loaded):
            return  # a resume that never read its checkpoint changed nothing: the run stays as it was
        try:
            previous = self.run.summary()
        except (OSError, ValueError):  # unreadable: write a fresh one
            previous = {}
        previous = previous if isinstance(previous, dict) else {}
        loaded = self.step > 0 or not previous
        try:
            self.run.write_summary({
                **{k: v for k, v in previous.items() if k not in ("status", "error")},
                **unfinished_summary(status, kind=self.kind, dataset=self.config.dataset,
                                     epochs=self.epoch if loaded else previous.get("epochs", 0),
                                     epochs_planned=self.config.epochs,
                                     steps=self.step if loaded else previous.get("steps", 0), error=error),
                **self._last_test, "best": self.best or previous.get("best", {}),
                "alarms": self.alarms_fired or previous.get("alarms", []),
            })
        except OSError:  # the disk that failed the run may refuse this too: the error is the news
            pass

    def _fit(self, resume: bool) -> dict:
        self.build()
        self._built = True
        if self.distributed and self.rank > 0:
            # rank 0 keeps the single-process stream; the others draw their own noise
            seed_everything(rank_seed(self.config.seed, self.rank))
        self._resuming = resume
        if resume:
            self.load_state(self.run.load_checkpoint("last", map_location=self.device))
            self._loaded = True
            self.run.truncate_metrics(self.step)
        changed = self.run.write_config()  # settings changed on resume are recorded once the run goes on
        if "epochs" in changed:  # the run now ends elsewhere: said even with --quiet (by rank 0, which writes)
            old, new = changed["epochs"]
            print(f"dllab {self.kind}: the run in {self.run.path} now plans {new} epochs, not {old} "
                  "(config.json records the change)", file=sys.stderr, flush=True)
        epochs = self.config.epochs
        log_every = self.config.log_every
        ckpt_every = self.config.checkpoint_every
        train_loader = self.loader("train", shuffle=True, augment=self.config.augment, drop_last=True)
        if len(train_loader) == 0:
            raise ValueError(
                f"batch size {self.config.batch_size} is larger than the training set "
                f"({len(self.data.train_y)} examples{' per rank' if self.distributed else ''}); "
                "lower --batch-size or raise --limit"
            )
        old_handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is signal.SIG_IGN:
                # started with it ignored (SIGINT under `cmd &` in a script): every other phase ignores
                # it too, as Python leaves it, so training does not take it up either
                continue
            try:
                old_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        test_metrics: dict = {}
        t_fit = time.perf_counter()
        try:
            while self.epoch < epochs:
                t_start = time.perf_counter()
                train_loader.set_epoch(self.epoch)
                sums: dict[str, torch.Tensor] = {}  # summed over the steps since the last log
                epoch_sums: dict[str, torch.Tensor] = {}
                alarm = f" [alarm: {', '.join(a['alarm'] for a in self.alarms_fired)}]" if self.alarms_fired else ""
                bar = progress(total=len(train_loader),
                               desc=f"{self.kind} epoch {self.epoch + 1}/{epochs}{alarm}",
                               quiet=self.quiet or self.rank != 0, initial=self.batch_in_epoch)
                t_epoch = time.perf_counter()
                for x, y in train_loader.iterate(start=self.batch_in_epoch):
                    metrics = self.train_step(x, y)
                    if not self._step_skipped:
                        self._nonfinite_run = 0
                    self.step += 1
                    self.batch_in_epoch += 1
                    self.images_seen += x.shape[0] * self.world_size
                    if metrics:  # the kept steps are counted on the device, not known on the host
                        metrics = {STEP_KEPT: 1.0, **{k: v.float() for k, v in metrics.items()}}
                        kept = metrics[STEP_KEPT]
                        for k, v in metrics.items():
                            for total in (sums, epoch_sums):
                                total[k] = total.get(k, 0) + v
                                if k in self.sparse_metrics:  # the mean over the steps that gave it
                                    total[STEPS_OF + k] = total.get(STEPS_OF + k, 0) + kept
                    bar.update(1)
                    if self.step % log_every == 0 or self.batch_in_epoch == len(train_loader):
                        # every log_every steps, and the epoch's last steps too
                        if (self.step - self._settled_at >= SETTLE_EVERY
                                or self.batch_in_epoch == len(train_loader)):
                            self._settle_skips()
                        record = self._mean_over_ranks(sums)
                        self.run.log({"split": "train", "step": self.step,
                                      "epoch": self.epoch + self.batch_in_epoch / len(train_loader),
                                      **record, **self.step_extras()})
                        bar.set_postfix({k: f"{v:.4g}" for k, v in list(record.items())[:3]})
                        sums = {}
                    if ckpt_every and self.step % ckpt_every == 0:
                        self.train_seconds += time.perf_counter() - t_epoch
                        t_epoch = time.perf_counter()
                        self.save("last")
                    self._check_stop()
                bar.close()
                self.train_seconds += time.perf_counter() - t_epoch
                self.epoch += 1
                self.batch_in_epoch = 0
                test_metrics = self._evaluate_on_rank0()
                self._last_test = {k: v for k, v in test_metrics.items() if not isinstance(v, (list, dict))}
                self.run.log({"split": "test", "step": self.step, "epoch": self.epoch,
                              **{k.removeprefix("test_"): v for k, v in test_metrics.items()}})
                if self._improved(test_metrics):
                    self.best = {"epoch": self.epoch, "step": self.step,
                                 self.best_metric: test_metrics[self.best_metric]}
                    self.save("best")
                train_means = self._mean_over_ranks(epoch_sums)
                self.history.append({**self._last_test, **{f"train_{k}": v for k, v in train_means.items()}})
                now = time.perf_counter()
                self._epoch_line(epochs, test_metrics, train_means, now - t_start, now - t_fit)
                fired = self._sound_alarms(bar)
                self.save("last")
                if self.rank == 0:
                    self.epoch_end(self.epoch, test_metrics)
                self._check_stop()
                if fired and self.config.on_alarm == "stop":
                    raise AlarmStop(fired[0]["alarm"], fired[0]["message"], self.run.path, self.kind)
            # The final phase (evaluation, analyses, figures) has no steps to stop between: a
            # signal stops it at once. last.pt holds the finished training, so --resume goes
            # straight back to this phase.
            for sig in old_handlers:
                signal.signal(sig, self._interrupt_now)
            if self._stop_signal is not None:
                raise Interrupted(self._stop_signal, self.run.path, self.kind)
            previous = self._previous_summary() if not test_metrics else {}
            if not test_metrics:  # resumed a run that had trained to the end: measure (again)
                test_metrics = self._evaluate_on_rank0()
            summary = self.summary(test_metrics)
            if self.rank == 0:
                summary.update(self.finish(test_metrics))
                if previous.get("status") == "complete":  # a finished run measured again (--tta, say):
                    summary["measured_again"] = self._measured_again(previous, test_metrics)  # said so
            if self._stop_signal is not None:  # a signal whose exception something swallowed
                raise Interrupted(self._stop_signal, self.run.path, self.kind)
            self.run.write_summary(summary)
            return summary
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            self.run.close()

    def _previous_summary(self) -> dict:
        """summary.json as it was before this process wrote one (``{}`` if missing or unreadable)."""
        try:
            previous = self.run.summary()
        except (OSError, ValueError):
            return {}
        return previous if isinstance(previous, dict) else {}

    @staticmethod
    def _measured_again(previous: dict, test_metrics: dict) -> dict:
        """When a finished run's test numbers were measured again on resume, and what they were
        before: the numbers training gave (``previous``, the finished run's summary, which
        metrics.jsonl's last test row also holds; kept from the first time when measured again
        more than once)."""
        before = previous.get("measured_again", {}).get("before", previous)
        return {"at": _dt.datetime.now().isoformat(timespec="seconds"),
                "before": {k: before[k] for k in test_metrics if k in before
                           and not isinstance(before[k], (list, dict))}}

    def _sound_alarms(self, bar) -> list[dict]:
        """Run the kind's alarm rules on the history; each alarm that fires for the first time is
        logged (``{"split": "alarm"}``), written under the progress bar, and returned."""
        already = {a["alarm"] for a in self.alarms_fired}
        fired = [{"alarm": name, "epoch": self.epoch, "step": self.step, "message": message}
                 for name, message in self.alarms(self.history) if message and name not in already]
        for i, alarm in enumerate(fired):
            self.alarms_fired.append(alarm)
            self.run.log({"split": "alarm", **alarm})
            said_by_the_stop = i == 0 and self.config.on_alarm == "stop"  # AlarmStop's line names it
            if self.rank == 0 and not said_by_the_stop:  # a warning, not progress: said with --quiet too
                bar.write(f"dllab {self.kind}: ALARM after epoch {self.epoch}: {alarm['message']}",
                          file=sys.stderr)
        return fired

    def _epoch_line(self, epochs: int, test_metrics: dict, train_means: dict, seconds: float,
                    elapsed: float) -> None:
        """One plain line on stderr after each epoch where no progress bar is drawn (a log file, a
        pipe, CI; see :func:`dllab.utils.progress_lines`): the epoch, the kind's :attr:`headline`
        test metrics (the epoch's mean training losses when it measured none, e.g. a DCGAN without
        a classifier), the epoch's seconds and those since training (re)started. Rank 0 only."""
        if self.rank != 0 or not progress_lines(self.quiet):
            return
        shown = {k: test_metrics[k] for k in self.headline if isinstance(test_metrics.get(k), (int, float))}
        if not shown:
            losses = [k for k in train_means if k.endswith("loss")] or list(train_means)
            shown = {f"train_{k}": train_means[k] for k in losses[:3]}
        numbers = "".join(f"  {k} {v:.4g}" for k, v in shown.items())
        print(f"dllab {self.kind}: epoch {self.epoch}/{epochs}{numbers}  {seconds:.1f} s "
              f"(elapsed {elapsed:.0f} s)", file=sys.stderr, flush=True)

    def step_extras(self) -> dict:
        """Values logged with every train record (e.g. learning rate)."""
        return {}

    def _improved(self, metrics: dict) -> bool:
        value = metrics.get(self.best_metric)
        if value is None or not math.isfinite(value):
            return False
        old = self.best.get(self.best_metric)
        if old is None:
            return True
        return value < old if self.best_mode == "min" else value > old

    def summary(self, test_metrics: dict) -> dict:
        params = {k: sum(p.numel() for p in unwrap(m).parameters()) for k, m in self.modules().items()}
        return {
            "status": "complete",
            "kind": self.kind,
            "dataset": self.config.dataset,
            **{k: v for k, v in test_metrics.items() if not isinstance(v, (list, dict))},
            "params": sum(params.values()) if len(params) != 1 else next(iter(params.values())),
            **({f"params_{k}": v for k, v in params.items()} if len(params) > 1 else {}),
            "epochs": self.epoch,
            "epochs_planned": self.config.epochs,
            "steps": self.step,
            "train_seconds": round(self.train_seconds, 2),
            "images_per_second": round(self.images_seen / self.train_seconds, 2)
            if self.train_seconds > 0 else None,
            "nonfinite_steps_skipped": self.nonfinite_total,
            "alarms": self.alarms_fired,
            "best": self.best,
            "device": str(self.device),
            "precision": precision_name(self.amp_dtype),
            "world_size": self.world_size,
        }

