"""What one training step asks of a GPU, counted on the CPU: kernels and host syncs.

:func:`dllab.utils.count_ops` sees every aten operation below autograd, on any device, so these
tests hold the CUDA code path's per-step figures without a GPU. A host sync (``.item()``,
``bool(tensor)``, ...) makes Python wait until the GPU has finished everything queued, so the
GPU idles while Python prepares the next step; the engine's step has none (see
``Trainer.train_step``). Before this test existed, every step read each loss's finiteness on the
host: one sync per update (the "host" path below, still used for the very first step).

The kernel budgets are the counts measured when the test was written (torch 2.14 and 2.4), with
a few kernels of slack: an extra per-parameter loop (say, one norm per parameter: +62 kernels for
the ResNet-18) fails them.
"""

import pytest
import torch

from dllab.config import from_mapping
from dllab.data import load
from dllab.engine import STEP_KEPT, Trainer
from dllab.runs import Run
from dllab.train import config_class, defaults, kind_module
from dllab.utils import count_ops

TINY = {"classifier": dict(width=8), "vae": dict(), "dcgan": dict(g_width=8, d_width=8, nz=16)}
#: kernels of one step on the device path (ResNet-18, the MLP VAE, the DCGAN), at most
KERNEL_BUDGET = {"classifier": 195, "vae": 99, "dcgan": 140}
UPDATES = {"classifier": 1, "vae": 1, "dcgan": 2}


def _trainer(kind, tmp_path, **settings):
    cfg = from_mapping(config_class(kind), {**defaults(kind), "dataset": "mnist5k", "limit": 64,
                                            "batch_size": 32, "device": "cpu", "precision": "fp32",
                                            "out": str(tmp_path), **TINY[kind], **settings})
    trainer = kind_module(kind).TRAINER(cfg, load("mnist5k", limit=64), Run(tmp_path, {}, writer=False),
                                        torch.device("cpu"), quiet=True)
    trainer.build()
    batches = list(trainer.loader("train", shuffle=True, augment=False, drop_last=True))
    return trainer, batches


def _count_step(trainer, x, y):
    with count_ops() as counts:
        trainer.train_step(x, y)
    return counts


@pytest.mark.parametrize("kind", ["classifier", "vae", "dcgan"])
def test_a_training_step_never_waits_for_the_device(kind, tmp_path, monkeypatch):
    trainer, batches = _trainer(kind, tmp_path)
    x, y = batches[0]
    first = _count_step(trainer, x, y)  # the first step checks on the host (see train_step)
    assert first.syncs == UPDATES[kind], first.sync_ops()
    trainer.train_step(x, y)
    after = _count_step(trainer, x, y)
    assert after.syncs == 0, f"host syncs in a {kind} step: {after.sync_ops()}"
    assert after.kernels <= KERNEL_BUDGET[kind], (after.kernels, sorted(after.by_op.items(), key=lambda kv: -kv[1]))
    # before: the same step with the finite check on the host
    monkeypatch.setattr(Trainer, "_skip_on_device", lambda self, updates: False)
    before = _count_step(trainer, x, y)
    assert before.syncs == UPDATES[kind] and before.sync_ops() == {"aten._local_scalar_dense.default": UPDATES[kind]}
    print(f"{kind}: host syncs per step {before.syncs} -> {after.syncs}; kernels {before.kernels} -> {after.kernels}")


def test_count_ops_sees_syncs_and_leaves_views_out():
    x = torch.randn(4, 3)
    with count_ops() as counts:
        y = x.t().unsqueeze(0)  # views: no kernel
        z = (y * 2).sum()
        assert bool(z > -1e9)
        _ = z.item()
    assert counts.kernels == 3 + 2 and counts.syncs == 2  # mul, sum, gt, and the two reads
    assert counts.sync_ops() == {"aten._local_scalar_dense.default": 2}
    x = torch.randn(4, 3)
    with count_ops() as counts:
        x.tolist(), x.numpy(), x.cpu(), torch.equal(x, x)  # host reads: no kernel on a CPU tensor
    assert counts.syncs == 4 and counts.sync_ops() == {"Tensor.tolist": 1, "Tensor.numpy": 1, "Tensor.cpu": 1,
                                                       "aten.equal.default": 1}
    assert "tolist" not in vars(torch.Tensor) and x.tolist() == x.tolist()  # put back afterwards
    with count_ops() as counts:
        x.t().reshape(12)  # not a view of x: a copy
        x.split([1, 3])
    assert counts.kernels == 1 and counts.by_op["aten.clone.default"] == 1


