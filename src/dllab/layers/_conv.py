"""2-D convolution as matrix multiplication (im2col), with a hand-written backward pass.

The formula. For an input ``x`` of shape (N, C, H, W), a weight ``w`` of shape
(C_out, C/G, kh, kw) and ``G`` groups, the output is

    y[n, o, p, q] = b[o] + sum_{c, i, j} w[o, c, i, j] * xp[n, g*C/G + c, p*sh + i*dh, q*sw + j*dw]

where ``xp`` is ``x`` zero-padded by (top, bottom, left, right), ``g = o // (C_out/G)`` is the
group of output channel ``o``, and the sum runs over the C/G input channels of that group and the
kh x kw taps of the kernel. The output has ``Ho = (H + top + bottom - dh*(kh-1) - 1) // sh + 1``
rows (and likewise ``Wo`` columns).

im2col. Lay the input out channels-last, NHWC, so that the C channels of one pixel are adjacent in
memory. The (kh, kw, C) patch that output pixel (n, p, q) reads is then a strided *view* of the
padded input: ``xp.as_strided((N, Ho, Wo, kh, kw, C), (sN, sh*sH, sw*sW, dh*sH, dw*sW, 1))``.
Copying that view into a contiguous buffer gives the matrix ``col`` of shape
(N*Ho*Wo, kh*kw*C), one row per output pixel and one column per (tap, channel). The weight read
the same way, ``w.permute(2, 3, 1, 0)``, is a (kh*kw*C, C_out) matrix ``wmat``, and the double sum
above is exactly one row of the matrix product:

    y_nhwc (N*Ho*Wo, C_out) = col (N*Ho*Wo, kh*kw*C) @ wmat (kh*kw*C, C_out) + b

One large GEMM does all the arithmetic, and since the output comes out as NHWC rows, a 1x1
stride-1 convolution needs no copy at all: ``col`` *is* the input, viewed as (N*H*W, C).
With G groups each group is its own GEMM, batched with ``torch.bmm``.

The backward pass (written by hand so that autograd keeps only ``x`` and ``w``, not the
kh*kw-times larger ``col``; ``col`` is rebuilt when it is needed):

* ``grad_b = sum over pixels of grad_y``                 (column sums of the (N*Ho*Wo, C_out) matrix)
* ``grad_w = grad_y^T @ col``                             ((C_out, N*Ho*Wo) @ (N*Ho*Wo, kh*kw*C))
* ``grad_x``: every element of ``col`` is a copy of one input element, so the gradient of the
  input is the sum of ``grad_col = grad_y @ wmat^T`` over all the places it was copied to
  ("col2im"): kh*kw strided additions into a zero-padded buffer, then the padding is cut off.
  For stride 1 the same sum is itself a convolution: ``grad_y``, zero-padded by
  ``d*(k-1) - pad``, convolved with the kernel flipped in both spatial axes and with its in/out
  channels swapped. That form runs the big GEMM with ``kh*kw*C_out`` as the inner dimension and
  needs no scatter, so it is used whenever it applies.

Low precision. Under ``torch.autocast`` the functional wrapper casts ``x``, ``w`` and ``b`` to the
autocast dtype first (as autocast does for ``F.conv2d``), so results and gradients have the dtypes
torch gives. The GEMMs then run in that dtype where the hardware multiplies it natively (CUDA, and
CPUs with AVX512-BF16 or AMX); on other CPUs a bf16 GEMM is emulated at a small fraction of fp32
speed, so there the already-rounded bf16 operands are widened to fp32 (exactly), multiplied in
fp32 and the result rounded to bf16: the same numbers a native bf16 GEMM with fp32 accumulation
produces, up to summation order.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices natively (bf16: AVX512-BF16/AMX; fp16: AMX-FP16)."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        if dtype == torch.float16:
            return bool(torch.cpu._is_amx_fp16_supported())
    except AttributeError:  # older torch without the probes: assume emulation
        return False
    return True


def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the GEMMs of a ``dtype`` convolution run in on ``device`` (see module docstring)."""
    if dtype in (torch.float16, torch.bfloat16) and device.type == "cpu" and not _cpu_has_native(dtype):
        return torch.float32
    return dtype


