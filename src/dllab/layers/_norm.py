"""Batch normalisation from reductions and elementwise arithmetic, with a closed-form backward.

Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal
Covariate Shift", ICML 2015 (https://arxiv.org/abs/1502.03167), Algorithm 1 and section 3.

Forward (training). For an input of shape (N, C, *), each channel c is normalised over the
``n = N * prod(*)`` values it has in the batch:

    mean_c = sum(x) / n,   var_c = sum((x - mean_c)^2) / n          (biased: divide by n)
    xhat = (x - mean_c) / sqrt(var_c + eps),   y = gamma_c * xhat + beta_c

computed as one fused multiply-add over the tensor, ``y = x * scale_c + shift_c`` with
``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale``.

Computing the variance. The textbook two-pass algorithm (mean first, then the mean of
``(x - mean)^2``) is exact to rounding; the one-pass ``var = sum(x^2)/n - mean^2`` saves a pass
over the tensor but subtracts two numbers of size ``var + mean^2``, so it loses
``log10(1 + mean^2/var)`` of float32's 7 digits. On the CPU, where each pass over the tensor is
what costs, the variance comes from one pass (``sum(x)`` and ``|x|^2``), and any channel with
``mean^2 > 1000 * var`` (more than 3 digits lost) sends the whole batch through the two-pass
algorithm instead (that test is read on the host: a GPU would wait for it). For float64 on the
CPU the two-pass algorithm is always used. Elsewhere (CUDA) float32 and float64 statistics come
from one ``torch.var_mean`` (a reduction, not a batch-norm kernel), whose one pass is Welford's
update, as exact as two passes; half-precision inputs take two passes in float32 there.

Running statistics. The normalisation uses the *biased* variance (it is the variance of the very
numbers being normalised), but the running estimate that eval mode uses should estimate the
variance of the population the batches are drawn from, and the unbiased estimator of that is
``var * n / (n - 1)`` (Bessel's correction; Ioffe & Szegedy, Algorithm 2, step 10). Hence

    running_mean <- (1 - momentum) * running_mean + momentum * mean
    running_var  <- (1 - momentum) * running_var  + momentum * var * n / (n - 1)

and training needs n > 1. ``momentum=None`` (module only) uses ``1 / num_batches_tracked``: the
running statistics are then the plain average of all batch statistics so far.

Backward (training), with ``g = dL/dy`` and sums over the n values of a channel: because mean and
var depend on every x of the channel, differentiating through them gives

    dL/dbeta = sum(g),   dL/dgamma = sum(g * xhat),
    dL/dx    = gamma / sqrt(var + eps) * (g - sum(g) / n - xhat * sum(g * xhat) / n)

(the two subtracted terms are the gradient flowing through the mean and through the variance).
It needs x (or ``x - mean``, whichever the forward kept), the saved mean and 1/sqrt(var + eps),
and two channel sums: no graph of the forward's intermediate tensors is kept. The last line is
evaluated as ``g * a_c + x * b_c + c_c`` with per-channel a, b, c: two fused multiply-adds. In
eval mode the statistics are constants and ``y = x * scale + shift`` is differentiated by
autograd as it stands.

Low precision: statistics and the per-channel scale/shift are computed in float32 for
bfloat16/float16 inputs (like torch's kernels), and the output has the input's dtype.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from dllab.layers import _workspace as workspace

ONE_PASS_MAX_RATIO = 1e3  # mean^2 / var above which the one-pass variance is not trusted
NORM_MIN_PLANE = 25  # CPU sums of squares: per-plane norms for planes this large (5x5), else x*x and a sum


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half types, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the call when it is a no-op (each call costs about a microsecond)."""
    return t if t.dtype == dtype else t.to(dtype)


