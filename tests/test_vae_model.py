"""VAE model: config validation, shapes for every arch/size/channels/latent, sampling, rebuild."""

import dataclasses
import json

import pytest
import torch

from dllab.models.vae import VAE, VAEConfig


@pytest.mark.parametrize("arch", ["conv", "mlp"])
@pytest.mark.parametrize("image_size", [28, 32])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("latent_dim", [2, 16])
def test_shapes(arch, image_size, channels, latent_dim):
    torch.manual_seed(0)
    cfg = VAEConfig(arch=arch, image_size=image_size, in_channels=channels, latent_dim=latent_dim,
                    widths=(8, 16) if arch == "conv" else (32, 16), fc_dim=24)
    model = VAE(cfg)
    x = torch.rand(3, channels, image_size, image_size)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, latent_dim)
    loc, log_scale = model.decode(mu)
    assert loc.shape == x.shape and log_scale is None
    out = model(x)
    assert out["z"].shape == (3, latent_dim) and out["loc"].shape == x.shape
    samples = model.sample(5)
    assert samples.shape == (5, channels, image_size, image_size)
    assert samples.min() >= 0 and samples.max() <= 1
    rec = model.reconstruct(x)
    assert rec.shape == x.shape and rec.min() >= 0 and rec.max() <= 1
    assert model.log_px_given_z(x, mu).shape == (3,)


@pytest.mark.parametrize("variance", ["learned", "fixed"])
@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_gaussian_decoder(arch, variance):
    torch.manual_seed(0)
    cfg = VAEConfig(arch=arch, likelihood="gaussian", gaussian_variance=variance,
                    gaussian_sigma=0.2, gaussian_sigma_min=0.05, latent_dim=4, in_channels=3,
                    image_size=32, widths=(8, 16, 16) if arch == "conv" else (32,), fc_dim=16)
    model = VAE(cfg)
    z = torch.randn(6, 4) * 5
    mean, log_scale = model.decode(z)
    assert mean.shape == log_scale.shape == (6, 3, 32, 32)
    assert mean.min() >= 0 and mean.max() <= 1
    if variance == "fixed":
        want = torch.full_like(log_scale, torch.log(torch.tensor(0.2)))
        torch.testing.assert_close(log_scale, want)
    else:
        # the soft floor holds even for very negative raw outputs
        with torch.no_grad():
            last = model.decoder_conv[-1][0] if arch == "conv" else model.decoder_fc[-1]
            last.bias.fill_(-50.0)
        _, log_scale = model.decode(z)
        assert log_scale.min() >= torch.log(torch.tensor(0.05)) - 1e-6


def test_reparameterize_moments_and_generator():
    mu = torch.tensor([[1.0, -2.0]]).expand(20000, 2)
    logvar = torch.tensor([[0.0, 2 * torch.log(torch.tensor(3.0))]]).expand(20000, 2)
    z = VAE.reparameterize(mu, logvar, torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.mean(0), torch.tensor([1.0, -2.0]), atol=0.06, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([1.0, 3.0]), atol=0.05, rtol=0)
    z2 = VAE.reparameterize(mu, logvar, torch.Generator().manual_seed(0))
    assert torch.equal(z, z2)


def test_sample_temperature_and_determinism():
    torch.manual_seed(0)
    model = VAE(VAEConfig(arch="mlp", widths=(16,), latent_dim=3))
    a = model.sample(4, generator=torch.Generator().manual_seed(1))
    b = model.sample(4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # temperature 0 decodes z = 0 for every sample
    c = model.sample(4, temperature=0.0)
    torch.testing.assert_close(c, model.mean_image(model.decode(torch.zeros(4, 3))[0]))


def test_config_round_trip_rebuilds_same_model():
    torch.manual_seed(0)
    cfg = VAEConfig(latent_dim=5, arch="conv", widths=(8, 12), fc_dim=20, image_size=32,
                    in_channels=3, likelihood="gaussian", beta=4.0)
    model = VAE(cfg)
    blob = json.loads(json.dumps(dataclasses.asdict(cfg)))  # widths becomes a list
    rebuilt = VAE(VAEConfig(**blob))
    assert rebuilt.config == cfg
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt.reconstruct(x), model.reconstruct(x))


def test_default_widths_depend_on_arch():
    assert VAEConfig(arch="conv").widths == (32, 64)
    assert VAEConfig(arch="mlp").widths == (512, 256)


@pytest.mark.parametrize("kwargs, needle", [
    ({"arch": "resnet"}, "'resnet'"),
    ({"likelihood": "poisson"}, "'poisson'"),
    ({"gaussian_variance": "diag"}, "'diag'"),
    ({"binarize": "static"}, "'static'"),
    ({"latent_dim": 0}, "latent_dim=0"),
    ({"in_channels": -1}, "in_channels=-1"),
    ({"image_size": 30}, "image_size=30"),  # 30 is not divisible by 4
    ({"image_size": 28, "widths": (8, 8, 8)}, "image_size=28"),
    ({"widths": (8, 0)}, "widths=(8, 0)"),
    ({"beta": -1.0}, "beta=-1.0"),
    ({"free_bits": -0.5}, "free_bits=-0.5"),
    ({"kl_warmup_steps": -3}, "kl_warmup_steps=-3"),
    ({"gaussian_sigma": 0.0}, "gaussian_sigma=0.0"),
    ({"likelihood": "gaussian", "binarize": "dynamic"}, "'gaussian'"),
])
def test_bad_config_raises_naming_value(kwargs, needle):
    with pytest.raises(ValueError) as err:
        VAEConfig(**kwargs)
    assert needle in str(err.value)


def test_bad_input_shape_and_sample_args():
    model = VAE(VAEConfig(arch="mlp", widths=(8,), latent_dim=2))
    with pytest.raises(ValueError, match=r"\(2, 1, 32, 32\)"):
        model.encode(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="n=0"):
        model.sample(0)
    with pytest.raises(ValueError, match="temperature=-1"):
        model.sample(2, temperature=-1.0)
