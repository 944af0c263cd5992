"""DCGAN (Radford et al. 2016) on CIFAR-10, MNIST-like digits or Fashion-MNIST.

Adam(2e-4, betas (0.5, 0.999)) for both networks by default, non-saturating BCE or hinge loss,
one-sided label smoothing, instance noise, DiffAugment, the (lazy) R1 penalty, spectral norm in D,
two-time-scale learning rates and an EMA of the generator for sampling. Logs per step the D loss
on real and fake, the G loss, D(x), D(G(z)) before and after the D update, the R1 penalty (on
each step that computes it) and both gradient norms; renders a fixed noise batch every epoch;
measures quality and mode collapse in the feature space of a dllab classifier.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from dllab.config import (TrainConfig, from_mapping, nonnegative_float, nonnegative_int, path_text,
                          positive_float, positive_int, redefault, setting, unit_float)
from dllab.engine import EMA, Trainer, Update
from dllab.train import MetricNames
from dllab.models.dcgan import IMAGE_SIZES, DCGANConfig, Discriminator, Generator
from dllab.models.dcgan import param_counts as dcgan_param_counts
from dllab.utils import optimizer_options, resolve_precision

@dataclasses.dataclass
class DCGANTrainConfig(TrainConfig):
    """``dllab train dcgan``: every setting, its default, bounds and help."""

    epochs: int = redefault("epochs", 20)
    batch_size: int = redefault("batch_size", 64)
    lr: float = redefault("lr", 2e-4)
    precision: str = redefault("precision", "fp32")
    augment: bool = redefault("augment", False)
    log_every: int = redefault("log_every", 1)
    lr_d: float | None = setting(None, "discriminator learning rate (two-time-scale rule)",
                                 type=positive_float, default_text="--lr")
    beta1: float = setting(0.5, "Adam beta1 for both nets", type=unit_float)
    nz: int = setting(100, "noise dimension", type=positive_int)
    g_width: int = setting(64, "generator width (ngf)", type=positive_int)
    d_width: int = setting(64, "discriminator width (ndf)", type=positive_int)
    image_size: int | None = setting(None, "generated image size; the data is resized to it", type=int,
                                     choices=IMAGE_SIZES, default_text="the dataset's")
    no_g_norm: bool = setting(False, "ablation: no batch norm in the generator")
    no_d_norm: bool = setting(False, "no batch norm in the discriminator")
    spectral_norm: bool = setting(False, "spectral normalisation in D")
    loss: str = setting("bce", "bce = non-saturating GAN loss; hinge = Lim & Ye 2017", choices=("bce", "hinge"))
    label_smoothing: float = setting(0.0, "one-sided: real targets become 1 - this (bce only; 0.1 is usual)",
                                     type=unit_float)
    instance_noise: float = setting(0.0, "initial std of Gaussian noise added to D's inputs, annealed "
                                    "to 0 over --instance-noise-steps", type=nonnegative_float)
    instance_noise_steps: int = setting(0, "steps to anneal the instance noise to 0", type=nonnegative_int)
    minibatch_std: bool = setting(False, "a minibatch standard-deviation map before D's last layer "
                                  "(Karras et al. 2018): D sees how varied a batch is")
    pack: int = setting(1, "PacGAN (Lin et al. 2018): D judges packs of this many images, stacked as "
                        "channels (2 is usual; the batch size must be a multiple)", type=positive_int)
    diff_augment: bool = setting(False, "DiffAugment (Zhao et al. 2020): a random translation (1/8) "
                                 "and cutout (1/2) of every input of D, real and generated, in both "
                                 "updates; keeps D from memorising a small training set")
    r1: float = setting(0.0, "gamma of the R1 penalty, gamma/2 * E|grad D(x)|^2 on real images (Mescheder "
                        "et al. 2018; 1 in the demo, 10 in their paper); 0 = off", type=nonnegative_float)
    r1_every: int = setting(1, "lazy R1 (Karras et al. 2020, StyleGAN2): the penalty on every this-many D "
                            "steps only, times this many, so it costs 1/this as much (nothing without --r1)",
                            type=positive_int)
    ema: float = setting(0.0, "decay of an EMA of G's weights used for sampling (e.g. 0.999; 0 = off)",
                         type=unit_float)
    classifier_run: str | None = setting(None, "run folder of a dllab classifier on the same dataset: its "
                                         "features give per-epoch FID/precision/recall and class coverage "
                                         "(NOT Inception FID)", type=path_text,
                                         default_text="none: no quality metrics")
    eval_samples: int = setting(1000, "generated samples for the per-epoch and final metrics",
                                type=positive_int)
    fid_patience: int = setting(5, "alarm when the classifier-feature FID has not improved on its best "
                                "for this many epochs", type=positive_int, resumable=True)


CONFIG = DCGANTrainConfig
METRICS = MetricNames(
    headline=("clf_fid", "clf_precision", "clf_recall", "clf_modes_covered", "clf_kl_gen_data"),
    curves=("clf_fid", "clf_modes_covered", "clf_precision", "clf_recall", "clf_kl_gen_data"),
    cost=("params_generator", "params_discriminator", "epochs", "train_seconds", "images_per_second"))


def data_options(config: DCGANTrainConfig) -> dict:
    return {"image_size": config.image_size}  # the images are resized to the size G makes


def model_config(config: DCGANTrainConfig, data) -> DCGANConfig:
    if config.image_size is None and data.image_size not in IMAGE_SIZES:
        raise ValueError(f"the {config.dataset} images are {data.image_size}x{data.image_size}, a size the "
                         f"DCGAN does not make; give --image-size {', '.join(map(str, IMAGE_SIZES[:-1]))} or "
                         f"{IMAGE_SIZES[-1]} to resize them")
    return DCGANConfig(nz=config.nz, g_width=config.g_width, d_width=config.d_width,
                       image_size=config.image_size or data.image_size,
                       channels=data.in_channels, g_norm=not config.no_g_norm,
                       d_norm=not config.no_d_norm, spectral_norm=config.spectral_norm,
                       minibatch_std=config.minibatch_std, pack=config.pack)


def check_new_run(config: DCGANTrainConfig) -> None:
    """Refuse a new run given a setting that does nothing (a ValueError naming it): instance noise
    with no steps to anneal it over is no noise at all. (Steps with no noise, like --r1-every
    without --r1, stay allowed: `dllab sweep dcgan --instance-noise 0 0.1 --instance-noise-steps
    2000` is an ablation.) A run that began before this check resumes as it is."""
    if config.instance_noise and not config.instance_noise_steps:
        raise ValueError(f"--instance-noise {config.instance_noise:g} falls to 0 over --instance-noise-steps, "
                         "which is 0: no noise would be added; give --instance-noise-steps too (e.g. 2000)")


def validate(config: DCGANTrainConfig, data) -> None:
    """Refuse a bad config or an unusable --classifier-run before any run folder is written (the
    parameter budget is checked for every kind by :func:`dllab.train.check_param_budget`)."""
    if config.classifier_run:
        check_classifier_run(config.classifier_run, config.dataset)
    if config.batch_size % config.pack:
        raise ValueError(f"--batch-size {config.batch_size} is not a multiple of --pack {config.pack}")
    # settings that would fail at the first step are refused before anything is written (--r1-every
    # without --r1 does nothing, and is allowed: `dllab sweep dcgan --r1 0 1 --r1-every 4` is an ablation)
    if config.r1 and config.compile:
        raise ValueError("--r1 needs a double backward through D, which torch.compile does not do "
                         "(aot_autograd); leave out --compile or --r1")
    if config.label_smoothing and config.loss != "bce":
        raise ValueError(f"--label-smoothing {config.label_smoothing:g} is defined for --loss bce only, "
                         f"not --loss {config.loss}")


def check_classifier_run(path: str, dataset: str) -> None:
    """Refuse a classifier run whose features cannot score this DCGAN's images (a ValueError, or a
    RunFolderError when it is not a run): another kind, another dataset, no checkpoint, or no
    finished epoch. One that is not complete yet is used, and said on stderr."""
    from dllab.runs import Run

    clf = Run.open(path)
    if clf.kind != "classifier":
        raise ValueError(f"--classifier-run {clf.path} is a {clf.kind!r} run, not a classifier")
    if clf.config.get("dataset") != dataset:
        raise ValueError(f"--classifier-run {clf.path} was trained on {clf.config.get('dataset')!r}, "
                         f"not on {dataset!r}: its features would not describe these images")
    if not (clf.has_checkpoint("best") or clf.has_checkpoint("last")):
        raise ValueError(f"--classifier-run {clf.path} has no checkpoint yet")
    if not any(r.get("split") == "test" for r in clf.metrics()):
        raise ValueError(f"--classifier-run {clf.path} has not finished an epoch ({clf.status}): its "
                         "features would score the images by an untrained network; finish it with "
                         f"`dllab train classifier --resume --out {clf.path}`")
    if not clf.complete:  # an epoch or more: usable, and said (the protocol names its checkpoint)
        print(f"dllab dcgan: note: --classifier-run {clf.path} is {clf.status}, not complete: the quality "
              "metrics use the features it has learnt so far", file=sys.stderr, flush=True)


def param_counts(config: DCGANTrainConfig, data) -> dict[str, int]:
    """Parameters of G and D (counted on the meta device: nothing is allocated)."""
    counts = dcgan_param_counts(model_config(config, data))
    return {"generator": counts["generator"], "discriminator": counts["discriminator"]}


def load_model(state: dict, *, average: bool = True) -> Generator:
    """The generator of a checkpoint (on the CPU, in eval mode): its weight average when it has
    one and ``average``, else its trained weights. Used by ``dllab eval`` and
    :func:`dllab.load_run`."""
    generator = Generator(DCGANConfig(**state["extra"]["model_config"]))
    key = "generator_ema" if average and "generator_ema" in state["models"] else "generator"
    generator.load_state_dict(state["models"][key])
    return generator.eval()


class ClassifierFeatures:
    """A trained dllab classifier seen from GAN images in [-1, 1]: features and logits."""

    def __init__(self, run_path, device: torch.device):
        from dllab.runs import Run
        from dllab.train.classifier import load_model as load_classifier

        run = Run.open(run_path)  # checked by check_classifier_run
        from dllab.checkpoint import sha256_file

        name = "best" if run.has_checkpoint("best") else "last"
        state = run.load_checkpoint(name, map_location="cpu")
        extra = state["extra"]
        self.model = load_classifier(state).to(device)
        self.checkpoint = run.checkpoint_path(name)
        self.sha256 = sha256_file(self.checkpoint)
        self.averaged = any(k in state["models"] for k in ("model_ema", "ema"))
        self.mean = torch.tensor(extra["mean"], device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(extra["std"], device=device).view(1, -1, 1, 1)
        self.classes = extra["classes"]
        # the size it was trained on (a checkpoint of before it was recorded: its --image-size, if any)
        self.image_size = extra.get("image_size", run.config.get("image_size"))
        self.dataset = run.config.get("dataset")
        self.device = device
        self._reference: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _standard(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device).float()
        if self.image_size and x.shape[-1] != self.image_size:  # a DCGAN at --image-size 32 of 28px data
            x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                                antialias=True, align_corners=False)
        return ((x + 1) / 2 - self.mean) / self.std

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(self._standard(x))

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self._standard(x))

    @torch.no_grad()
    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from :meth:`features` (the classifier's last layer alone)."""
        return self.model.fc(features.to(self.device, torch.float32))

    def reference(self, data, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` training images in [-1, 1] and their features, computed once per
        (dataset, n) and kept: every epoch scores its samples against them."""
        from dllab.metrics.gan import apply_batched

        key = (data.name, n)
        if key not in self._reference:
            real = data.train_x[:n].float() / 127.5 - 1
            self._reference[key] = (real, apply_batched(self.features, real))
        return self._reference[key]


@torch.no_grad()
def generate(generator: Generator, n: int, seed: int, device: torch.device,
             batch_size: int = 500) -> torch.Tensor:
    """``n`` images from ``generator`` in eval mode, noise from a CPU generator seeded ``seed``."""
    was = generator.training
    generator.eval()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, batch_size):
        z = generator.sample_noise(min(batch_size, n - i), generator=gen, device=device)
        out.append(generator(z).float().cpu())
    generator.train(was)
    return torch.cat(out)


def protocol(clf: ClassifierFeatures, data, n: int, seed: int, sampler: str) -> dict:
    """How the classifier-feature metrics were measured: what a number needs beside it to be
    compared (FIDs disagree between tools when this goes unstated: pytorch-fid #11 and #118,
    StudioGAN #76)."""
    return {
        "metrics": "clf_fid (Frechet distance), clf_precision / clf_recall (Kynkaanniemi et al. 2019, "
                   "k=3), class coverage and KL",
        "feature_extractor": f"dllab classifier (NOT Inception): penultimate layer of {clf.checkpoint}"
                             f"{' (its weight average)' if clf.averaged else ''}",
        "feature_extractor_sha256": clf.sha256,
        "generated_samples": n,
        "generator": sampler,
        "reference_samples": min(n, len(data.train_y)),
        "reference_split": f"{data.name} train, the first {min(n, len(data.train_y))} images",
        "resize": (f"bilinear (antialiased) from {data.image_size}x{data.image_size} to the classifier's input "
                   f"size, {clf.image_size}x{clf.image_size}" if clf.image_size and clf.image_size != data.image_size
                   else f"none ({data.image_size}x{data.image_size}, the classifier's input size)"),
        "dtype": "float32 features, float64 statistics",
        "noise_seed": seed,
    }


def quality_metrics(generator, data, clf: ClassifierFeatures, n: int, seed: int, device) -> dict:
    """Classifier-feature FID, precision/recall, coverage and diversity of ``n`` samples vs train."""
    from dllab.metrics.gan import classifier_feature_metrics

    fake = generate(generator, n, seed, device)
    real, real_features = clf.reference(data, n)
    counts = torch.bincount(data.train_y, minlength=data.num_classes).double()
    return classifier_feature_metrics(clf.features, clf.logits, real, fake,
                                      data_class_probs=(counts / counts.sum()).tolist(),
                                      real_features=real_features, head_fn=clf.head)


class DCGANTrainer(Trainer):
    kind = "dcgan"
    config_class = DCGANTrainConfig
    headline = METRICS.headline
    best_metric = "clf_fid"
    best_mode = "min"
    scale = "tanh"
    size_flags = ("--g-width", "--d-width", "--nz")
    sparse_metrics = ("r1_penalty",)  # with --r1-every N, every Nth step only

    def build(self) -> None:
        from dllab.losses.gan import d_loss, g_loss

        self._d_loss, self._g_loss = d_loss, g_loss
        c = self.config
        self.amp_dtype = resolve_precision(c.precision, self.device)
        cfg = model_config(c, self.data)
        self.counts = dcgan_param_counts(cfg)
        self.gen = Generator(cfg).to(self.device)
        self.disc = Discriminator(cfg).to(self.device)
        # D runs three times per step (real, fake, fake again for G) before its graphs are used.
        # DDP's per-forward buffer broadcast copies rank 0's batch-norm statistics into D's
        # buffers; torch 2.4 and 2.11 bump their version counters doing so (2.14 preserves them),
        # and batch_norm saves running_mean/var for backward, so the real batch's graph failed
        # ("modified by an inplace operation"). D's running statistics are never used (D only
        # ever runs in training mode), so D does not broadcast them.
        self.G, self.D = self.wrap(self.gen), self.wrap(self.disc, broadcast_buffers=False)
        self.D_in_g = self.plain(self.disc)  # D in G's loss: under DDP, not expecting D's gradients
        betas = (c.beta1, 0.999)
        fused = optimizer_options(self.device)
        self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=c.lr, betas=betas, **fused)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=c.lr_d or c.lr, betas=betas, **fused)
        self.ema = EMA(self.gen, c.ema) if c.ema > 0 else None
        gen = torch.Generator().manual_seed(c.seed + 1)
        self.fixed_noise = self.gen.sample_noise(64, generator=gen, device=self.device)
        self.clf = ClassifierFeatures(c.classifier_run, self.device) if c.classifier_run else None

    def modules(self):
        return {"generator": self.gen, "discriminator": self.disc}

    def updates(self):
        """D's step on real and fake, then G's step against the updated D (Goodfellow et al. 2014,
        algorithm 1, with k = 1)."""
        return [Update("discriminator", self.d_loss, self.opt_d, self.disc, grad_norm_key="grad_norm_d"),
                Update("generator", self.g_loss, self.opt_g, self.gen, ema=self.ema,
                       grad_norm_key="grad_norm_g")]

    def extra_state(self) -> dict:
        return {"model_config": dataclasses.asdict(self.gen.config), "fixed_noise": self.fixed_noise.cpu(),
                "classes": list(self.data.classes)}

    def load_extra_state(self, state: dict) -> None:
        self.fixed_noise = state["fixed_noise"].to(self.device)

    def sampler(self) -> Generator:
        return self.ema.module if self.ema is not None else self.gen

    def prepare(self, x, y) -> dict:
        from dllab.losses.gan import instance_noise_std

        batch = super().prepare(x, y)
        batch["noise_std"] = instance_noise_std(self.step, self.config.instance_noise,
                                                self.config.instance_noise_steps)
        return batch

    def _d_input(self, images: torch.Tensor, batch: dict) -> torch.Tensor:
        """What D sees of a real or generated batch: DiffAugment'ed and noised as configured."""
        from dllab.losses.gan import add_instance_noise, diff_augment

        if self.config.diff_augment:
            images = diff_augment(images)
        return add_instance_noise(images, batch["noise_std"])

    def d_loss(self, batch: dict):
        """The discriminator's loss: maximise log D(x) + log(1 - D(G(z))), plus gamma/2 times the R1
        penalty with ``--r1 gamma``. Leaves G(z) in ``batch``."""
        from dllab.losses.gan import r1_penalty

        x = batch["x"]
        z = torch.randn(x.shape[0], self.gen.config.nz, device=self.device)
        with self.autocast():
            fake = self.G(z)
            real_in = self._d_input(x, batch)
            lazy = self.config.r1_every
            r1 = self.config.r1 * lazy if self.config.r1 and self.step % lazy == 0 else 0.0
            if r1:
                real_in = real_in.detach().requires_grad_(True)
            real_logits = self.D(real_in)
            fake_logits = self.D(self._d_input(fake.detach(), batch))
        loss_d, loss_real, loss_fake = self._d_loss(real_logits.float(), fake_logits.float(), self.config.loss,
                                                    smooth=self.config.label_smoothing)
        total, extra = loss_d, {}
        if r1:  # on the images as D read them, after --diff-augment and --instance-noise (StyleGAN2-ADA
            # differentiates through its augmentation to the clean image instead)
            penalty = r1_penalty(real_logits, real_in)
            total = loss_d + r1 / 2 * penalty
            extra["r1_penalty"] = penalty.detach()
        batch["fake"] = fake
        # d_loss is the GAN loss alone, comparable with its equilibrium value 2 ln 2; D minimises
        # d_loss + r1 / 2 * r1_penalty
        return total, {"d_loss": loss_d.detach(), "d_loss_real": loss_real.detach(),
                        "d_loss_fake": loss_fake.detach(),
                        "d_real": torch.sigmoid(real_logits.detach().float()).mean(),
                        "d_fake_before": torch.sigmoid(fake_logits.detach().float()).mean(), **extra}

    def g_loss(self, batch: dict):
        """The generator's non-saturating loss, maximise log D(G(z)), against the updated D."""
        with self.autocast():
            fake_logits_after = self.D_in_g(self._d_input(batch["fake"], batch))
        loss_g = self._g_loss(fake_logits_after.float(), self.config.loss)
        return loss_g, {"g_loss": loss_g.detach(),
                        "d_fake_after": torch.sigmoid(fake_logits_after.detach().float()).mean()}

    def alarms(self, history):
        from dllab.metrics.alarms import gan_divergence, mode_collapse, past_best

        rules = [("divergence", gan_divergence(history))]
        if self.clf is not None:  # coverage and FID need the classifier's features
            rules += [("mode_collapse", mode_collapse(history, len(self.clf.classes))),
                      ("past_best_fid", past_best(history, "clf_fid", self.config.fid_patience))]
        return rules

    def evaluate(self) -> dict:
        if self.clf is None:
            return {}
        m = quality_metrics(self.sampler(), self.data, self.clf, self.config.eval_samples,
                            self.config.seed, self.device)
        return {k: m[k] for k in ("clf_fid", "clf_precision", "clf_recall", "clf_modes_covered",
                                  "clf_kl_gen_data")}

    def epoch_end(self, epoch, test_metrics) -> None:
        from dllab.figures.common import save_image_grid
        from dllab.figures.gan import plot_gan_losses

        with torch.no_grad():
            g = self.sampler()
            was = g.training
            g.eval()
            images = g(self.fixed_noise).float().cpu()
            g.train(was)
        save_image_grid(images, self.run.figure_path(f"progress/epoch_{epoch:03d}.png"), nrow=8,
                        scale="tanh", title=f"fixed noise, epoch {epoch}")
        folder = self.run.path / "progress"  # the grids as tensors, for the strip and the GIF
        folder.mkdir(exist_ok=True)
        torch.save(images.to(torch.float16), folder / f"epoch_{epoch:03d}.pt")
        # the loss plot reads every step's record: about ten times a run (and at its end), not
        # every epoch, or a long run would spend more time drawing it than training
        every = max(1, self.config.epochs // 10)
        if epoch % every == 0 or epoch == self.config.epochs:
            plot_gan_losses(self.run.metrics(), self.run.figure_path("losses.png"),
                            loss_kind=self.config.loss)

    def finish(self, test_metrics) -> dict:
        return analyse(self.sampler(), self.data, self.run, self.device, self.config, self.clf,
                       n=self.config.eval_samples, counts=self.counts,
                       sampler="generator_ema" if self.ema is not None else "generator")


def progress_grids(run) -> list[torch.Tensor]:
    folder = run.path / "progress"
    return [torch.load(p, weights_only=True).float() for p in sorted(folder.glob("epoch_*.pt"))]


def analyse(generator, data, run, device, config: DCGANTrainConfig, clf: ClassifierFeatures | None,
            n: int, counts: dict | None = None, prefix: str = "", sampler: str = "generator") -> dict:
    """Final samples, progress strip/GIF, nearest training neighbours and the classifier metrics."""
    from dllab.figures.common import save_image_grid
    from dllab.figures.gan import (plot_class_histogram, plot_nearest_neighbours, save_progress_gif,
                                   save_progress_strip)
    from dllab.metrics.gan import nearest_neighbours

    seed = config.seed
    samples = generate(generator, 64, seed + 2, device)
    save_image_grid(samples, run.figure_path(f"{prefix}samples.png"), nrow=8, scale="tanh",
                    title="samples")
    grids = progress_grids(run)
    if grids and not prefix:
        save_progress_strip(grids, run.figure_path("progress_strip.png"))
        save_progress_gif(grids, run.figure_path("progress.gif"))
    # memorisation check: nearest training images (pixel space) of a few samples
    train = data.train_x.float() / 127.5 - 1
    idx, _ = nearest_neighbours(samples[:8].flatten(1), train.flatten(1), k=5)
    plot_nearest_neighbours(samples[:8], train[idx], run.figure_path(f"{prefix}nearest_neighbours.png"))
    out: dict = {}
    if counts:
        out.update({"params_generator": counts["generator"], "params_discriminator": counts["discriminator"]})
    if clf is not None:
        m = quality_metrics(generator, data, clf, n, seed, device)
        plot_class_histogram(m["clf_class_hist"], m["clf_data_probs"], clf.classes,
                             run.figure_path(f"{prefix}class_histogram.png"))
        out.update({k: v for k, v in m.items() if not isinstance(v, (list, dict))})
        out["clf_class_hist"] = m["clf_class_hist"]
        out["classifier_run"] = str(config.classifier_run)
        out["protocol"] = protocol(clf, data, n, seed, sampler)
    return out


#: the ``dllab eval`` options of this kind alone (those of every kind: checkpoint, device,
#: data_dir, batch_size, quiet); given for a run of another kind, they are refused
EVAL_OPTIONS = ("classifier", "inception_weights", "num_samples")


def evaluate_run(run, device: torch.device, options: dict) -> dict:
    """``dllab eval`` for a DCGAN run: samples, memorisation check, classifier-feature metrics and
    (with local weights) Inception FID/IS."""
    from dllab.data import load

    c = from_mapping(DCGANTrainConfig, run.config)
    state = run.load_checkpoint(options.get("checkpoint", "best"), map_location="cpu")
    data = load(c.dataset, data_dir=options.get("data_dir") or c.data_dir, limit=c.limit, **data_options(c))
    generator = load_model(state).to(device)
    key = "generator_ema" if "generator_ema" in state["models"] else "generator"
    clf_path = options.get("classifier") or c.classifier_run
    if clf_path:  # (the run's own too: it may have been replaced since)
        check_classifier_run(clf_path, c.dataset)
    clf = ClassifierFeatures(clf_path, device) if clf_path else None
    n = int(options.get("num_samples") or 5000)
    result = {"checkpoint": options.get("checkpoint", "best"), "epoch": state["epoch"],
              "sampler": key, "num_samples": n}
    result.update(analyse(generator, data, run, device, dataclasses.replace(c, classifier_run=clf_path),
                          clf, n=n, prefix="eval_", sampler=key))
    if options.get("inception_weights"):
        from dllab.metrics.gan import inception_metrics

        fake = generate(generator, n, c.seed, device)
        real = data.train_x[:n].float() / 127.5 - 1
        from dllab.checkpoint import sha256_file
        from dllab.metrics.gan import find_inception_weights

        result.update(inception_metrics(fake, real, weights_path=options["inception_weights"]))
        weights = find_inception_weights(options["inception_weights"])
        result["inception_protocol"] = {
            "feature_extractor": f"Inception-v3 (torch-fidelity's TF port) from {weights}",
            "feature_extractor_sha256": sha256_file(weights),
            "generated_samples": n, "generator": key, "reference_samples": int(real.shape[0]),
            "reference_split": f"{data.name} train, the first {int(real.shape[0])} images",
            "resize": "to 299x299 inside the network (bilinear), grey images repeated to RGB",
            "dtype": "uint8 images, float64 statistics", "noise_seed": c.seed}
    return result


TRAINER = DCGANTrainer
