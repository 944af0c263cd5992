"""ResNet-18 image classifier (CIFAR-10, MNIST, Fashion-MNIST, image folders).

SGD with Nesterov momentum (or AdamW), weight decay on weights only (not on norms and biases),
one-cycle or warm-up + cosine schedule, label smoothing, per-dataset augmentation, bf16 autocast
where the hardware has it, channels_last, optional weight EMA and test-time flip averaging.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dllab.config import (TrainConfig, from_mapping, nonnegative_float, positive_int, redefault,
                          setting, unit_float)
from dllab.engine import EMA, Trainer, Update, plain_state_dict
from dllab.train import MetricNames
from dllab.models.resnet import ResNet, ResNetConfig
from dllab.utils import optimizer_options, precision_name, resolve_precision

#: named recipes for ``--preset``: each gives the settings that the command line (or the Python
#: caller) leaves out; whatever is given explicitly wins.
PRESETS = {
    # ResNet-18 (width 64, CIFAR stem) on CIFAR-10 in 18 epochs, the recipe of the fast CIFAR-10
    # work (Page 2018, "How to train your ResNet"; Jordan 2024, airbench; hlb-cifar10) carried over
    # to a ResNet-18: batch 512 with the learning rate scaled linearly from 0.1 at batch 128
    # (Goyal et al. 2017), one-cycle with a fifth of the run warming up, Nesterov SGD, weight
    # decay 5e-4 on conv/linear weights only, label smoothing 0.1, crop + flip augmentation,
    # horizontal-flip test-time averaging, bf16 autocast where the hardware has it, channels_last.
    "cifar10-fast": dict(dataset="cifar10", width=64, stem="cifar", batch_size=512, epochs=18, lr=0.4,
                         optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4,
                         schedule="onecycle", warmup_epochs=4.0, label_smoothing=0.1, augment=True,
                         tta=True, channels_last=True, precision="auto", eval_batch_size=1024),
}


@dataclasses.dataclass
class ClassifierTrainConfig(TrainConfig):
    """``dllab train classifier``: every setting, its default, bounds and help."""

    epochs: int = redefault("epochs", 15)
    lr: float = redefault("lr", 0.1)
    optimizer: str = setting("sgd", "optimiser: SGD with momentum, or AdamW", choices=("sgd", "adamw"))
    momentum: float = setting(0.9, "SGD momentum", type=unit_float)
    nesterov: bool = setting(True, "Nesterov momentum for SGD (--no-nesterov: plain momentum)")
    weight_decay: float = setting(5e-4, "decoupled for AdamW; applied to conv/linear weights only, "
                                  "never norms or biases", type=nonnegative_float)
    schedule: str = setting("onecycle", "learning-rate schedule (cosine has a linear warm-up)",
                            choices=("onecycle", "cosine", "constant"))
    warmup_epochs: float = setting(1.0, "warm-up length (onecycle: the rise to the peak, at most half "
                                   "the run; cosine and constant: a linear warm-up)", type=nonnegative_float)
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy targets (0.1 is usual)",
                                     type=unit_float)
    ema: float = setting(0.0, "decay of an exponential moving average of the weights, used for "
                         "evaluation (e.g. 0.999; 0 = off)", type=unit_float)
    tta: bool = setting(False, "test-time horizontal-flip averaging in evaluation", resumable=True)
    stem: str = setting("cifar", "cifar: 3x3 stride-1 conv; imagenet: 7x7 stride-2 conv + max-pool",
                        choices=("cifar", "imagenet"))
    layers: str = setting("torch", "torch.nn layers or dllab's from-scratch Conv2d/MaxPool2d/BatchNorm2d",
                          choices=("torch", "scratch"))
    norm: bool = setting(True, "batch norm after each convolution (--no-norm: the ablation)")
    maxpool: str = setting("default", "max-pool after the stem: on, off, or default = on for the "
                           "imagenet stem and off for cifar", choices=("default", "on", "off"))
    width: int = setting(64, "channels of the first stage (64 = ResNet-18; smaller is faster on a CPU)",
                         type=positive_int)
    image_size: int | None = setting(None, "folder datasets: resize images to this size",
                                     type=positive_int, default_text="the images' own size")
    eval_batch_size: int = setting(512, "batch size of the test-set evaluation", type=positive_int,
                                   resumable=True)
    preset: str | None = setting(None, "a named recipe for every setting not given: cifar10-fast = "
                                 "ResNet-18 on CIFAR-10, batch 512, 18 epochs, bf16 + channels_last "
                                 "(README: A fast CIFAR-10 run)", choices=tuple(PRESETS), default_text="none")


CONFIG = ClassifierTrainConfig
METRICS = MetricNames(headline=("test_acc", "test_loss", "ece"), curves=("acc", "loss", "ece"))


def data_options(config: ClassifierTrainConfig) -> dict:
    return {"image_size": config.image_size}


def model_config(config: ClassifierTrainConfig, data) -> ResNetConfig:
    maxpool = {"default": None, "on": True, "off": False}[config.maxpool]
    return ResNetConfig(num_classes=data.num_classes, in_channels=data.in_channels,
                        stem=config.stem, layers=config.layers, norm=config.norm,
                        maxpool=maxpool, width=config.width)


def validate(config: ClassifierTrainConfig, data) -> None:
    """Refuse, before any folder is written, what the classifier could not train with."""
    from dllab.utils import dist_info

    if config.optimizer == "sgd" and config.nesterov and config.momentum == 0:
        raise ValueError("Nesterov momentum needs --momentum above 0: give --momentum or --no-nesterov")
    if config.sync_bn and config.layers == "scratch" and dist_info()[2] > 1:
        raise ValueError("--sync-bn converts torch.nn BatchNorm layers only; --layers scratch uses "
                         "dllab's from-scratch BatchNorm2d, which would stay per-rank: use "
                         "--layers torch or leave --sync-bn off")


def check_new_run(config: ClassifierTrainConfig) -> None:
    """Refuse a new run given a setting that its other settings would ignore (a ValueError naming
    both): SGD's momentum flags with AdamW. Only values other than the defaults can be seen here;
    a run that began before this check resumes as it is. Also a warm-up longer than a cosine or
    constant schedule's run, whose learning rate would never reach ``--lr`` (one-cycle's rise
    takes at most half the run, whatever --warmup-epochs says)."""
    if config.schedule != "onecycle" and config.warmup_epochs > config.epochs:
        raise ValueError(f"--warmup-epochs {config.warmup_epochs:g} is longer than the run (--epochs "
                         f"{config.epochs}): with --schedule {config.schedule} the learning rate would never "
                         f"reach --lr {config.lr:g}; give a warm-up of at most {config.epochs} epochs")
    if config.optimizer == "adamw":
        sgd_only = [flag for flag, changed in (("--momentum", config.momentum != CONFIG.momentum),
                                               ("--no-nesterov", config.nesterov != CONFIG.nesterov)) if changed]
        if sgd_only:
            raise ValueError(f"{' and '.join(sgd_only)} set{'s' if len(sgd_only) == 1 else ''} SGD's momentum, "
                             "and --optimizer adamw has none (its betas are torch's defaults): leave "
                             f"{' and '.join(sgd_only)} out, or use --optimizer sgd")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only; norms' scales/shifts and biases are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_scheduler(optimizer, config: ClassifierTrainConfig, steps_per_epoch: int):
    """One-cycle (Smith & Topin 2019), linear warm-up + cosine decay, or constant."""
    total = config.epochs * steps_per_epoch
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    kind = config.schedule
    if kind == "onecycle" and total < 4:  # too short for one-cycle's phases: warm-up + cosine
        kind = "cosine"
    if kind == "onecycle":
        # torch's OneCycleLR divides by (pct * total - 1): its warm-up must span 2+ steps
        pct = min(max(warmup / total, 0.01, 2 / total), 0.5)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=max(total, 2), pct_start=pct,
            anneal_strategy="cos", div_factor=25.0, final_div_factor=1e3,
            cycle_momentum=config.optimizer == "sgd")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_model(config: ClassifierTrainConfig, data, device: torch.device) -> ResNet:
    model = ResNet(model_config(config, data)).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def param_counts(config: ClassifierTrainConfig, data) -> dict[str, int]:
    """The ResNet's parameters (counted on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        return {"model": sum(p.numel() for p in ResNet(model_config(config, data)).parameters())}


