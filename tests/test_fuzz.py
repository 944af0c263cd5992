"""Property-based (hypothesis) tests: no traceback where a message belongs.

- The CLI: argument lists built from the real parser's own flags, with good and bad values, go
  through ``dllab.cli.main`` and the real ``dllab.train.train`` up to the point where the run
  folder would be written. Every outcome is either "valid" (reached that point), or exit code
  0/1/2 with a message on stderr that starts ``dllab ...: error:`` and holds no traceback.
- The from-scratch layers: random argument combinations (valid or not) for ``conv2d``,
  ``max_pool2d``, ``batch_norm`` and their modules either give torch's numbers or raise
  ValueError/RuntimeError exactly where torch raises too.
"""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from dllab.layers import functional as DF
from dllab.layers import modules as DM

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ---- the CLI -----------------------------------------------------------------------------------
class Validated(Exception):
    """Raised where ``train()`` would write the run folder: everything before it accepted the flags."""


def _train_actions() -> dict[str, list[argparse.Action]]:
    from dllab.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    kinds = next(a for a in sub.choices["train"]._actions if isinstance(a, argparse._SubParsersAction))
    return {kind: [a for a in p._actions if a.option_strings and a.dest not in ("help", "quiet")]
            for kind, p in kinds.choices.items()}


ACTIONS = _train_actions()
GARBAGE = st.sampled_from(["", "x", "-1", "0", "1e999", "nan", "inf", "-inf", "3.5", "1e-12",
                           "999999999999", "--", "ü", "None", "[1]", " 2", "0x10"])


def _numbers(action) -> st.SearchStrategy[str]:
    name = getattr(action.type, "__name__", "")
    if "int" in name:
        return st.integers(-5, 10**7).map(str)
    return st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                     st.floats(-2, 2).map(str), st.sampled_from(["0", "1", "0.5", "1e-3"]))


def _value(action, paths: dict) -> st.SearchStrategy[list[str]]:
    flag = st.sampled_from(action.option_strings)
    if action.nargs == 0:  # store_true / store_false
        return flag.map(lambda f: [f])
    if action.choices is not None:
        values = st.one_of(st.sampled_from([str(c) for c in action.choices]), GARBAGE)
    elif action.dest == "dataset":
        values = st.sampled_from(["mnist5k", "mnist5k", "mnist", "cifar10", "fashion-mnist",
                                  f"folder:{paths['nowhere']}", "folder:", "imagenet", "MNIST5K"])
    elif action.dest in ("out", "data_dir", "classifier_run"):
        values = st.sampled_from([paths["empty"], paths["nowhere"], paths["under_file"], "."])
    elif action.type is not None:
        values = st.one_of(_numbers(action), GARBAGE)
    else:
        values = GARBAGE
    return st.tuples(flag, values).map(list)


@st.composite
def train_argv(draw, paths):
    kind = draw(st.sampled_from(sorted(ACTIONS)))
    chosen = draw(st.lists(st.sampled_from(ACTIONS[kind]), max_size=6, unique_by=lambda a: a.dest))
    argv = ["train", kind]
    for action in chosen:
        argv += draw(_value(action, paths))
    if draw(st.booleans()):
        argv += draw(st.sampled_from([["--bogus"], ["extra"], ["--epochs"], ["--lr=1", "--lr", "x"]]))
    return argv


@pytest.fixture
def cli_paths(tmp_path, monkeypatch):
    import dllab.engine

    def stop(*args, **kwargs):
        raise Validated

    monkeypatch.setattr(dllab.engine, "create_run", stop)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("x")
    return {"empty": str(tmp_path / "empty"), "nowhere": str(tmp_path / "nowhere"),
            "under_file": str(tmp_path / "a-file" / "run")}


def _run_cli(argv):
    from dllab.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: --help, or a usage error
            code = e.code
        except Validated:
            code = "validated"
    return code, out.getvalue(), err.getvalue()


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_cli_never_shows_a_traceback(cli_paths, data):
    argv = data.draw(train_argv(cli_paths))
    code, out, err = _run_cli(argv)  # anything but the outcomes below propagates and fails
    if code == "validated":
        return
    assert code in (1, 2), (argv, code, err)
    assert "Traceback" not in err and "Traceback" not in out
    first = err.strip().splitlines()[0] if err.strip() else ""
    assert first.startswith("dllab") and "error:" in first, (argv, err)
    if code == 2:  # bad usage: exactly one line
        assert len(err.strip().splitlines()) == 1, (argv, err)


