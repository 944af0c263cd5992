"""dllab.layers against torch: values, gradients, running statistics, modules, errors, dispatch.

Everything is compared with the torch original on the same numbers (float64 unless the test is
about another dtype), micrograd-style.
"""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dllab.layers import BatchNorm2d, Conv2d, MaxPool2d
from dllab.layers import _workspace
from dllab.layers import functional as LF

DT = torch.float64


@pytest.fixture(params=["cpu", "cuda-paths"])
def device_paths(request, monkeypatch):
    """Run a test twice: as the CPU runs it, and through the paths a CUDA tensor takes.

    The layers ask ``_workspace.uses_cpu_paths`` before every CPU-only choice (the workspace,
    the one-pass variance, batch norm's sums of squares, emulated bf16 GEMMs). Answering False
    sends CPU tensors down the branches CUDA takes, so those are checked against torch on a
    machine without a GPU. (What only a GPU can show, kernels and streams, needs one:
    tests/test_cuda.py.)
    """
    if request.param == "cuda-paths":
        monkeypatch.setattr(_workspace, "uses_cpu_paths", lambda device: False)
    return request.param


def _leaves(*tensors):
    """Two independent leaf copies of each tensor (None stays None): one for dllab, one for torch."""
    a = [None if t is None else t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    b = [None if t is None else t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    return a, b


def _close(a, b, tol=1e-10):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _compare_fn(ours, theirs, inputs, grad_seed=0, tol=1e-10):
    """Forward values and every input gradient of ours(*inputs) vs theirs(*inputs)."""
    a, b = _leaves(*inputs)
    ya, yb = ours(*a), theirs(*b)
    _close(ya, yb, tol)
    g = torch.randn(yb.shape, dtype=yb.dtype, generator=torch.Generator().manual_seed(grad_seed))
    ya.backward(g)
    yb.backward(g)
    for ta, tb in zip(a, b):
        if ta is not None and ta.requires_grad:
            _close(ta.grad, tb.grad, tol)
    return ya, yb


# ----------------------------------------------------------------------------------------------
# conv2d

CONV_GRID = [
    # (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups, bias)
    (2, 3, 8, 8, 4, 3, 1, 1, 1, 1, True),
    (2, 3, 8, 8, 4, 3, 1, 0, 1, 1, False),
    (2, 4, 9, 7, 6, 3, 2, 1, 1, 1, True),
    (2, 4, 9, 7, 6, 3, 2, 1, 1, 2, True),
    (2, 4, 10, 10, 8, 1, 1, 0, 1, 1, True),
    (2, 4, 10, 10, 8, 1, 2, 0, 1, 1, False),
    (2, 4, 10, 10, 8, 1, 1, 1, 1, 1, True),  # 1x1 with padding: input grad via col2im
    (1, 4, 9, 9, 4, 3, 1, 1, 1, 4, True),  # depthwise
    (2, 4, 9, 9, 8, 3, 2, 1, 1, 4, False),  # depthwise, channel multiplier 2
    (2, 3, 11, 9, 5, (3, 2), (2, 1), (1, 0), (2, 1), 1, True),
    (2, 3, 11, 9, 5, (1, 4), (1, 3), (0, 2), 1, 1, True),
    (2, 3, 7, 7, 2, 5, 1, 2, 1, 1, True),
    (2, 3, 7, 7, 2, 5, 3, 2, 1, 1, True),
    (1, 2, 12, 12, 3, 3, 1, 2, 2, 1, True),
    (1, 2, 12, 12, 3, 3, 2, 3, 3, 1, True),  # padding larger than needed
    (2, 6, 6, 6, 6, 3, 1, "same", 1, 3, True),
    (2, 2, 6, 7, 3, (2, 4), 1, "same", 1, 1, True),  # even kernel: extra padding bottom/right
    (2, 2, 9, 9, 3, 3, 1, "same", (2, 3), 1, False),
    (2, 2, 6, 6, 3, 3, 2, "valid", 1, 1, True),
    (2, 3, 5, 5, 4, 5, 1, 0, 1, 1, True),  # kernel as large as the input: 1x1 output
    (3, 1, 1, 1, 2, 1, 1, 0, 1, 1, True),  # 1x1 pixels
]


@pytest.mark.usefixtures("device_paths")
@pytest.mark.parametrize("case", CONV_GRID, ids=[str(i) for i in range(len(CONV_GRID))])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("im2col", ["auto", "nhwc"])
def test_conv2d_matches_torch(case, channels_last, im2col, monkeypatch):
    from dllab.layers import _conv

    if im2col == "nhwc":  # few-channel inputs and some NCHW ones take the planar im2col by default: test both
        monkeypatch.setattr(_conv, "PLANAR_MAX_CHANNELS", 0)
        monkeypatch.setattr(_conv, "PLANAR_NCHW", False)
    n, c, h, w, c_out, k, s, p, d, g, has_bias = case
    kh, kw = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    x = torch.randn(n, c, h, w, dtype=DT, generator=gen)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c // g, kh, kw, dtype=DT, generator=gen)
    bias = torch.randn(c_out, dtype=DT, generator=gen) if has_bias else None
    ya, yb = _compare_fn(lambda x_, w_, b_: LF.conv2d(x_, w_, b_, s, p, d, g),
                         lambda x_, w_, b_: F.conv2d(x_, w_, b_, s, p, d, g), [x, weight, bias])
    assert ya.is_contiguous(memory_format=torch.channels_last) == yb.is_contiguous(memory_format=torch.channels_last)
    assert ya.is_contiguous() == yb.is_contiguous()


@pytest.mark.usefixtures("device_paths")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("hw,k,s,p,g,c_out", [
    (16, 3, 1, 1, 1, 24),  # stride 1: input gradient as a convolution; per-image NCHW / row GEMMs
    (16, 3, 2, 1, 1, 24),  # stride 2: NHWC col2im
    (16, 1, 2, 0, 1, 24),  # 1x1 shortcut: planar (NCHW, 8x8 output) or NHWC (channels-last)
    (16, 1, 1, 0, 1, 24),  # 1x1 stride 1: the planar col is x itself
    (16, 1, 1, 1, 1, 24),  # 1x1 with padding: planar, input gradient cut out of a padded buffer
    (8, 1, 2, 0, 1, 24),  # 1x1 shortcut with a 4x4 output: NHWC in both layouts
    (8, 3, 1, 1, 1, 16),  # 8x8: one GEMM for NCHW, per-image rows for channels-last
    (16, 3, 1, 1, 4, 16),  # groups
    (17, 3, 1, 2, 1, 16),  # padding beyond the kernel extent: col2im at stride 1
])
@pytest.mark.parametrize("planar_nchw", [True, False])
@pytest.mark.parametrize("weights", ["contiguous", "channels-last, flipped by tap"])
def test_conv2d_wide_layers_all_gemm_paths(channels_last, hw, k, s, p, g, c_out, planar_nchw, weights, monkeypatch):
    """24 input channels and images up to 17x17, so the per-image GEMM paths and the NHWC col2im run
    (NCHW inputs with large images through the planar route and, with it switched off, through NHWC).
    A channels-last weight gets its gradient from the GEMM written in place; the stride-1 input
    gradient's flipped kernel is copied tap by tap, as large weights are."""
    from dllab.layers import _conv

    monkeypatch.setattr(_conv, "PLANAR_NCHW", planar_nchw)
    gen = torch.Generator().manual_seed(hw * 100 + k * 10 + s)
    x = torch.randn(2, 24, hw, hw, dtype=DT, generator=gen)  # wide enough for the NHWC im2col
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(c_out, 24 // g, k, k, dtype=DT, generator=gen)
    if weights != "contiguous":
        monkeypatch.setattr(_conv, "FLIP_BY_TAP_MIN_ELEMENTS", 0)
        w = w.contiguous(memory_format=torch.channels_last)
    b = torch.randn(c_out, dtype=DT, generator=gen)
    _compare_fn(lambda *t: LF.conv2d(*t, stride=s, padding=p, groups=g),
                lambda *t: F.conv2d(*t, stride=s, padding=p, groups=g), [x, w, b])


@pytest.mark.usefixtures("device_paths")
def test_conv2d_broad_grid():
    """Every combination of kernel, stride, padding, dilation, groups and bias on a small input."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 7, 6, dtype=DT, generator=gen)
    count = 0
    for k, s, p, d, g, has_bias in itertools.product([1, 2, 3], [1, 2], [0, 1, "same"], [1, 2], [1, 2, 4],
                                                     [False, True]):
        if p == "same" and s != 1:
            continue
        weight = torch.randn(4, 4 // g, k, k, dtype=DT, generator=gen)
        bias = torch.randn(4, dtype=DT, generator=gen) if has_bias else None
        _compare_fn(lambda x_, w_, b_: LF.conv2d(x_, w_, b_, s, p, d, g),
                    lambda x_, w_, b_: F.conv2d(x_, w_, b_, s, p, d, g), [x, weight, bias], grad_seed=count)
        count += 1
    assert count == 180


@pytest.mark.usefixtures("device_paths")
def test_conv2d_unbatched_and_empty_batch():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(5, 3, 3, 3, dtype=DT, generator=gen)
    b = torch.randn(5, dtype=DT, generator=gen)
    x = torch.randn(3, 6, 6, dtype=DT, generator=gen)
    ya, yb = _compare_fn(lambda x_, w_, b_: LF.conv2d(x_, w_, b_, padding=1),
                         lambda x_, w_, b_: F.conv2d(x_, w_, b_, padding=1), [x, w, b])
    assert ya.shape == (5, 6, 6)
    x0 = torch.randn(0, 3, 6, 6, dtype=DT)
    ya, yb = _compare_fn(lambda x_, w_, b_: LF.conv2d(x_, w_, b_, stride=2),
                         lambda x_, w_, b_: F.conv2d(x_, w_, b_, stride=2), [x0, w, b])
    assert ya.shape == (0, 5, 2, 2)


@pytest.mark.usefixtures("device_paths")
def test_conv2d_float32_and_gradcheck():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, 10, 10, generator=gen)
    w = torch.randn(16, 8, 3, 3, generator=gen) * 0.1
    b = torch.randn(16, generator=gen)
    _compare_fn(lambda *t: LF.conv2d(*t, stride=2, padding=1), lambda *t: F.conv2d(*t, stride=2, padding=1),
                [x, w, b], tol=1e-4)
    for s, p, d, g in [(1, 1, 1, 1), (2, 1, 1, 2), (1, "same", 2, 1), (2, 0, 1, 1), (1, 2, 1, 1)]:
        xd = torch.randn(2, 2, 6, 5, dtype=DT, generator=gen, requires_grad=True)
        wd = torch.randn(2, 2 // g, 3, 3, dtype=DT, generator=gen, requires_grad=True)
        bd = torch.randn(2, dtype=DT, generator=gen, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x_, w_, b_: LF.conv2d(x_, w_, b_, s, p, d, g), (xd, wd, bd),
                                        fast_mode=True)


@pytest.mark.parametrize("bad", [
    dict(x=(1, 4, 5, 5), w=(4, 3, 3, 3)),  # channels do not match
    dict(x=(1, 4, 5, 5), w=(4, 4, 7, 7)),  # kernel larger than padded input
    dict(x=(4, 5), w=(4, 4, 3, 3)),  # wrong input rank
    dict(x=(1, 4, 5, 5), w=(4, 4, 3), padding=1),  # wrong weight rank
    dict(x=(1, 4, 5, 5), w=(4, 4, 3, 3), stride=2, padding="same"),
    dict(x=(1, 4, 5, 5), w=(4, 4, 3, 3), stride=0),
    dict(x=(1, 4, 5, 5), w=(4, 4, 3, 3), padding=-1),
    dict(x=(1, 4, 5, 5), w=(4, 4, 3, 3), dilation=0),
    dict(x=(1, 4, 5, 5), w=(4, 4, 3, 3), padding="full"),
    dict(x=(1, 4, 5, 5), w=(4, 2, 3, 3), groups=3),  # groups divide neither
    dict(x=(1, 4, 5, 5), w=(3, 2, 3, 3), groups=2),  # out channels not divisible by groups
    dict(x=(1, 4, 5, 5), w=(4, 4, 3, 3), groups=0),
    dict(x=(1, 4, 5, 5), w=(4, 4, 3, 3), bias=3),
    dict(x=(1, 4, 5, 5), w=(4, 4, 3, 3), stride=(1, 2, 3)),
])
def test_conv2d_errors_where_torch_errors(bad):
    bad = dict(bad)
    x, w = torch.randn(bad.pop("x")), torch.randn(bad.pop("w"))
    if "bias" in bad:
        bad["bias"] = torch.randn(bad["bias"])
    with pytest.raises(RuntimeError):
        F.conv2d(x, w, **bad)
    with pytest.raises(ValueError):
        LF.conv2d(x, w, **bad)


def test_conv2d_dtype_mismatch_raises():
    with pytest.raises(ValueError, match="dtype"):
        LF.conv2d(torch.randn(1, 2, 4, 4, dtype=DT), torch.randn(2, 2, 3, 3))


# ----------------------------------------------------------------------------------------------
# Conv2d module

@pytest.mark.usefixtures("device_paths")
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, (2, 1), "same"])
def test_conv2d_module_padding_modes(padding_mode, padding):
    torch.manual_seed(4)
    ref = nn.Conv2d(3, 4, 3, padding=padding, padding_mode=padding_mode, dtype=DT)
    ours = Conv2d(3, 4, 3, padding=padding, padding_mode=padding_mode, dtype=DT)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 6, 5, dtype=DT)
    _compare_fn(ours, ref, [x])
    _close(ours.weight.grad, ref.weight.grad)
    _close(ours.bias.grad, ref.bias.grad)
    assert repr(ours) == repr(ref)


def test_conv2d_module_same_init_state_dict_and_repr():
    for kwargs in [dict(in_channels=4, out_channels=6, kernel_size=3),
                   dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2, padding=(1, 0), dilation=(1, 2),
                        groups=2, bias=False),
                   dict(in_channels=3, out_channels=3, kernel_size=1, padding="valid")]:
        torch.manual_seed(5)
        ref = nn.Conv2d(**kwargs)
        torch.manual_seed(5)
        ours = Conv2d(**kwargs)
        assert repr(ours).replace("Conv2d", "") == repr(ref).replace("Conv2d", "")
        sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
        assert list(sd_ref) == list(sd_ours)
        for key in sd_ref:  # same seed, same draws, same numbers
            torch.testing.assert_close(sd_ref[key], sd_ours[key], rtol=0, atol=0)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "transposed", "output_padding", "_reversed_padding_repeated_twice"):
            assert getattr(ours, attr) == getattr(ref, attr), attr
    # a state dict moves both ways with identical outputs
    ours, ref = Conv2d(4, 8, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_conv2d_init_distribution():
    """Weights ~ U(-b, b) with b = 1/sqrt(fan_in) (kaiming_uniform_ with a=sqrt(5)), bias likewise."""
    torch.manual_seed(6)
    conv = Conv2d(32, 64, 3)
    bound = 1 / math.sqrt(32 * 9)
    w = conv.weight.detach()
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.02 * bound
    assert conv.bias.abs().max() <= bound


@pytest.mark.parametrize("kwargs", [dict(groups=3), dict(groups=0), dict(padding="full"),
                                    dict(padding="same", stride=2), dict(padding_mode="mirror"),
                                    dict(padding=-1), dict(kernel_size=0)])
def test_conv2d_module_errors(kwargs):
    args = dict(in_channels=4, out_channels=6, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError):
        Conv2d(**args)


WINOGRAD_GRID = [
    # (N, C_in, H, W, C_out, padding, bias): 3x3 stride-1 convolutions with 16+ channels
    (2, 16, 8, 8, 16, 1, False),
    (3, 16, 7, 9, 24, 1, True),  # odd sizes: a zero row and column complete the last tiles
    (2, 24, 6, 6, 16, 0, True),  # no padding (4x4 output)
    (1, 16, 5, 5, 16, 2, False),  # padding 2 (7x7 output); the input gradient's own padding is 0
    (2, 32, 4, 4, 48, 1, True),  # ResNet's last stage shape
    (2, 16, 9, 8, 16, "same", False),
]


def _count_winograd(monkeypatch) -> list:
    """The names of the Winograd functions called from now on, in order."""
    from dllab.layers import _winograd

    calls = []
    for name in ("conv", "weight_grad"):
        real = getattr(_winograd, name)
        monkeypatch.setattr(_winograd, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    return calls


@pytest.mark.parametrize("pieces", ["default", "one image", "rows of tiles"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", WINOGRAD_GRID, ids=[str(i) for i in range(len(WINOGRAD_GRID))])
def test_conv2d_by_winograd_matches_torch(case, channels_last, pieces, monkeypatch):
    """F(2x2, 3x3) for the forward pass and the input gradient, F(3x3, 2x2) for the weight
    gradient, in float64 to 1e-10 of torch: values, all three gradients and the layouts; also in
    pieces of one image, or of one row of 2x2 tiles (how images too large for the cache go), whose
    weight gradients are summed over the pieces."""
    from dllab.layers import _winograd

    calls = _count_winograd(monkeypatch)
    n, c, h, w, c_out, p, has_bias = case
    if pieces == "one image":
        monkeypatch.setattr(_winograd, "CHUNK_BYTES", 16 * (h // 2 + 1) * (w // 2 + 1) * max(c, c_out) * 8)
    elif pieces == "rows of tiles":
        monkeypatch.setattr(_winograd, "CHUNK_BYTES", 1)
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(n, c, h, w, dtype=DT, generator=gen)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c, 3, 3, dtype=DT, generator=gen)
    bias = torch.randn(c_out, dtype=DT, generator=gen) if has_bias else None
    ya, yb = _compare_fn(lambda x_, w_, b_: LF.conv2d(x_, w_, b_, 1, p),
                         lambda x_, w_, b_: F.conv2d(x_, w_, b_, 1, p), [x, weight, bias])
    assert calls == ["conv", "conv", "weight_grad"], calls  # forward, input gradient, weight gradient
    assert ya.is_contiguous(memory_format=torch.channels_last) == yb.is_contiguous(memory_format=torch.channels_last)


def test_conv2d_by_winograd_in_float32_is_as_close_to_torch_as_float32_allows():
    """A ResNet layer in float32: Winograd's outputs and gradients agree with float64 to float32
    rounding (relative error well under 1e-4), as im2col's do."""
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(4, 64, 16, 16, generator=gen)
    weight = torch.randn(64, 64, 3, 3, generator=gen) * 0.05
    exact = F.conv2d(x.double(), weight.double(), padding=1)
    y = LF.conv2d(x, weight, None, 1, 1)
    assert ((y.double() - exact).norm() / exact.norm()).item() < 1e-5


def test_winograd_with_an_empty_batch_gives_torchs_zero_gradients(monkeypatch):
    """An empty batch after a full one: the weight gradient is zero, not what the last call left
    in a workspace buffer."""
    calls = _count_winograd(monkeypatch)
    gen = torch.Generator().manual_seed(23)
    weight = torch.randn(16, 16, 3, 3, dtype=DT, generator=gen)
    _compare_fn(lambda x_, w_: LF.conv2d(x_, w_, None, 1, 1), lambda x_, w_: F.conv2d(x_, w_, None, 1, 1),
                [torch.randn(2, 16, 6, 6, dtype=DT, generator=gen), weight])
    assert calls == ["conv", "conv", "weight_grad"]
    _compare_fn(lambda x_, w_: LF.conv2d(x_, w_, None, 1, 1), lambda x_, w_: F.conv2d(x_, w_, None, 1, 1),
                [torch.zeros(0, 16, 6, 6, dtype=DT), weight])


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("cell", [(1, 1), (0, 0)], ids=["centre", "corner"])
@pytest.mark.parametrize("where", ["x", "weight", "grad_y"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 3e38])
def test_non_finite_or_huge_operands_take_im2col_and_give_torchs_answer(where, value, cell, padding, monkeypatch):
    """Winograd's transforms take differences (inf - inf is NaN where torch gives inf) and grow
    sums; an operand that is not finite, or near the float32 range, goes through im2col instead.
    Its finite results are torch's, and so is every NaN and inf torch gives; im2col multiplies zero
    padding too (the forward's, and grad_y's in the input gradient), so a NaN or inf weight or
    grad_y also gives NaN (0 * inf) where a window reaches that padding, and torch's kernels, which
    skip the padding, may give a number."""
    calls = _count_winograd(monkeypatch)
    gen = torch.Generator().manual_seed(27)
    x = torch.randn(2, 16, 6, 6, generator=gen)
    weight = torch.randn(16, 16, 3, 3, generator=gen)
    g = torch.randn(2, 16, 6 - 2 + 2 * padding, 6 - 2 + 2 * padding, generator=gen)
    {"x": x, "weight": weight, "grad_y": g}[where][(0, 0, *cell)] = value
    xa, wa = x.clone().requires_grad_(), weight.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), weight.clone().requires_grad_()
    ya, yb = LF.conv2d(xa, wa, None, 1, padding), F.conv2d(xb, wb, None, 1, padding)
    ya.backward(g)
    yb.backward(g)
    for a, b in ((ya.detach(), yb.detach()), (xa.grad, xb.grad), (wa.grad, wb.grad)):
        assert not (torch.isnan(b) & ~torch.isnan(a)).any()  # every NaN of torch's
        assert torch.equal(a[torch.isinf(b)], b[torch.isinf(b)])  # every inf of torch's, with its sign
        # 0 * inf in a zero padding: the forward's, or the input gradient's padding of grad_y by
        # (kernel - 1 - padding); a bad x never meets one (its padding multiplies finite numbers)
        padding_nan = torch.isnan(a) & ~torch.isnan(b)
        assert not padding_nan.any() or where != "x", padding_nan.nonzero()[:5]
        finite = torch.isfinite(b) & ~padding_nan
        torch.testing.assert_close(a[finite], b[finite], rtol=1e-4, atol=1e-3 * max(1.0, float(b[finite].abs().max())))
    assert "weight_grad" not in calls or where == "weight"  # the operands with the odd value took im2col
    assert calls.count("conv") == (0 if where in ("x", "weight") else 1) + (0 if where in ("weight", "grad_y") else 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_convolutions_keep_im2col(dtype, monkeypatch):
    """Half-precision inputs never take Winograd, also where their GEMMs run in float32 (a CPU
    without native half-precision arithmetic): its sums of up to 9 numbers, and a bias added after
    a half-precision rounding, would round more than once."""
    calls = _count_winograd(monkeypatch)
    gen = torch.Generator().manual_seed(24)
    x = torch.randn(2, 16, 8, 8, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(16, 16, 3, 3, generator=gen).to(dtype).requires_grad_()
    LF.conv2d(x, weight, torch.randn(16, generator=gen).to(dtype), 1, 1).sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        LF.conv2d(x.detach().float(), weight.detach().float(), None, 1, 1)
    assert calls == []


@pytest.mark.parametrize("what", ["stride 2", "dilation 2", "groups 2", "5x5", "8 channels", "bfloat16", "cuda paths"])
def test_winograd_serves_only_what_it_is_for(what, monkeypatch):
    from dllab.layers import _workspace
    from dllab.layers._winograd import applies

    cpu = torch.device("cpu")
    kwargs = dict(c_in=16, w_shape=(16, 16, 3, 3), stride=(1, 1), dilation=(1, 1), groups=1, dtype=torch.float32,
                  device=cpu)
    assert applies(**kwargs)
    change = {"stride 2": dict(stride=(2, 2)), "dilation 2": dict(dilation=(2, 2)),
              "groups 2": dict(groups=2, w_shape=(16, 8, 3, 3)), "5x5": dict(w_shape=(16, 16, 5, 5)),
              "8 channels": dict(c_in=8, w_shape=(16, 8, 3, 3)), "bfloat16": dict(dtype=torch.bfloat16),
              "cuda paths": {}}[what]
    if what == "cuda paths":
        monkeypatch.setattr(_workspace, "uses_cpu_paths", lambda device: False)
    assert not applies(**{**kwargs, **change})


# ----------------------------------------------------------------------------------------------
# max_pool2d

POOL_GRID = [
    # (H, W, kernel, stride, padding, dilation, ceil_mode)
    (8, 8, 2, None, 0, 1, False),
    (9, 7, 3, 2, 1, 1, False),
    (9, 7, 3, 2, 1, 1, True),
    (10, 10, 3, 2, 0, 1, True),
    (6, 6, 2, 2, 1, 1, True),  # ceil_mode with padding: the last window starts in the padding? dropped
    (5, 5, 2, 2, 1, 1, True),
    (9, 8, (3, 2), (2, 1), (1, 0), (1, 2), False),
    (11, 11, 3, 1, 1, 2, True),
    (7, 9, 3, 3, 1, 1, True),
    (5, 5, 5, 1, 2, 1, False),
    (4, 4, 1, 1, 0, 1, False),
    # column strides whose taps fall on different column phases (the NCHW path splits by phase)
    (12, 13, 3, (1, 3), 1, (1, 2), True),
    (10, 11, (2, 4), (2, 3), (1, 2), 1, False),
    (9, 20, 3, (2, 4), 1, 3, False),
    (20, 20, 17, 1, 8, 1, False),  # 289 taps
]


@pytest.fixture(params=["whole-batch", "per-image"])
def pool_chunks(request, monkeypatch):
    """The running maximum over the whole batch at once, or one image at a time (how the CPU
    splits large batches, ``_pool.POOL_CHUNK_BYTES``)."""
    from dllab.layers import _pool

    if request.param == "per-image":
        monkeypatch.setattr(_pool, "POOL_CHUNK_BYTES", 1)
    return request.param


@pytest.mark.usefixtures("device_paths", "pool_chunks")
@pytest.mark.parametrize("case", POOL_GRID, ids=[str(i) for i in range(len(POOL_GRID))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool2d_matches_torch(case, channels_last):
    h, w, k, s, p, d, ceil = case
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, h, w, dtype=DT, generator=gen)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ya, yb = _compare_fn(lambda x_: LF.max_pool2d(x_, k, s, p, d, ceil),
                         lambda x_: F.max_pool2d(x_, k, s, p, d, ceil), [x])
    ia = LF.max_pool2d(x, k, s, p, d, ceil, return_indices=True)[1]
    ib = F.max_pool2d(x, k, s, p, d, ceil, return_indices=True)[1]
    assert ia.dtype == ib.dtype and torch.equal(ia, ib)
    assert ya.is_contiguous(memory_format=torch.channels_last) == yb.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.usefixtures("device_paths")
@pytest.mark.parametrize("stride", [1, 2])
def test_max_pool2d_ties_route_to_first_maximum(stride):
    """Integer-valued inputs with many equal maxima: same indices and gradients as torch."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randint(0, 3, (2, 3, 9, 9), generator=gen).to(DT)
    x[0, 0] = 1.0  # a plane that is all ties
    ya, yb = _compare_fn(lambda x_: LF.max_pool2d(x_, 3, stride, 1), lambda x_: F.max_pool2d(x_, 3, stride, 1), [x])
    ia = LF.max_pool2d(x, 3, stride, 1, return_indices=True)[1]
    ib = F.max_pool2d(x, 3, stride, 1, return_indices=True)[1]
    assert torch.equal(ia, ib)


@pytest.mark.usefixtures("device_paths")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool2d_half_precision_like_torch(dtype, channels_last):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 5, 13, 12, generator=gen).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ya, ia = LF.max_pool2d(x, 3, 2, 1, return_indices=True)
    yb, ib = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert ya.dtype == dtype and torch.equal(ya, yb) and torch.equal(ia, ib)


@pytest.mark.usefixtures("device_paths", "pool_chunks")
def test_max_pool2d_infinities_and_nan():
    x = torch.full((2, 1, 4, 4), -math.inf, dtype=DT)
    x[0] = torch.randn(1, 4, 4, dtype=DT, generator=torch.Generator().manual_seed(9))  # finite image first
    x[1, 0, 3, 3] = 2.0
    x[1, 0, 0, 3] = math.nan
    x[1, 0, 1, 2] = math.nan
    for p in (0, 1):
        ya, ia = LF.max_pool2d(x, 2, 2, p, return_indices=True)
        yb, ib = F.max_pool2d(x, 2, 2, p, return_indices=True)
        torch.testing.assert_close(ya, yb, equal_nan=True)
        assert torch.equal(ia, ib)


@pytest.mark.usefixtures("device_paths")
@pytest.mark.parametrize("case", POOL_GRID, ids=[str(i) for i in range(len(POOL_GRID))])
def test_max_pool2d_all_minus_infinity_windows_choose_torchs_cell(case):
    """Windows whose real cells are all -inf (float) or the dtype's minimum (integers) report
    torch's cell, the first real one, in every geometry of the grid: on a GPU this rule is applied
    everywhere from a cached table of each window's first real tap, not after a test."""
    h, w, k, s, p, d, ceil = case
    x = torch.randn(2, 3, h, w, dtype=DT, generator=torch.Generator().manual_seed(12))
    x[0] = -math.inf  # an image of -inf only; the other keeps a few -inf cells
    x[1, :, ::2] = -math.inf
    ya, ia = LF.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    yb, ib = F.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    assert torch.equal(ya, yb) and torch.equal(ia, ib)
    xi = torch.randint(-5, 5, (1, 2, h, w), dtype=torch.int64, generator=torch.Generator().manual_seed(13))
    xi[0, 0] = torch.iinfo(torch.int64).min
    ya, ia = LF.max_pool2d(xi, k, s, p, d, ceil, return_indices=True)
    yb, ib = F.max_pool2d(xi.double(), k, s, p, d, ceil, return_indices=True)  # torch pools floats only
    assert torch.equal(ya.double(), yb) and torch.equal(ia, ib)


@pytest.mark.usefixtures("device_paths")
@pytest.mark.parametrize("shape,kwargs", [((1, 1), dict(kernel_size=2, stride=1, padding=1, dilation=(2, 1))),
                                          ((2, 1), dict(kernel_size=(1, 2), stride=1, padding=(0, 1), dilation=(1, 2))),
                                          ((1, 4), dict(kernel_size=2, stride=(1, 2), padding=1, dilation=2))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool2d_windows_wholly_in_the_padding_are_torchs(shape, kwargs, channels_last):
    """With dilation a window may hold no real cell: torch reports -inf and an index past the plane.
    dllab gives the same values and indices instead of failing, and drops those windows'
    gradients (torch's CPU backward adds them to the cell past the plane, in the next plane: an
    out-of-bounds write, not a gradient)."""
    x = torch.randn(2, 3, *shape, dtype=DT, generator=torch.Generator().manual_seed(25))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ya, ia = LF.max_pool2d(x, return_indices=True, **kwargs)
    yb, ib = F.max_pool2d(x, return_indices=True, **kwargs)
    assert torch.equal(ya, yb) and torch.equal(ia, ib)
    assert (ib >= shape[0] * shape[1]).any()  # the case is what it says
    x.requires_grad_()
    g = torch.randn(yb.shape, dtype=DT, generator=torch.Generator().manual_seed(26))
    LF.max_pool2d(x, **kwargs).backward(g)
    inside = ib < shape[0] * shape[1]
    expected = torch.zeros(2, 3, shape[0] * shape[1], dtype=DT).scatter_add_(
        2, torch.where(inside, ib, 0).flatten(2), torch.where(inside, g, 0).flatten(2))
    _close(x.grad, expected.view(x.shape))


@pytest.mark.usefixtures("device_paths")
def test_max_pool2d_unbatched_empty_float32_and_gradcheck():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 7, 7, dtype=DT, generator=gen)
    ya, ia = LF.max_pool2d(x, 3, 2, 1, return_indices=True)
    yb, ib = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    _close(ya, yb)
    assert torch.equal(ia, ib) and ya.shape == (3, 4, 4)
    x0 = torch.randn(0, 3, 7, 7)
    assert LF.max_pool2d(x0, 2).shape == F.max_pool2d(x0, 2).shape == (0, 3, 3, 3)
    x32 = torch.randn(2, 4, 9, 9, generator=gen)
    _compare_fn(lambda x_: LF.max_pool2d(x_, 3, 2, 1), lambda x_: F.max_pool2d(x_, 3, 2, 1), [x32], tol=0)
    xd = torch.randn(2, 2, 7, 6, dtype=DT, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: LF.max_pool2d(t, 3, 2, 1, ceil_mode=True), (xd,))
    assert torch.autograd.gradcheck(lambda t: LF.max_pool2d(t, 2, 1, dilation=2), (xd,))


@pytest.mark.parametrize("bad", [dict(kernel_size=3, padding=2), dict(kernel_size=0), dict(kernel_size=2, stride=0),
                                 dict(kernel_size=5), dict(kernel_size=2, dilation=0),
                                 dict(kernel_size=2, padding=-1)])
def test_max_pool2d_errors_where_torch_errors(bad):
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(RuntimeError):
        F.max_pool2d(x, **bad)
    with pytest.raises(ValueError):
        LF.max_pool2d(x, **bad)
    with pytest.raises(ValueError):
        LF.max_pool2d(torch.randn(4, 4), 2)


def test_max_pool2d_module():
    ref, ours = nn.MaxPool2d(3, 2, 1, ceil_mode=True), MaxPool2d(3, 2, 1, ceil_mode=True)
    assert repr(ours) == repr(ref)
    assert ours.stride == ref.stride and MaxPool2d(2).stride == nn.MaxPool2d(2).stride == 2
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    _compare_fn(ours, ref, [x])
    ya, ia = MaxPool2d(2, return_indices=True)(x)
    yb, ib = nn.MaxPool2d(2, return_indices=True)(x)
    assert torch.equal(ya, yb) and torch.equal(ia, ib)


# ----------------------------------------------------------------------------------------------
# batch_norm

@pytest.mark.usefixtures("device_paths")
@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5), (4, 3, 5, 6), (2, 3, 3, 4, 2)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, 0.7])
def test_batch_norm_training_matches_torch(shape, affine, momentum):
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(shape, dtype=DT, generator=gen) * 3 + 2
    c = shape[1]
    w = torch.rand(c, dtype=DT, generator=gen) + 0.5 if affine else None
    b = torch.randn(c, dtype=DT, generator=gen) if affine else None
    rm = [torch.randn(c, dtype=DT, generator=gen)] * 2
    rv = [torch.rand(c, dtype=DT, generator=gen) + 0.5] * 2
    rm, rv = [t.clone() for t in rm], [t.clone() for t in rv]
    _compare_fn(lambda x_, w_, b_: LF.batch_norm(x_, rm[0], rv[0], w_, b_, True, momentum),
                lambda x_, w_, b_: F.batch_norm(x_, rm[1], rv[1], w_, b_, True, momentum), [x, w, b])
    _close(rm[0], rm[1])
    _close(rv[0], rv[1])


@pytest.mark.usefixtures("device_paths")
def test_batch_norm_eval_and_no_running_stats():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 3, 5, 5, dtype=DT, generator=gen)
    w, b = torch.rand(3, dtype=DT, generator=gen), torch.randn(3, dtype=DT, generator=gen)
    rm, rv = torch.randn(3, dtype=DT, generator=gen), torch.rand(3, dtype=DT, generator=gen) + 0.1
    _compare_fn(lambda x_, w_, b_: LF.batch_norm(x_, rm, rv, w_, b_, False),
                lambda x_, w_, b_: F.batch_norm(x_, rm, rv, w_, b_, False), [x, w, b])
    _compare_fn(lambda x_, w_, b_: LF.batch_norm(x_, None, None, w_, b_, True),
                lambda x_, w_, b_: F.batch_norm(x_, None, None, w_, b_, True), [x, w, b])
    _compare_fn(lambda x_, w_: LF.batch_norm(x_, None, None, w_, None, True, eps=0.3),
                lambda x_, w_: F.batch_norm(x_, None, None, w_, None, True, eps=0.3), [x, w])
    xd = x[:2, :, :3, :3].clone().requires_grad_()
    wd, bd = w.clone().requires_grad_(), b.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: LF.batch_norm(t[0], None, None, t[1], t[2], True), (xd, wd, bd))
    assert torch.autograd.gradcheck(lambda *t: LF.batch_norm(t[0], rm, rv, t[1], t[2], False), (xd, wd, bd))


@pytest.mark.usefixtures("device_paths")
@pytest.mark.parametrize("offset", [0.0, 3e3, 1e5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_float32_ill_conditioned_and_layouts(offset, channels_last):
    """float32 with |mean| up to 1e5 * std (the one-pass variance would lose everything) and both layouts."""
    gen = torch.Generator().manual_seed(18)
    x = torch.randn(8, 4, 6, 6, generator=gen) + offset * torch.tensor([1.0, -1.0, 0.5, 0.0]).view(1, 4, 1, 1)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.rand(4, generator=gen) + 0.5, torch.randn(4, generator=gen)
    rm, rv = [torch.zeros(4), torch.zeros(4)], [torch.ones(4), torch.ones(4)]
    tol = max(1e-5, 64 * offset * 2.0**-24)  # x itself carries offset * 2^-24 of rounding
    _compare_fn(lambda x_, w_, b_: LF.batch_norm(x_, rm[0], rv[0], w_, b_, True),
                lambda x_, w_, b_: F.batch_norm(x_, rm[1], rv[1], w_, b_, True), [x, w, b], tol=tol)
    torch.testing.assert_close(rv[0], rv[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rm[0], rm[1], rtol=1e-6, atol=1e-5)


@pytest.mark.usefixtures("device_paths")
def test_batch_norm_a_nan_channel_leaves_the_others_as_torch_has_them():
    """A NaN in one channel must not decide for the others: beside it, a channel the one-pass
    variance would cancel (mean 1e3, std 0.1) still gets torch's output and running variance
    (one version read the NaN as "well conditioned" and gave that channel NaN and a negative
    running variance)."""
    x = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(7)).double()
    x[:, 2] = 1e3 + 0.1 * x[:, 2]
    x = x.float()
    x[0, 0, 0, 0] = float("nan")
    rm, rv = [torch.zeros(3), torch.zeros(3)], [torch.ones(3), torch.ones(3)]
    ya = LF.batch_norm(x, rm[0], rv[0], training=True, momentum=1.0)
    yb = F.batch_norm(x, rm[1], rv[1], training=True, momentum=1.0)
    assert ya[:, 0].isnan().all() and yb[:, 0].isnan().all()
    torch.testing.assert_close(ya[:, 1:], yb[:, 1:], rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(rv[0][1:], rv[1][1:], rtol=1e-3, atol=1e-7)
    assert (rv[0][1:] > 0).all()


@pytest.mark.usefixtures("device_paths")
def test_batch_norm_weight_changed_before_backward_is_an_error_as_in_torch():
    for bn in (BatchNorm2d(3), nn.BatchNorm2d(3)):
        y = bn(torch.randn(4, 3, 5, 5, requires_grad=True))
        with torch.no_grad():
            bn.weight.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


@pytest.mark.usefixtures("device_paths")
def test_batch_norm_bfloat16_input():
    gen = torch.Generator().manual_seed(19)
    x = (torch.randn(8, 4, 6, 6, generator=gen) * 2 + 1).bfloat16()
    w, b = torch.rand(4, generator=gen) + 0.5, torch.randn(4, generator=gen)
    a, r = _leaves(x, w, b)
    ya, yb = LF.batch_norm(a[0], None, None, a[1], a[2], True), F.batch_norm(r[0], None, None, r[1], r[2], True)
    assert ya.dtype == yb.dtype == torch.bfloat16
    torch.testing.assert_close(ya.float(), yb.float(), rtol=0.02, atol=0.02)
    g = torch.randn(ya.shape, generator=gen).bfloat16()
    ya.backward(g)
    yb.backward(g)
    for ta, tb in zip(a, r):
        assert ta.grad.dtype == tb.grad.dtype
        torch.testing.assert_close(ta.grad.float(), tb.grad.float(), rtol=0.03, atol=0.03)


@pytest.mark.usefixtures("device_paths")
def test_batch_norm_empty_batch_and_errors():
    rm, rv = torch.zeros(4), torch.ones(4)
    y = LF.batch_norm(torch.randn(0, 4, 5, 5), rm, rv, training=True)
    assert y.shape == (0, 4, 5, 5) and torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))
    with pytest.raises(ValueError, match="more than 1 value"):
        LF.batch_norm(torch.randn(1, 4), rm, rv, training=True)
    with pytest.raises(ValueError, match="running_mean"):
        LF.batch_norm(torch.randn(3, 4), None, None, training=False)
    with pytest.raises(ValueError, match="5"):
        LF.batch_norm(torch.randn(3, 4), torch.zeros(5), torch.ones(5), training=True)
    with pytest.raises(ValueError):
        LF.batch_norm(torch.randn(4), None, None, training=True)


@pytest.mark.usefixtures("device_paths")
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_batch_norm_module_train_eval(momentum, affine, track):
    torch.manual_seed(12)
    ref = nn.BatchNorm2d(5, momentum=momentum, affine=affine, track_running_stats=track, dtype=DT)
    ours = BatchNorm2d(5, momentum=momentum, affine=affine, track_running_stats=track, dtype=DT)
    assert repr(ours) == repr(ref)
    assert list(ours.state_dict()) == list(ref.state_dict())
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
    ours.load_state_dict(ref.state_dict())
    for step in range(3):
        x = torch.randn(4, 5, 3, 3, dtype=DT) * (step + 1) + step
        _compare_fn(ours, ref, [x])
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-12, atol=1e-12)
    ours.eval()
    ref.eval()
    _compare_fn(ours, ref, [torch.randn(2, 5, 3, 3, dtype=DT)])
    with pytest.raises(ValueError, match="4D"):
        ours(torch.randn(2, 5, 3))


TORCH_BN_HAS_BIAS = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters


def test_batch_norm_module_bias_false_and_old_state_dict():
    ours = BatchNorm2d(3, bias=False)
    assert ours.bias is None and "bias=False" in repr(ours)
    if TORCH_BN_HAS_BIAS:  # torch 2.14 has the flag: the same text and keys
        ref = nn.BatchNorm2d(3, bias=False)
        assert repr(ours) == repr(ref)
    else:  # older torch cannot build it: torch's keys without the bias, and torch's text plus bias=False
        ref = nn.BatchNorm2d(3)
        assert repr(ours) == repr(ref).replace(", track_running_stats", ", bias=False, track_running_stats")
        ref.register_parameter("bias", None)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    sd = nn.BatchNorm2d(3).state_dict()
    del sd["num_batches_tracked"]
    bn = BatchNorm2d(3)
    bn._load_from_state_dict(sd, "", {"version": 1}, True, [], [], [])  # pre-v2 dicts load
    assert int(bn.num_batches_tracked) == 0


# ----------------------------------------------------------------------------------------------
# whole layers together, dtypes, and the no-native-kernel guarantee

def _small_net(conv, bn, pool):
    return nn.Sequential(conv(3, 8, 3, padding=1, bias=False), bn(8), nn.ReLU(), pool(3, 2, 1),
                         conv(8, 16, 3, stride=2, padding=1), bn(16), nn.ReLU(), conv(16, 16, 1))


def _twin_small_nets(**to):
    """The small net from dllab's layers and from torch.nn, same weights, moved with ``.to(**to)``."""
    ours = _small_net(Conv2d, BatchNorm2d, MaxPool2d).to(**to)
    ref = _small_net(nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d).to(**to)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def test_a_compiled_model_runs_the_layers_eagerly_between_its_graphs():
    """torch.compile cannot trace the layers' CPU workspace (a compiled model with them failed at its
    first call): dynamo breaks its graph around each layer, which runs eagerly, and the results and
    gradients are eager's. (aot_eager: the graphs without TorchInductor's C++ build.)"""
    import torch._dynamo

    torch._dynamo.reset()
    LF.clear_workspace()  # the compiled model makes the buffers: that is what failed
    torch.manual_seed(3)
    eager = _small_net(Conv2d, BatchNorm2d, MaxPool2d).double()
    twin = _small_net(Conv2d, BatchNorm2d, MaxPool2d).double()
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin, backend="aot_eager")
    for size in (12, 10, 14):  # new sizes: dynamo recompiles with symbolic shapes
        x = torch.randn(4, 3, size, size, dtype=torch.float64)
        for net in (compiled, eager):
            net(x).square().sum().backward()
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-12, msg=name)
    torch.testing.assert_close(twin[1].running_var, eager[1].running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("device_paths")
@pytest.mark.parametrize("channels_last", [False, True])
def test_network_state_dict_round_trip_train_and_eval(channels_last):
    torch.manual_seed(13)
    ours, ref = _twin_small_nets(dtype=DT)
    x = torch.randn(4, 3, 12, 12, dtype=DT)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    for mode in ("train", "eval"):
        ours.train(mode == "train")
        ref.train(mode == "train")
        _compare_fn(ours, ref, [x])
        for (name, pa), pb in zip(ours.named_parameters(), ref.parameters()):
            _close(pa.grad, pb.grad)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("device_paths")
def test_autocast_bf16_cpu_dtypes_and_values():
    torch.manual_seed(14)
    ours = _small_net(Conv2d, BatchNorm2d, MaxPool2d)
    ref = _small_net(nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 12, 12)
    outs = []
    for net in (ours, ref):
        acts = []
        hooks = [m.register_forward_hook(lambda m, i, o: acts.append(o)) for m in net]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(x)
        y.float().square().mean().backward()
        for h in hooks:
            h.remove()
        outs.append((acts, [p.grad for p in net.parameters()]))
    (acts_a, grads_a), (acts_b, grads_b) = outs
    for a, b in zip(acts_a, acts_b):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)
    for a, b in zip(grads_a, grads_b):
        assert a.dtype == b.dtype == torch.float32
        # the floor covers the bias of the conv before a batch norm, whose true gradient is 0
        torch.testing.assert_close(a, b, rtol=0.1, atol=max(0.02 * b.abs().max().item(), 1e-4))


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.name())
        return func(*args, **(kwargs or {}))