def load_model(state: dict, *, average: bool = True) -> ResNet:
    """The classifier of a checkpoint (on the CPU, in eval mode): its weight average when it has
    one and ``average``, else its trained weights. Used by ``dllab eval``, :func:`dllab.load_run`
    and the DCGAN's classifier-feature metrics."""
    model = ResNet(ResNetConfig(**state["extra"]["model_config"]))
    models = state["models"]
    key = next((k for k in ("model_ema", "ema") if k in models), None) if average else None
    model.load_state_dict(plain_state_dict(models[key or "model"]))
    return model.eval()


class ClassifierTrainer(Trainer):
    kind = "classifier"
    config_class = ClassifierTrainConfig
    headline = METRICS.headline
    best_metric = "test_acc"
    best_mode = "max"
    scale = "standard"
    size_flags = ("--width",)

    def build(self) -> None:
        c = self.config
        self.amp_dtype = resolve_precision(c.precision, self.device)
        self.net = build_model(c, self.data, self.device)
        self.model = self.wrap(self.net)
        groups = param_groups(self.net, c.weight_decay)
        if c.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                                             **optimizer_options(self.device))
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=c.lr, **optimizer_options(self.device))
        self.steps_per_epoch = max(1, len(self.loader("train", shuffle=True, augment=False, drop_last=True)))
        self.scheduler = make_scheduler(self.optimizer, c, self.steps_per_epoch)
        self.ema = EMA(self.net, c.ema) if c.ema > 0 else None
        self.test_loader = self.loader("test", shuffle=False, augment=False, drop_last=False,
                                       batch_size=c.eval_batch_size)

    def modules(self):
        return {"model": self.net}

    def updates(self):
        return [Update("model", self.loss, self.optimizer, self.net, scheduler=self.scheduler,
                       ema=self.ema)]

    def loss(self, batch: dict):
        x, y = batch["x"], batch["y"]
        with self.autocast():
            logits = self.model(x)  # (B, num_classes)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.config.label_smoothing)
        return loss, {"loss": loss.detach(), "acc": (logits.detach().argmax(1) == y).float().mean()}

    def extra_state(self) -> dict:
        return {"model_config": dataclasses.asdict(self.net.config), "classes": list(self.data.classes),
                "mean": list(self.data.mean), "std": list(self.data.std), "image_size": self.data.image_size}

    def load_state(self, state: dict) -> None:
        """Resume; if ``--epochs`` changed, re-plan the schedule for the new length.

        The schedule is rebuilt for the new total and fast-forwarded to the current step, so
        from here on the learning rate follows the new plan (one-cycle: it jumps to where a run
        of the new length would be at this step). It is rebuilt after the optimiser's state is
        loaded, whose parameter groups replace the ones the new schedule set up (a run too short
        for one-cycle ran on warm-up + cosine, whose groups lack one-cycle's ``max_lr``).
        """
        replan = int(state.get("config", {}).get("epochs", self.config.epochs)) != self.config.epochs
        super().load_state({**state, "schedulers": {}} if replan else state)
        if replan:
            self.scheduler = make_scheduler(self.optimizer, self.config, self.steps_per_epoch)
            self.declared_updates()[0].scheduler = self.scheduler
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "step() before optimizer.step()"
                for _ in range(self.step):
                    self.scheduler.step()

    def step_extras(self) -> dict:
        return {"lr": self.optimizer.param_groups[0]["lr"]}

    def alarms(self, history):
        from dllab.metrics.alarms import classifier_divergence

        return [("diverged", classifier_divergence(history, self.data.num_classes))]

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.net

    def evaluate(self) -> dict:
        from dllab.metrics.classification import evaluate_classifier

        result = evaluate_classifier(self.eval_model(), self.test_loader, self.device,
                                     self.data.num_classes, tta_flip=self.config.tta,
                                     autocast_dtype=self.amp_dtype)
        self._last_eval = result
        return {"test_loss": result["test_loss"], "test_acc": result["test_acc"], "ece": result["ece"]}

    def epoch_end(self, epoch, test_metrics) -> None:
        from dllab.figures.classifier import plot_lr_schedule, plot_training_curves

        records = self.run.metrics()
        plot_training_curves(records, self.run.figure_path("curves.png"))
        plot_lr_schedule(records, self.run.figure_path("lr_schedule.png"))

    def finish(self, test_metrics) -> dict:
        # tta: whether the test numbers are flip-averaged (a finished run resumed with --tta changes them)
        return {**write_analysis(self.run, self._last_eval, self.data), "tta": self.config.tta}


