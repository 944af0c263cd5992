"""GAN losses on discriminator logits, and the discriminator regularisers that act on its inputs,
targets and slope (one-sided label smoothing, instance noise, DiffAugment, the R1 penalty).

Every loss is a mean over the batch. ``d_loss`` returns the sum of its real and fake parts, each
a batch mean, so the numbers match the usual DCGAN logs (pytorch/examples ``dcgan/main.py``
prints ``errD = errD_real + errD_fake``).

Reference values for the non-saturating BCE loss. At the equilibrium of the minimax game
(Goodfellow et al. 2014, Proposition 1 and Theorem 1: the optimal discriminator is
p_data / (p_data + p_g), and the game is solved at p_g = p_data, where it is 1/2 everywhere):
    D(x) = D(G(z)) = 1/2,
    D loss = -log(1/2) - log(1 - 1/2) = 2 ln 2 ~= 1.386  (real + fake parts, ln 2 each),
    G loss = -log(1/2) = ln 2 ~= 0.693                    (non-saturating form).
With one-sided label smoothing (real target t = 0.9) the optimal discriminator is
D*(x) = t p_data / (p_data + p_g) (Salimans et al. 2016, sec. 3.4), so at p_g = p_data it is
t/2 = 0.45 and the reference values move; ``EQUILIBRIUM`` holds the unsmoothed ones. The hinge
loss has no such probabilistic reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("bce", "hinge")

EQUILIBRIUM = {
    "d_real": 0.5,            # D(x) = sigmoid(real logit)
    "d_fake": 0.5,            # D(G(z))
    "d_loss": 2 * math.log(2),  # real + fake parts
    "d_loss_real": math.log(2),
    "d_loss_fake": math.log(2),
    "g_loss": math.log(2),
}
"""Theoretical values at the BCE equilibrium p_g = p_data (Goodfellow et al. 2014, Theorem 1)."""


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown GAN loss kind {kind!r}; expected one of {KINDS}")


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "bce",
           smooth: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Discriminator loss -> (loss, loss_real, loss_fake), loss = loss_real + loss_fake.

    kind="bce": Goodfellow et al. (2014), "Generative Adversarial Nets", eq. 1, as binary
        cross-entropy on logits: loss_real = -mean log sigmoid(real) against target 1 - smooth,
        loss_fake = -mean log(1 - sigmoid(fake)) against target 0.
    kind="hinge": Lim & Ye (2017), "Geometric GAN"; Miyato et al. (2018), "Spectral
        Normalization for GANs": loss_real = mean relu(1 - real),
        loss_fake = mean relu(1 + fake).
    smooth: one-sided label smoothing (Salimans et al. 2016, "Improved Techniques for Training
        GANs", sec. 3.4): real targets become 1 - smooth (0.1 gives the usual 0.9); fake targets
        stay 0. Defined for BCE only. With smoothing, loss_real cannot go below the entropy of
        the target, H(0.9) ~= 0.325 nats.
    """
    _check_kind(kind)
    if not (isinstance(smooth, (int, float)) and 0.0 <= smooth < 1.0):
        raise ValueError(f"smooth={smooth!r} must be in [0, 1)")
    if kind == "hinge" and smooth != 0:
        raise ValueError(f"label smoothing (smooth={smooth}) is defined for kind='bce' only, "
                         f"not for kind={kind!r}")
    if real_logits.dim() != 1 or fake_logits.dim() != 1:
        raise ValueError(f"logits must be 1-D (N,), got real {tuple(real_logits.shape)} and "
                         f"fake {tuple(fake_logits.shape)}")
    if kind == "bce":
        loss_real = F.binary_cross_entropy_with_logits(
            real_logits, torch.full_like(real_logits, 1.0 - smooth))
        loss_fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    else:
        loss_real = F.relu(1.0 - real_logits).mean()
        loss_fake = F.relu(1.0 + fake_logits).mean()
    return loss_real + loss_fake, loss_real, loss_fake


