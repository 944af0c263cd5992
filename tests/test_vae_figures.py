"""VAE figures: each writes a PNG that PIL opens; slerp's geometry; bad arguments raise."""

import math

import pytest
import torch
from PIL import Image

from dllab.figures.vae import (plot_interpolation, plot_manifold, plot_rate_distortion,
                               plot_reconstructions, plot_samples, plot_tsne, plot_vae_curves,
                               slerp)
from dllab.models.vae import VAE, VAEConfig


def _opens(path, min_w=200, min_h=150):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] >= min_w and im.size[1] >= min_h, im.size
        # not a blank canvas
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 50


@pytest.fixture(scope="module")
def model2():
    torch.manual_seed(0)
    return VAE(VAEConfig(arch="mlp", widths=(32,), latent_dim=2)).eval()


def _records(with_test_step=False):
    recs = []
    for epoch in range(3):
        for i in range(10):
            step = epoch * 10 + i
            recs.append({"split": "train", "step": step, "epoch": epoch, "loss": 200 - step,
                         "recon": 180 - step, "kl": 20 + 0.1 * step})
        test = {"split": "test", "epoch": epoch, "loss": 195 - 10 * epoch,
                "recon": 175 - 10 * epoch,
                "kl": 20.0, "elbo": -(196 - 10 * epoch)}
        if with_test_step:
            test["step"] = epoch * 10 + 9
        recs.append(test)
    return recs


@pytest.mark.parametrize("variant", ["steps", "test_step", "epochs_only"])
def test_plot_vae_curves(tmp_path, variant):
    recs = _records(with_test_step=variant == "test_step")
    if variant == "epochs_only":  # test epochs without train records: falls back to epochs
        recs = [r for r in recs if r["split"] == "test"] + [
            {"split": "train", "epoch": 0, "loss": 1.0, "recon": 1.0, "kl": 0.0}]
    _opens(plot_vae_curves(recs, tmp_path / "curves.png"), min_w=800)
    with pytest.raises(ValueError):
        plot_vae_curves([{"split": "val"}], tmp_path / "x.png")


def test_plot_reconstructions(tmp_path, model2):
    x = torch.rand(12, 1, 28, 28)
    _opens(plot_reconstructions(x, model2.reconstruct(x), tmp_path / "rec.png", nrow=5))
    with pytest.raises(ValueError, match=r"\(3, 1, 28, 28\)"):
        plot_reconstructions(x[:3], x[:4], tmp_path / "bad.png")


def test_plot_samples(tmp_path, model2):
    _opens(plot_samples(model2, tmp_path / "samples.png", n=16, temperatures=(0.5, 1.0, 1.5),
                        generator=torch.Generator().manual_seed(0)), min_w=500)


def test_plot_tsne_with_raw_panel_and_bad_perplexity(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(90) % 3
    z = torch.randn(90, 2, generator=g) + labels[:, None] * 4.0
    _opens(plot_tsne(z, labels, tmp_path / "tsne.png", perplexities=(5, 20), seed=0,
                     class_names=["a", "b", "c"]), min_w=800)
    with pytest.raises(ValueError, match="perplexity=90"):
        plot_tsne(z, labels, tmp_path / "bad.png", perplexities=(90,))


def test_plot_interpolation(tmp_path, model2):
    xa, xb = torch.rand(3, 1, 28, 28), torch.rand(3, 1, 28, 28)
    _opens(plot_interpolation(model2, xa, xb, tmp_path / "interp.png", steps=6,
                              labels_a=[0, 3, 4], labels_b=[1, 8, 9]))
    _opens(plot_interpolation(model2, xa[0], xb[0], tmp_path / "one.png", steps=4), min_h=100)


def test_plot_manifold_needs_2d(tmp_path, model2):
    _opens(plot_manifold(model2, tmp_path / "manifold.png", n=8))
    model16 = VAE(VAEConfig(arch="mlp", widths=(8,), latent_dim=16))
    with pytest.raises(ValueError, match="latent_dim=16"):
        plot_manifold(model16, tmp_path / "bad.png")


def test_plot_rate_distortion(tmp_path):
    rows = [{"beta": b, "test_kl": 30 / b, "test_recon": 80 + 10 * b} for b in (0.5, 1, 2, 4)]
    _opens(plot_rate_distortion(rows, tmp_path / "rd.png"))
    _opens(plot_rate_distortion([{"beta": 1, "kl": 3.0, "recon": 90.0}], tmp_path / "one.png"))
    with pytest.raises(ValueError, match="none of the keys"):
        plot_rate_distortion([{"beta": 1}], tmp_path / "bad.png")


def test_slerp_geometry():
    a = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [2.0, 2.0]])  # second pair is parallel: falls back to lerp
    t = torch.linspace(0, 1, 5)
    out = slerp(a, b, t)  # (2, 5, 2)
    torch.testing.assert_close(out[:, 0], a)
    torch.testing.assert_close(out[:, -1], b)
    # equal norms: the path stays on the circle of radius 2, at evenly spaced angles
    torch.testing.assert_close(out[0].norm(dim=-1), torch.full((5,), 2.0))
    angles = torch.atan2(out[0, :, 1], out[0, :, 0])
    torch.testing.assert_close(angles, t * math.pi / 2)
    torch.testing.assert_close(out[1], (1 - t)[:, None] * a[1] + t[:, None] * b[1])
