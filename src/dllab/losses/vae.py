"""The VAE objective: the negative evidence lower bound (ELBO), with beta, free bits and KL warm-up.

Normalisation, stated once and used everywhere in dllab: every term is a **sum over the pixels of
one image and over the latent dimensions**, then **averaged over the images of the batch**. So
``recon`` and ``kl`` are in nats per image; divide by D ln 2 (D = C * H * W) for bits per dimension
(``dllab.metrics.vae.bits_per_dim``). Nothing is divided by the number of pixels or latent dims.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dllab.models.vae import VAEConfig


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dynamic binarisation: one Bernoulli draw per pixel with probability x in [0, 1].

    Drawn afresh every time an image is seen in training, so the Bernoulli likelihood is a proper
    probability of binary data (the protocol of Salakhutdinov & Murray 2008 / Burda et al. 2016).
    The caller feeds the draw to the encoder and uses it as the target.
    """
    if generator is not None and generator.device != x.device:
        u = torch.rand(x.shape, generator=generator, device=generator.device).to(x.device)
    else:
        u = torch.rand(x.shape, generator=generator, device=x.device)
    return (u < x).to(x.dtype)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per latent dimension, (B, L), in nats.

    Closed form of Kingma & Welling (2014), "Auto-Encoding Variational Bayes", appendix B:
    -KL = 1/2 * sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2); here not yet summed over j.
    """
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def bernoulli_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log Bernoulli(target; sigmoid(logits)) summed over pixels, (B,), in nats.

    For binary targets this is a negative log-probability. For grey targets in [0, 1]
    (binarize="none") it is a cross-entropy that is not a normalised likelihood: it stays above
    zero even for a perfect reconstruction, by the targets' own binary entropy.
    """
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(),
                                              reduction="none").flatten(1).sum(1)


def gaussian_nll(mean: torch.Tensor, log_scale: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log N(target; mean, exp(log_scale)^2) summed over pixels, (B,): the exact log-density.

    Per pixel: 1/2 log(2 pi) + log sigma + (x - mean)^2 / (2 sigma^2). This is a *density* of
    continuous data, so it can be negative and is not comparable to Bernoulli nats or to the bits
    per dimension of discrete (8-bit) data without dequantisation.
    """
    mean, log_scale, target = mean.float(), log_scale.float(), target.float()
    z = (target - mean) * torch.exp(-log_scale)
    return (0.5 * math.log(2 * math.pi) + log_scale + 0.5 * z.pow(2)).flatten(1).sum(1)


def recon_nll(loc: torch.Tensor, log_scale: torch.Tensor | None,
              target: torch.Tensor) -> torch.Tensor:
    """-log p(target|z), (B,), from ``VAE.decode``'s (loc, log_scale); Bernoulli if no scale."""
    if loc.shape != target.shape:
        raise ValueError(f"decoder output shape {tuple(loc.shape)} != target shape "
                         f"{tuple(target.shape)}")
    if log_scale is None:
        return bernoulli_nll(loc, target)
    return gaussian_nll(loc, log_scale, target)


def kl_weight(beta: float, step: int | None, warmup_steps: int) -> float:
    """beta_eff = beta * min(1, step / warmup_steps): linear KL warm-up (annealing).

    Bowman et al. (2016), "Generating Sentences from a Continuous Space", and Sønderby et al.
    (2016), "Ladder Variational Autoencoders". ``step=None`` (evaluation) or ``warmup_steps=0``
    gives beta itself.
    """
    if step is None or warmup_steps <= 0:
        return float(beta)
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    return float(beta) * min(1.0, step / warmup_steps)


def vae_loss(out: dict, target: torch.Tensor, config: VAEConfig,
             step: int | None = None) -> dict[str, torch.Tensor]:
    """Negative ELBO of a batch, with beta, free bits and KL warm-up applied to the optimised loss.

    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)) (Kingma & Welling 2014, eq. 10), with the
    expectation estimated by the one sample ``out["z"]`` and the KL in closed form (appendix B).

    out: ``VAE.forward``'s dict (mu, logvar, loc, log_scale). target: (B, C, H, W) in [0, 1]; with
        binarize="dynamic" pass the binarised batch (``binarize``) that the encoder also saw.
    step: the optimiser step for KL warm-up; None (evaluation) means no warm-up.

    Returns tensors, each a mean over the B images of a per-image sum (see the module docstring):
      loss: recon + beta_eff * KL_fb, the quantity to minimise. KL_fb is the KL with free bits
            (Kingma et al. 2016, "Improved Variational Inference with Inverse Autoregressive
            Flow", the "free bits" objective): sum_j max(lambda, KL_j), where KL_j is the
            batch-averaged KL of latent dimension j and lambda = ``config.free_bits`` nats per
            dimension; a dimension below lambda gets no KL gradient. KL_fb = KL when lambda = 0.
      recon: -E_q[log p(x|z)] in nats per image.
      kl: the true KL(q(z|x) || p(z)) in nats per image (no free bits, no beta).
      kl_per_dim: (L,) batch-averaged KL of each latent dimension; sums to kl.
      elbo: -(recon + kl), the true bound, whatever beta, free bits or warm-up.
      beta: beta_eff, the KL weight used this step (a 0-d tensor).
    """
    recon_per_image = recon_nll(out["loc"], out["log_scale"], target)  # (B,)
    kl_matrix = gaussian_kl(out["mu"], out["logvar"])  # (B, L)
    recon = recon_per_image.mean()
    kl_per_dim = kl_matrix.mean(0)  # (L,)
    kl = kl_per_dim.sum()
    if config.free_bits > 0:
        kl_optimised = kl_per_dim.clamp(min=config.free_bits).sum()
    else:
        kl_optimised = kl
    beta_eff = kl_weight(config.beta, step, config.kl_warmup_steps)
    loss = recon + beta_eff * kl_optimised
    return {
        "loss": loss,
        "recon": recon,
        "kl": kl,
        "kl_per_dim": kl_per_dim,
        "elbo": -(recon + kl),
        "beta": torch.tensor(beta_eff, device=loss.device),
    }