FORBIDDEN = ("conv", "pool", "batch_norm", "im2col", "col2im", "unfold_backward")


@pytest.mark.usefixtures("device_paths")
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("size,channels_last", [(12, False), (32, False), (32, True)])
def test_no_native_conv_pool_or_batchnorm_kernel_runs(autocast, size, channels_last):
    torch.manual_seed(15)
    net = _small_net(Conv2d, BatchNorm2d, MaxPool2d)
    x = torch.randn(2, 3, size, size)  # 32x32: the per-image GEMM paths run too
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    with _OpRecorder() as rec:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = net(x)
        y.float().sum().backward()
        net.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            net(x).float().sum().backward()
    assert any("mm" in op for op in rec.ops)  # the recorder sees the GEMMs
    bad = sorted(op for op in rec.ops if any(word in op for word in FORBIDDEN))
    assert not bad, bad
    # and the recorder does see torch's own kernels
    with _OpRecorder() as rec:
        _small_net(nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)(x).sum().backward()
    assert any("convolution" in op for op in rec.ops) and any("batch_norm" in op for op in rec.ops)


@pytest.mark.usefixtures("device_paths")
@pytest.mark.parametrize("channels_last", [False, True])
def test_outputs_allow_in_place_ops(channels_last):
    """Outputs are fresh tensors, not views, so ReLU(inplace=True) after any layer works."""
    torch.manual_seed(17)
    ours = nn.Sequential(Conv2d(3, 4, 1), nn.ReLU(inplace=True), MaxPool2d(2), nn.ReLU(inplace=True),
                         Conv2d(4, 4, 3, padding=1, groups=2), BatchNorm2d(4), nn.ReLU(inplace=True)).double()
    ref = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.ReLU(inplace=True),
                        nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4), nn.ReLU(inplace=True)).double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 6, 6, dtype=DT)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    _compare_fn(ours, ref, [x])