def _trained(trainer):
    """Every number a step changes but the weight averages: weights, buffers, optimiser state."""
    tensors = [v for m in trainer.modules().values() for v in m.state_dict().values()]
    for opt in trainer.optimizers().values():
        for state in opt.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
    return tensors


def _model_state(trainer):
    return [v for m in trainer.modules().values() for v in m.state_dict().values()]


def _averaged(trainer):
    return [v for a in trainer.averages().values() for v in a.module.state_dict().values()]


@pytest.mark.parametrize("kind,settings", [("classifier", dict(ema=0.9, grad_clip=1.0)), ("vae", {}),
                                           ("dcgan", dict(ema=0.9))])
def test_the_device_skip_matches_the_host_skip(kind, settings, tmp_path, monkeypatch):
    """Six steps, the 3rd and 4th with a NaN batch: the step that decides on the device leaves
    everything as the host-checked step does (weights, BatchNorm statistics, optimiser state
    bit for bit; the weight average to rounding), counts the same skips and logs the same
    metrics, zeroed and weighted 0 for the skipped steps."""
    runs = {}
    for path in ("device", "host"):
        torch.manual_seed(0)
        trainer, batches = _trainer(kind, tmp_path / path, **settings)
        if path == "host":
            monkeypatch.setattr(Trainer, "_skip_on_device", lambda self, updates: False)
        logged = []
        for step in range(6):
            x, y = batches[step % len(batches)]
            if step in (2, 3):
                x = torch.full_like(x, float("nan"))
            logged.append(trainer.train_step(x, y))
            trainer.step += 1
        trainer._settle_skips()
        runs[path] = (trainer, logged)
        monkeypatch.undo()
    (dev, dev_logged), (host, host_logged) = runs["device"], runs["host"]
    assert dev.nonfinite_total == host.nonfinite_total == 2
    assert dev._nonfinite_run == 0  # (the host path resets its count in fit)
    assert len(_trained(dev)) == len(_trained(host)) > 0
    for i, (a, b) in enumerate(zip(_trained(dev), _trained(host))):
        assert torch.equal(a, b), i
    assert _averaged(dev) and len(_averaged(dev)) == len(_averaged(host)) or kind == "vae"
    for a, b in zip(_averaged(dev), _averaged(host)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert [a.updates for a in dev.averages().values()] == [a.updates for a in host.averages().values()]
    for step, (d, h) in enumerate(zip(dev_logged, host_logged)):
        if step in (2, 3):
            assert h == {} and float(d[STEP_KEPT]) == 0.0 and all(float(v) == 0 for v in d.values())
        else:
            assert float(d.pop(STEP_KEPT, 1.0)) == 1.0 and d.keys() == h.keys()
            for k in d:
                torch.testing.assert_close(d[k], h[k].float(), msg=k)


def test_a_streak_of_skips_on_the_device_stops_the_run_at_the_next_read(tmp_path):
    """Skips are read now and then: a row of ``max_nonfinite`` skips stops the run at the next
    read, even when a good step came between the row and the read."""
    from dllab.engine import NonFiniteLossError

    trainer, batches = _trainer("vae", tmp_path, max_nonfinite=3)
    x, y = batches[0]
    trainer.train_step(x, y)
    trainer.step += 1
    nan = torch.full_like(x, float("nan"))
    for _ in range(2):
        trainer.train_step(nan, y)
        trainer.step += 1
    trainer._settle_skips()  # 2 in a row: goes on
    assert trainer.nonfinite_total == 2 and trainer._nonfinite_run == 2
    trainer.train_step(nan, y)
    trainer.step += 1
    with pytest.raises(NonFiniteLossError, match="3 steps in a row had a non-finite loss .counted at step 4"):
        trainer._settle_skips()


@pytest.mark.slow  # torch.compile builds for up to a minute on a 2-core CPU
@pytest.mark.parametrize("kind,settings", [("vae", {}), ("classifier", dict(norm=False)),
                                           ("vae", dict(compile_mode="reduce-overhead"))],
                         ids=["vae", "classifier", "vae-reduce-overhead"])
def test_a_compiled_step_gives_the_eager_results(kind, settings, tmp_path):
    """``--compile`` (and ``--compile-mode reduce-overhead``, CUDA graphs on a GPU, TorchInductor's
    kernels without them on the CPU): three steps, the second with a NaN batch, compiled and eager from the same
    start give the same weights (to float rounding: the compiled kernels fuse and reorder
    arithmetic) and skip the same step. The classifier runs without batch norm here: with it, its
    first steps amplify rounding differences into gradients that differ by up to 30 % (eager on 1
    thread against eager on 2 threads does the same), which no tolerance can tell from a bug. (Compiled random draws, the VAE's noise, take eager's
    stream only with inductor's ``fallback_random``. ``count_ops`` cannot look inside compiled
    code: under a dispatch mode torch runs it eagerly.)"""
    import torch._dynamo
    import torch._inductor.config

    results = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        trainer, batches = _trainer(kind, tmp_path / str(compiled), compile=compiled, **settings)
        start = [t.clone() for t in _model_state(trainer)]
        with torch._inductor.config.patch(fallback_random=True):
            for step in range(3):
                x, y = batches[step % len(batches)]
                if step == 1:
                    x = torch.full_like(x, float("nan"))
                trainer.train_step(x, y)
                trainer.step += 1
        assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0) == compiled
        trainer._settle_skips()
        results[compiled] = (trainer.nonfinite_total, start, _model_state(trainer))
    (eager_skips, start, eager), (compiled_skips, _, compiled) = results[False], results[True]
    assert eager_skips == compiled_skips == 1
    for i, (a, b) in enumerate(zip(eager, compiled)):
        if a.is_floating_point():  # what the two updates did, compiled against eager
            update = (a - start[i]).double().norm()
            assert (b - a).double().norm() <= 1e-3 * update + 1e-6, i
        else:
            assert torch.equal(a, b), i