@pytest.mark.parametrize("argv, needle", [
    (["train", "vae", "--precision", "fp16", "--device", "cpu"], "fp16"),
    (["train", "classifier", "--width", "0"], "--width"),
    (["train", "dcgan", "--image-size", "48"], "48"),
    (["train", "vae", "--lr", "nan"], "--lr"),
    (["train", "vae", "--resume"], "--resume"),
])
def test_cli_refuses_known_bad_values_before_writing(cli_paths, argv, needle):
    """A few bad values the fuzzer should also find, checked by hand."""
    code, _, err = _run_cli([*argv, "--dataset", "mnist5k", "--limit", "64"])
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_cli_accepts_good_values(cli_paths):
    # 64 examples need a batch of at most 64 (the default 128 is refused before the run folder)
    code, _, err = _run_cli(["train", "classifier", "--dataset", "mnist5k", "--limit", "64",
                             "--batch-size", "32", "--width", "8", "--precision", "fp32", "--lr", "0.1"])
    assert code == "validated", err
    code, _, err = _run_cli(["train", "classifier", "--dataset", "mnist5k", "--limit", "64"])
    assert code == 2 and "batch size 128 is larger than the training set (64 examples)" in err


# ---- the from-scratch layers -------------------------------------------------------------------
def _same_outcome(ours, theirs, compare, degenerate: bool = False):
    """Run both: where torch raises, ours must raise ValueError/RuntimeError; where torch returns,
    ours must return the same numbers. On ``degenerate`` arguments (zero or negative sizes, empty
    tensors), which torch sometimes lets through, ours may refuse with a ValueError instead."""
    try:
        expected = theirs()
    except (RuntimeError, ValueError, IndexError) as e:
        with pytest.raises((ValueError, RuntimeError)):
            ours()
        return type(e)
    if degenerate:
        try:
            got = ours()
        except ValueError:
            return ValueError
    else:
        got = ours()
    compare(got, expected)
    return None


def _close(a, b):
    if isinstance(b, tuple):
        for x, y in zip(a, b):
            _close(x, y)
        return
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


pair = st.one_of(st.integers(-1, 4), st.tuples(st.integers(-1, 4), st.integers(-1, 4)))


@FUZZ
@given(n=st.integers(1, 2), c_in=st.integers(1, 4), c_w=st.integers(1, 4), c_out=st.integers(1, 4),
       groups=st.integers(0, 3), kh=st.integers(1, 4), kw=st.integers(1, 4),
       h=st.integers(1, 7), w=st.integers(1, 7), stride=pair, dilation=pair,
       padding=st.one_of(pair, st.sampled_from(["same", "valid"])), bias=st.booleans(),
       unbatched=st.booleans(), seed=st.integers(0, 2**16))
def test_conv2d_matches_torch_or_both_refuse(n, c_in, c_w, c_out, groups, kh, kw, h, w, stride,
                                             dilation, padding, bias, unbatched, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((c_in, h, w) if unbatched else (n, c_in, h, w), generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_w, kh, kw, generator=g, dtype=torch.float64)
    b = torch.randn(c_out, generator=g, dtype=torch.float64) if bias else None
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)

    def ours():
        xx, ww = x.clone().requires_grad_(), weight.clone().requires_grad_()
        y = DF.conv2d(xx, ww, b, **args)
        y.sum().backward()
        return y.detach(), xx.grad, ww.grad

    def theirs():
        xx, ww = x.clone().requires_grad_(), weight.clone().requires_grad_()
        y = F.conv2d(xx, ww, b, **args)
        y.sum().backward()
        return y.detach(), xx.grad, ww.grad

    _same_outcome(ours, theirs, _close)


@FUZZ
@given(n=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(1, 8), w=st.integers(1, 8),
       kernel=pair, stride=st.one_of(st.none(), pair), padding=pair, dilation=pair,
       ceil_mode=st.booleans(), unbatched=st.booleans(), seed=st.integers(0, 2**16))
