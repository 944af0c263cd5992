"""``TorchConv2d``: ``nn.Conv2d`` whose bf16 weight gradient of small images on the CPU is one GEMM,
and whose bf16 forward pass and input gradient of tiny images (at most 16 output pixels) are too.

The route is forced with ``native_bf16`` where a test needs it, so that it runs on every CPU kind
(without AVX512-BF16/AMX a bf16 GEMM is emulated: slow, but the same numbers up to summation order).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from dllab.layers import TorchConv2d, _conv
from dllab.models.resnet import resnet18


class ConvLog(TorchDispatchMode):
    """Records the ``output_mask`` (grad input, grad weight, grad bias) of every native convolution
    backward, and counts the native convolution forward passes."""

    def __init__(self):
        super().__init__()
        self.masks: list[list[bool]] = []
        self.forwards = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.masks.append(list(args[-1]))
        if func in (torch.ops.aten.convolution.default, torch.ops.aten._convolution.default):
            self.forwards += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(_conv, "_cpu_has_native", lambda dtype: True)


# (c_in, c_out, kernel, stride, padding, dilation, H, W, bias): every one has 17 to 64 output
# pixels, where only the weight gradient is a GEMM
SMALL = [
    (8, 12, 3, 1, 1, 1, 6, 6, False),
    (8, 12, 3, 2, 1, 1, 9, 9, True),  # a stride-2 stage entry
    (6, 10, 1, 2, 0, 1, 10, 10, False),  # a 1x1 stride-2 shortcut
    (5, 7, 3, 1, 2, 2, 5, 6, True),  # dilation
    (4, 6, (3, 2), (2, 1), (1, 0), 1, 7, 7, True),  # unequal kernel, stride and padding
]
# at most 16 output pixels: the forward pass and the input gradient are GEMMs too
TINY = [
    (8, 12, 3, 1, 1, 1, 4, 4, False),  # ResNet-18's last stage
    (8, 12, 3, 2, 1, 1, 7, 7, True),  # its stride-2 entry, 7x7 -> 4x4
    (6, 10, 1, 2, 0, 1, 8, 8, False),  # a 1x1 stride-2 shortcut
    (5, 7, 3, 1, 2, 2, 3, 4, True),  # dilation
    (4, 6, (3, 2), (2, 1), (1, 0), 1, 7, 5, True),  # unequal kernel, stride and padding
    (3, 5, 3, 1, 0, 1, 3, 3, True),  # one output pixel, no padding
    # wide enough for the NHWC im2col, the flipped-kernel input gradient and NHWC col2im (the
    # routes of ResNet-18's last stage; the narrow cases above take the planar ones)
    (32, 24, 3, 1, 1, 1, 4, 4, True),
    (32, 24, 3, 2, 1, 1, 7, 7, False),
    (24, 32, 1, 2, 0, 1, 7, 7, False),
]


def pair(v):
    return v if isinstance(v, tuple) else (v, v)


def make(case, dtype=torch.float32, seed=0):
    c_in, c_out, k, s, p, d, h, w, bias = case
    torch.manual_seed(seed)
    ours = TorchConv2d(c_in, c_out, k, stride=s, padding=p, dilation=d, bias=bias).to(dtype)
    ref = nn.Conv2d(c_in, c_out, k, stride=s, padding=p, dilation=d, bias=bias).to(dtype)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, c_in, h, w, dtype=dtype)
    return ours, ref, x


def run(module, x, grad_seed=1, autocast=True, log=None):
    """(y, grad_x, grad_w, grad_b) of one forward+backward, under CPU bf16 autocast if asked."""
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    with log if log is not None else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = module(x)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y.dtype)
        y.backward(g)
    return y.detach(), x.grad, module.weight.grad, None if module.bias is None else module.bias.grad


@pytest.mark.parametrize("case", SMALL)
@pytest.mark.parametrize("grad_layout", ["nhwc-rows", "nchw"])
def test_conv_weight_grad_is_torchs_weight_gradient_in_float64(case, grad_layout):
    c_in, c_out, k, s, p, d, h, w, _ = case
    (kh, kw), stride, (ph, pw), dil = pair(k), pair(s), pair(p), pair(d)
    torch.manual_seed(0)
    x = torch.randn(3, c_in, h, w, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, kh, kw, dtype=torch.float64)
    y = torch.nn.functional.conv2d(x, weight, None, stride, (ph, pw), dil)
    gy = torch.randn_like(y)
    rows = gy.permute(0, 2, 3, 1).contiguous() if grad_layout == "nhwc-rows" else None
    got = _conv.conv_weight_grad(x, gy, rows, weight.shape, stride, (ph, ph, pw, pw), dil, 1, torch.float64,
                                 torch.float64)
    want = torch.nn.grad.conv2d_weight(x, weight.shape, gy, stride, (ph, pw), dil)
    assert got.shape == weight.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_conv_weight_grad_with_groups_in_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    weight = torch.randn(9, 2, 3, 3, dtype=torch.float64)
    gy = torch.randn_like(torch.nn.functional.conv2d(x, weight, None, 2, 1, 1, 3))
    got = _conv.conv_weight_grad(x, gy, gy.permute(0, 2, 3, 1).contiguous(), weight.shape, (2, 2), (1, 1, 1, 1),
                                 (1, 1), 3, torch.float64, torch.float64)
    want = torch.nn.grad.conv2d_weight(x, weight.shape, gy, 2, 1, 1, 3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", SMALL)
@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_small_images_take_the_gemm_weight_gradient(native_bf16, case, channels_last):
    ours, ref, x = make(case)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mine, theirs = ConvLog(), ConvLog()
    y, gx, gw, gb = run(ours, x, log=mine)
    y_ref, gx_ref, gw_ref, gb_ref = run(ref, x, log=theirs)
    # torch computes the forward and the input gradient; only the weight gradient is dllab's
    assert mine.masks == [[True, False, False]]
    assert theirs.masks == [[True, True, case[-1]]]
    assert y.dtype == y_ref.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    assert torch.equal(gx, gx_ref)
    assert gw.dtype == gw_ref.dtype == torch.float32 and gw.shape == gw_ref.shape
    # both are bf16 GEMMs with float accumulation rounded to bf16: they differ by the summation order
    assert (gw - gw_ref).norm() <= 1e-2 * gw_ref.norm()
    if case[-1]:
        assert (gb - gb_ref).norm() <= 1e-2 * gb_ref.norm()


def test_bf16_parameters_without_autocast_take_it_too(native_bf16):
    ours, ref, x = make(SMALL[1], dtype=torch.bfloat16)
    mine = ConvLog()
    y, gx, gw, gb = run(ours, x, autocast=False, log=mine)
    y_ref, gx_ref, gw_ref, gb_ref = run(ref, x, autocast=False)
    assert mine.masks == [[True, False, False]]
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    assert gw.dtype == torch.bfloat16 and (gw.float() - gw_ref.float()).norm() <= 1e-2 * gw_ref.float().norm()
    assert (gb.float() - gb_ref.float()).norm() <= 1e-2 * gb_ref.float().norm()


def test_the_weight_gradient_feeds_the_same_training_step(native_bf16):
    """A step of SGD with the route and without it lands on nearly the same weights."""
    ours, ref, x = make(SMALL[0])
    for m in (ours, ref):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        run(m, x)
        opt.step()
    assert (ours.weight - ref.weight).norm() <= 1e-3 * ref.weight.norm()


OTHERS = {
    "float32": dict(autocast=False),
    "output above 64 pixels": dict(hw=9),
    "groups": dict(groups=2),
    "reflect padding": dict(padding_mode="reflect"),
    "padding='same'": dict(padding="same"),
    "frozen weight": dict(frozen=True),
}


@pytest.mark.parametrize("name", list(OTHERS))
def test_everything_else_is_nn_conv2d(native_bf16, name):
    opts = OTHERS[name]
    hw = opts.get("hw", 8)
    kwargs = dict(padding=opts.get("padding", 1), groups=opts.get("groups", 1),
                  padding_mode=opts.get("padding_mode", "zeros"))
    torch.manual_seed(0)
    ours, ref = TorchConv2d(4, 6, 3, **kwargs), nn.Conv2d(4, 6, 3, **kwargs)
    ref.load_state_dict(ours.state_dict())
    if opts.get("frozen"):
        ours.weight.requires_grad_(False)
        ref.weight.requires_grad_(False)
    x = torch.randn(2, 4, hw, hw)
    mine, theirs = ConvLog(), ConvLog()
    autocast = opts.get("autocast", True)
    y, gx, gw, gb = run(ours, x, autocast=autocast, log=mine)
    y_ref, gx_ref, gw_ref, gb_ref = run(ref, x, autocast=autocast, log=theirs)
    assert mine.masks == theirs.masks and all(m[1] == (not opts.get("frozen")) for m in mine.masks)
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    if gw_ref is not None:
        assert torch.equal(gw, gw_ref)


def test_only_where_the_cpu_multiplies_bf16_natively(monkeypatch):
    monkeypatch.setattr(_conv, "_cpu_has_native", lambda dtype: False)
    ours, _, x = make(SMALL[0])
    log = ConvLog()
    run(ours, x, log=log)
    assert log.masks == [[True, True, False]]


@pytest.mark.parametrize("case", TINY)
def test_the_tiny_route_is_torchs_convolution_in_float64(case):
    """TorchConvFunction with everything=True (conv_forward, conv_input_grad, conv_weight_grad), as
    TorchConv2d calls it, against F.conv2d and its gradients in float64."""
    c_in, c_out, k, s, p, d, h, w, bias = case
    (kh, kw), stride, padding, dil = pair(k), pair(s), pair(p), pair(d)
    torch.manual_seed(0)
    x = torch.randn(3, c_in, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c_out, c_in, kh, kw, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c_out, dtype=torch.float64, requires_grad=True) if bias else None
    leaves = [t for t in (x, weight, b) if t is not None]
    y = _conv.TorchConvFunction.apply(x, weight, b, stride, padding, dil, True)
    y_ref = torch.nn.functional.conv2d(x, weight, b, stride, padding, dil)
    gy = torch.randn_like(y_ref)
    got, want = torch.autograd.grad(y, leaves, gy), torch.autograd.grad(y_ref, leaves, gy)
    assert y.shape == y_ref.shape and y.shape[2] * y.shape[3] <= _conv.GEMM_CONV_MAX_PIXELS
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", TINY)
@pytest.mark.parametrize("layout", ["nchw", "channels-last input", "channels-last weight"])
def test_bf16_tiny_images_are_gemms_forward_and_backward(native_bf16, case, layout):
    ours, ref, x = make(case)
    if layout == "channels-last input":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "channels-last weight":  # torch then gives channels-last outputs: so does the route
        ours, ref = ours.to(memory_format=torch.channels_last), ref.to(memory_format=torch.channels_last)
    mine, theirs = ConvLog(), ConvLog()
    y, gx, gw, gb = run(ours, x, log=mine)
    y_ref, gx_ref, gw_ref, gb_ref = run(ref, x, log=theirs)
    assert (mine.forwards, mine.masks) == (0, [])  # no native convolution at all
    assert theirs.forwards == 1 and theirs.masks == [[True, True, case[-1]]]
    assert y.dtype == y_ref.dtype == torch.bfloat16 and y.shape == y_ref.shape
    assert gx.dtype == gx_ref.dtype == torch.float32 and gw.dtype == gw_ref.dtype == torch.float32
    for a, e in ((y, y_ref), (gx, gx_ref), (gw, gw_ref)):
        assert a.stride() == e.stride()
    # bf16 GEMMs with float accumulation rounded to bf16: they differ by the summation order
    for a, e in [(y, y_ref), (gx, gx_ref), (gw, gw_ref)] + ([(gb, gb_ref)] if case[-1] else []):
        assert (a.float() - e.float()).norm() <= 1e-2 * e.float().norm()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
def test_tiny_images_take_the_gemm_forward_without_a_gradient_too(native_bf16, mode):
    from dllab.layers.functional import clear_workspace

    clear_workspace()  # the workspace's buffers are first made here, whatever ran before
    ours, ref, x = make(TINY[1])
    log = ConvLog()
    with log, torch.autocast("cpu", dtype=torch.bfloat16):
        if mode == "frozen":  # a frozen layer inside a network: x needs its gradient, w does not
            ours.requires_grad_(False)
            y = ours(x.requires_grad_())
            y.float().sum().backward()
        else:
            with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
                y = ours(x)
    assert (log.forwards, log.masks) == (0, [])
    y_ref = ref(x.detach())
    assert y.dtype == torch.bfloat16 and (y.float() - y_ref.float()).norm() <= 1e-2 * y_ref.float().norm()
    if mode == "frozen":
        assert x.grad is not None and ours.weight.grad is None
    # a buffer first used under inference mode is not an inference tensor for the next training step
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours.requires_grad_(True)
        ours(x.detach().requires_grad_()).float().sum().backward()
    assert ours.weight.grad is not None


@pytest.mark.parametrize("view", ["expanded channels", "sliced width", "n111"])
def test_odd_strides_get_torchs_layouts(native_bf16, view):
    """torch reads a layout from the strides (a broadcast channel dimension and ambiguous
    N111 shapes default to NCHW): the tiny route's output and input gradient follow it."""
    torch.manual_seed(0)
    c = 1 if view == "n111" else 16
    ours = TorchConv2d(c, 8, 3, padding=1).to(torch.bfloat16)
    ref = nn.Conv2d(c, 8, 3, padding=1).to(torch.bfloat16)
    ref.load_state_dict(ours.state_dict())
    bf16 = dict(dtype=torch.bfloat16)
    x = {"expanded channels": torch.randn(2, 1, 4, 4, **bf16).expand(2, 16, 4, 4),  # strides (16, 0, 4, 1)
         "sliced width": torch.randn(2, 16, 4, 8, **bf16)[..., ::2],
         "n111": torch.randn(2, 1, 1, 1, **bf16)}[view]
    results = []
    for m in (ours, ref):
        xi = x.detach().requires_grad_()  # a view with the same strides, as a leaf
        y = m(xi)
        y.float().sum().backward()
        results.append((y, xi.grad))
    (y, gx), (y_ref, gx_ref) = results
    assert y.stride() == y_ref.stride() and gx.stride() == gx_ref.stride()
    assert (y.float() - y_ref.float()).norm() <= 1e-2 * y_ref.float().norm()


