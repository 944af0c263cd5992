"""VAE metrics: the IWAE estimator against the exact marginal likelihood of probabilistic PCA,
plus bits per dimension, active units, k-NN accuracy and evaluate_vae on a small VAE."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from dllab.metrics.vae import (active_units, bits_per_dim, collect_latents, evaluate_vae,
                               iwae_log_likelihood, knn_accuracy)
from dllab.models.vae import VAE, VAEConfig

D, L, SIGMA = 6, 3, 0.5
F64 = torch.float64


class PPCA:
    """z ~ N(0, I_L), x|z ~ N(Wz + b, sigma^2 I_D), so p(x) = N(b, W W^T + sigma^2 I) exactly.

    The encoder is deliberately imperfect: a diagonal Gaussian (the true posterior has full
    covariance) with a shrunk, shifted mean and inflated variances.
    """

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(D, L, generator=g, dtype=F64)
        self.b = torch.randn(D, generator=g, dtype=F64)
        M = self.W.T @ self.W + SIGMA ** 2 * torch.eye(L, dtype=F64)
        self.post_A = torch.linalg.solve(M, self.W.T)  # posterior mean = A (x - b)
        self.post_cov = SIGMA ** 2 * torch.linalg.inv(M)
        self.q_var = 1.5 * torch.diagonal(self.post_cov)

    def posterior_mean(self, x):
        return (x - self.b) @ self.post_A.T

    def encode(self, x):
        return 0.9 * self.posterior_mean(x) + 0.1, torch.log(self.q_var).expand(len(x), L)

    def log_px_given_z(self, x, z):
        return Normal(z @ self.W.T + self.b, SIGMA).log_prob(x).sum(-1)

    def sample(self, n, g):
        z = torch.randn(n, L, generator=g, dtype=F64)
        return z @ self.W.T + self.b + SIGMA * torch.randn(n, D, generator=g, dtype=F64)

    def log_px(self, x):
        cov = self.W @ self.W.T + SIGMA ** 2 * torch.eye(D, dtype=F64)
        return MultivariateNormal(self.b, cov).log_prob(x)

    def elbo(self, x):
        """Exact ELBO = log p(x) - KL(q(z|x) || p(z|x)), both Gaussians."""
        mu, logvar = self.encode(x)
        q = MultivariateNormal(mu, torch.diag_embed(logvar.exp()))
        post = MultivariateNormal(self.posterior_mean(x), self.post_cov)
        return self.log_px(x) - kl_divergence(q, post)


@pytest.fixture(scope="module")
def ppca_data():
    model = PPCA()
    # importance weights have finite variance: 2 * posterior precision - q precision > 0
    prec = 2 * torch.linalg.inv(model.post_cov) - torch.diag(1 / model.q_var)
    assert torch.linalg.eigvalsh(prec).min() > 0
    x = model.sample(20, torch.Generator().manual_seed(1))
    return model, x, model.log_px(x)


def test_iwae_converges_to_exact_ppca_log_likelihood(ppca_data):
    model, x, log_px = ppca_data
    errors, means = {}, {}
    for k in (1, 10, 100, 1000, 5000):
        # batch_size 2000 with 20 images: chunks of 100 samples, so k=5000 takes 50 chunks
        est = iwae_log_likelihood(model, x, k=k, batch_size=2000,
                                  generator=torch.Generator().manual_seed(2))
        assert est.shape == (20,) and est.dtype == F64
        errors[k] = (est - log_px).abs().mean().item()
        means[k] = (est - log_px).mean().item()
    ks = sorted(errors)
    assert all(errors[a] > errors[b] for a, b in zip(ks, ks[1:])), errors
    assert errors[5000] < 0.03, errors
    # a lower bound in expectation: clearly below for small k
    assert means[1] < -0.5 and means[10] < -0.1, means


def test_elbo_is_below_log_px_and_k1_estimates_average_to_it(ppca_data):
    model, x, log_px = ppca_data
    elbo = model.elbo(x)
    gap = log_px - elbo
    assert torch.all(gap > 0.05), gap  # the imperfect encoder leaves a real gap
    # many k=1 IWAE estimates of the same images average to the exact ELBO
    # one call on 400 copies of the 20 images: 400 independent single-sample estimates each
    reps = iwae_log_likelihood(model, x.repeat(400, 1), k=1, batch_size=10**5,
                               generator=torch.Generator().manual_seed(3)).view(400, 20)
    se = reps.std(0) / math.sqrt(len(reps))
    assert torch.all((reps.mean(0) - elbo).abs() < 4 * se + 1e-3), (reps.mean(0) - elbo, se)
    assert torch.all(reps.mean(0) < log_px)


def test_iwae_k1_equals_single_sample_elbo_term_on_vae():
    torch.manual_seed(0)
    model = VAE(VAEConfig(arch="mlp", widths=(32,), latent_dim=4, image_size=28)).double().eval()
    x = (torch.rand(3, 1, 28, 28, dtype=F64) > 0.5).double()
    got = iwae_log_likelihood(model, x, k=1, generator=torch.Generator().manual_seed(5))
    # redo the one-sample log-weight by hand with the same noise
    eps = torch.randn((1, 3, 4), generator=torch.Generator().manual_seed(5), dtype=F64)[0]
    mu, logvar = model.encode(x)
    z = mu + (0.5 * logvar).exp() * eps
    log_q = Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(1)
    log_pz = Normal(0.0, 1.0).log_prob(z).sum(1)
    bern = torch.distributions.Bernoulli(logits=model.decode(z)[0])
    log_px_z = bern.log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(got, log_px_z + log_pz - log_q)


def test_iwae_chunking_and_bad_args(ppca_data):
    model, x, log_px = ppca_data
    x, log_px = x[:4], log_px[:4]
    # one sample per pass (and an uneven last chunk of 5 = 2000 - 285 * 7) vs all 2000 at once:
    # both land on the exact value
    for batch_size in (1, 28, 10**6):
        est = iwae_log_likelihood(model, x, k=2000, batch_size=batch_size,
                                  generator=torch.Generator().manual_seed(batch_size))
        assert torch.all((est - log_px).abs() < 0.1), (batch_size, est - log_px)
    with pytest.raises(ValueError, match="k=0"):
        iwae_log_likelihood(model, x, k=0)


def test_bits_per_dim():
    assert bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)
    assert bits_per_dim(100.0, 784) == pytest.approx(100 / (784 * math.log(2)))
    with pytest.raises(ValueError, match="num_dims=0"):
        bits_per_dim(1.0, 0)


def test_active_units_counts_varying_means():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(1000, 4, generator=g) * torch.tensor([1.0, 0.05, 0.2, 0.001])
    count, var = active_units(mu)
    assert count == 2  # variances 1 and 0.04 exceed 0.01; 0.0025 and 1e-6 do not
    torch.testing.assert_close(var, mu.double().var(0, correction=0))
    assert active_units(mu, threshold=0.001)[0] == 3
    with pytest.raises(ValueError):
        active_units(torch.zeros(5))


def test_knn_accuracy_separable_and_random():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    z = torch.randn(200, 3, generator=g) * 0.1 + y[:, None].float() * 3
    assert knn_accuracy(z[:100], y[:100], z[100:], y[100:], k=5) == 1.0
    noise = torch.randn(200, 3, generator=g)
    assert 0.3 < knn_accuracy(noise[:100], y[:100], noise[100:], y[100:], k=5) < 0.7
    with pytest.raises(ValueError, match="k=0"):
        knn_accuracy(z, y, z, y, k=0)


def _loader(x, y, batch_size):
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


@pytest.mark.parametrize("binarize, likelihood", [("dynamic", "bernoulli"), ("none", "gaussian")])
def test_evaluate_vae_consistent_numbers(binarize, likelihood):
    torch.manual_seed(0)
    cfg = VAEConfig(arch="mlp", widths=(32,), latent_dim=3, likelihood=likelihood,
                    binarize=binarize, beta=2.0, free_bits=0.3)
    model = VAE(cfg)
    x = torch.rand(40, 1, 28, 28)
    y = torch.arange(40) % 4
    loader = _loader(x, y, 16)
    model.train()
    r = evaluate_vae(model, loader, "cpu", iw_samples=20, iw_max_images=24, seed=3)
    assert model.training  # mode restored
    assert r["num_images"] == 40 and r["num_dims"] == 784 and r["iw_num_images"] == 24
    assert r["test_elbo"] == pytest.approx(-(r["test_recon"] + r["test_kl"]))
    assert r["test_kl"] == pytest.approx(sum(r["kl_per_dim"]))
    fb = sum(max(0.3, v) for v in r["kl_per_dim"])
    assert r["test_loss"] == pytest.approx(r["test_recon"] + 2.0 * fb)
    assert r["bits_per_dim"] == pytest.approx(-r["test_elbo"] / (784 * math.log(2)))
    assert r["recon_bits_per_dim"] + r["kl_bits_per_dim"] == pytest.approx(r["bits_per_dim"])
    assert len(r["latent_variances"]) == 3 and 0 <= r["active_units"] <= 3
    assert all(isinstance(v, (int, float)) for k, v in r.items() if not isinstance(v, list))
    # same seed, same numbers
    assert evaluate_vae(model, loader, "cpu", seed=3)["test_elbo"] == r["test_elbo"]
    mu, labels = collect_latents(model, loader, "cpu", max_images=30)
    assert mu.shape == (30, 3) and torch.equal(labels, y[:30])