def test_double_backward_raises_instead_of_being_wrong():
    x = torch.randn(1, 2, 5, 5, dtype=DT, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, dtype=DT, requires_grad=True)
    (gx,) = torch.autograd.grad(LF.conv2d(x, w, padding=1).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate", "circular"])
def test_pad2d_matches_f_pad(mode):
    x = torch.randn(2, 3, 4, 5, dtype=DT)
    _compare_fn(lambda t: LF.pad2d(t, (1, 2, 3, 0), mode), lambda t: F.pad(t, (1, 2, 3, 0), mode=mode), [x])
    xc = x.to(memory_format=torch.channels_last)
    assert LF.pad2d(xc, (1, 1, 1, 1), mode).is_contiguous(memory_format=torch.channels_last) or mode == "constant"


def test_pad2d_and_helpers_errors():
    x = torch.randn(1, 1, 3, 3)
    for bad in [dict(padding=(1, 1, 1)), dict(padding=(1, 1, 1, -1)), dict(padding=(3, 0, 0, 0), mode="reflect"),
                dict(padding=(4, 0, 0, 0), mode="circular"), dict(padding=(1, 1, 1, 1), mode="mirror")]:
        with pytest.raises(ValueError):
            LF.pad2d(x, **bad)
    assert LF.conv_output_size(32, 3, 2, 2, 1) == F.conv2d(torch.randn(1, 1, 32, 32), torch.randn(1, 1, 3, 3),
                                                              stride=2, padding=1).shape[-1] == 16
    for bad in [dict(in_channels=-1), dict(out_channels=5, groups=2, in_channels=4)]:
        args = dict(in_channels=4, out_channels=6, kernel_size=3)
        args.update(bad)
        with pytest.raises(ValueError):
            Conv2d(**args)
    for bad in [dict(num_features=-2), dict(num_features=2.5)]:
        args = dict(num_features=4)
        args.update(bad)
        with pytest.raises(ValueError):
            BatchNorm2d(**args)
    with pytest.raises(ValueError, match="floating-point"):
        LF.conv2d(torch.ones(1, 1, 3, 3, dtype=torch.long), torch.ones(1, 1, 1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="momentum"):
        LF.batch_norm(torch.randn(4, 2), torch.zeros(2), torch.ones(2), training=True, momentum=None)


def _net_step(x):
    """Outputs and gradients of a conv -> batch norm -> max-pool step (float32, CPU workspace paths)."""
    torch.manual_seed(0)
    net = nn.Sequential(Conv2d(8, 16, 3, padding=1), BatchNorm2d(16), MaxPool2d(3, 2, 1), Conv2d(16, 4, 3, stride=2))
    x = x.detach().clone().requires_grad_()
    y = net(x)
    y.backward(torch.ones_like(y))
    return [y.detach(), x.grad] + [p.grad for p in net.parameters()]


@pytest.mark.parametrize("channels_last", [False, True])
def test_workspace_limit_caps_what_is_kept_and_changes_no_result(channels_last):
    x = torch.randn(4, 8, 12, 12)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert LF.workspace_limit() is None  # the default: no cap
    LF.clear_workspace()
    free = _net_step(x)
    assert LF.workspace_bytes() > 100_000  # the col matrices and padded copies are kept
    try:
        for cap in (0, 20_000):
            LF.set_workspace_limit(cap)
            assert LF.workspace_bytes() <= cap  # what was held above the cap is freed at once
            capped = _net_step(x)
            assert LF.workspace_bytes() <= cap
            for a, b in zip(capped, free):
                assert torch.equal(a, b)  # the same arithmetic on fresh buffers
    finally:
        LF.set_workspace_limit(None)
    _net_step(x)
    assert LF.workspace_bytes() > 100_000


def test_workspace_limit_arguments_and_environment(monkeypatch):
    from dllab.layers import _workspace

    for bad in (-1, 1.5, True, "64"):
        with pytest.raises(ValueError, match="max_bytes"):
            LF.set_workspace_limit(bad)
    assert LF.workspace_limit() is None
    monkeypatch.setenv("DLLAB_WORKSPACE_LIMIT_MB", "64")
    assert _workspace._limit_from_env() == 64 * 2**20
    monkeypatch.setenv("DLLAB_WORKSPACE_LIMIT_MB", "lots")
    with pytest.raises(ValueError, match="DLLAB_WORKSPACE_LIMIT_MB"):
        _workspace._limit_from_env()
    monkeypatch.setenv("DLLAB_WORKSPACE_LIMIT_MB", "")
    assert _workspace._limit_from_env() is None


def test_workspace_grown_during_inference_mode_still_serves_training():
    """An evaluation under torch.inference_mode() with a larger batch grows the workspace there;
    the training steps after it must still be able to write into it (inference tensors may not be
    written outside inference mode)."""
    torch.manual_seed(0)
    net = nn.Sequential(Conv2d(1, 8, 3, padding=1), BatchNorm2d(8), MaxPool2d(2), Conv2d(8, 8, 3, padding=1))
    LF.clear_workspace()
    net(torch.randn(2, 1, 12, 12)).sum().backward()  # the workspace made in training
    with torch.inference_mode():
        net.eval()
        net(torch.randn(16, 1, 12, 12))  # bigger batch: buffers regrown in inference mode
        net.train()
    x = torch.randn(2, 1, 12, 12, requires_grad=True)
    net(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_padded_buffers_first_made_in_inference_mode_serve_training():
    """A zero-bordered padding buffer first made under torch.inference_mode() (an evaluation before
    any training step of that shape) is a normal tensor: the training step after it writes into it."""
    torch.manual_seed(0)
    net = nn.Sequential(Conv2d(16, 16, 3, padding=1), BatchNorm2d(16), MaxPool2d(3, 2, 1), Conv2d(16, 8, 3, padding=1))
    LF.clear_workspace()
    with torch.inference_mode():
        net(torch.randn(2, 16, 6, 6))
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    net(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_device_paths_fixture_takes_the_other_branches(monkeypatch):
    """The switch ``device_paths`` relies on does change the paths: no workspace, native-dtype GEMMs."""
    from dllab.layers._conv import gemm_dtype

    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    LF.clear_workspace()
    monkeypatch.setattr(_workspace, "uses_cpu_paths", lambda device: False)
    LF.max_pool2d(LF.conv2d(x, w, padding=1), 2)
    assert LF.workspace_bytes() == 0
    assert gemm_dtype(torch.bfloat16, x.device) == torch.bfloat16
    monkeypatch.undo()
    LF.max_pool2d(LF.conv2d(x, w, padding=1), 2)
    assert LF.workspace_bytes() > 0


def test_cached_scalars_are_per_inference_mode():
    """A 0-d constant cached while under torch.inference_mode() (batch norm made some there) is an
    inference tensor, which autograd refuses to save for backward: outside that mode the cache
    must hand out a normal tensor instead."""
    from dllab.layers import _workspace

    _workspace._SCALARS.clear()
    x = torch.randn(4, 3, 5, 5, dtype=DT)
    with torch.inference_mode():
        LF.batch_norm(x, None, None, training=True)
        inner = _workspace.scalar(0.25, DT, x.device)
    outer = _workspace.scalar(0.25, DT, x.device)
    assert inner.is_inference() and not outer.is_inference()
    assert _workspace.scalar(0.25, DT, x.device) is outer  # cached
    v = torch.randn(3, dtype=DT, requires_grad=True)
    (v * outer).sum().backward()  # would raise with the inference tensor
    assert torch.equal(v.grad, torch.full_like(v, 0.25))
    w = torch.randn(3, dtype=DT)  # and batch norm still matches torch after the inference-mode call
    _compare_fn(lambda x_, w_: LF.batch_norm(x_, None, None, w_, training=True),
                lambda x_, w_: F.batch_norm(x_, None, None, w_, training=True), [x, w])
