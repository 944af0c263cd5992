"""2-D max-pooling from strided slices, and a backward pass that routes each gradient to its argmax.

Forward. Pad the input with -inf, so that padding never wins a comparison, then visit the kh x kw
taps of the window in row-major order (i outer, j inner). Tap (i, j) of *every* window at once is
one strided slice of the padded input:

    xp[:, :, i*dh : i*dh + sh*(Ho-1) + 1 : sh,  j*dw : j*dw + sw*(Wo-1) + 1 : sw]   # (N, C, Ho, Wo)

and a running elementwise maximum over the kh*kw slices gives the output. Next to the maximum we
keep the tap that produced it, and replace it only when a later tap is *strictly* greater, so a
window whose maximum occurs several times (a tie) picks the **first** one in row-major order:
torch's CPU and CUDA kernels scan the window the same way with the test ``val > max || isnan(val)``.
The ``isnan`` term copies torch's NaN rule too: a NaN always wins, so a window with NaNs outputs
NaN and points at its *last* NaN. Padding cells are never chosen: until a window has seen one real
cell, the first real cell it meets is taken whatever its value (this matters only for windows
whose real cells are all -inf, where torch also points at the first real cell).

``return_indices`` gives, like torch, the flat index ``h*W + w`` of the chosen cell in its
(H, W) input plane.

Backward. Only the chosen cell of each window influenced the output, so
``grad_x[n, c, index] += grad_y[n, c, p, q]`` for every output pixel: one ``scatter_add`` over the
flattened planes. When windows overlap (stride < kernel) a cell that is the maximum of several
windows receives the sum of their gradients, as in torch.
"""

from __future__ import annotations

import torch

from dllab.layers._conv import suggest_memory_format


def pool_taps(xp: torch.Tensor, kernel, stride, dilation, out_hw):
    """Yield (i, j, slice) for each tap of the pooling window, as strided views of ``xp``."""
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel, stride, dilation, out_hw
    for i in range(kh):
        for j in range(kw):
            yield i, j, xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]


def max_pool2d_forward(x: torch.Tensor, kernel, stride, padding, dilation, out_hw):
    """(values, flat indices) of a max-pool of (N, C, H, W) ``x``; see the module docstring."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), (ho, wo) = kernel, stride, padding, dilation, out_hw
    # padded size: ceil_mode may let the last window run past the right/bottom padding
    hp = max(h + 2 * ph, sh * (ho - 1) + dh * (kh - 1) + 1)
    wp = max(w + 2 * pw, sw * (wo - 1) + dw * (kw - 1) + 1)
    fmt = suggest_memory_format(x)
    if (hp, wp) == (h, w):
        xp = x
    else:
        low = -torch.inf if x.is_floating_point() else torch.iinfo(x.dtype).min
        xp = torch.full((n, c, hp, wp), low, dtype=x.dtype, device=x.device).contiguous(memory_format=fmt)
        xp[:, :, ph:ph + h, pw:pw + w] = x
    # which taps of which windows fall on real (unpadded) cells: depends only on (tap, p, q)
    rows = torch.arange(ho, device=x.device) * sh - ph  # top row of each window, in input coordinates
    cols = torch.arange(wo, device=x.device) * sw - pw
    best = arg = None
    found = None  # (Ho, Wo) bool: the window has met a real cell
    for i, j, v in pool_taps(xp, kernel, stride, dilation, out_hw):
        t = i * kw + j
        r, q = rows + i * dh, cols + j * dw
        real = ((r >= 0) & (r < h))[:, None] & ((q >= 0) & (q < w))[None, :]  # (Ho, Wo)
        if best is None:
            best = v.clone(memory_format=fmt) if v.is_floating_point() else v.clone()
            small = kh * kw <= 256  # the winning tap number fits a byte
            arg = torch.zeros(best.shape, dtype=torch.uint8 if small else torch.int64, device=x.device)
            found = real
            continue
        take = v > best
        if v.is_floating_point():
            take |= torch.isnan(v)
        first_real = real & ~found
        if bool(first_real.any()):
            take |= first_real
            found = found | real
        best = torch.where(take, v, best)
        arg.masked_fill_(take, t)
    # flat index h*W + w of the chosen cell
    best = best.contiguous(memory_format=fmt)
    arg = arg.long()
    ti, tj = arg // kw, arg % kw
    idx = (rows.view(ho, 1) + ti * dh) * w + (cols.view(1, wo) + tj * dw)
    return best, idx


class MaxPool2dFunction(torch.autograd.Function):
    """(y, indices) = max_pool2d(x); backward scatters grad_y to the argmax cells."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, out_hw):
        y, idx = max_pool2d_forward(x, kernel, stride, padding, dilation, out_hw)
        ctx.save_for_backward(idx)
        ctx.x_shape = x.shape
        ctx.fmt = suggest_memory_format(x)
        ctx.mark_non_differentiable(idx)
        return y, idx

    @staticmethod
    def backward(ctx, grad_y, grad_idx):
        (idx,) = ctx.saved_tensors
        n, c, h, w = ctx.x_shape
        grad_x = grad_y.new_zeros((n, c, h * w))
        grad_x.scatter_add_(2, idx.reshape(n, c, -1), grad_y.reshape(n, c, -1))
        grad_x = grad_x.view(n, c, h, w)
        if ctx.fmt != torch.contiguous_format:
            grad_x = grad_x.contiguous(memory_format=ctx.fmt)
        return grad_x, None, None, None, None, None
