"""DCGAN model, GAN losses, weight EMA and GAN figures."""

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
from PIL import Image

from dllab.figures.common import save_image_grid
from dllab.figures.gan import (plot_class_histogram, plot_gan_losses, plot_nearest_neighbours,
                               save_progress_gif, save_progress_strip)
from dllab.losses.gan import (EQUILIBRIUM, add_instance_noise, d_loss, g_loss,
                              instance_noise_std)
from dllab.engine import ema_update, make_ema
from dllab.models.dcgan import (DCGAN, DCGANConfig, Discriminator, Generator, ParamBudgetError,
                                check_budget, count_params)

SMALL = dict(nz=17, g_width=8, d_width=6)


def _bn_count(module):
    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())


# ----------------------------------------------------------------------------- model

@pytest.mark.parametrize("image_size", [28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_every_size_and_channel_count(image_size, channels):
    torch.manual_seed(0)
    cfg = DCGANConfig(image_size=image_size, channels=channels, **SMALL)
    g, d = Generator(cfg), Discriminator(cfg)
    z = torch.randn(3, 17)
    x = g(z)
    assert x.shape == (3, channels, image_size, image_size)
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(g(z[:, :, None, None]), x)  # (N, nz, 1, 1) is accepted too
    logits = d(x)
    assert logits.shape == (3,)
    assert torch.isfinite(logits).all()


def test_bad_config_and_inputs_raise_naming_the_value():
    with pytest.raises(ValueError, match="48"):
        DCGANConfig(image_size=48)
    with pytest.raises(ValueError, match="channels=2"):
        DCGANConfig(channels=2)
    with pytest.raises(ValueError, match="g_width=0"):
        DCGANConfig(g_width=0)
    cfg = DCGANConfig(**SMALL)
    with pytest.raises(ValueError, match=r"\(4, 16\)"):
        Generator(cfg)(torch.randn(4, 16))
    with pytest.raises(ValueError, match="32, 32"):
        Discriminator(cfg)(torch.randn(2, 1, 32, 32))


def test_paper_network_parameter_count_matches_layer_formula():
    # Radford et al.'s 64x64 RGB network with ngf = ndf = 64 (pytorch/examples dcgan): every conv
    # followed by BN has no bias; the output conv of G, the first conv of D and D's logit conv do.
    nz, ngf, ndf, c = 100, 64, 64, 3
    g = (nz * ngf * 8 * 16 + 2 * ngf * 8 + ngf * 8 * ngf * 4 * 16 + 2 * ngf * 4
         + ngf * 4 * ngf * 2 * 16 + 2 * ngf * 2 + ngf * 2 * ngf * 16 + 2 * ngf + ngf * c * 16 + c)
    d = (c * ndf * 16 + ndf + ndf * ndf * 2 * 16 + 2 * ndf * 2 + ndf * 2 * ndf * 4 * 16
         + 2 * ndf * 4 + ndf * 4 * ndf * 8 * 16 + 2 * ndf * 8 + ndf * 8 * 16 + 1)
    cfg = DCGANConfig(image_size=64, channels=3)
    assert count_params(Generator(cfg)) == g == 3576707
    assert count_params(Discriminator(cfg)) == d
    assert check_budget(cfg, 10**8) == {"generator": g, "discriminator": d, "total": g + d}


def test_budget_refusal_names_counted_and_allowed_numbers():
    cfg = DCGANConfig(image_size=32, channels=3, **SMALL)
    net = DCGAN(cfg)
    g, d = count_params(net.generator), count_params(net.discriminator)
    assert count_params(net) == g + d
    assert check_budget(cfg, g + d)["total"] == g + d  # exactly at the budget is allowed
    with pytest.raises(ParamBudgetError) as info:
        check_budget(cfg, g + d - 1)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in msg
    for number in (g + d, g, d, g + d - 1):
        assert str(number) in msg
    with pytest.raises(ValueError, match="max_params=0"):
        check_budget(cfg, 0)


def test_budget_check_of_a_huge_config_allocates_nothing():
    cfg = DCGANConfig(image_size=64, channels=3, g_width=2048, d_width=2048)  # ~1e10 params
    with pytest.raises(ParamBudgetError, match="max_params=1000000"):
        check_budget(cfg, 1_000_000)


def test_init_statistics():
    torch.manual_seed(0)
    cfg = DCGANConfig(image_size=64, channels=3, g_width=32, d_width=32)
    net = DCGAN(cfg)
    weights, bn_w = [], []
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            weights.append(m.weight.detach().flatten())
            if m.bias is not None:
                assert torch.all(m.bias == 0)
        elif isinstance(m, nn.BatchNorm2d):
            bn_w.append(m.weight.detach())
            assert torch.all(m.bias == 0)
    w, b = torch.cat(weights), torch.cat(bn_w)
    assert w.numel() > 10**5
    assert abs(w.std().item() - 0.02) < 0.0005 and abs(w.mean().item()) < 0.0005
    assert abs(b.mean().item() - 1.0) < 0.005 and abs(b.std().item() - 0.02) < 0.005
    # a different init_std is honoured
    g = Generator(dataclasses.replace(cfg, init_std=0.05))
    assert abs(g.blocks[0][0].weight.std().item() - 0.05) < 0.002


def test_batch_norm_switches_remove_batch_norm():
    for size in (28, 32, 64):
        cfg = DCGANConfig(image_size=size, **SMALL)
        n = cfg.num_stages
        assert _bn_count(Generator(cfg)) == n           # project + each hidden up block
        assert _bn_count(Discriminator(cfg)) == n - 1   # none on D's input layer
        assert _bn_count(Generator(dataclasses.replace(cfg, g_norm=False))) == 0
        assert _bn_count(Discriminator(dataclasses.replace(cfg, g_norm=False))) == n - 1
        assert _bn_count(Discriminator(dataclasses.replace(cfg, d_norm=False))) == 0
        assert _bn_count(Generator(dataclasses.replace(cfg, d_norm=False))) == n
    # without BN every conv gets a bias again
    g = Generator(DCGANConfig(g_norm=False, **SMALL))
    convs = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert all(m.bias is not None for m in convs)


def test_spectral_norm_discriminator():
    torch.manual_seed(0)
    cfg = DCGANConfig(image_size=32, channels=3, spectral_norm=True, d_norm=False, **SMALL)
    d = Discriminator(cfg)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == cfg.num_stages + 1
    assert all(nn.utils.parametrize.is_parametrized(m, "weight") for m in convs)
    # spectral norm adds buffers (u, v), not parameters
    plain = Discriminator(dataclasses.replace(cfg, spectral_norm=False))
    assert count_params(d) == count_params(plain)
    x = torch.randn(4, 3, 32, 32)
    for _ in range(10):  # power iterations run in train-mode forwards
        out = d(x)
    assert out.shape == (4,)
    d.eval()
    for m in convs:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert abs(sigma.item() - 1.0) < 0.05
    out.sum().backward()  # gradients flow to the raw weights
    assert all(m.parametrizations.weight.original.grad is not None for m in convs)


def test_one_adam_step_changes_both_networks():
    torch.manual_seed(0)
    cfg = DCGANConfig(image_size=28, **SMALL)
    net = DCGAN(cfg)
    g, d = net.generator, net.discriminator
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    before_g = [p.detach().clone() for p in g.parameters()]
    before_d = [p.detach().clone() for p in d.parameters()]
    real = torch.rand(8, 1, 28, 28) * 2 - 1
    fake = g(g.sample_noise(8))
    loss_d, _, _ = d_loss(d(real), d(fake.detach()))
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()
    loss_g = g_loss(d(fake))
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()
    for before, net_ in ((before_g, g), (before_d, d)):
        for p0, p in zip(before, net_.parameters()):
            # Adam's first step moves every parameter with a nonzero gradient by about lr
            assert not torch.equal(p0, p.detach())
            assert (p.detach() - p0).abs().max() <= 2e-4 * 1.01


def test_sample_noise_is_seeded_and_config_round_trips():
    cfg = DCGANConfig(**SMALL)
    g = Generator(cfg)
    a = g.sample_noise(5, torch.Generator().manual_seed(3))
    b = g.sample_noise(5, torch.Generator().manual_seed(3))
    assert a.shape == (5, 17) and torch.equal(a, b)
    net = DCGAN(cfg)
    rebuilt = DCGAN(DCGANConfig(**dataclasses.asdict(cfg)))
    rebuilt.load_state_dict(net.state_dict())
    z = torch.randn(2, 17)
    net.eval()
    rebuilt.eval()
    assert torch.equal(net(z), rebuilt(z))


# ----------------------------------------------------------------------------- EMA

def _tiny():
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_ema_update_math_parameters_and_buffers():
    torch.manual_seed(0)
    model, ema = _tiny(), make_ema(_tiny())
    assert all(not p.requires_grad for p in ema.parameters())
    model.train()
    model(torch.randn(6, 3))  # move model's running stats and num_batches_tracked
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema_update(ema, model, 0.9)
    for name, value in ema.state_dict().items():
        m = model.state_dict()[name]
        if value.dtype.is_floating_point:
            assert torch.allclose(value, 0.9 * before[name] + 0.1 * m, atol=1e-7), name
        else:
            assert torch.equal(value, m), name  # num_batches_tracked copied
    # decay 0 copies, decay 1 keeps
    ema_update(ema, model, 0.0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ema.state_dict().items())
    frozen = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema_update(ema, model, 1.0)
    assert all(torch.equal(v, frozen[k]) for k, v in ema.state_dict().items())


def test_ema_update_converges_to_a_fixed_model_geometrically():
    cfg = DCGANConfig(**SMALL)
    g = Generator(cfg)
    ema = make_ema(Generator(cfg))
    gap0 = (ema.to_image.weight - g.to_image.weight).abs().max()
    for _ in range(10):
        ema_update(ema, g, 0.5)
    gap = (ema.to_image.weight - g.to_image.weight).abs().max()
    assert torch.allclose(gap, gap0 * 0.5 ** 10, rtol=1e-3, atol=1e-9)


def test_ema_update_rejects_bad_input():
    with pytest.raises(ValueError, match="decay=1.5"):
        ema_update(_tiny(), _tiny(), 1.5)
    with pytest.raises(ValueError, match="keys"):
        ema_update(_tiny(), nn.Linear(3, 2), 0.9)


# ----------------------------------------------------------------------------- losses

def test_bce_losses_at_equilibrium():
    zero = torch.zeros(7)  # D(x) = D(G(z)) = sigmoid(0) = 1/2
    loss, real, fake = d_loss(zero, zero, "bce")
    assert math.isclose(loss.item(), 2 * math.log(2), rel_tol=1e-6)
    assert math.isclose(real.item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(fake.item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(g_loss(zero, "bce").item(), math.log(2), rel_tol=1e-6)
    assert EQUILIBRIUM["d_loss"] == 2 * math.log(2) and EQUILIBRIUM["g_loss"] == math.log(2)
    assert EQUILIBRIUM["d_real"] == EQUILIBRIUM["d_fake"] == 0.5


def test_bce_losses_match_the_formulas_with_smoothing():
    torch.manual_seed(0)
    r, f = torch.randn(11, dtype=torch.float64) * 3, torch.randn(11, dtype=torch.float64) * 3
    sr, sf = torch.sigmoid(r), torch.sigmoid(f)
    loss, real, fake = d_loss(r, f, "bce", smooth=0.1)
    want_real = -(0.9 * sr.log() + 0.1 * (1 - sr).log()).mean()
    want_fake = -(1 - sf).log().mean()
    assert torch.allclose(real, want_real) and torch.allclose(fake, want_fake)
    assert torch.allclose(loss, want_real + want_fake)
    assert torch.allclose(g_loss(f, "bce"), -sf.log().mean())
    # fakes are never smoothed
    assert torch.allclose(d_loss(r, f, "bce", smooth=0.0)[2], fake)


def test_non_saturating_generator_loss_keeps_its_gradient():
    # D confidently rejects the fakes: -log D(G(z)) still has gradient ~ -1 per sample (mean: -1/N)
    logits = torch.full((4,), -12.0, requires_grad=True)
    g_loss(logits, "bce").backward()
    assert torch.allclose(logits.grad, torch.full((4,), -0.25), atol=1e-5)


def test_hinge_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    loss, lr, lf = d_loss(real, fake, "hinge")
    assert math.isclose(lr.item(), (0 + 0.5 + 2) / 3, rel_tol=1e-6)
    assert math.isclose(lf.item(), (0 + 1 + 2) / 3, rel_tol=1e-6)
    assert math.isclose(loss.item(), lr.item() + lf.item(), rel_tol=1e-6)
    assert math.isclose(g_loss(fake, "hinge").item(), 1 / 3, rel_tol=1e-6)


def test_loss_arguments_are_checked():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="'wgan'"):
        d_loss(x, x, "wgan")
    with pytest.raises(ValueError, match="'wgan'"):
        g_loss(x, "wgan")
    with pytest.raises(ValueError, match="smooth=0.1"):
        d_loss(x, x, "hinge", smooth=0.1)
    with pytest.raises(ValueError, match="smooth=1.0"):
        d_loss(x, x, "bce", smooth=1.0)
    with pytest.raises(ValueError, match=r"\(3, 1\)"):
        d_loss(x[:, None], x, "bce")


def test_instance_noise_schedule_and_noise():
    assert instance_noise_std(0, 0.1, 100) == pytest.approx(0.1)
    assert instance_noise_std(50, 0.1, 100) == pytest.approx(0.05)
    assert instance_noise_std(100, 0.1, 100) == 0.0
    assert instance_noise_std(1000, 0.1, 100) == 0.0
    assert instance_noise_std(0, 0.1, 0) == 0.0
    for bad in (dict(step=-1, initial=0.1, anneal_steps=10),
                dict(step=0, initial=-1.0, anneal_steps=10),
                dict(step=0, initial=0.1, anneal_steps=-5)):
        with pytest.raises(ValueError):
            instance_noise_std(**bad)
    x = torch.zeros(20000)
    assert add_instance_noise(x, 0.0) is x
    a = add_instance_noise(x, 0.3, torch.Generator().manual_seed(0))
    b = add_instance_noise(x, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and abs(a.std().item() - 0.3) < 0.01
    with pytest.raises(ValueError, match="std=-0.1"):
        add_instance_noise(x, -0.1)


def test_minibatch_std_adds_the_spread_of_each_group():
    from dllab.models.dcgan import MinibatchStd

    layer = MinibatchStd(group=4)
    same = torch.randn(1, 3, 2, 2).expand(8, 3, 2, 2)  # a collapsed batch: no spread at all
    out = layer(same)
    assert out.shape == (8, 4, 2, 2) and torch.equal(out[:, :3], same)
    assert out[:, 3].abs().max() < 1e-3
    x = torch.randn(8, 3, 2, 2, dtype=torch.float64)
    out = layer(x)
    # images i and i + 2 and i + 4 and i + 6 form a group (stride N/G = 2)
    for i in range(8):
        group = x[i % 2::2]
        expected = (group.var(0, unbiased=False) + 1e-8).sqrt().mean()
        torch.testing.assert_close(out[i, 3], expected.expand(2, 2))
    assert layer(torch.randn(6, 3, 2, 2)).shape == (6, 4, 2, 2)  # groups of 3 when 4 does not divide
    d = Discriminator(DCGANConfig(d_width=8, g_width=8, minibatch_std=True))
    assert d(torch.randn(5, 1, 28, 28)).shape == (5,)
    assert d.to_logit.in_channels == 8 * 2 + 1


def test_pacgan_judges_packs_of_images():
    d = Discriminator(DCGANConfig(d_width=8, g_width=8, pack=2))
    assert d.blocks[0][0].in_channels == 2
    x = torch.randn(6, 1, 28, 28)
    assert d(x).shape == (3,)
    # a pack is two consecutive images: changing image 1 changes pack 0's logit only
    y = x.clone()
    y[1] += 1.0
    d.eval()
    a, b = d(x), d(y)
    assert a[0] != b[0] and torch.equal(a[1:], b[1:])
    with pytest.raises(ValueError, match="packs of 2"):
        d(torch.randn(5, 1, 28, 28))
    with pytest.raises(ValueError, match="pack=0"):
        DCGANConfig(pack=0)


def test_diff_augment_translates_and_cuts_out_differentiably():
    from dllab.losses.gan import diff_augment

    torch.manual_seed(0)
    x = torch.full((64, 1, 16, 16), -1.0)
    x[:, :, 6:10, 6:10] = 1.0  # a white square on black
    # translation only: the square moves by at most 2 pixels (1/8 of 16), whole, the rest black
    moved = diff_augment(x, cutout=0.0)
    assert moved.shape == x.shape
    assert torch.equal((moved == 1).sum((1, 2, 3)), torch.full((64,), 16))
    assert set(moved.unique().tolist()) == {-1.0, 1.0}
    rows = (moved[:, 0] == 1).any(2).float().argmax(1)  # first white row of each image
    assert rows.min() >= 4 and rows.max() <= 8 and len(rows.unique()) > 1  # 6 +- 2, and it varies
    # cutout only: an 8x8 square (1/2 of 16), clipped at the border, set to 0
    cut = diff_augment(x, translate=0.0)
    zeros = (cut == 0).sum((1, 2, 3))
    assert zeros.max() == 64 and zeros.min() >= 16 and (zeros < 64).any()
    assert torch.equal(cut[cut != 0], x[cut != 0])
    # gradients flow to the images through both
    g = torch.randn(4, 1, 16, 16, requires_grad=True)
    diff_augment(g).sum().backward()
    assert g.grad is not None and g.grad.abs().sum() > 0 and set(g.grad.unique().tolist()) <= {0.0, 1.0}


# ----------------------------------------------------------------------------- figures

def _opens(path, fmt):
    with Image.open(path) as im:
        assert im.format == fmt
        im.load()
        return im.size


def _records(n_epochs=3, steps_per_epoch=20):
    recs, step = [], 0
    for epoch in range(1, n_epochs + 1):
        for _ in range(steps_per_epoch):
            t = step / (n_epochs * steps_per_epoch)
            recs.append(dict(split="train", step=step, epoch=epoch, d_loss=1.4 - 0.5 * t,
                             d_loss_real=0.7, d_loss_fake=0.7 - 0.5 * t, g_loss=0.7 + t,
                             d_real=0.5 + 0.3 * t, d_fake_before=0.5 - 0.3 * t,
                             d_fake_after=0.45 - 0.3 * t, grad_norm_d=1.0, grad_norm_g=1.0))
            step += 1
    recs.append(dict(split="test", epoch=n_epochs, clf_fid=12.0))
    return recs


def test_plot_gan_losses_writes_png(tmp_path):
    assert _opens(plot_gan_losses(_records(), tmp_path / "losses.png"), "PNG")
    no_probs = [{k: v for k, v in r.items() if not k.startswith("d_fake") and k != "d_real"}
                for r in _records()]
    assert _opens(plot_gan_losses(no_probs, tmp_path / "hinge.png", loss_kind="hinge"), "PNG")
    with pytest.raises(ValueError, match="split='train'"):
        plot_gan_losses([dict(split="test", epoch=1)], tmp_path / "x.png")
    with pytest.raises(ValueError, match="'wgan'"):
        plot_gan_losses(_records(), tmp_path / "x.png", loss_kind="wgan")


def test_progress_strip_from_tensors_and_pngs(tmp_path):
    torch.manual_seed(0)
    batches = [torch.rand(16, 1, 28, 28) * 2 - 1 for _ in range(12)]
    w, h = _opens(save_progress_strip(batches, tmp_path / "strip.png", nrow=4), "PNG")
    assert w > 3 * h  # a horizontal strip
    paths = [save_image_grid(b, tmp_path / f"grid{i}.png", nrow=4, scale="tanh")
             for i, b in enumerate(batches[:3])]
    _opens(save_progress_strip(paths, tmp_path / "strip2.png", labels=["a", "b", "c"]), "PNG")
    with pytest.raises(ValueError, match="2 labels for 3 grids"):
        save_progress_strip(paths, tmp_path / "x.png", labels=["a", "b"])


def test_progress_gif_has_one_frame_per_batch(tmp_path):
    torch.manual_seed(0)
    batches = [torch.rand(8, 3, 32, 32) * 2 - 1 for _ in range(4)]
    path = save_progress_gif(batches, tmp_path / "progress.gif", nrow=4)
    with Image.open(path) as im:
        assert im.format == "GIF" and im.n_frames == 4 and im.info.get("loop") == 0
        assert min(im.size) >= 320
    with pytest.raises(ValueError, match="same size"):
        save_progress_gif([batches[0], batches[0][:4]], tmp_path / "bad.gif", nrow=4)


def test_class_histogram_and_nearest_neighbours_figures(tmp_path):
    hist = [50, 30, 15, 5, 0]
    _opens(plot_class_histogram(hist, None, list("abcde"), tmp_path / "hist.png"), "PNG")
    with pytest.raises(ValueError, match="4 class names"):
        plot_class_histogram(hist, None, list("abcd"), tmp_path / "x.png")
    torch.manual_seed(0)
    fake = torch.rand(4, 1, 28, 28) * 2 - 1
    nn3 = (torch.rand(4, 3, 1, 28, 28) * 255).to(torch.uint8)
    _opens(plot_nearest_neighbours(fake, nn3, tmp_path / "nn.png", distances=torch.rand(4, 3),
                                   neighbour_scale="uint8"), "PNG")
    _opens(plot_nearest_neighbours(fake, fake.flip(0), tmp_path / "nn1.png"), "PNG")
    with pytest.raises(ValueError, match="do not match"):
        plot_nearest_neighbours(fake, fake[:3], tmp_path / "x.png")


def test_r1_penalty_by_hand_and_its_gradient_reaches_d():
    """D(x) = sum_j w_j x_j^2: grad_x D = 2 w x, so R1 = mean_i sum_j 4 w_j^2 x_ij^2 and
    dR1/dw_j = mean_i 8 w_j x_ij^2 (float64). The penalty keeps its graph (create_graph), so D's
    own weights get its gradient, through convolutions and batch norm too."""
    from dllab.losses.gan import r1_penalty

    torch.manual_seed(0)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    penalty = r1_penalty((w * x.square()).sum(1), x)
    want = (4 * w.detach().square() * x.detach().square()).sum(1).mean()
    assert torch.allclose(penalty, want, rtol=1e-12)
    penalty.backward()
    assert torch.allclose(w.grad, (8 * w.detach() * x.detach().square()).mean(0), rtol=1e-12)
    # a linear D has a constant slope: R1 = |w|^2 for every batch
    lin = torch.randn(3, 4, 4, dtype=torch.float64)
    images = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(r1_penalty((images * lin).sum((1, 2, 3)), images), lin.square().sum())
    # the DCGAN's discriminator: its convolution weights get the penalty's gradient
    disc = Discriminator(DCGANConfig(**SMALL))
    real = torch.rand(8, 1, 28, 28).mul(2).sub(1).requires_grad_(True)
    r1_penalty(disc(real), real).backward()
    first = disc.blocks[0][0].weight.grad
    assert first is not None and first.abs().sum() > 0 and torch.isfinite(first).all()


def test_r1_penalty_rejects_what_has_no_slope():
    from dllab.losses.gan import r1_penalty

    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="requires_grad"):
        r1_penalty(x.sum(1), x)
    with pytest.raises(ValueError, match="1-D"):
        r1_penalty(x.requires_grad_(True).sum(), x)
    with pytest.raises(ValueError, match="4 real inputs do not split evenly into 3 outputs"):
        r1_penalty(x[:3].sum(1), x)  # 3 logits cannot each read a whole pack of the 4 images


def test_r1_penalty_under_pacgan_is_per_logit():
    """With PacGAN one logit reads a pack of images: R1 is |grad|^2 over the whole pack. A linear
    D summing w.x over a pack of 2 has slope w on each image: R1 = 2 |w|^2, not |w|^2."""
    from dllab.losses.gan import r1_penalty

    w = torch.randn(5, dtype=torch.float64)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    logits = (x @ w).reshape(3, 2).sum(1)  # packs of 2 images, one logit each
    assert torch.allclose(r1_penalty(logits, x), 2 * w.square().sum())
