"""Batch normalisation from reductions and elementwise arithmetic, with a closed-form backward.

Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal
Covariate Shift", ICML 2015 (https://arxiv.org/abs/1502.03167), Algorithm 1 and section 3.

Forward (training). For an input of shape (N, C, *), each channel c is normalised over the
``n = N * prod(*)`` values it has in the batch:

    mean_c = sum(x) / n,   var_c = sum((x - mean_c)^2) / n          (biased: divide by n)
    xhat = (x - mean_c) / sqrt(var_c + eps),   y = gamma_c * xhat + beta_c

computed as ``y = x * scale_c + shift_c`` with ``scale = gamma / sqrt(var + eps)`` and
``shift = beta - mean * scale``: one fused multiply-add over the tensor after one fused pass for
both statistics (``torch.var_mean``).

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
It needs only x, the saved mean and 1/sqrt(var + eps), and two channel sums: no graph of the
forward's intermediate tensors is kept. In eval mode the statistics are constants and
``y = x * scale + shift`` is differentiated by autograd as it stands.

Low precision: statistics and the per-channel scale/shift are computed in float32 for
bfloat16/float16 inputs (like torch's kernels), and the output has the input's dtype.
"""

from __future__ import annotations

import torch

from dllab.layers import _workspace as workspace


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half types, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def channel_shape(x: torch.Tensor) -> tuple[int, ...]:
    """(1, C, 1, ..., 1): broadcasts a per-channel vector against ``x``."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    """Every dimension except the channel dimension 1."""
    return (0,) + tuple(range(2, x.dim()))


def scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` per channel, computed in float32 or better, returned in x's dtype."""
    shape = channel_shape(x)
    if scale.dtype == x.dtype:
        return torch.addcmul(shift.view(shape), x, scale.view(shape))
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or shift.requires_grad):
        return torch.addcmul(shift.view(shape), x, scale.view(shape)).to(x.dtype)  # autograd can't use out=
    out = torch.empty_like(x)  # computed in scale's dtype, rounded once into x's
    return torch.addcmul(shift.view(shape), x, scale.view(shape), out=out)


class BatchNormTrainFunction(torch.autograd.Function):
    """(y, mean, biased var) of a training-mode batch norm; closed-form backward.

    Two passes for the statistics, as the numerically safe textbook algorithm: ``mean = sum(x)/n``,
    then ``xc = x - mean`` and ``var = |xc|^2 / n`` (no cancellation, unlike ``E[x^2] - mean^2``).
    For float32/float64 inputs ``xc`` is what backward keeps (instead of x: the same size, and the
    backward needs x only as ``x - mean``); for half inputs x is kept and ``xc`` rebuilt in float32.
    Temporaries live in the CPU workspace (see ``_workspace.py``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        acc = acc_dtype(x.dtype)
        dims, shape = reduce_dims(x), channel_shape(x)
        n = x.numel() // x.shape[1]
        mean = x.sum(dims, dtype=acc) / n  # (C,)
        keep_xc = x.dtype == acc
        xc = torch.sub(x, mean.view(shape), out=None if keep_xc else workspace.buffer_like("bn_xc", x, acc))
        var = torch.linalg.vector_norm(xc, 2, dims).square_() / n  # (C,) biased
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight.to(acc)
        shift = None if bias is None else bias.to(acc)
        out = torch.empty_like(x)  # x's dtype and layout; computed in acc, rounded once
        if shift is None:
            torch.mul(xc, scale.view(shape), out=out)
        else:
            torch.addcmul(shift.view(shape), xc, scale.view(shape), out=out)
        ctx.save_for_backward(xc if keep_xc else x, weight, mean, invstd)
        ctx.keep_xc = keep_xc
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        saved, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        acc = mean.dtype
        dims, shape = reduce_dims(saved), channel_shape(saved)
        n = saved.numel() // saved.shape[1]
        xc = saved if ctx.keep_xc else torch.sub(saved, mean.view(shape), out=workspace.buffer_like("bn_xc", saved, acc))
        g = grad_y
        sum_g = g.sum(dims, dtype=acc)  # (C,)  = dL/dbeta
        tmp = workspace.buffer_like("bn_tmp", xc, acc)
        sum_g_xhat = torch.mul(g, xc, out=tmp).sum(dims) * invstd  # (C,)  = dL/dgamma
        grad_x = grad_w = grad_b = None
        if need_x:
            a = invstd if weight is None else invstd * weight.to(acc)  # gamma / std
            # a * (g - sum_g/n - xhat * sum_g_xhat/n)  =  g*a + xc*b + c0
            b = -a * invstd * sum_g_xhat / n
            c0 = -a * sum_g / n
            grad_x = torch.empty_like(grad_y, memory_format=torch.preserve_format) if grad_y.dtype == saved.dtype \
                else torch.empty_like(saved)
            if grad_x.dtype == acc:
                torch.addcmul(c0.view(shape), xc, b.view(shape), out=grad_x).addcmul_(g, a.view(shape))
            else:
                torch.addcmul(torch.addcmul(c0.view(shape), xc, b.view(shape), out=tmp), g, a.view(shape), out=grad_x)
        if need_w and weight is not None:
            grad_w = sum_g_xhat.to(weight.dtype)
        if need_b and ctx.bias_dtype is not None:
            grad_b = sum_g.to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None
