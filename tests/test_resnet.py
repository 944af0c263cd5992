"""ResNet-18: shapes for every variant, equivalence with torchvision, parameter counts, training."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from dllab.models.resnet import BasicBlock, ResNet, ResNetConfig, num_parameters, resnet18

BACKENDS = ["torch", "scratch"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 threads made these small convolutions
    10-40x slower (threads spinning while other processes hold the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _expected_layer1_size(size: int, stem: str, maxpool: bool | None) -> int:
    """Spatial size entering layer1: ceil(H/2) for each stride-2 conv or pool in the stem."""
    use_pool = (stem == "imagenet") if maxpool is None else maxpool
    size = math.ceil(size / 2) if stem == "imagenet" else size
    return math.ceil(size / 2) if use_pool else size


# ----------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("stem,norm,maxpool,in_channels", list(itertools.product(
    ["cifar", "imagenet"], [True, False], [None, True, False], [1, 3])))
def test_output_shapes(stem, norm, maxpool, in_channels):
    torch.manual_seed(0)
    model = resnet18(num_classes=7, in_channels=in_channels, stem=stem, norm=norm,
                     maxpool=maxpool, width=4).eval()
    seen = {}
    model.layer1.register_forward_hook(lambda m, i, o: seen.__setitem__("layer1", o.shape))
    model.layer4.register_forward_hook(lambda m, i, o: seen.__setitem__("layer4", o.shape))
    for size in (28, 32, 64):
        x = torch.randn(2, in_channels, size, size)
        with torch.no_grad():
            out = model(x)
            feats = model.features(x)
        assert out.shape == (2, 7)
        assert feats.shape == (2, 32)
        assert torch.isfinite(out).all()
        s1 = _expected_layer1_size(size, stem, maxpool)
        assert seen["layer1"] == (2, 4, s1, s1)
        s4 = math.ceil(math.ceil(math.ceil(s1 / 2) / 2) / 2)
        assert seen["layer4"] == (2, 32, s4, s4)


@pytest.mark.parametrize("stem,norm", [("cifar", True), ("imagenet", False)])
def test_output_shapes_scratch(stem, norm):
    torch.manual_seed(0)
    model = resnet18(num_classes=7, in_channels=1, stem=stem, norm=norm, layers="scratch",
                     width=4, maxpool=True)
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_maxpool_defaults_and_ablation():
    assert isinstance(resnet18(stem="cifar", width=4).maxpool, nn.Identity)
    assert isinstance(resnet18(stem="imagenet", width=4).maxpool, nn.MaxPool2d)
    assert isinstance(resnet18(stem="imagenet", maxpool=False, width=4).maxpool, nn.Identity)
    pool = resnet18(stem="cifar", maxpool=True, width=4).maxpool
    assert isinstance(pool, nn.MaxPool2d)
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    conv = resnet18(stem="cifar", width=4).conv1
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))


def test_width_scales_every_stage():
    model = resnet18(width=3, num_classes=7)
    assert model.conv1.out_channels == 3
    assert [getattr(model, f"layer{i}")[1].conv2.out_channels for i in range(1, 5)] == [3, 6, 12, 24]
    assert model.fc.in_features == 24


# ----------------------------------------------------------------------------- torchvision

def _random_torchvision(num_classes: int = 1000) -> nn.Module:
    """torchvision's resnet18 with random (non-default) batch-norm affine and running stats."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=num_classes)
    g = torch.Generator().manual_seed(1)
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.rand(n, generator=g) - 0.5
            m.running_mean = torch.rand(n, generator=g) - 0.5
            m.running_var = torch.rand(n, generator=g) + 0.5
    return tv


@pytest.mark.parametrize("layers", BACKENDS)
def test_state_dict_matches_torchvision(layers):
    ours = resnet18(stem="imagenet", num_classes=1000, layers=layers).state_dict()
    theirs = torchvision.models.resnet18().state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("layers", BACKENDS)
