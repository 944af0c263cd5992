"""Variational autoencoder (beta-VAE) on MNIST-like images.

Minimises the negative ELBO (per-image sums, batch mean) with beta, KL warm-up and free bits;
logs reconstruction and KL separately; draws reconstructions, samples at several temperatures,
t-SNE of the latent means, interpolations and (for 2-D latents) the decoded manifold; measures
active units, k-NN accuracy of the latent means and, on request, the IWAE log-likelihood.
"""

from __future__ import annotations

import dataclasses

import torch

from dllab.config import (TrainConfig, from_mapping, nonnegative_float, nonnegative_int, positive_int,
                          redefault, setting)
from dllab.engine import Trainer, Update
from dllab.train import MetricNames
from dllab.models.vae import VAE, VAEConfig
from dllab.utils import optimizer_options, resolve_precision

@dataclasses.dataclass
class VAETrainConfig(TrainConfig):
    """``dllab train vae``: every setting, its default, bounds and help."""

    epochs: int = redefault("epochs", 10)
    precision: str = redefault("precision", "fp32")
    augment: bool = redefault("augment", False)
    latent_dim: int = setting(16, "dimensions of the latent code z", type=positive_int)
    arch: str = setting("conv", "encoder and decoder: convolutional, or MLP as in pytorch/examples",
                        choices=("conv", "mlp"))
    likelihood: str = setting("bernoulli", "p(x|z): Bernoulli (binary cross-entropy) or Gaussian",
                              choices=("bernoulli", "gaussian"))
    gaussian_variance: str = setting("learned", "for --likelihood gaussian: the decoder's variance",
                                     choices=("learned", "fixed"))
    beta: float = setting(1.0, "weight of the KL term (1 = the ELBO)", type=nonnegative_float)
    kl_warmup_steps: int = setting(0, "anneal the KL weight linearly from 0 to beta over this many steps",
                                   type=nonnegative_int)
    free_bits: float = setting(0.0, "nats per latent dimension below which the KL is not penalised",
                               type=nonnegative_float)
    binarize: str = setting("none", "dynamic: train on a fresh Bernoulli draw of each image every time",
                            choices=("none", "dynamic"))
    tsne_points: int = setting(2000, "test latents embedded by t-SNE at the end of training",
                               type=positive_int, resumable=True)
    iw_samples: int = setting(0, "importance samples for the final log-likelihood estimate (0: skip; "
                              "`dllab eval RUN --iw-samples 5000` measures it later)", type=nonnegative_int,
                              resumable=True)


CONFIG = VAETrainConfig
METRICS = MetricNames(
    headline=("test_elbo", "test_recon", "test_kl", "bits_per_dim", "active_units", "knn_acc",
              "iw_log_likelihood"),
    curves=("loss", "elbo", "recon", "kl", "active_units", "bits_per_dim"))


def data_options(config: VAETrainConfig) -> dict:
    return {}


#: t-SNE's perplexities for the final figure (van der Maaten & Hinton 2008 suggest 5 to 50)
TSNE_PERPLEXITIES = (5, 30, 50)


def tsne_perplexities(n: int) -> tuple[int, ...]:
    """The perplexities a t-SNE of ``n`` points can take (each must be below ``n``)."""
    return tuple(p for p in TSNE_PERPLEXITIES if p < n)


def validate(config: VAETrainConfig, data) -> None:
    """Refuse, before any folder is written, a final analysis that could not run."""
    n = min(config.tsne_points, len(data.test_y))
    if not tsne_perplexities(n):
        raise ValueError(f"t-SNE of {n} test points (--tsne-points {config.tsne_points}, "
                         f"{len(data.test_y)} test images) cannot take perplexity {TSNE_PERPLEXITIES[0]} "
                         f"or more: give at least {TSNE_PERPLEXITIES[0] + 1} points")


def model_config(config: VAETrainConfig, data) -> VAEConfig:
    return VAEConfig(latent_dim=config.latent_dim, in_channels=data.in_channels,
                     image_size=data.image_size, arch=config.arch, likelihood=config.likelihood,
                     gaussian_variance=config.gaussian_variance, beta=config.beta,
                     kl_warmup_steps=config.kl_warmup_steps, free_bits=config.free_bits,
                     binarize=config.binarize)