def test_max_pool2d_matches_torch_or_both_refuse(n, c, h, w, kernel, stride, padding, dilation,
                                                 ceil_mode, unbatched, seed):
    g = torch.Generator().manual_seed(seed)
    # distinct values, so the position of each maximum (and its gradient) is unambiguous
    numel = c * h * w if unbatched else n * c * h * w
    x = torch.randperm(numel, generator=g).double().view((c, h, w) if unbatched else (n, c, h, w))
    args = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation,
                ceil_mode=ceil_mode, return_indices=True)

    def run(fn):
        def call():
            xx = x.clone().requires_grad_()
            y, idx = fn(xx, **args)
            y.sum().backward()
            return y.detach(), idx, xx.grad
        return call

    def compare(got, expected):
        _close(got[0], expected[0])
        assert torch.equal(got[1], expected[1])
        _close(got[2], expected[2])

    _same_outcome(run(DF.max_pool2d), run(F.max_pool2d), compare)


@FUZZ
@given(n=st.integers(0, 3), c=st.integers(1, 3), extra=st.lists(st.integers(1, 3), max_size=2),
       stat_size=st.integers(1, 3), training=st.booleans(), momentum=st.floats(0, 1),
       eps=st.sampled_from([1e-5, 1e-3, 0.0, 1.0]), affine=st.booleans(), stats=st.booleans(),
       seed=st.integers(0, 2**16))
def test_batch_norm_matches_torch_or_both_refuse(n, c, extra, stat_size, training, momentum, eps,
                                                 affine, stats, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, c, *extra), generator=g, dtype=torch.float64) * 3 + 1
    rm = torch.randn(stat_size, generator=g, dtype=torch.float64) if stats else None
    rv = torch.rand(stat_size, generator=g, dtype=torch.float64) + 0.5 if stats else None
    weight = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    bias = torch.randn(c, generator=g, dtype=torch.float64) if affine else None

    def run(fn, eps=eps):
        def call():
            m, v = (rm.clone(), rv.clone()) if stats else (None, None)
            xx = x.clone().requires_grad_()
            y = fn(xx, m, v, weight, bias, training, momentum, eps)
            if y.numel():
                (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
            return y.detach(), xx.grad if xx.grad is not None else torch.zeros(0), m, v
        return call

    def compare(got, expected):
        _close(got[0], expected[0])
        if expected[1].numel() and got[1].numel():
            torch.testing.assert_close(got[1], expected[1], rtol=1e-7, atol=1e-7)
        if stats:
            _close(got[2], expected[2])
            _close(got[3], expected[3])

    if eps == 0.0:  # torch's rule for eps=0 changed between versions; dllab keeps torch 2.14's
        if training:
            with pytest.raises(ValueError, match="eps"):
                run(DF.batch_norm)()
            return
        # in evaluation eps=0 is well defined (running_var > 0 here): torch 2.11 refuses it, so the
        # reference adds an eps too small to change a float64 rsqrt of a variance of at least 0.5
        _same_outcome(run(DF.batch_norm), run(F.batch_norm, eps=1e-300), compare, degenerate=n == 0)
        return
    _same_outcome(run(DF.batch_norm), run(F.batch_norm), compare, degenerate=n == 0)


@FUZZ
@given(c_in=st.integers(0, 4), c_out=st.integers(0, 4), kernel=pair, stride=pair, dilation=pair,
       padding=st.one_of(pair, st.sampled_from(["same", "valid", "full"])), groups=st.integers(0, 3),
       bias=st.booleans(), mode=st.sampled_from(["zeros", "reflect", "replicate", "circular", "wrap"]),
       hw=st.integers(2, 6))
def test_conv2d_module_matches_torch_or_both_refuse(c_in, c_out, kernel, stride, dilation, padding,
                                                    groups, bias, mode, hw):
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
                padding_mode=mode, dtype=torch.float64)
    def ints(v):
        return list(v) if isinstance(v, tuple) else [v] if isinstance(v, int) else [1]

    # torch builds e.g. a 0-channel, 0x0-kernel or stride-0 conv (some fail later, in forward)
    degenerate = min([c_in, c_out, *ints(kernel), *ints(stride), *ints(dilation)]) < 1 \
        or min(ints(padding)) < 0
    try:
        reference = nn.Conv2d(c_in, c_out, kernel, **args)
    except (ValueError, RuntimeError, ZeroDivisionError):
        with pytest.raises(ValueError):
            DM.Conv2d(c_in, c_out, kernel, **args)
        return
    if degenerate:  # dllab may refuse those at construction
        try:
            ours = DM.Conv2d(c_in, c_out, kernel, **args)
        except ValueError:
            return
    else:
        ours = DM.Conv2d(c_in, c_out, kernel, **args)
    if c_in == 0 or c_out == 0:  # built alike; torch's own forward is inconsistent there (a
        return                   # 0 -> 1 channel conv returns 0 channels), so nothing to compare
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, c_in, hw, hw + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _same_outcome(lambda: ours(x), lambda: reference(x), _close, degenerate=degenerate)