def to_nhwc_padded(x: torch.Tensor, pads: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """(N, C, H, W) -> zero-padded channels-last (N, H+top+bottom, W+left+right, C) in ``dtype``.

    The transpose to NHWC, the cast and the padding happen in one copy; a channels-last input
    with no padding is returned as a view, without copying.
    """
    top, bottom, left, right = pads
    n, c, h, w = x.shape
    xh = x.permute(0, 2, 3, 1)  # (N, H, W, C) view
    if not any(pads) and xh.is_contiguous() and x.dtype == dtype:
        return xh
    hp, wp = h + top + bottom, w + left + right
    xp = torch.empty((n, hp, wp, c), dtype=dtype, device=x.device)
    # zero only the border, then copy the interior: every element is written once
    if top:
        xp[:, :top].zero_()
    if bottom:
        xp[:, hp - bottom:].zero_()
    if left:
        xp[:, top:hp - bottom, :left].zero_()
    if right:
        xp[:, top:hp - bottom, wp - right:].zero_()
    xp[:, top:top + h, left:left + w].copy_(xh)
    return xp


def im2col(xp: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
           dilation: tuple[int, int], out_hw: tuple[int, int], groups: int) -> torch.Tensor:
    """Padded NHWC input (N, Hp, Wp, C) -> patch matrix (G, N*Ho*Wo, kh*kw*C/G).

    Row (n, p, q) holds the kh x kw x C/G patch that output pixel (n, p, q) of each group reads,
    ordered (tap row i, tap column j, channel c), matching ``weight_matrix``.
    """
    n, hp, wp, c = xp.shape
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel, stride, dilation, out_hw
    g = groups
    if kh == kw == 1 and g == 1:
        if (sh, sw) != (1, 1):
            xp = xp[:, : sh * (ho - 1) + 1: sh, : sw * (wo - 1) + 1: sw]
        return xp.reshape(1, n * ho * wo, c)  # a view when no copy is needed
    s_n, s_h, s_w, s_c = xp.stride()
    patches = xp.as_strided((n, ho, wo, kh, kw, g, c // g),
                            (s_n, sh * s_h, sw * s_w, dh * s_h, dw * s_w, (c // g) * s_c, s_c),
                            xp.storage_offset())
    if g == 1:
        return patches.reshape(1, n * ho * wo, kh * kw * c)
    return patches.permute(5, 0, 1, 2, 3, 4, 6).reshape(g, n * ho * wo, kh * kw * (c // g))


def weight_matrix(w: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """Weight (C_out, C/G, kh, kw) -> (G, kh*kw*C/G, C_out/G), rows ordered like ``im2col``'s columns."""
    c_out, cg, kh, kw = w.shape
    wg = w.reshape(groups, c_out // groups, cg, kh, kw)
    return wg.permute(0, 3, 4, 2, 1).reshape(groups, kh * kw * cg, c_out // groups).to(dtype)


def conv_nhwc(xp: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, stride, dilation,
              groups: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Convolution of an already padded NHWC input; returns the NHWC output (N, Ho, Wo, C_out).

    ``out``, if given, is an (N, Ho, Wo, C_out) tensor (any dtype, any strides) to write into.
    """
    n, hp, wp, c = xp.shape
    c_out, _, kh, kw = w.shape
    ho = (hp - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wp - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    col = im2col(xp, (kh, kw), stride, dilation, (ho, wo), groups)  # (G, M, K)
    wmat = weight_matrix(w, groups, dtype)  # (G, K, C_out/G)
    m = n * ho * wo
    b = None if bias is None else bias.to(dtype)
    if groups == 1:
        col2, w2 = col[0], wmat[0]
        direct = out is not None and out.dtype == dtype and out.is_contiguous()
        y2 = out.view(m, c_out) if direct else None  # the GEMM writes straight into ``out``
        y2 = torch.mm(col2, w2, out=y2) if b is None else torch.addmm(b, col2, w2, out=y2)  # (M, C_out)
        y = y2.view(n, ho, wo, c_out)
    else:
        if b is None:
            y = torch.bmm(col, wmat)  # (G, M, C_out/G)
        else:
            y = torch.baddbmm(b.view(groups, 1, c_out // groups), col, wmat)
        y = y.permute(1, 0, 2).reshape(n, ho, wo, c_out)  # (M, G, C_out/G) -> NHWC
        direct = False
    if out is not None and not direct:
        out.copy_(y)
        return out
    return y


def new_nchw(shape, dtype, device, memory_format) -> tuple[torch.Tensor, torch.Tensor]:
    """An empty (N, C, H, W) tensor in ``memory_format`` and its (N, H, W, C) view."""
    y = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    return y, y.permute(0, 2, 3, 1)


def suggest_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor laid out channels-last (and not also plain contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The layout torch's conv gives its output: channels-last iff the input is channels-last."""
    return suggest_memory_format(x)


class Conv2dFunction(torch.autograd.Function):
    """y = conv2d(x, w, b) by im2col + GEMM; backward by GEMMs (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, w, bias, stride, pads, dilation, groups):
        dtype = gemm_dtype(x.dtype, x.device)
        fmt = memory_format_of(x)
        xp = to_nhwc_padded(x, pads, dtype)
        n, _, h, wd = x.shape
        c_out, _, kh, kw = w.shape
        top, bottom, left, right = pads
        ho = (h + top + bottom - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        wo = (wd + left + right - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        # the output is a fresh tensor (not a view), so in-place ops on it (ReLU(inplace=True)) work
        y, y_nhwc = new_nchw((n, c_out, ho, wo), x.dtype, x.device, fmt)
        conv_nhwc(xp, w, bias, stride, dilation, groups, dtype, out=y_nhwc)
        ctx.save_for_backward(xp, w)
        ctx.conf = (x.shape, x.dtype, fmt, stride, pads, dilation, groups, bias is not None, dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        xp, w = ctx.saved_tensors
        x_shape, x_dtype, fmt, stride, pads, dilation, groups, has_bias, dtype = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(grad_y.device.type, enabled=False):
            return _conv_backward(grad_y, xp, w, x_shape, x_dtype, fmt, stride, pads, dilation,
                                  groups, has_bias, dtype, need_x, need_w, need_b)


def _conv_backward(grad_y, xp, w, x_shape, x_dtype, fmt, stride, pads, dilation, groups, has_bias,
                   dtype, need_x, need_w, need_b):
    n, c, h, wd = x_shape
    c_out, cg, kh, kw = w.shape
    g = groups
    gy = to_nhwc_padded(grad_y, (0, 0, 0, 0), dtype)  # (N, Ho, Wo, C_out)
    _, ho, wo, _ = gy.shape
    m = n * ho * wo
    gy2 = gy.reshape(m, c_out)
    grad_x = grad_w = grad_b = None
    if need_b and has_bias:
        grad_b = gy2.sum(0).to(w.dtype)
    if need_w:
        col = im2col(xp, (kh, kw), stride, dilation, (ho, wo), g)  # (G, M, K)
        if g == 1:
            gw = gy2.t() @ col[0]  # (C_out, K)
        else:
            gw = torch.bmm(gy2.view(m, g, c_out // g).permute(1, 2, 0), col)  # (G, C_out/G, K)
        # (C_out, kh, kw, C/G) -> (C_out, C/G, kh, kw)
        grad_w = gw.reshape(c_out, kh, kw, cg).permute(0, 3, 1, 2).to(w.dtype, memory_format=torch.contiguous_format)
    if need_x:
        grad_x, gx_nhwc = new_nchw((n, c, h, wd), x_dtype, grad_y.device, fmt)
        _conv_input_grad(gy, w, (n, c, h, wd), stride, pads, dilation, g, dtype, out=gx_nhwc)
    return grad_x, grad_w, grad_b, None, None, None, None


def _conv_input_grad(gy, w, x_shape, stride, pads, dilation, groups, dtype, out):
    """d loss / d x written into ``out`` (N, H, W, C), from grad_y in NHWC (N, Ho, Wo, C_out)."""
    n, c, h, wd = x_shape
    c_out, cg, kh, kw = w.shape
    (sh, sw), (dh, dw), g = stride, dilation, groups
    top, bottom, left, right = pads
    n_, ho, wo, _ = gy.shape
    hp, wp = h + top + bottom, wd + left + right
    eh, ew = dh * (kh - 1), dw * (kw - 1)  # kernel extent - 1
    if (sh, sw) == (1, 1) and max(top, bottom) <= eh and max(left, right) <= ew:
        # grad_x = grad_y, zero-padded by (extent - pad), correlated with the kernel flipped in
        # both spatial axes and with in/out channels swapped (per group):
        # grad_xp[r] = sum_i w[i] grad_y[r - i*d] = sum_i' w[k-1-i'] grad_y_padded[r + i'*d].
        w_t = w.reshape(g, c_out // g, cg, kh, kw).transpose(1, 2).reshape(c, c_out // g, kh, kw)
        w_t = w_t.flip(2, 3)
        gp = to_nhwc_padded(gy.permute(0, 3, 1, 2), (eh - top, eh - bottom, ew - left, ew - right), dtype)
        return conv_nhwc(gp, w_t, None, (1, 1), (dh, dw), g, dtype, out=out)  # (N, H, W, C)
    # col2im: grad_col = grad_y @ wmat^T, scattered back to the taps it came from
    wmat = weight_matrix(w, g, dtype)  # (G, K, C_out/G)
    m = n * ho * wo
    gy2 = gy.reshape(m, c_out)
    if g == 1:
        gcol = (gy2 @ wmat[0].t()).view(n, ho, wo, kh, kw, c)
    else:
        gcol = torch.bmm(gy2.view(m, g, c_out // g).transpose(0, 1), wmat.transpose(1, 2))  # (G, M, K)
        gcol = gcol.view(g, n, ho, wo, kh, kw, cg).permute(1, 2, 3, 4, 5, 0, 6).reshape(n, ho, wo, kh, kw, c)
    gxp = torch.zeros((n, hp, wp, c), dtype=dtype, device=gy.device)
    for i in range(kh):
        for j in range(kw):
            gxp[:, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw] += gcol[:, :, :, i, j]
    return out.copy_(gxp[:, top:top + h, left:left + wd])