def param_counts(config: VAETrainConfig, data) -> dict[str, int]:
    """The VAE's parameters (counted on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        return {"model": sum(p.numel() for p in VAE(model_config(config, data)).parameters())}


def load_model(state: dict) -> VAE:
    """The VAE of a checkpoint (on the CPU, in eval mode); used by ``dllab eval`` and
    :func:`dllab.load_run`."""
    model = VAE(VAEConfig(**state["extra"]["model_config"]))
    model.load_state_dict(state["models"]["model"])
    return model.eval()


class VAETrainer(Trainer):
    kind = "vae"
    config_class = VAETrainConfig
    headline = METRICS.headline
    best_metric = "test_loss"
    best_mode = "min"
    scale = "unit"
    size_flags = ("--latent-dim",)

    def build(self) -> None:
        from dllab.losses.vae import binarize, vae_loss

        self._binarize, self._loss = binarize, vae_loss
        c = self.config
        self.amp_dtype = resolve_precision(c.precision, self.device)
        self.net = VAE(model_config(c, self.data)).to(self.device)
        self.model = self.wrap(self.net)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=c.lr, **optimizer_options(self.device))
        self.test_loader = self.loader("test", shuffle=False, augment=False, drop_last=False,
                                       batch_size=512)
        # fixed test images for the progress pictures, so epochs compare
        self.fixed_x = self.scaled(self.data.test_x[:32])

    def scaled(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return x_uint8.to(self.device).float() / 255.0

    def modules(self):
        return {"model": self.net}

    def updates(self):
        return [Update("model", self.loss, self.optimizer, self.net)]

    def extra_state(self) -> dict:
        return {"model_config": dataclasses.asdict(self.net.config), "classes": list(self.data.classes)}

    def loss(self, batch: dict):
        x = batch["x"]
        if self.net.config.binarize == "dynamic":
            x = self._binarize(x)
        with self.autocast():
            out = self.model(x)
        out = {k: (v.float() if torch.is_tensor(v) else v) for k, v in out.items()}
        losses = self._loss(out, x, self.net.config, step=self.step)
        return losses["loss"], {k: losses[k].detach() for k in ("loss", "recon", "kl", "beta")}

    def alarms(self, history):
        from dllab.metrics.alarms import posterior_collapse

        if self.step < self.config.kl_warmup_steps:  # the KL is not yet fully weighted
            return []
        return [("posterior_collapse", posterior_collapse(history, self.config.latent_dim))]

    def evaluate(self) -> dict:
        from dllab.metrics.vae import evaluate_vae

        result = evaluate_vae(self.net, self.test_loader, self.device, seed=self.config.seed)
        self._last_eval = result
        keys = ("test_loss", "test_elbo", "test_recon", "test_kl", "bits_per_dim", "active_units")
        return {k: result[k] for k in keys}

    def epoch_end(self, epoch, test_metrics) -> None:
        from dllab.figures.vae import plot_reconstructions, plot_vae_curves

        plot_vae_curves(self.run.metrics(), self.run.figure_path("curves.png"))
        with torch.no_grad():
            self.net.eval()
            rec = self.net.reconstruct(self.fixed_x)
        plot_reconstructions(self.fixed_x, rec, self.run.figure_path("reconstructions.png"))

    def finish(self, test_metrics) -> dict:
        return analyse(self.net, self.data, self.run, self.device, self.config,
                       iw_samples=self.config.iw_samples)


def analyse(model: VAE, data, run, device, config: VAETrainConfig, iw_samples: int = 0,
            prefix: str = "") -> dict:
    """Final VAE figures and latent-space numbers: samples, t-SNE, interpolation, k-NN, (IWAE)."""
    from dllab.figures.vae import plot_interpolation, plot_manifold, plot_samples, plot_tsne
    from dllab.metrics.vae import collect_latents, evaluate_vae, knn_accuracy

    model.eval()
    seed = config.seed
    gen = torch.Generator().manual_seed(seed)
    test_loader = data.loader("test", batch_size=512, shuffle=False, augment=False, scale="unit",
                              device=device, drop_last=False)
    train_loader = data.loader("train", batch_size=512, shuffle=False, augment=False, scale="unit",
                               device=device, drop_last=False)
    out: dict = {}
    if iw_samples > 0:
        result = evaluate_vae(model, test_loader, device, iw_samples=iw_samples,
                              iw_batch_size=1000, seed=seed)
        out.update({k: result[k] for k in result if k.startswith("iw_") or k.startswith("test_")})
        out["active_units"] = result["active_units"]
        out["kl_per_dim"] = result["kl_per_dim"]
    z_train, y_train = collect_latents(model, train_loader, device, seed=seed)
    z_test, y_test = collect_latents(model, test_loader, device, seed=seed)
    out["knn_acc"] = knn_accuracy(z_train, y_train, z_test, y_test, k=5)
    n = min(config.tsne_points, len(z_test))
    plot_tsne(z_test[:n], y_test[:n], run.figure_path(f"{prefix}tsne.png"), seed=seed,
              class_names=list(data.classes), perplexities=tsne_perplexities(n))
    plot_samples(model, run.figure_path(f"{prefix}samples.png"), generator=gen)
    # interpolate between the first test images of two different classes (several pairs)
    x_test = data.test_x.float() / 255.0
    pairs = []
    for a, b in [(0, 1), (3, 8), (4, 9), (5, 6)]:
        ia, ib = (data.test_y == a).nonzero(), (data.test_y == b).nonzero()
        if len(ia) and len(ib):
            pairs.append((int(ia[0]), int(ib[0])))
    if pairs:
        xa = x_test[[i for i, _ in pairs]].to(device)
        xb = x_test[[j for _, j in pairs]].to(device)
        plot_interpolation(model, xa, xb, run.figure_path(f"{prefix}interpolation.png"))
    if model.config.latent_dim == 2:
        plot_manifold(model, run.figure_path(f"{prefix}manifold.png"))
    out["protocol"] = protocol(model, data, iw_samples, seed, limit=config.limit)
    return out


def protocol(model: VAE, data, iw_samples: int, seed: int, limit: int | None = None) -> dict:
    """How the likelihood numbers were measured, so that they are compared only with like ones
    (grey-level MNIST-5k ELBOs are not binarised-MNIST ELBOs, nor a --limit run's with a full run's)."""
    cfg = model.config
    n = len(data.test_y)
    split = (f"{data.name} test, the first {n} images (--limit {limit})" if limit is not None
             else f"{data.name} test, all {n} images")
    return {
        "metrics": "test ELBO, reconstruction and KL in nats per image (per-image sums); bits/dim; "
                   + (f"IWAE bound with k={iw_samples} (Burda et al. 2016)" if iw_samples else "no IWAE bound"),
        "split": split,
        "pixels": ("dynamically binarised" if cfg.binarize == "dynamic" else "grey levels in [0, 1]")
                  + f", {cfg.likelihood} likelihood",
        "iw_samples": iw_samples,
        "noise_seed": seed,
    }


#: the ``dllab eval`` options of this kind alone (those of every kind: checkpoint, device,
#: data_dir, batch_size, quiet); given for a run of another kind, they are refused
EVAL_OPTIONS = ("iw_samples",)


def evaluate_run(run, device: torch.device, options: dict) -> dict:
    """``dllab eval`` for a VAE run: test ELBO terms, active units, k-NN, IWAE log p(x)."""
    from dllab.data import load
    from dllab.metrics.vae import evaluate_vae

    c = from_mapping(VAETrainConfig, run.config)
    state = run.load_checkpoint(options.get("checkpoint", "best"), map_location="cpu")
    data = load(c.dataset, data_dir=options.get("data_dir") or c.data_dir, limit=c.limit)
    model = load_model(state).to(device)
    loader = data.loader("test", batch_size=int(options.get("batch_size") or 256), shuffle=False,
                         augment=False, scale="unit", device=device, drop_last=False)
    result = evaluate_vae(model, loader, device, seed=c.seed)
    summary = {k: v for k, v in result.items() if k != "latent_variances"}
    summary.update(analyse(model, data, run, device, c, iw_samples=int(options.get("iw_samples") or 0),
                           prefix="eval_"))
    return {"checkpoint": options.get("checkpoint", "best"), "epoch": state["epoch"], **summary}


def sweep_figures(rows: list[dict], out) -> None:
    """The rate-distortion plot of a sweep (KL = rate vs reconstruction = distortion)."""
    from dllab.figures.vae import plot_rate_distortion

    plot_rate_distortion(rows, out / "rate_distortion.png")


TRAINER = VAETrainer