def test_an_empty_output_gets_torchs_error(native_bf16):
    ours, ref, _ = make(TINY[1])  # 3x3 stride 2, padding 1: a 1x1 input gives an 1x1 output ...
    x = torch.randn(2, 8, 1, 1)
    for m in (ours, ref):
        m.padding = (0, 0)  # ... and without padding none at all
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="[Kk]ernel size"):
            m(x)


def penalty_gradients(case):
    """(weight gradient, dL/dx, dL/dw) of a gradient penalty (create_graph=True) under bf16
    autocast, for TorchConv2d and for nn.Conv2d: the backward must itself be differentiable."""
    results = []
    for m in make(case)[:2]:
        x = make(case)[2].requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        gw, = torch.autograd.grad(y.float().pow(2).sum(), m.weight, create_graph=True)
        gw.pow(2).sum().backward()
        results.append((gw.detach(), x.grad, m.weight.grad))
    return zip(*results)


def test_a_differentiated_backward_of_a_tiny_image_is_torchs(native_bf16):
    """create_graph=True on the tiny route: the forward is dllab's GEMM, the backward torch's own."""
    for ours, theirs in penalty_gradients(TINY[1]):
        assert (ours - theirs).norm() <= 2e-2 * theirs.norm()


@pytest.fixture
def routed(monkeypatch):
    """Counts the calls that take the GEMM weight-gradient route."""
    calls = []
    apply = _conv.TorchConvFunction.apply
    monkeypatch.setattr(_conv.TorchConvFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_grad_and_inference_mode_run_nn_conv2d(native_bf16, routed, mode):
    ours, ref, x = make(SMALL[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(x).requires_grad and routed == [1]  # the route, where a gradient is wanted
        with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
            assert torch.equal(ours(x), ref(x))
    assert routed == [1]


@pytest.mark.parametrize("hw,route", [(4, "all"), (5, "weight-grad"), (8, "weight-grad"), (9, None)])
def test_the_routes_end_at_16_and_64_output_pixels(native_bf16, hw, route):
    conv = TorchConv2d(4, 6, 3, padding=1)
    log = ConvLog()
    with log, torch.autocast("cpu", dtype=torch.bfloat16):
        conv(torch.randn(2, 4, hw, hw, requires_grad=True)).float().sum().backward()
    assert log.forwards == (0 if route == "all" else 1)
    assert log.masks == {"all": [], "weight-grad": [[True, False, False]], None: [[True, True, True]]}[route]


def test_a_first_layer_whose_input_needs_no_gradient(native_bf16):
    ours, ref, x = make(SMALL[1])
    grads = []
    for m in (ours, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)  # x does not require grad: only the weight and bias gradients are asked for
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype))
        grads.append(m.weight.grad)
    assert (grads[0] - grads[1]).norm() <= 1e-2 * grads[1].norm()


def test_channels_last_weights_get_channels_last_gradients(native_bf16):
    ours, ref, x = make(SMALL[0])
    ours, ref = ours.to(memory_format=torch.channels_last), ref.to(memory_format=torch.channels_last)
    _, _, gw, _ = run(ours, x.contiguous(memory_format=torch.channels_last))
    _, _, gw_ref, _ = run(ref, x.contiguous(memory_format=torch.channels_last))
    channels_last = [g.is_contiguous(memory_format=torch.channels_last) for g in (gw, gw_ref)]
    assert channels_last == [True, True]
    assert (gw - gw_ref).norm() <= 1e-2 * gw_ref.norm()


def test_a_differentiated_backward_is_torchs(native_bf16):
    """A gradient penalty (create_graph=True) under bf16 autocast: the backward must itself be
    differentiable, so it is torch's convolution_backward there, giving nn.Conv2d's numbers."""
    for ours, theirs in penalty_gradients(SMALL[1]):
        assert torch.equal(ours, theirs)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # torch.func scripts a helper on first use
def test_torch_func_and_forward_mode_ad_run_nn_conv2d(native_bf16, routed):
    ours, ref, x = make(SMALL[0], dtype=torch.bfloat16)
    params = dict(ours.named_parameters())

    def loss(p, x):
        return torch.func.functional_call(ours, p, (x,)).float().pow(2).sum()

    grads = torch.func.grad(loss)(params, x)
    ref_grads = torch.autograd.grad(ref(x).float().pow(2).sum(), list(ref.parameters()))
    assert torch.equal(grads["weight"], ref_grads[0])
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        tangent = fwAD.unpack_dual(ours(dual)).tangent
    assert tangent is not None and routed == []


def test_operands_of_mixed_dtypes_are_refused_as_torch_refuses_them(native_bf16):
    conv = TorchConv2d(4, 6, 3, padding=1).to(torch.bfloat16)
    conv.bias.data = conv.bias.data.float()
    with pytest.raises(RuntimeError, match="same"):
        conv(torch.randn(2, 4, 6, 6, dtype=torch.bfloat16))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # deprecated in torch 2.10+, still used
def test_torchscript_fx_and_jit_trace_see_nn_conv2d(native_bf16):
    conv = TorchConv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 6, 6)
    want = conv(x)
    assert torch.equal(torch.jit.script(conv)(x), want)
    assert torch.equal(torch.fx.symbolic_trace(conv)(x), want)
    bf = TorchConv2d(4, 6, 3, padding=1).to(torch.bfloat16)
    xb = x.bfloat16()
    assert torch.equal(torch.jit.trace(bf, xb)(xb), bf(xb))


def test_the_layers_and_precision_auto_agree_on_native_bf16():
    """One answer (dllab._cpu) for --precision auto and for the layers' GEMM dtype: on torch 2.4,
    which has no bf16 probes, the layers used to emulate bf16 where auto picked it."""
    from dllab.utils import cpu_supports_bf16

    assert _conv._cpu_has_native(torch.bfloat16) == cpu_supports_bf16()


def test_it_is_an_nn_conv2d_with_the_same_state():
    conv = TorchConv2d(3, 5, 3, padding=1)
    assert isinstance(conv, nn.Conv2d)
    plain = nn.Conv2d(3, 5, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    conv.load_state_dict(plain.state_dict())
    assert repr(conv).replace("TorchConv2d", "Conv2d") == repr(plain)


def test_the_torch_resnet_uses_it_and_the_scratch_resnet_does_not():
    torch_net = resnet18(in_channels=1, width=8, layers="torch")
    scratch_net = resnet18(in_channels=1, width=8, layers="scratch")
    convs = [m for m in torch_net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is TorchConv2d for m in convs)
    assert not any(isinstance(m, TorchConv2d) for m in scratch_net.modules())
