"""The layer, train and eval paths on a CUDA GPU, against torch on the same GPU.

Every test here is marked ``cuda`` and is skipped, with the reason, where torch sees no GPU
(``make gpu-check`` runs them on one). On a machine without a GPU the branches the layers take
for CUDA tensors are still checked, on CPU tensors, by ``device_paths`` in test_layers.py.

Precision is pinned: float64 for the layer grids (cuDNN and the from-scratch GEMMs then agree to
1e-10), float32 with TF32 off for the small network, and bf16 autocast only where a test says so.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_layers import CONV_GRID, FORBIDDEN, POOL_GRID, _OpRecorder, _small_net, _twin_small_nets

from dllab.cli import main
from dllab.layers import BatchNorm2d, Conv2d, MaxPool2d
from dllab.layers import functional as LF
from dllab.runs import read_metrics
from dllab.utils import resolve_device, resolve_precision

pytestmark = pytest.mark.cuda

DT = torch.float64
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 would round float32 GEMMs and convolutions to 10-bit mantissas, on both sides unequally."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _compare(ours, theirs, inputs, tol=1e-10):
    """Forward values and every input gradient, on the GPU, of ours(*inputs) against theirs(*inputs)."""
    a = [None if t is None else t.detach().to(CUDA).requires_grad_() for t in inputs]
    b = [None if t is None else t.detach().to(CUDA).requires_grad_() for t in inputs]
    ya, yb = ours(*a), theirs(*b)
    assert ya.device.type == "cuda" and ya.shape == yb.shape and ya.dtype == yb.dtype
    torch.testing.assert_close(ya, yb, rtol=tol, atol=tol)
    g = torch.randn(yb.shape, dtype=yb.dtype, generator=torch.Generator().manual_seed(0)).to(CUDA)
    ya.backward(g)
    yb.backward(g)
    for ta, tb in zip(a, b):
        if ta is not None:
            torch.testing.assert_close(ta.grad, tb.grad, rtol=tol, atol=tol)
    return ya, yb


def test_device_auto_is_the_gpu_and_precision_auto_is_bf16_where_supported():
    assert resolve_device("auto").type == "cuda"
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    assert resolve_precision("auto", CUDA) == expected


@pytest.mark.parametrize("case", CONV_GRID, ids=[str(i) for i in range(len(CONV_GRID))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_on_cuda_matches_torch(case, channels_last):
    n, c, h, w, c_out, k, s, p, d, g, has_bias = case
    kh, kw = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(len(CONV_GRID) + hash(case) % 2**31)
    x = torch.randn(n, c, h, w, dtype=DT, generator=gen)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c // g, kh, kw, dtype=DT, generator=gen)
    bias = torch.randn(c_out, dtype=DT, generator=gen) if has_bias else None
    _compare(lambda x_, w_, b_: LF.conv2d(x_, w_, b_, s, p, d, g),
             lambda x_, w_, b_: F.conv2d(x_, w_, b_, s, p, d, g), [x, weight, bias])


@pytest.mark.parametrize("case", POOL_GRID, ids=[str(i) for i in range(len(POOL_GRID))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool2d_on_cuda_matches_torch(case, channels_last):
    h, w, k, s, p, d, ceil = case
    x = torch.randn(2, 3, h, w, dtype=DT, generator=torch.Generator().manual_seed(7))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    _compare(lambda x_: LF.max_pool2d(x_, k, s, p, d, ceil_mode=ceil),
             lambda x_: F.max_pool2d(x_, k, s, p, d, ceil_mode=ceil), [x], tol=0)
    ya, ia = LF.max_pool2d(x.to(CUDA), k, s, p, d, ceil_mode=ceil, return_indices=True)
    yb, ib = F.max_pool2d(x.to(CUDA), k, s, p, d, ceil_mode=ceil, return_indices=True)
    assert torch.equal(ya, yb) and torch.equal(ia, ib)


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5, 6), (64, 16, 8, 8)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_on_cuda_matches_torch(shape, channels_last):
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last is a 4-D layout")
    gen = torch.Generator().manual_seed(10)
    c = shape[1]
    x = torch.randn(shape, dtype=DT, generator=gen) * 3 + 2
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.rand(c, dtype=DT, generator=gen) + 0.5, torch.randn(c, dtype=DT, generator=gen)
    stats = [[torch.zeros(c, dtype=DT, device=CUDA), torch.ones(c, dtype=DT, device=CUDA)] for _ in range(2)]
    _compare(lambda x_, w_, b_: LF.batch_norm(x_, *stats[0], w_, b_, True, 0.3),
             lambda x_, w_, b_: F.batch_norm(x_, *stats[1], w_, b_, True, 0.3), [x, w, b])
    for ours, ref in zip(stats[0], stats[1]):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    _compare(lambda x_: LF.batch_norm(x_, *stats[0], w.to(CUDA), b.to(CUDA), False),
             lambda x_: F.batch_norm(x_, *stats[1], w.to(CUDA), b.to(CUDA), False), [x])


@pytest.mark.parametrize("channels_last", [False, True])
def test_modules_train_and_eval_on_cuda_in_float32(channels_last):
    torch.manual_seed(16)
    ours, ref = _twin_small_nets(device=CUDA)
    x = torch.randn(4, 3, 12, 12, device=CUDA)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    for mode in ("train", "eval"):
        ours.train(mode == "train")
        ref.train(mode == "train")
        ya, yb = ours(x), ref(x)
        torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-4)
        ya.square().sum().backward()
        yb.square().sum().backward()
        for pa, pb in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-3, atol=1e-3)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_on_cuda_like_torch():
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    torch.manual_seed(17)
    ours, ref = _twin_small_nets(device=CUDA)
    x = torch.randn(4, 3, 12, 12, device=CUDA)
    outs = []
    for net in (ours, ref):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = net(x)
        y.float().square().mean().backward()
        outs.append((y, [p.grad for p in net.parameters()]))
    (ya, ga), (yb, gb) = outs
    assert ya.dtype == yb.dtype
    torch.testing.assert_close(ya.float(), yb.float(), rtol=0.05, atol=0.05)
    for a, b in zip(ga, gb):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.1, atol=max(0.02 * b.abs().max().item(), 1e-4))


def test_no_native_conv_pool_or_batchnorm_kernel_runs_on_cuda():
    net = _small_net(Conv2d, BatchNorm2d, MaxPool2d).to(CUDA)
    x = torch.randn(2, 3, 32, 32, device=CUDA, requires_grad=True)
    with _OpRecorder() as rec:
        for autocast in (False, True):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                net(x).float().sum().backward()
    assert any("mm" in op for op in rec.ops)
    bad = sorted(op for op in rec.ops if any(word in op for word in FORBIDDEN))
    assert not bad, bad


# ---- training and evaluation through the CLI -----------------------------------------------------
TINY = {
    "classifier": ["--width", "4", "--batch-size", "32", "--lr", "0.05"],
    "vae": ["--batch-size", "32", "--latent-dim", "4", "--tsne-points", "100"],
    "dcgan": ["--batch-size", "32", "--g-width", "8", "--d-width", "8", "--nz", "16"],
}


def _train(kind, out, *extra, epochs=2):
    return main(["train", kind, "--dataset", "mnist5k", "--limit", "128", "--epochs", str(epochs),
                 "--out", str(out), "--quiet", "--seed", "3", "--device", "cuda", *TINY[kind], *extra])


@pytest.mark.parametrize("kind", ["classifier", "vae", "dcgan"])
def test_train_resume_and_eval_on_cuda(kind, tmp_path):
    """A run trains on the GPU, resumes there to more epochs, and evaluates on the GPU and on the
    CPU from its checkpoint."""
    out = tmp_path / kind
    assert _train(kind, out, epochs=1) == 0
    assert _train(kind, out, "--resume", epochs=2) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"].startswith("cuda") and summary["epochs"] == 2
    losses = [r["loss"] if "loss" in r else r["g_loss"] for r in read_metrics(out)
              if r["split"] == "train" and ("loss" in r or "g_loss" in r)]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    for device in ("cuda", "cpu"):
        assert main(["eval", str(out), "--device", device, "--quiet", "--checkpoint", "last",
                     "--num-samples", "200"]) == 0
        assert (out / "eval.json").exists()


def test_classifier_bf16_channels_last_on_cuda_learns(tmp_path):
    """The GPU's usual settings (bf16 autocast where supported, channels_last) learn the digits:
    the same run reached 96.3 % on an AMX CPU (bf16, 80 steps)."""
    out = tmp_path / "fast"
    assert main(["train", "classifier", "--dataset", "mnist5k", "--limit", "2048", "--epochs", "5",
                 "--out", str(out), "--quiet", "--seed", "3", "--device", "cuda", "--width", "16",
                 "--batch-size", "128", "--precision", "auto", "--channels-last"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "fp32")
    assert summary["test_acc"] > 0.9


@pytest.mark.parametrize("kind,precision", [("classifier", "fp32"), ("classifier", "bf16"), ("vae", "fp32"),
                                            ("dcgan", "fp32")])
def test_a_training_step_never_syncs_on_cuda(kind, precision, tmp_path):
    """What tests/test_step_counts.py counts on the CPU, checked by CUDA itself: from the second
    step on, ``torch.cuda.set_sync_debug_mode("error")`` raises at any host sync in a step."""
    from dllab.config import from_mapping
    from dllab.data import load
    from dllab.runs import Run
    from dllab.train import config_class, defaults, kind_module

    tiny = {"classifier": dict(width=8), "vae": dict(), "dcgan": dict(g_width=8, d_width=8, nz=16)}[kind]
    cfg = from_mapping(config_class(kind), {**defaults(kind), "dataset": "mnist5k", "limit": 128, "batch_size": 32,
                                            "device": "cuda", "precision": precision, "out": str(tmp_path), **tiny})
    trainer = kind_module(kind).TRAINER(cfg, load("mnist5k", limit=128), Run(tmp_path, {}, writer=False), CUDA,
                                        quiet=True)
    trainer.build()
    batches = list(trainer.loader("train", shuffle=True, augment=False, drop_last=True))
    for x, y in batches[:2]:
        trainer.train_step(x, y)
    x, y = batches[2]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        metrics = trainer.train_step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v.device.type == "cuda" for v in metrics.values())


@pytest.mark.parametrize("kind", ["classifier", "vae", "dcgan"])
def test_cuda_graphs_train_and_give_the_eager_results(kind, tmp_path):
    """``--compile --compile-mode reduce-overhead`` on the GPU: CUDA graphs are recorded and
    replayed (the DCGAN calls D three times a step, the case the step marks are for), a short run
    finishes, and its first steps land on eager's weights to float rounding (TF32 is off)."""
    import torch._dynamo

    from dllab.config import from_mapping
    from dllab.data import load
    from dllab.runs import Run
    from dllab.train import config_class, defaults, kind_module

    tiny = {"classifier": dict(width=8, norm=False), "vae": dict(), "dcgan": dict(g_width=8, d_width=8, nz=16)}[kind]
    states = {}
    for mode in ("eager", "reduce-overhead"):
        torch.manual_seed(0)
        torch._dynamo.reset()
        cfg = from_mapping(config_class(kind), {
            **defaults(kind), "dataset": "mnist5k", "limit": 256, "batch_size": 32, "device": "cuda",
            "precision": "fp32", "out": str(tmp_path / mode), "compile": mode != "eager",
            "compile_mode": "reduce-overhead", **tiny})
        trainer = kind_module(kind).TRAINER(cfg, load("mnist5k", limit=256), Run(tmp_path / mode, {}, writer=False),
                                            CUDA, quiet=True)
        trainer.build()
        assert trainer.uses_cuda_graphs is (mode != "eager")
        for x, y in list(trainer.loader("train", shuffle=True, augment=False, drop_last=True))[:6]:
            metrics = trainer.train_step(x, y)  # outputs of earlier replays are never read again
            trainer.step += 1
        assert all(bool(torch.isfinite(v).all()) for v in metrics.values())
        states[mode] = {k: v.detach().clone() for m in trainer.modules().values() for k, v in m.state_dict().items()}
    for key, eager in states["eager"].items():
        if eager.is_floating_point():
            torch.testing.assert_close(states["reduce-overhead"][key], eager, rtol=1e-3, atol=1e-4, msg=key)
    out = tmp_path / "run"
    assert _train(kind, out, "--compile", "--compile-mode", "reduce-overhead", epochs=1) == 0


def test_scratch_layers_never_sync_on_cuda():
    """What tests/test_step_counts.py counts on CPU tensors sent down the CUDA paths, checked by
    CUDA: the from-scratch conv, batch norm and max-pool (forward and backward) make no host sync."""
    torch.manual_seed(0)
    net = nn.Sequential(Conv2d(8, 16, 3, padding=1), BatchNorm2d(16), nn.ReLU(), MaxPool2d(3, 2, 1)).to(CUDA)
    x = torch.randn(4, 8, 16, 16, device=CUDA, requires_grad=True)
    net(x).sum().backward()  # first call: anything made once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        net(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