def test_a_row_of_skips_ended_before_the_read_still_stops_the_run(tmp_path):
    from dllab.engine import NonFiniteLossError

    trainer, batches = _trainer("vae", tmp_path, max_nonfinite=2)
    x, y = batches[0]
    nan = torch.full_like(x, float("nan"))
    for batch in (x, nan, nan, nan, x):  # three in a row, then a good step, then the read
        trainer.train_step(batch, y)
        trainer.step += 1
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        trainer._settle_skips()


#: kernels of one call of each from-scratch layer on the paths a CUDA tensor takes, forward and
#: backward, at most (measured: max-pool 14 + 3, batch norm 10 + 14, 3x3 convolution 4-5 + 13-15;
#: before the GPU paths were counted, max-pool 47 + 3 with a host sync and batch norm 14-17 + 15-18)
LAYER_BUDGET = {"maxpool": (15, 3), "bn": (11, 15), "conv": (6, 16)}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("layer", list(LAYER_BUDGET))
def test_the_scratch_layers_on_the_gpu_paths_never_wait_and_launch_few_kernels(layer, channels_last, monkeypatch):
    """On a GPU the from-scratch layers run without host syncs and with a bounded number of kernels.
    Before this test max-pool read one answer on the host in every forward call (whether NaN or
    -inf needed torch's rules) and rebuilt its index tables each call: 47 kernels and 1 sync; batch
    norm took its mean and variance in four reductions and split each channel sum in two."""
    from dllab.layers import BatchNorm2d, Conv2d, MaxPool2d, _workspace

    monkeypatch.setattr(_workspace, "uses_cpu_paths", lambda device: False)
    module = {"maxpool": lambda: MaxPool2d(3, 2, 1), "bn": lambda: BatchNorm2d(16),
              "conv": lambda: Conv2d(16, 16, 3, padding=1, bias=False)}[layer]()
    x = torch.randn(4, 16, 12, 12)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    module(x).sum().backward()  # first call: anything made once
    with count_ops() as forward:
        y = module(x)
    g = torch.ones_like(y)
    with count_ops() as backward:
        y.backward(g)
    assert forward.syncs == backward.syncs == 0, (forward.sync_ops(), backward.sync_ops())
    budget = LAYER_BUDGET[layer]
    assert forward.kernels <= budget[0] and backward.kernels <= budget[1], \
        (forward.kernels, backward.kernels, sorted(forward.by_op.items(), key=lambda kv: -kv[1]))


#: ATen calls (views included: on the CPU each costs a dispatch) of one scratch batch-norm call on
#: the CPU paths, forward and backward, at most (measured: 26-27 + 25 in NCHW, 23 + 21 in
#: channels-last; before the fixed cost was cut, 28-29 + 27 and 25 + 23)
BN_CPU_CALLS = {False: (27, 25), True: (23, 21)}  # by channels_last