def g_loss(fake_logits: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """Generator loss on the discriminator's logits for G(z).

    kind="bce": the non-saturating loss -mean log D(G(z)) (Goodfellow et al. 2014, sec. 3: it
        gives strong gradients early, when D rejects fakes confidently and log(1 - D(G(z)))
        saturates). Equals ln 2 at the equilibrium D(G(z)) = 1/2.
    kind="hinge": -mean D(G(z)) on logits (Lim & Ye 2017; Miyato et al. 2018).
    """
    _check_kind(kind)
    if fake_logits.dim() != 1:
        raise ValueError(f"logits must be 1-D (N,), got {tuple(fake_logits.shape)}")
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    return -fake_logits.mean()


def r1_penalty(real_logits: torch.Tensor, real_inputs: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder, Geiger & Nowozin 2018, "Which Training Methods for GANs do actually
    Converge?", ICML, eq. 9): the mean over D's outputs of |grad_x D(x)|^2 on real images (x being
    all that one output read: an image, or a pack of them under PacGAN), kept
    differentiable (``create_graph``) so that adding ``gamma / 2`` times it to D's loss penalises
    D's slope on the data. ``real_inputs`` must be the tensor D read, with ``requires_grad``.
    The gradient is that of the sum of the logits, which is each output's own when the outputs do
    not mix samples; a D with batch norm in training mode (the DCGAN's default) or a minibatch-std
    map mixes them a little, and then each image's gradient also holds the other outputs' slopes
    through the batch statistics (Mescheder et al. and StyleGAN use Ds without batch norm).

    Near the data a discriminator with no such penalty can keep sharpening its boundary; the
    penalty makes the GAN's gradient field converge locally (their Theorem 4.1) instead of
    oscillating. In dllab's demo it is what lets the DCGAN reach the digits it missed: without it
    (with DiffAugment and a minibatch-std map) 7 or 8 of 10 classes; with gamma = 1 on every 4th
    step, 9 or 10 in each of 3 seeds, in fp32 and in bf16 (README's demo tables).
    """
    if real_logits.dim() != 1 or real_logits.shape[0] == 0:
        raise ValueError(f"real_logits must be 1-D and non-empty, got {tuple(real_logits.shape)}")
    if not real_inputs.requires_grad:
        raise ValueError("real_inputs does not require grad: pass the tensor D read, made with "
                         "requires_grad_(True) before D's forward")
    if real_inputs.dim() == 0 or real_inputs.shape[0] % real_logits.shape[0]:
        raise ValueError(f"{real_inputs.shape[0] if real_inputs.dim() else 0} real inputs do not split evenly "
                         f"into {real_logits.shape[0]} outputs (PacGAN packs whole groups of images)")
    (grad,) = torch.autograd.grad(real_logits.sum(), real_inputs, create_graph=True)
    per_image = grad.to(torch.promote_types(grad.dtype, torch.float32)).square().flatten(1).sum(1)
    # the mean over D's outputs of |grad|^2 over each one's whole input: with PacGAN (one logit per
    # pack of images) that is the per-image mean times the pack size
    return per_image.mean() * (real_inputs.shape[0] / real_logits.shape[0])


def instance_noise_std(step: int, initial: float, anneal_steps: int) -> float:
    """Std of the instance noise at optimiser step ``step``: ``initial`` at step 0, falling
    linearly to 0 at ``anneal_steps`` and staying 0 after (``anneal_steps=0``: always 0).

    Sønderby et al. (2017), "Amortised MAP Inference for Image Super-resolution" (ICLR): adding
    Gaussian noise to both real and generated inputs of D makes the two distributions overlap, so
    D cannot separate them perfectly and G keeps getting gradients; the noise is annealed to zero
    so the final model matches the clean data. ``initial`` is in the data's units (images in
    [-1, 1], so 0.1 is 5% of the range).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} must be a non-negative integer")
    if not (isinstance(initial, (int, float)) and initial >= 0 and math.isfinite(initial)):
        raise ValueError(f"initial={initial!r} must be a finite number >= 0")
    if isinstance(anneal_steps, bool) or not isinstance(anneal_steps, int) or anneal_steps < 0:
        raise ValueError(f"anneal_steps={anneal_steps!r} must be a non-negative integer")
    if anneal_steps == 0 or step >= anneal_steps:
        return 0.0
    return float(initial) * (1.0 - step / anneal_steps)


def add_instance_noise(x: torch.Tensor, std: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """x + std * N(0, I) (a new tensor; x itself when std == 0). Apply to the real AND the fake
    batch before D, with the same std (Sønderby et al. 2017)."""
    if not (isinstance(std, (int, float)) and std >= 0 and math.isfinite(std)):
        raise ValueError(f"std={std!r} must be a finite number >= 0")
    if std == 0:
        return x
    gen_device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype)
    return x + std * noise.to(x.device)


def diff_augment(x: torch.Tensor, *, translate: float = 0.125, cutout: float = 0.5,
                 background: float = -1.0) -> torch.Tensor:
    """DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN
    Training", NeurIPS): a random translation and a random cutout of a batch of D's inputs, made
    of differentiable operations so that G's gradient flows through them. Apply it to the real and
    the generated batch alike, in D's update and in G's: D then never sees an unaugmented image,
    cannot memorise a small training set, and G is not pushed to generate the augmentations.

    ``translate``: each image moves by up to that fraction of its size in each direction (1/8,
    the paper's), the uncovered border filled with ``background`` (-1: the black of images in
    [-1, 1]); ``cutout``: a square of that fraction of the size (1/2, the paper's), centred
    anywhere in the image, is set to 0. The draws come from torch's generator on ``x``'s device.
    """
    from dllab.data.augment import crop_flip

    b, _, h, w = x.shape
    if translate:
        pad = max(1, int(round(min(h, w) * translate)))
        top = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
        left = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
        no_flip = torch.zeros(b, dtype=torch.bool, device=x.device)
        x = crop_flip(x - background, top, left, no_flip, pad) + background  # padded with background
    if cutout:
        ch, cw = max(1, int(round(h * cutout))), max(1, int(round(w * cutout)))
        cy = torch.randint(0, h, (b, 1), device=x.device) - ch // 2
        cx = torch.randint(0, w, (b, 1), device=x.device) - cw // 2
        rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        in_rows = (rows >= cy) & (rows < cy + ch)  # (B, H)
        in_cols = (cols >= cx) & (cols < cx + cw)  # (B, W)
        x = x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0.0)
    return x
