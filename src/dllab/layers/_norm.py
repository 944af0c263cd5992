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
    """(y, mean, biased var) of a training-mode batch norm; closed-form backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        acc = acc_dtype(x.dtype)
        dims = reduce_dims(x)
        xf = x if x.dtype == acc else x.to(acc)
        var, mean = torch.var_mean(xf, dim=dims, correction=0)  # (C,), (C,)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight.to(acc)
        shift = -mean * scale if bias is None else bias.to(acc) - mean * scale
        y = scale_shift(x, scale, shift)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        acc = mean.dtype
        dims = reduce_dims(x)
        shape = channel_shape(x)
        n = x.numel() // x.shape[1]
        g = grad_y if grad_y.dtype == acc else grad_y.to(acc)
        xf = x if x.dtype == acc else x.to(acc)
        xc = xf - mean.view(shape)  # x - mean
        sum_g = g.sum(dims)  # (C,)
        sum_g_xhat = (g * xc).sum(dims) * invstd  # (C,)
        grad_x = grad_w = grad_b = None
        if need_x:
            a = invstd if weight is None else invstd * weight.to(acc)  # gamma / std
            # a * (g - sum_g/n - xhat * sum_g_xhat/n), written as g*a + xc*b + c0
            b = -a * invstd * sum_g_xhat / n
            c0 = -a * sum_g / n
            grad_x = torch.addcmul(torch.addcmul(c0.view(shape), xc, b.view(shape)), g, a.view(shape))
            grad_x = grad_x.to(x.dtype)
        if need_w and weight is not None:
            grad_w = sum_g_xhat.to(weight.dtype)
        if need_b and ctx.bias_dtype is not None:
            grad_b = sum_g.to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None