@FUZZ
@given(features=st.integers(-1, 4), eps=st.sampled_from([1e-5, 0.1]),
       momentum=st.one_of(st.none(), st.floats(0, 1)), affine=st.booleans(), track=st.booleans(),
       n=st.integers(1, 3), train=st.booleans())
def test_batchnorm2d_module_matches_torch_or_both_refuse(features, eps, momentum, affine, track, n,
                                                         train):
    args = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track,
                dtype=torch.float64)
    try:
        reference = nn.BatchNorm2d(features, **args)
    except (ValueError, RuntimeError):
        with pytest.raises((ValueError, RuntimeError)):
            DM.BatchNorm2d(features, **args)
        return
    if features < 1:  # torch builds BatchNorm2d(-1) without affine parameters; dllab may refuse
        try:
            ours = DM.BatchNorm2d(features, **args)
        except ValueError:
            return
    else:
        ours = DM.BatchNorm2d(features, **args)
    ours.load_state_dict(reference.state_dict())
    reference.train(train)
    ours.train(train)
    x = torch.randn(n, max(features, 1), 3, 2, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # twice: the second call sees updated running statistics
        if _same_outcome(lambda: ours(x), lambda: reference(x), _close, degenerate=features < 1):
            return
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-9, atol=1e-9)


def test_batch_norm_refuses_zero_eps_in_training_on_every_torch():
    """eps=0 in training divides a constant channel by zero. dllab refuses it as torch 2.14 does
    (torch 2.4 accepts it, 2.11 refuses it in evaluation too); evaluation with eps=0 works."""
    x = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        DF.batch_norm(x, None, None, training=True, eps=0.0)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        DM.BatchNorm2d(2, eps=0.0)(x.view(4, 2, 1, 1))
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.full((2,), 4.0, dtype=torch.float64)
    torch.testing.assert_close(DF.batch_norm(x, rm, rv, training=False, eps=0.0), x / 2)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("stats, affine", [(None, None), (3, None), (None, 3), (0, None)])
def test_batch_norm_on_an_empty_1d_input_like_torch(training, stats, affine):
    """An input of shape (0,) comes back empty, whatever statistics and affine parameters come
    with it (PyTorch's OpInfo samples for batch_norm include it)."""
    x = torch.randn(0, dtype=torch.float64, requires_grad=True)
    args = [torch.zeros(stats, dtype=torch.float64) if stats is not None else None,
            torch.ones(stats, dtype=torch.float64) if stats is not None else None,
            torch.ones(affine, dtype=torch.float64) if affine is not None else None,
            torch.zeros(affine, dtype=torch.float64) if affine is not None else None]
    ours, ref = DF.batch_norm(x, *args, training=training), F.batch_norm(x, *args, training=training)
    assert ours.shape == ref.shape == (0,) and ours.dtype == ref.dtype
    ours.sum().backward()
    assert x.grad.shape == (0,)


def test_batch_norm_on_an_empty_eval_batch_without_statistics_like_torch():
    x = torch.randn(0, 2, dtype=torch.float64)
    assert F.batch_norm(x, None, None, training=False).shape == (0, 2)
    assert DF.batch_norm(x, None, None, training=False).shape == (0, 2)