@pytest.mark.parametrize("hw", [12, 4], ids=["norm-planes", "small-planes"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_scratch_batch_norm_makes_few_calls_on_the_cpu(hw, channels_last):
    """At ResNet-18's small shapes a scratch batch norm's fixed cost (its ATen calls and the Python
    around them) rivals its passes over the tensor, so the number of calls is held down."""
    from dllab.layers import BatchNorm2d

    module = BatchNorm2d(16)
    x = torch.randn(4, 16, hw, hw)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    module(x).sum().backward()
    with count_ops() as forward:
        y = module(x)
    g = torch.ones_like(y)
    with count_ops() as backward:
        y.backward(g)
    calls = sum(forward.by_op.values()), sum(backward.by_op.values())
    assert forward.syncs == 1  # the one-pass variance's conditioning test, read on the host
    budget = BN_CPU_CALLS[channels_last]
    assert calls[0] <= budget[0] and calls[1] <= budget[1], (calls, forward.by_op, backward.by_op)


def test_a_scratch_resnet_step_on_the_gpu_paths_never_waits(tmp_path, monkeypatch):
    """The classifier with every from-scratch layer, max-pool included (the ImageNet stem), on the
    paths a CUDA tensor takes: no host sync in a step."""
    from dllab.layers import _workspace

    monkeypatch.setattr(_workspace, "uses_cpu_paths", lambda device: False)
    trainer, batches = _trainer("classifier", tmp_path, layers="scratch", stem="imagenet")
    x, y = batches[0]
    for _ in range(2):
        trainer.train_step(x, y)
    after = _count_step(trainer, x, y)
    assert after.syncs == 0, after.sync_ops()


@pytest.mark.parametrize("r1", [0.0, 1.0], ids=["plain", "r1"])
def test_each_update_computes_gradients_for_its_own_model_only(r1, tmp_path):
    """The DCGAN's generator loss runs through D, and an R1 step differentiates D's input: a plain
    backward computed D's weight gradients in G's update (thrown away by D's next zero_grad) and
    the real images' gradient in the R1 step. Each update's backward now names its own parameters,
    so D's weight gradients are computed once per step and the real images' never."""
    trainer, batches = _trainer("dcgan", tmp_path, r1=r1, r1_every=1)
    x, y = batches[0]
    trainer.train_step(x, y)
    computed = {"D": 0, "G": 0}
    hooks = [p.register_hook(lambda g, k=k: computed.__setitem__(k, computed[k] + 1))
             for k, module in (("D", trainer.disc), ("G", trainer.gen)) for p in module.parameters()]
    try:
        trainer.train_step(x, y)
    finally:
        for h in hooks:
            h.remove()
    assert computed == {"D": len(list(trainer.disc.parameters())), "G": len(list(trainer.gen.parameters()))}
    seen = []  # every input D reads in a step: the R1 step's real images are a leaf with requires_grad
    hook = trainer.disc.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        trainer.train_step(x, y)
    finally:
        hook.remove()
    assert any(t.is_leaf and t.requires_grad for t in seen) == bool(r1)
    assert all(t.grad is None for t in seen if t.is_leaf)


def test_a_parameter_the_optimiser_steps_outside_its_module_still_trains(tmp_path):
    """The backward names what the update's optimiser steps, not just its module's parameters: a
    kind whose optimiser also steps, say, a learned scale keeps training it."""
    trainer, batches = _trainer("vae", tmp_path)
    extra = torch.nn.Parameter(torch.zeros(()))
    update = trainer.declared_updates()[0]
    update.optimizer.add_param_group({"params": [extra]})
    loss_of = update.loss

    def loss(batch):
        value, metrics = loss_of(batch)
        return value + (extra - 1) ** 2, metrics

    update.loss = loss
    x, y = batches[0]
    trainer.train_step(x, y)
    assert extra.grad is not None and extra.item() > 0


def test_a_compiled_classifier_with_the_from_scratch_layers_trains(tmp_path, monkeypatch):
    """``--layers scratch --compile`` failed at its first step (dynamo could not trace the layers'
    workspace). The layers now run eagerly between the compiled graphs; three steps, one of them
    skipped for a NaN batch, give eager's weights. (aot_eager: no TorchInductor C++ build.)"""
    import torch._dynamo

    from dllab import engine

    compile_ = torch.compile
    monkeypatch.setattr(engine.torch, "compile", lambda model, **kw: compile_(model, backend="aot_eager"))
    from dllab.layers.functional import clear_workspace

    results = {}
    for compiled in (True, False):  # compiled first, with an empty workspace: it failed making its buffers
        torch.manual_seed(0)
        torch._dynamo.reset()
        clear_workspace()
        trainer, batches = _trainer("classifier", tmp_path / str(compiled), layers="scratch", compile=compiled)
        for step in range(3):
            x, y = batches[step % len(batches)]
            trainer.train_step(torch.full_like(x, float("nan")) if step == 1 else x, y)
            trainer.step += 1
        trainer._settle_skips()
        results[compiled] = (trainer.nonfinite_total, _model_state(trainer))
    assert results[False][0] == results[True][0] == 1
    for a, b in zip(results[False][1], results[True][1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