def channel_shape(x: torch.Tensor) -> tuple[int, ...]:
    """(1, C, 1, ..., 1): broadcasts a per-channel vector against ``x``."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    """Every dimension except the channel dimension 1."""
    return (0,) + tuple(range(2, x.dim()))


def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor | None = None):
    """``x * scale + shift`` with per-channel vectors ``scale`` and ``shift`` of shape (C,).

    For NCHW inputs on the CPU a multiply followed by an in-place add is 2-4x faster than one
    ``addcmul`` whose first operand is the broadcast shift (0.13 against 0.5 ms for a 64x512x4x4
    tensor here): both vectors would broadcast along the innermost (plane) dimension, which that
    kernel does not vectorise. For channels-last inputs, whose channels are innermost, and on a
    GPU (one kernel rather than two) ``addcmul`` is the faster one, and so is it where ``out`` has a
    lower precision than the vectors (a bfloat16 x): there it rounds once, the multiply-and-add twice.
    """
    shape = channel_shape(x)
    if multiply_then_add(x, scale, out):
        return torch.mul(x, scale.view(shape), out=out).add_(shift.view(shape))
    return torch.addcmul(shift.view(shape), x, scale.view(shape), out=out)


def multiply_then_add(x: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None) -> bool:
    """Whether :func:`channel_affine` takes a multiply then an add (NCHW on the CPU, at one precision)."""
    return (scale.dtype == x.dtype and (out is None or out.dtype == x.dtype) and x.dim() > 2
            and x.is_contiguous() and workspace.uses_cpu_paths(x.device))


def scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """``x * scale + shift`` per channel, computed in scale's dtype, returned in x's dtype."""
    shift = torch.zeros_like(scale) if shift is None else shift
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or shift.requires_grad):
        shape = channel_shape(x)  # autograd can't use out= (nor in-place ops): channel_affine's kernels
        if multiply_then_add(x, scale):
            return torch.mul(x, scale.view(shape)).add(shift.view(shape))
        return torch.addcmul(shift.view(shape), x, scale.view(shape)).to(x.dtype)
    out = torch.empty_like(x)  # computed in scale's dtype, rounded once into x's
    return channel_affine(x, scale, shift, out=out)


def channel_sum(x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """sum(x) per channel, in ``acc``.

    A contiguous (N, C, *) tensor is summed as its (N, C, L) view in two steps, which on the CPU
    here is up to 3x faster than one reduction over (0, 2, 3): planes of 64 values or more are
    summed first along their contiguous length L, then over N; smaller planes over N first (a
    reduction across the outer dimension, vectorised along the C*L contiguous values), then over L.
    """
    dtype = None if x.dtype == acc else acc  # (passing dtype= costs a little even when it is x's)
    if not workspace.uses_cpu_paths(x.device):  # a GPU reduces over several dimensions in one kernel
        return x.sum(reduce_dims(x), dtype=dtype)
    if x.dim() > 2 and x.is_contiguous():
        x3 = x.view(x.shape[0], x.shape[1], -1)
        if x3.shape[2] >= 64:
            return x3.sum(2, dtype=dtype).sum(0)
        return x3.sum(0, dtype=dtype).sum(1)
    return x.sum(reduce_dims(x), dtype=dtype)


def channel_sumsq(x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """sum(x^2) per channel, in ``acc``, without a tensor-sized temporary where that is faster.

    torch's CPU norm kernel is fast along a contiguous dimension but not vectorised across an
    outer one (reducing a channels-last tensor over (0, 2, 3) took 20x as long as summing it).
    Contiguous (N, C, *) with planes of ``NORM_MIN_PLANE`` values or more: the 2-norm of each
    (image, channel) plane, squared and summed over N (one read of x, where x*x and a sum read it,
    write a temporary and read that: on the AMX Xeon the faster from 6x6 planes up, and even at
    5x5). Smaller planes (the per-plane norms are then many tiny reductions, slower at
    4x4), channels-last and 2-D (N, C) inputs on the CPU: x*x into a workspace buffer, then a
    channel sum.
    """
    on_cpu = workspace.uses_cpu_paths(x.device)
    if x.dim() > 2 and x.is_contiguous() and (math.prod(x.shape[2:]) >= NORM_MIN_PLANE or not on_cpu):
        return torch.linalg.vector_norm(x.view(x.shape[0], x.shape[1], -1), 2, 2, dtype=acc).square_().sum(0)
    if on_cpu:
        return channel_dot(x, x, acc)
    return torch.linalg.vector_norm(x, 2, reduce_dims(x), dtype=acc).square_()


def channel_dot(g: torch.Tensor, z: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """sum(g * z) per channel, in ``acc``: the product in a workspace buffer (z's layout), then a channel sum.

    The product is taken in ``acc`` (a bfloat16 z is widened first), so no product is rounded to
    half precision.
    """
    tmp = workspace.buffer_like("bn_tmp", z, acc)
    if z.dtype == acc:
        torch.mul(g, z, out=tmp)
    else:
        tmp.copy_(z).mul_(g)
    return channel_sum(tmp, acc)


def batch_statistics(x: torch.Tensor, acc: torch.dtype, inv_n: torch.Tensor):
    """(mean, biased variance, x - mean or None) per channel of a training batch, in ``acc``.

    ``x - mean`` is returned when it was computed (the two-pass algorithm), in ``acc``: a workspace
    buffer on the CPU if x has half precision (the caller must use it before the next call).
    """
    if not workspace.uses_cpu_paths(x.device) and x.dtype == acc:  # a GPU: one Welford pass
        var, mean = torch.var_mean(x, reduce_dims(x), correction=0)
        return mean, var, torch.sub(x, mean.view(channel_shape(x)))
    mean = channel_sum(x, acc).mul_(inv_n)
    if workspace.uses_cpu_paths(x.device) and acc != torch.float64:
        var = channel_sumsq(x, acc).mul_(inv_n).addcmul_(mean, mean, value=-1)  # E[x^2] - mean^2
        # trusted where no channel has mean^2 > ratio * var (a variance rounded below 0 included);
        # a NaN anywhere reads False too: then two passes, which keep the other channels exact
        if torch.addcmul(var, mean, mean, value=-1 / ONE_PASS_MAX_RATIO).min().item() >= 0:
            return mean, var, None
    out = None if x.dtype == acc else workspace.buffer_like("bn_xc", x, acc)
    xc = torch.sub(x, mean.view(channel_shape(x)), out=out)
    return mean, channel_sumsq(xc, acc).mul_(inv_n), xc


class BatchNormTrainFunction(torch.autograd.Function):
    """A training-mode batch norm: y, with the running statistics updated in place; closed-form backward.

    Backward keeps ``z``: x itself (the one-pass case) or ``x - mean`` (the two-pass case, which
    computes it anyway). Half-precision x is kept as it is and widened to float32 in the CPU
    workspace when backward needs it.

    At the small ResNet shapes (512 x 4 x 4 at batch 32 is 0.26 M values) a step's fixed costs
    rival its passes over the tensor, so the per-channel arithmetic below is written with few,
    mostly in-place operations, its constants are cached 0-d tensors (``workspace.scalar``: torch
    wraps and converts a Python number on every operation), and the running statistics are
    updated here rather than by the caller (no second grad mode, no outputs for mean and variance).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        acc = acc_dtype(x.dtype)
        n = x.numel() // x.shape[1]
        mean, var, xc = batch_statistics(x, acc, workspace.scalar(1.0 / n, acc, x.device))
        if running_mean is not None:
            running_mean.lerp_(as_dtype(mean, running_mean.dtype), momentum)
        if running_var is not None:  # the unbiased variance (Bessel)
            unbiased = torch.mul(var, workspace.scalar(n / (n - 1), acc, x.device))
            running_var.lerp_(as_dtype(unbiased, running_var.dtype), momentum)
        invstd = var.add_(workspace.scalar(eps, acc, x.device)).rsqrt_()  # (var is not needed again)
        scale = invstd if weight is None else invstd * as_dtype(weight, acc)
        y = torch.empty_like(x)
        if xc is None:  # y = x * scale + (beta - mean * scale)
            if bias is None:
                shift = torch.mul(mean, scale).neg_()
            else:
                shift = torch.addcmul(as_dtype(bias, acc), mean, scale, value=-1)
            channel_affine(x, scale, shift, out=y)
        elif bias is None:  # y = (x - mean) * scale + beta: no cancellation when |mean| >> std
            torch.mul(xc, scale.view(channel_shape(x)), out=y)
        else:
            channel_affine(xc, scale, as_dtype(bias, acc), out=y)
        shifted = xc is not None and xc.dtype == x.dtype  # keep x - mean, unless it is a workspace buffer
        # weight is kept for its version counter only: an in-place change before backward is an
        # error, as in torch (backward itself uses scale, computed from the weight forward saw)
        ctx.save_for_backward(xc if shifted else x, mean, invstd, scale, weight)
        ctx.shifted = shifted  # z = x - mean (True) or z = x (False)
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @once_differentiable  # a second derivative would need this backward's own graph: not kept
    def backward(ctx, grad_y):
        x_kept, mean, invstd, a, _ = ctx.saved_tensors  # a = scale = gamma / std
        z = x_kept
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        acc = mean.dtype
        minus_inv_n = workspace.scalar(-1.0 / (z.numel() // z.shape[1]), acc, z.device)
        if z.dtype != acc:  # half precision: work on a float32 copy of x
            z = workspace.buffer_like("bn_xc", z, acc)  # a fresh tensor elsewhere than on the CPU
            z.copy_(x_kept)
        g = grad_y
        sum_g = channel_sum(g, acc)  # (C,)  = dL/dbeta
        sum_g_xhat = channel_dot(g, z, acc)  # sum(g * z)
        if not ctx.shifted:  # z = x: sum(g * (x - mean)) = sum(g * x) - mean * sum(g)
            sum_g_xhat.addcmul_(mean, sum_g, value=-1)
        sum_g_xhat.mul_(invstd)  # (C,)  = dL/dgamma
        grad_x = grad_w = grad_b = None
        if need_x:
            # a * (g - sum_g/n - xhat * sum_g_xhat/n)  =  g*a + z*b + c
            u = torch.mul(a, minus_inv_n)  # -a/n
            c = torch.mul(u, sum_g)  # -a * sum_g/n ...
            b = u.mul_(invstd).mul_(sum_g_xhat)  # -a/std * sum_g_xhat/n
            if not ctx.shifted:
                c.addcmul_(b, mean, value=-1)  # ... - b * mean, since x - mean = z - mean
            grad_x = torch.empty_like(x_kept)  # x's dtype and layout
            a = a.view(channel_shape(z))
            if grad_x.dtype == acc:
                channel_affine(z, b, c, out=grad_x).addcmul_(g, a)
            else:
                tmp = workspace.buffer_like("bn_tmp", z, acc)
                torch.addcmul(channel_affine(z, b, c, out=tmp), g, a, out=grad_x)
        if need_w and ctx.weight_dtype is not None:
            grad_w = as_dtype(sum_g_xhat, ctx.weight_dtype)
        if need_b and ctx.bias_dtype is not None:
            grad_b = as_dtype(sum_g, ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None