def test_outputs_match_torchvision(layers):
    tv = _random_torchvision().double().eval()
    ours = resnet18(stem="imagenet", num_classes=1000, layers=layers).double()
    ours.load_state_dict(tv.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = tv(x)
        got = ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert expected.std() > 0.1  # the comparison is not between two near-zero tensors


@pytest.mark.parametrize("layers", BACKENDS)
def test_training_mode_matches_torchvision(layers):
    """Batch statistics, running-stat updates and every parameter gradient, float64."""
    tv = _random_torchvision(num_classes=7).double().train()
    ours = resnet18(stem="imagenet", num_classes=7, layers=layers).double().train()
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([1, 5])
    F.cross_entropy(tv(x), y).backward()
    F.cross_entropy(ours(x), y).backward()
    for (name, p), q in zip(tv.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-9, msg=name)
    for (name, b), c in zip(tv.named_buffers(), ours.buffers()):
        torch.testing.assert_close(c, b, msg=name)


@pytest.mark.parametrize("layers", BACKENDS)
def test_cifar_stem_matches_modified_torchvision(layers):
    """The cifar stem is torchvision's resnet18 with a 3x3 stride-1 conv1 and no max-pool."""
    tv = _random_torchvision(num_classes=7)
    tv.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    tv.maxpool = nn.Identity()
    tv = tv.double().eval()
    ours = resnet18(stem="cifar", in_channels=1, num_classes=7, layers=layers).double()
    ours.load_state_dict(tv.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=1e-10, atol=1e-10)


def test_parameter_counts():
    assert num_parameters(resnet18(stem="imagenet", num_classes=1000)) == 11_689_512
    assert num_parameters(torchvision.models.resnet18()) == 11_689_512
    assert num_parameters(resnet18(stem="cifar", num_classes=10)) == 11_173_962


def test_no_norm_state_dict_and_init():
    reference = resnet18(width=8, num_classes=7)
    with_bn = reference.state_dict()
    bn_names = {n for n, m in reference.named_modules() if isinstance(m, nn.BatchNorm2d)}
    conv_names = {n for n, m in reference.named_modules() if isinstance(m, nn.Conv2d)}
    model = resnet18(width=8, num_classes=7, norm=False)
    without = model.state_dict()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # Batch-norm entries are gone, every convolution gained a bias, the rest is unchanged.
    kept = {k for k in with_bn if k.rsplit(".", 1)[0] not in bn_names}
    assert set(without) == kept | {f"{n}.bias" for n in conv_names}
    assert all(with_bn[k].shape == without[k].shape for k in kept)
    assert len(conv_names) == 20 and len(bn_names) == 20
    # Every residual branch starts at zero, so each block starts as the identity.
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8
    assert all(b.conv2.weight.abs().sum() == 0 and b.conv2.bias.abs().sum() == 0 for b in blocks)
    assert all(b.conv1.weight.abs().sum() > 0 for b in blocks)


def test_zero_init_residual():
    model = resnet18(width=8, zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert all(b.bn2.weight.abs().sum() == 0 and b.bn1.weight.abs().sum() > 0 for b in blocks)
    default = resnet18(width=8)
    assert all((m.bn2.weight == 1).all() for m in default.modules() if isinstance(m, BasicBlock))


def test_rebuild_from_config_dict():
    model = resnet18(num_classes=7, in_channels=1, stem="imagenet", norm=False, maxpool=False,
                     width=4)
    cfg = dataclasses.asdict(model.config)
    assert cfg == {"num_classes": 7, "in_channels": 1, "stem": "imagenet", "layers": "torch",
                   "norm": False, "maxpool": False, "width": 4}
    rebuilt = ResNet(ResNetConfig(**cfg))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))


# ----------------------------------------------------------------------------- training

@pytest.mark.parametrize("norm", [True, False])
def test_sgd_steps_lower_the_loss(norm):
    torch.manual_seed(0)
    model = resnet18(num_classes=7, in_channels=1, norm=norm, width=8)
    x = torch.randn(16, 1, 28, 28)
    y = torch.arange(16) % 7
    # Without batch norm the net needs a smaller learning rate (see ResNet's docstring).
    opt = torch.optim.SGD(model.parameters(), lr=0.05 if norm else 0.01, momentum=0.9)
    losses = []
    for _ in range(10 if norm else 15):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < (0.7 if norm else 0.9) * losses[0], losses


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = resnet18(num_classes=7, width=8).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        got = model_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layers", BACKENDS)
@pytest.mark.parametrize("norm", [True, False])
def test_bf16_autocast_forward_backward(norm, layers):
    torch.manual_seed(0)
    model = resnet18(num_classes=7, in_channels=1, width=8, norm=norm, layers=layers).to(
        memory_format=torch.channels_last)
    x = torch.randn(4, 1, 28, 28).to(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = F.cross_entropy(out, torch.arange(4))
    assert out.dtype == torch.bfloat16 and out.shape == (4, 7)
    # Both passes are in train mode (batch statistics), so they compute the same function.
    torch.testing.assert_close(out.float(), reference, rtol=0.1, atol=0.1)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.conv1.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("norm", [True, False])
def test_scratch_channels_last_matches_torch_backend(norm):
    """Same weights, channels_last input, train mode: outputs and gradients agree (float64)."""
    torch.manual_seed(0)
    ref = resnet18(num_classes=7, width=4, norm=norm).double()
    ours = resnet18(num_classes=7, width=4, norm=norm, layers="scratch").double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref, ours = (m.to(memory_format=torch.channels_last) for m in (ref, ours))
    x = torch.randn(3, 3, 20, 20, dtype=torch.float64).to(memory_format=torch.channels_last)
    out_ref, out = ref(x), ours(x)
    torch.testing.assert_close(out, out_ref)
    out_ref.square().sum().backward()
    out.square().sum().backward()
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


# ----------------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("kwargs,fragment", [
    ({"stem": "resnet"}, "'resnet'"),
    ({"layers": "numpy"}, "'numpy'"),
    ({"width": 0}, "width"),
    ({"width": -3}, "-3"),
    ({"num_classes": 0}, "num_classes"),
    ({"in_channels": 0}, "in_channels"),
    ({"num_classes": 2.5}, "2.5"),
    ({"norm": "yes"}, "'yes'"),
    ({"maxpool": 1}, "maxpool"),
])
def test_bad_arguments_raise(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace(".", r"\.")):
        resnet18(**kwargs)


def test_wrong_input_channels_raise():
    model = resnet18(in_channels=1, width=4)
    with pytest.raises(ValueError, match=r"\(2, 3, 28, 28\)"):
        model(torch.randn(2, 3, 28, 28))