def write_analysis(run, result: dict, data, prefix: str = "") -> dict:
    """Confusion matrix, reliability diagram and most confident mistakes; returns summary extras."""
    from dllab.figures.classifier import plot_confident_mistakes, plot_confusion_matrix, plot_reliability
    from dllab.metrics.classification import most_confident_mistakes

    plot_confusion_matrix(result["confusion"], data.classes, run.figure_path(f"{prefix}confusion_matrix.png"))
    plot_reliability(result["ece_bins"], run.figure_path(f"{prefix}reliability.png"))
    idx = most_confident_mistakes(result["probs"], result["targets"], k=16)
    if len(idx):
        images = data.test_x[idx]
        probs = result["probs"][idx]
        plot_confident_mistakes(images, result["targets"][idx], probs.argmax(1), probs.max(1).values,
                                data.classes, run.figure_path(f"{prefix}confident_mistakes.png"),
                                scale="uint8")
    per_class = result["per_class_acc"]
    return {"per_class_acc": {c: a for c, a in zip(data.classes, per_class)}}


#: the ``dllab eval`` options of this kind alone (those of every kind: checkpoint, device,
#: data_dir, batch_size, quiet); given for a run of another kind, they are refused
EVAL_OPTIONS = ("tta", "precision")


def evaluate_run(run, device: torch.device, options: dict) -> dict:
    """``dllab eval`` for a classifier run: metrics and figures from a checkpoint."""
    from dllab.data import load
    from dllab.metrics.classification import evaluate_classifier

    c = from_mapping(ClassifierTrainConfig, run.config)
    state = run.load_checkpoint(options.get("checkpoint", "best"), map_location="cpu")
    data = load(c.dataset, data_dir=options.get("data_dir") or c.data_dir, limit=c.limit,
                **data_options(c))
    model = load_model(state).to(device)
    loader = data.loader("test", batch_size=int(options.get("batch_size") or 256), shuffle=False,
                         augment=False, scale="standard", device=device, drop_last=False)
    precision = options.get("precision") or "run"
    amp_dtype = resolve_precision(c.precision if precision == "run" else precision, device)
    result = evaluate_classifier(model, loader, device, data.num_classes,
                                 tta_flip=bool(options.get("tta")), autocast_dtype=amp_dtype)
    extras = write_analysis(run, result, data, prefix="eval_")
    return {"checkpoint": options.get("checkpoint", "best"), "epoch": state["epoch"],
            "test_acc": result["test_acc"], "test_loss": result["test_loss"], "ece": result["ece"],
            "tta": bool(options.get("tta")), "precision": precision_name(amp_dtype), **extras}


TRAINER = ClassifierTrainer
