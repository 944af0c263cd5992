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

Where the output goes. A channels-last output *is* the (N*Ho*Wo, C_out) product, so the GEMM
writes straight into it. For a contiguous NCHW output the same numbers are computed transposed,
image by image: ``y[n] (C_out, Ho*Wo) = wmat^T (C_out, K) @ col[n]^T (K, Ho*Wo)``, one batched
GEMM with the weight broadcast over images, again written in place (for images of 16x16 pixels
or more; smaller ones make GEMMs too thin, and go through one transposing copy instead).

The backward pass (written by hand so that autograd keeps only ``x`` and ``w``, as torch does,
not the kh*kw-times larger ``col``; ``col`` is rebuilt when it is needed):

* ``grad_b = sum over pixels of grad_y``
* ``grad_w = grad_y^T @ col``: computed as ``(col^T @ grad_y)^T`` (the faster operand order for
  MKL), or for NCHW ``grad_y`` as ``sum_n grad_y[n] (C_out, Ho*Wo) @ col[n] (Ho*Wo, K)``, which
  needs no transposed copy of ``grad_y``.
* ``grad_x``: every element of ``col`` is a copy of one input element, so the gradient of the
  input is the sum of ``grad_col = grad_y @ wmat^T`` over all the places it was copied to
  ("col2im"): kh*kw strided additions into a zero-padded buffer, then the padding is cut off.
  For stride 1 the same sum is itself a convolution: ``grad_y``, zero-padded by
  ``d*(k-1) - pad``, convolved with the kernel flipped in both spatial axes and with its in/out
  channels swapped. That form runs one big GEMM with ``kh*kw*C_out`` as the inner dimension and
  needs no scatter, so it is used whenever it applies, except for inputs with few channels (an
  RGB stem: C=3, C_out=64), where col2im's buffers are ~20x smaller; there the col2im runs in
  NCHW order, so that each tap's addition streams along image rows rather than along 3 channels.

Few input channels (an RGB or grey-scale stem, or the first stage of a narrow network: C <= 16).
An NHWC ``col`` row then holds kh*kw runs of only C values, and copying it streams C floats at a
time (2 ms for a batch of 64 CIFAR images at C = 3 here). Such inputs use the *planar* im2col
instead: the padded NCHW input viewed as (N, C, kh, kw, Ho, Wo), copied into ``col`` of shape
(N, C*kh*kw, Ho*Wo), every copied run an image row (10x faster). Its rows are ordered (c, i, j),
which is ``w.reshape(C_out, C*kh*kw)`` as it is, and ``y[n] = w_2d @ col[n]`` (NCHW) or
``col[n]^T @ w_2d^T`` (channels-last), and ``grad_w = sum_n grad_y[n] @ col[n]^T``.

Contiguous NCHW inputs take the planar route at any channel count when each output image has at
least 256 pixels (64 for 1x1 kernels), so x is not transposed to NHWC (``planar_nchw`` has the
measurements); so does the stride-1 input gradient, a convolution of the NCHW grad_y. For 1x1
kernels (ResNet shortcuts, bottleneck projections) the planar ``col`` is the input subsampled by
the stride (x itself at stride 1), and the input gradient ``w_2d^T @ grad_y[n]`` is placed at
every stride-th pixel of a zeroed grad_x, so neither grad_y nor grad_x is transposed either.

Memory. The CPU temporaries (padded copies, ``col``) live in a per-thread workspace that is
reused from call to call (``_workspace.py``): a fresh 150 MB buffer per call costs more in page
faults than the copy that fills it. Padded buffers keep their zero border between calls, so
padding costs only the copy of the interior.

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
from torch.autograd.function import once_differentiable

from dllab._cpu import native_bf16, native_fp16
from dllab.layers import _winograd as winograd
from dllab.layers import _workspace as workspace


@functools.cache
def _cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices natively (bf16: AVX512-BF16/AMX; fp16: AMX-FP16)."""
    if dtype == torch.bfloat16:
        return native_bf16()
    if dtype == torch.float16:
        return native_fp16()
    return True


def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the GEMMs of a ``dtype`` convolution run in on ``device`` (see module docstring)."""
    if dtype in (torch.float16, torch.bfloat16) and workspace.uses_cpu_paths(device) and not _cpu_has_native(dtype):
        return torch.float32
    return dtype


def suggest_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor laid out channels-last (and not also plain contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def pad_nhwc(x_nhwc: torch.Tensor, pads: tuple[int, int, int, int], dtype: torch.dtype,
             slot: str = "pad") -> torch.Tensor:
    """(N, H, W, C) view of any layout -> zero-padded contiguous (N, H+top+bottom, W+left+right, C).

    The transpose to NHWC, the cast to ``dtype`` and the padding are one copy; an input that is
    already contiguous NHWC of ``dtype`` and needs no padding is returned as it is.
    """
    return padded_copy(x_nhwc, pads, dtype, slot, rows_axis=1)


def padded_copy(t: torch.Tensor, pads: tuple[int, int, int, int], dtype: torch.dtype, slot: str,
                rows_axis: int) -> torch.Tensor:
    """Contiguous copy of the 4-D ``t`` in ``dtype``, zero-padded by (top, bottom, left, right) along
    axes ``rows_axis`` and ``rows_axis + 1`` (1 for NHWC, 2 for NCHW), in workspace slot ``slot``;
    ``t`` itself when it is already contiguous, of ``dtype`` and needs no padding."""
    top, bottom, left, right = pads
    if not any(pads) and t.is_contiguous() and t.dtype == dtype:
        return t
    h, w = t.shape[rows_axis], t.shape[rows_axis + 1]
    shape = list(t.shape)
    shape[rows_axis], shape[rows_axis + 1] = h + top + bottom, w + left + right
    if not any(pads):
        buf = workspace.buffer(slot, shape, dtype, t.device)
    else:  # its border is zero already and stays so: only the interior is ever written
        buf = workspace.bordered(slot, shape, pads, dtype, t.device)
    interior = [slice(None)] * 4
    interior[rows_axis], interior[rows_axis + 1] = slice(top, top + h), slice(left, left + w)
    buf[tuple(interior)].copy_(t)
    return buf


def out_size(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Output length of a convolution over an already padded length ``size``."""
    return (size - dilation * (kernel - 1) - 1) // stride + 1


def im2col(xp: torch.Tensor, kernel, stride, dilation, groups: int, slot: str = "col") -> torch.Tensor:
    """Padded NHWC input (N, Hp, Wp, C) -> patch matrix (G, N*Ho*Wo, kh*kw*C/G).

    Row (n, p, q) holds the kh x kw x C/G patch that output pixel (n, p, q) of each group reads,
    ordered (tap row i, tap column j, channel c), matching ``weight_matrix``. It is one strided
    view of ``xp`` copied once; for a 1x1 stride-1 convolution it is ``xp`` itself, no copy.
    """
    n, hp, wp, c = xp.shape
    (kh, kw), (sh, sw), (dh, dw), g = kernel, stride, dilation, groups
    ho, wo = out_size(hp, kh, sh, dh), out_size(wp, kw, sw, dw)
    m, cg = n * ho * wo, c // groups
    if kh == kw == sh == sw == 1 and g == 1 and xp.is_contiguous():
        return xp.view(1, m, c)
    s_n, s_h, s_w, s_c = xp.stride()
    patches = xp.as_strided((g, n, ho, wo, kh, kw, cg),
                            (cg * s_c, s_n, sh * s_h, sw * s_w, dh * s_h, dw * s_w, s_c), xp.storage_offset())
    col = workspace.buffer(slot, (g, n, ho, wo, kh, kw, cg), xp.dtype, xp.device)
    col.copy_(patches)
    return col.view(g, m, kh * kw * cg)


# Inputs with at most this many channels use the planar im2col (module docstring): the stems,
# and 8- or 16-channel layers of narrow networks (a width-8 / width-16 ResNet-18 step on 28x28
# images ran 7% / 5% faster with 16 here than with 4; from 32 channels on it made no difference).
PLANAR_MAX_CHANNELS = 16
# Contiguous NCHW inputs of any width use it too when each output image has at least
# PLANAR_NCHW_MIN_PIXELS pixels (PLANAR_1X1_MIN_PIXELS for 1x1 kernels): see ``planar_nchw``.
PLANAR_NCHW = True
PLANAR_NCHW_MIN_PIXELS = 256
PLANAR_1X1_MIN_PIXELS = 64


def planar_nchw(kernel, contiguous: bool, out_pixels: int) -> bool:
    """Whether a convolution of a contiguous NCHW tensor takes the planar route at any width.

    The planar ``col`` is copied from NCHW image rows, so x is never transposed to NHWC (nor, for
    1x1 kernels, grad_y and grad_x: their planar ``col`` is x subsampled by the stride). It pays
    where each image's GEMMs are large enough. Step times (forward and backward) measured here,
    NHWC route / planar route / torch: 3x3 at 64x32x32 176-182 / 158-162 / 127-162 ms, stride-2
    64->128 at 32x32 97-99 / 90-93 / 83-87, at 128x16x16 130-132 / 128-132 / 122-124; but planar
    was slower with smaller output images: 67 / 80 / 69 for the stride-2 3x3 128->256 (8x8
    outputs) and 122 / 139 / 114 at 256x8x8; 1x1 stride-2 shortcuts 37 / 22 / 26
    ms for 64->128 at 32x32, 19 / 14 / 16 for 128->256 at 16x16 (8x8 outputs), but 11 / 29 / 12
    for 256->512 at 8x8 (4x4 outputs).
    """
    if not (PLANAR_NCHW and contiguous):
        return False
    return out_pixels >= (PLANAR_1X1_MIN_PIXELS if tuple(kernel) == (1, 1) else PLANAR_NCHW_MIN_PIXELS)


def uses_planar(x: torch.Tensor, kernel, groups: int, out_pixels: int) -> bool:
    """Whether the planar im2col serves this convolution: inputs with few channels (any layout),
    and NCHW inputs with large enough output images (``planar_nchw``)."""
    if groups != 1:
        return False
    return x.shape[1] <= PLANAR_MAX_CHANNELS or planar_nchw(kernel, x.is_contiguous(), out_pixels)


def input_grad_in_nchw(c: int, kernel, groups: int, grad_x_contiguous: bool, out_pixels: int) -> bool:
    """Whether ``conv_input_grad`` assembles dL/dx in NCHW order: the planar counterpart of col2im."""
    if groups != 1:
        return False
    return c < NARROW_INPUT_CHANNELS or (tuple(kernel) == (1, 1) and planar_nchw(kernel, grad_x_contiguous, out_pixels))


def im2col_planar(x: torch.Tensor, kernel, stride, pads, dilation, dtype: torch.dtype) -> torch.Tensor:
    """Input (N, C, H, W) of any layout -> patch matrix (N, C*kh*kw, Ho*Wo), rows ordered (c, i, j).

    The zero-padded NCHW copy of x (in ``dtype``) viewed as (N, C, kh, kw, Ho, Wo) and copied once:
    every run copied is a row of an image, which streams, unlike the C-value runs of the NHWC
    ``im2col`` when C is 3.
    """
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    top, bottom, left, right = pads
    hp, wp = h + top + bottom, w + left + right
    ho, wo = out_size(hp, kh, sh, dh), out_size(wp, kw, sw, dw)
    xp = padded_copy(x, pads, dtype, "pad_planar", rows_axis=2)
    if kh == kw == sh == sw == 1:
        return xp.view(n, c, hp * wp)  # a 1x1 stride-1 convolution: col is the (padded) input itself
    s_n, s_c, s_h, s_w = xp.stride()
    patches = xp.as_strided((n, c, kh, kw, ho, wo), (s_n, s_c, dh * s_h, dw * s_w, sh * s_h, sw * s_w),
                            xp.storage_offset())
    col = workspace.buffer("col", (n, c, kh, kw, ho, wo), dtype, x.device)
    col.copy_(patches)
    return col.view(n, c * kh * kw, ho * wo)


def planar_gemm_into(col: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out (N, C_out, Ho, Wo) <- conv from the planar ``col`` (N, K, Ho*Wo) and weight (C_out, C, kh, kw)."""
    n, k, pixels = col.shape
    c_out = w.shape[0]
    w2 = w.reshape(c_out, k).to(col.dtype)
    b = None if bias is None else bias.to(col.dtype)
    out_nhwc = out.permute(0, 2, 3, 1)
    if out_nhwc.is_contiguous():  # channels-last: y[n] (Ho*Wo, C_out) = col[n]^T @ w2^T
        y = out_nhwc.view(n, pixels, c_out) if out.dtype == col.dtype else \
            workspace.buffer("gemm", (n, pixels, c_out), col.dtype, col.device)
        if b is None:
            torch.bmm(col.transpose(1, 2), w2.t().expand(n, k, c_out), out=y)
        else:
            torch.baddbmm(b.view(1, 1, c_out).expand(n, pixels, c_out), col.transpose(1, 2),
                          w2.t().expand(n, k, c_out), out=y)
        if y.dtype != out.dtype:
            out_nhwc.copy_(y.view(out_nhwc.shape))
        return
    # NCHW: y[n] (C_out, Ho*Wo) = w2 @ col[n]
    direct = out.is_contiguous() and out.dtype == col.dtype
    y = out.view(n, c_out, pixels) if direct else workspace.buffer("gemm", (n, c_out, pixels), col.dtype, col.device)
    if b is None:
        torch.bmm(w2.expand(n, c_out, k), col, out=y)
    else:
        torch.baddbmm(b.view(1, c_out, 1).expand(n, c_out, pixels), w2.expand(n, c_out, k), col, out=y)
    if not direct:
        out.copy_(y.view(out.shape))


def planar_weight_grad(col: torch.Tensor, grad_y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad_w (C_out, C*kh*kw) = sum_n grad_y[n] @ col[n]^T, from the planar ``col`` (N, K, Ho*Wo)."""
    n, k, pixels = col.shape
    c_out = grad_y.shape[1]
    gy_nhwc = grad_y.permute(0, 2, 3, 1)
    if gy_nhwc.is_contiguous() and grad_y.dtype == dtype:  # channels-last: (col[n] @ gy[n])^T
        return torch.bmm(col, gy_nhwc.reshape(n, pixels, c_out)).sum(0).t()
    gy = grad_y.reshape(n, c_out, pixels)
    if gy.dtype != dtype or not gy.is_contiguous():
        gy = workspace.buffer("grad_y_planar", (n, c_out, pixels), dtype, col.device).copy_(gy)
    per_image = workspace.buffer("grad_w", (n, c_out, k), dtype, col.device)
    return torch.bmm(gy, col.transpose(1, 2), out=per_image).sum(0)


def weight_matrix(w: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """Weight (C_out, C/G, kh, kw) -> (G, kh*kw*C/G, C_out/G), rows ordered like ``im2col``'s columns."""
    c_out, cg, kh, kw = w.shape
    wg = w.reshape(groups, c_out // groups, cg, kh, kw)
    return wg.permute(0, 3, 4, 2, 1).reshape(groups, kh * kw * cg, c_out // groups).to(dtype)


# Weights with at least this many elements are flipped tap by tap (below): one pass over the
# weight in contiguous blocks, where flip + copy make two (512x512x3x3 in fp32: 3.1 ms against 3.7;
# channels-last: 0.9 against 1.3). Smaller ones take two kernels instead of kh*kw copies.
FLIP_BY_TAP_MIN_ELEMENTS = 2**16


def flipped_weight_matrix(w: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """``weight_matrix`` of the stride-1 input gradient's convolution, in one copy of ``w``: the
    kernel with its in/out channels swapped per group and both spatial axes flipped, as
    (G, kh*kw*C_out/G, C/G), rows ordered (tap row, tap column, output channel)."""
    c_out, cg, kh, kw = w.shape
    og = c_out // groups
    wg = w.reshape(groups, og, cg, kh, kw)
    out = torch.empty(groups, kh, kw, og, cg, dtype=dtype, device=w.device)
    if workspace.uses_cpu_paths(w.device) and w.numel() >= FLIP_BY_TAP_MIN_ELEMENTS:
        for i in range(kh):
            for j in range(kw):
                out[:, i, j].copy_(wg[:, :, :, kh - 1 - i, kw - 1 - j])
    else:
        out.copy_(wg.permute(0, 3, 4, 1, 2).flip(1, 2))
    return out.view(groups, kh * kw * og, cg)


# Per-image GEMMs straight from/to NCHW beat a transposing copy plus one big GEMM only when each
# image has enough pixels to make a reasonably shaped GEMM (measured on ResNet-18 CIFAR shapes).
NCHW_GEMM_MIN_PIXELS = 256
# Channels-last: a batch of per-image (Ho*Wo, K) @ (K, C_out) GEMMs ran 10-20% faster in MKL than the
# one tall (N*Ho*Wo, K) @ (K, C_out) GEMM from 8x8 images up, and slower at 4x4.
ROWS_GEMM_MIN_PIXELS = 64
# Inputs with fewer channels than this (RGB stems) get their input gradient by col2im in NCHW order.
NARROW_INPUT_CHANNELS = 16


def gemm_into(col: torch.Tensor, wmat: torch.Tensor, bias: torch.Tensor | None, out_nchw: torch.Tensor) -> None:
    """out_nchw (N, C_out, Ho, Wo)  <-  col (G, N*Ho*Wo, K) @ wmat (G, K, C_out/G) + bias.

    The GEMM writes straight into ``out_nchw`` when its layout allows: channels-last output is the
    (N*Ho*Wo, C_out) product itself (computed image by image for 8x8 images and up, which MKL does
    faster than one tall GEMM); contiguous NCHW output is, image by image, the transposed
    product ``wmat^T (C_out, K) @ col_n^T (K, Ho*Wo)`` (a batched GEMM over images with the weight
    broadcast). Otherwise (groups, a dtype cast) it goes through a workspace buffer and one copy.
    """
    g, m, k = col.shape
    n, c_out, ho, wo = out_nchw.shape
    b = None if bias is None else bias.to(col.dtype)
    if g == 1 and out_nchw.dtype == col.dtype:
        out_nhwc = out_nchw.permute(0, 2, 3, 1)
        if out_nhwc.is_contiguous() and ho * wo >= ROWS_GEMM_MIN_PIXELS and n > 1:  # channels-last, per image
            y = out_nhwc.view(n, ho * wo, c_out)
            col_n, w_n = col[0].view(n, ho * wo, k), wmat[0].expand(n, k, c_out)
            if b is None:
                torch.bmm(col_n, w_n, out=y)
            else:
                torch.baddbmm(b.view(1, 1, c_out).expand(n, ho * wo, c_out), col_n, w_n, out=y)
            return
        if out_nhwc.is_contiguous():  # channels-last, one GEMM
            y = out_nhwc.view(m, c_out)
            if b is None:
                torch.mm(col[0], wmat[0], out=y)
            else:
                torch.addmm(b, col[0], wmat[0], out=y)
            return
        if out_nchw.is_contiguous() and ho * wo >= NCHW_GEMM_MIN_PIXELS:  # NCHW: (N, C_out, K) @ (N, K, Ho*Wo)
            y = out_nchw.view(n, c_out, ho * wo)
            w_t = wmat[0].t().expand(n, c_out, k)
            col_t = col[0].view(n, ho * wo, k).transpose(1, 2)
            if b is None:
                torch.bmm(w_t, col_t, out=y)
            else:
                torch.baddbmm(b.view(1, c_out, 1).expand(n, c_out, ho * wo), w_t, col_t, out=y)
            return
    y = workspace.buffer("gemm", (g, m, c_out // g), col.dtype, col.device)
    if g == 1 and b is None:
        torch.mm(col[0], wmat[0], out=y[0])
    elif g == 1:
        torch.addmm(b, col[0], wmat[0], out=y[0])
    elif b is None:
        torch.bmm(col, wmat, out=y)
    else:
        torch.baddbmm(b.view(g, 1, c_out // g), col, wmat, out=y)
    # (G, N, Ho, Wo, C_out/G) into the NHWC view split by group
    out_nchw.permute(0, 2, 3, 1).view(n, ho, wo, g, c_out // g).permute(3, 0, 1, 2, 4).copy_(
        y.view(g, n, ho, wo, c_out // g))


def conv_geometry(x_shape, w_shape, stride, pads, dilation) -> tuple[int, int]:
    """(Ho, Wo) of a convolution."""
    top, bottom, left, right = pads
    return (out_size(x_shape[2] + top + bottom, w_shape[2], stride[0], dilation[0]),
            out_size(x_shape[3] + left + right, w_shape[3], stride[1], dilation[1]))


def conv_forward(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, stride, pads, dilation, groups: int,
                 dtype: torch.dtype, memory_format: torch.memory_format | None = None,
                 winograd_ok: bool | None = None) -> torch.Tensor:
    """y = conv2d(x, w, bias) by im2col + GEMMs in ``dtype``; y has x's dtype, and ``memory_format``
    (by default x's). ``winograd_ok``: whether Winograd may serve it, when the caller has asked
    already (``winograd.applies`` and ``winograd.well_scaled``)."""
    ho, wo = conv_geometry(x.shape, w.shape, stride, pads, dilation)
    # the output is a fresh tensor (not a view), so in-place ops on it (ReLU(inplace=True)) work
    y = torch.empty((x.shape[0], w.shape[0], ho, wo), dtype=x.dtype, device=x.device,
                    memory_format=memory_format or suggest_memory_format(x))
    if winograd_ok is None:
        winograd_ok = (winograd.applies(x.shape[1], w.shape, stride, dilation, groups, x.dtype, x.device)
                       and winograd.well_scaled(x, w, 9 * x.shape[1], x.dtype))
    if winograd_ok:  # 3x3, stride 1
        xp = pad_nhwc(x.permute(0, 2, 3, 1), winograd.tile_pads(x.shape[2], x.shape[3], pads), dtype)
        winograd.conv(xp, winograd.weight_transform(w, dtype), bias, y)
    elif uses_planar(x, w.shape[2:], groups, ho * wo):  # a stem, or NCHW with large images: module docstring
        planar_gemm_into(im2col_planar(x, w.shape[2:], stride, pads, dilation, dtype), w, bias, y)
    else:
        xp = pad_nhwc(x.permute(0, 2, 3, 1), pads, dtype)
        col = im2col(xp, w.shape[2:], stride, dilation, groups)
        gemm_into(col, weight_matrix(w, groups, dtype), bias, y)
    return y


class Conv2dFunction(torch.autograd.Function):
    """y = conv2d(x, w, b) by im2col + GEMM; backward by GEMMs (see the module docstring).

    Saves only ``x`` and ``w`` for backward, like torch; the padded copy and ``col`` are rebuilt.
    """

    @staticmethod
    def forward(ctx, x, w, bias, stride, pads, dilation, groups):
        dtype = gemm_dtype(x.dtype, x.device)
        # Winograd's operand check reads x and w once; backward reuses their max-abs (saved tensors
        # cannot change in between: autograd refuses a backward after an in-place change)
        scales = None
        if winograd.applies(x.shape[1], w.shape, stride, dilation, groups, x.dtype, x.device):
            scales = winograd.max_abs(x), winograd.max_abs(w)
        y = conv_forward(x, w, bias, stride, pads, dilation, groups, dtype, winograd_ok=scales is not None
                         and winograd.well_scaled(*scales, 9 * x.shape[1], x.dtype))
        ctx.save_for_backward(x, w)
        ctx.conf = (suggest_memory_format(x), stride, pads, dilation, groups, bias is not None, dtype)
        ctx.scales = scales
        return y

    @staticmethod
    @once_differentiable  # a second derivative would need this backward's own graph: not kept
    def backward(ctx, grad_y):
        x, w = ctx.saved_tensors
        fmt, stride, pads, dilation, groups, has_bias, dtype = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(grad_y.device.type, enabled=False):
            grad_x = grad_w = grad_b = None
            g, c_out, (kh, kw) = groups, w.shape[0], w.shape[2:]
            n, _, ho, wo = grad_y.shape
            # grad_y as NHWC rows: free for channels-last; NCHW is used image by image instead
            gy_nhwc = grad_y.permute(0, 2, 3, 1)
            rows = gy_nhwc.is_contiguous() and grad_y.dtype == dtype
            nchw = (not rows and grad_y.is_contiguous() and grad_y.dtype == dtype and g == 1
                    and ho * wo >= NCHW_GEMM_MIN_PIXELS)
            planar = uses_planar(x, (kh, kw), g, ho * wo)  # its weight gradient reads grad_y as it is
            nchw_grad_x = input_grad_in_nchw(x.shape[1], (kh, kw), g, fmt == torch.contiguous_format, ho * wo)
            # Winograd (3x3, stride 1) reads grad_y through its own padded copies, in any layout
            wino = ctx.scales is not None  # winograd.applies, asked in forward
            gy_max = winograd.max_abs(grad_y) if wino else 0.0  # read once for both gradients
            x_max, w_max = ctx.scales or (0.0, 0.0)
            wino_x = wino and need_x and winograd.well_scaled(gy_max, w_max, 9 * c_out, x.dtype)
            wino_w = wino and need_w and winograd.well_scaled(gy_max, x_max, n * ho * wo, x.dtype)
            if not rows and not nchw and ((need_x and not nchw_grad_x and not wino_x)
                                          or (need_w and not planar and not wino_w)):
                gy_nhwc = pad_nhwc(gy_nhwc, (0, 0, 0, 0), dtype, slot="grad_y")
                rows = True
            if need_b and has_bias:
                grad_b = grad_y.sum((0, 2, 3), dtype=dtype).to(w.dtype)
            if need_x:
                grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
                conv_input_grad(gy_nhwc, w, stride, pads, dilation, g, dtype, grad_x, winograd_ok=wino_x)
            if wino_w:
                grad_w = torch.empty(w.shape, dtype=w.dtype, device=w.device, memory_format=suggest_memory_format(w))
                xp = pad_nhwc(x.permute(0, 2, 3, 1), winograd.tile_pads(x.shape[2], x.shape[3], pads), dtype)
                winograd.weight_grad(xp, grad_y.permute(0, 2, 3, 1), grad_w)
            elif need_w and planar:
                col = im2col_planar(x, (kh, kw), stride, pads, dilation, dtype)
                grad_w = planar_weight_grad(col, grad_y, dtype).reshape(w.shape).to(w.dtype)
            elif need_w:
                grad_w = conv_weight_grad(x, grad_y, gy_nhwc if rows else None, w.shape, stride, pads, dilation, g,
                                          dtype, w.dtype, suggest_memory_format(w))
        return grad_x, grad_w, grad_b, None, None, None, None


def conv_weight_grad(x: torch.Tensor, grad_y: torch.Tensor, gy_rows: torch.Tensor | None, w_shape, stride, pads,
                     dilation, groups: int, dtype: torch.dtype, out_dtype: torch.dtype,
                     memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """dL/dw (C_out, C/G, kh, kw) in ``out_dtype`` and ``memory_format`` (the weight's, so that
    AccumulateGrad need not copy it), by the NHWC im2col of x (GEMMs in ``dtype``).

    ``gy_rows`` is dL/dy as a contiguous NHWC (N, Ho, Wo, C_out) tensor of ``dtype``: then
    ``grad_w = (col^T @ grad_y)^T`` (the faster operand order for MKL), one GEMM per group. With
    ``gy_rows=None`` (groups 1 only) the contiguous NCHW ``grad_y`` of ``dtype`` is read as it is,
    image by image: ``sum_n grad_y[n] (C_out, Ho*Wo) @ col[n] (Ho*Wo, K)``.
    """
    c_out, _, kh, kw = w_shape
    n, _, ho, wo = grad_y.shape
    g, m = groups, n * ho * wo
    col = im2col(pad_nhwc(x.permute(0, 2, 3, 1), pads, dtype), (kh, kw), stride, dilation, g)
    out = torch.empty(tuple(w_shape), dtype=out_dtype, device=x.device, memory_format=memory_format)
    out_nhwc = out.permute(0, 2, 3, 1)  # (C_out, kh, kw, C): contiguous for a channels-last weight
    if g == 1 and gy_rows is not None and out_dtype == dtype and out_nhwc.is_contiguous():
        # a channels-last weight's gradient is grad_y^T @ col itself, written in place: its
        # transposing copy cost more than the GEMM at 4x4 images (the bf16 3x3 512->512 weight
        # gradient at batch 32 on an AMX Xeon: 11.5 ms with the copy, 4.1 without)
        torch.mm(gy_rows.reshape(m, c_out).t(), col[0], out=out_nhwc.view(c_out, -1))
        return out
    if g == 1 and gy_rows is not None:
        gw = (col[0].t() @ gy_rows.reshape(m, c_out)).t()  # (K, C_out)^T
    elif g == 1:
        per_image = workspace.buffer("grad_w", (n, c_out, col.shape[-1]), dtype, x.device)
        torch.bmm(grad_y.view(n, c_out, ho * wo), col[0].view(n, ho * wo, -1), out=per_image)
        gw = per_image.sum(0)
    else:  # (G, C_out/G, M) @ (G, M, kh*kw*C/G)
        gw = torch.bmm(gy_rows.reshape(m, g, c_out // g).permute(1, 2, 0), col)
    # (C_out, kh, kw, C/G) -> (C_out, C/G, kh, kw), one copy (Tensor.to(memory_format=...) may
    # return a transposed view as it is, which AccumulateGrad would then copy again)
    return out.copy_(gw.reshape(c_out, kh, kw, -1).permute(0, 3, 1, 2))


# torch's own convolution (oneDNN on the CPU) computes the weight gradient of bf16 convolutions
# with small output images slowly. On an AMX Xeon (docs/speed.md, `benchmarks/conv_routes.py
# weight-grad`, channels-last, batch 128) it took 1.8-4.8x as long as ``conv_weight_grad``'s one
# GEMM at every ResNet-18 shape with 4x4 to 7x7 outputs (3x3 512@4: 104 ms against 29; 1x1
# stride-2 256->512: 8.6 against 1.8). From 14x14 outputs on the two were about even, and oneDNN
# won at 28x28.
GEMM_WEIGHT_GRAD_MAX_PIXELS = 64
# At 4x4 outputs and below its bf16 forward pass and input gradient are slow as well: forward and
# backward of the 3x3 512->512 convolution at 4x4 (batch 128, channels-last, bf16 autocast, the same
# AMX Xeon) took 107 ms with oneDNN's forward and input gradient, and 69 ms with ``conv_forward``
# and ``conv_input_grad``; the stride-2 256->512 one (7x7 -> 4x4) 53 against 35 ms. At 7x7 outputs
# the two were even (3x3 256->256: 49 ms each). `benchmarks/conv_routes.py torch-conv` measures it.
GEMM_CONV_MAX_PIXELS = 16


def strides_like_channels_last(t: torch.Tensor) -> bool:
    """torch's own test (``is_channels_last_strides_2d``): the strides order the dimensions
    (C, W, H, N) from fastest to slowest. Unlike ``suggest_memory_format`` it reads the strides of a
    tensor that is also contiguous, such as a channels-last 1x1 kernel."""
    if t.dim() != 4 or t.stride(1) == 0:  # torch: a broadcast channel dimension defaults to NCHW
        return False
    smallest = 0
    for d in (1, 3, 2, 0):
        if t.shape[d] == 0 or t.stride(d) < smallest or (d == 0 and smallest == t.stride(1)):
            return False
        smallest = t.stride(d) * max(t.shape[d], 1)
    return True


def torch_memory_format(x: torch.Tensor, w: torch.Tensor) -> torch.memory_format:
    """The layout torch's CPU convolution gives its output and its gradients: channels-last if the
    input's or the weight's strides are, else contiguous."""
    if strides_like_channels_last(x) or strides_like_channels_last(w):
        return torch.channels_last
    return torch.contiguous_format


def gemm_route(dtype: torch.dtype, device: torch.device, groups: int, out_pixels: int) -> str | None:
    """How ``TorchConv2d`` serves a torch convolution computing in ``dtype`` with ``out_pixels``
    output pixels per image: "all" (``conv_forward``, ``conv_input_grad`` and ``conv_weight_grad``),
    "weight-grad" (torch's forward and input gradient, ``conv_weight_grad``'s weight gradient), or
    None (torch's own). Only bf16 on a CPU that multiplies it natively, groups 1 (the thresholds above).
    """
    if not (dtype == torch.bfloat16 and device.type == "cpu" and groups == 1 and _cpu_has_native(dtype)):
        return None
    if out_pixels <= GEMM_CONV_MAX_PIXELS:
        return "all"
    return "weight-grad" if out_pixels <= GEMM_WEIGHT_GRAD_MAX_PIXELS else None


def gemm_conv2d(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation) -> torch.Tensor:
    """``F.conv2d(x, w, bias, stride, padding, dilation)`` (groups 1, an (h, w) padding pair) by
    ``conv_forward``, in the layout torch gives: the forward of ``gemm_route``'s "all"."""
    pads = (padding[0], padding[0], padding[1], padding[1])
    return conv_forward(x, w, bias, tuple(stride), pads, tuple(dilation), 1, gemm_dtype(x.dtype, x.device),
                        torch_memory_format(x, w))


class TorchConvFunction(torch.autograd.Function):
    """A torch convolution (groups 1) served by ``gemm_route``: the weight gradient from
    ``conv_weight_grad``, and with ``everything`` also the forward pass and the input gradient
    from ``conv_forward`` and ``conv_input_grad``; else torch's ``F.conv2d`` forward and its input
    gradient. Saves x and w, as torch.

    A backward that is itself differentiated (``create_graph=True``: gradient penalties,
    Hessian-vector products) is torch's own ``convolution_backward``, which autograd can
    differentiate again.
    """

    @staticmethod
    def forward(ctx, x, w, bias, stride, padding, dilation, everything=False):
        ctx.save_for_backward(x, w)
        ctx.conf = (list(stride), list(padding), list(dilation), None if bias is None else list(bias.shape),
                    everything)
        if everything:
            return gemm_conv2d(x, w, bias, stride, padding, dilation)
        return torch.nn.functional.conv2d(x, w, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad_y):
        x, w = ctx.saved_tensors
        stride, padding, dilation, bias_sizes, everything = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias_sizes is not None
        if torch.is_grad_enabled():  # create_graph: a backward autograd can differentiate
            grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_y, x, w, bias_sizes, stride, padding, dilation, False, [0, 0], 1, [need_x, need_w, need_b])
            return grad_x, grad_w, grad_b, None, None, None, None
        grad_x = grad_w = grad_b = None
        pads = (padding[0], padding[0], padding[1], padding[1])
        with torch.autocast(grad_y.device.type, enabled=False):
            if need_x and everything:
                grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch_memory_format(x, w))
                conv_input_grad(grad_y.permute(0, 2, 3, 1), w, tuple(stride), pads, tuple(dilation), 1,
                                gemm_dtype(x.dtype, x.device), grad_x)
            elif need_x:
                grad_x = torch.ops.aten.convolution_backward(grad_y, x, w, None, stride, padding, dilation, False,
                                                             [0, 0], 1, [True, False, False])[0]
            if need_w:
                rows = pad_nhwc(grad_y.permute(0, 2, 3, 1), (0, 0, 0, 0), w.dtype, slot="grad_y")
                grad_w = conv_weight_grad(x, grad_y, rows, w.shape, stride, pads, dilation, 1, w.dtype, w.dtype,
                                          torch_memory_format(x, w))
            if need_b:
                acc = torch.promote_types(grad_y.dtype, torch.float32)  # float64 stays float64
                grad_b = grad_y.sum((0, 2, 3), dtype=acc).to(w.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def conv_input_grad(gy: torch.Tensor, w: torch.Tensor, stride, pads, dilation, groups: int, dtype: torch.dtype,
                    out_nchw: torch.Tensor, winograd_ok: bool | None = None) -> None:
    """dL/dx into ``out_nchw`` (N, C, H, W), from dL/dy seen as NHWC ``gy`` (N, Ho, Wo, C_out), any
    strides; the GEMMs run in ``dtype``. ``winograd_ok``: whether Winograd may serve it, when the
    caller has asked already (``winograd.applies`` and ``winograd.well_scaled``)."""
    n, c, h, wd = out_nchw.shape
    c_out, cg, kh, kw = w.shape
    (sh, sw), (dh, dw), g = stride, dilation, groups
    top, bottom, left, right = pads
    _, ho, wo, _ = gy.shape
    eh, ew = dh * (kh - 1), dw * (kw - 1)  # kernel extent - 1
    m, hp, wp = n * ho * wo, h + top + bottom, wd + left + right
    if input_grad_in_nchw(c, (kh, kw), g, out_nchw.is_contiguous(), ho * wo):
        # col2im in NCHW order, where each tap's addition runs along image rows instead of along
        # C (3 for RGB) channels: grad_col^T[n] (kh*kw*C, Ho*Wo) = wmat (kh*kw*C, C_out) @ grad_y[n].
        # 1x1 kernels on NCHW tensors come here too: no transposing copies (see ``planar_nchw``).
        k = kh * kw * c
        gy_nchw = gy.permute(0, 3, 1, 2)  # (N, C_out, Ho, Wo)
        if not (gy_nchw.is_contiguous() and gy_nchw.dtype == dtype):
            gy_nchw = workspace.buffer("grad_y_nchw", gy_nchw.shape, dtype, gy.device).copy_(gy_nchw)
        gcol = workspace.buffer("col", (n, k, ho * wo), dtype, gy.device)
        torch.bmm(weight_matrix(w, 1, dtype)[0].expand(n, k, c_out), gy_nchw.view(n, c_out, ho * wo), out=gcol)
        gcol = gcol.view(n, kh, kw, c, ho, wo)
        direct = not any(pads) and out_nchw.is_contiguous() and out_nchw.dtype == dtype  # add into out itself
        gxp = (out_nchw if direct else workspace.buffer("col2im", (n, c, hp, wp), dtype, gy.device)).zero_()
        for i in range(kh):
            for j in range(kw):
                gxp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw] += gcol[:, i, j]
        if not direct:
            out_nchw.copy_(gxp[:, :, top:top + h, left:left + wd])
        return
    if (sh, sw) == (1, 1) and max(top, bottom) <= eh and max(left, right) <= ew:
        # a convolution of grad_y, zero-padded by (extent - pad), with the kernel flipped in both
        # spatial axes and in/out channels swapped (per group):
        # grad_xp[r] = sum_i w[i] grad_y[r - i*d] = sum_i' w[k-1-i'] grad_y_padded[r + i'*d]
        gy_nchw, gy_pads = gy.permute(0, 3, 1, 2), (eh - top, eh - bottom, ew - left, ew - right)
        if winograd_ok is None:
            winograd_ok = (winograd.applies(c_out, w.shape[1::-1] + w.shape[2:], stride, dilation, g, out_nchw.dtype,
                                            gy.device) and winograd.well_scaled(gy, w, 9 * c_out, out_nchw.dtype))
        if winograd_ok:
            gp = pad_nhwc(gy, winograd.tile_pads(ho, wo, gy_pads), dtype)
            winograd.conv(gp, winograd.weight_transform(w, dtype, flipped=True), None, out_nchw)
            return
        nchw = gy_nchw.is_contiguous() and out_nchw.is_contiguous()
        if g == 1 and planar_nchw((kh, kw), nchw, h * wd):
            # NCHW grad_y and grad_x: the same convolution by the planar route, nothing transposed
            w_t = w.transpose(0, 1).flip(2, 3)
            planar_gemm_into(im2col_planar(gy_nchw, (kh, kw), (1, 1), gy_pads, (dh, dw), dtype), w_t, None, out_nchw)
            return
        gp = pad_nhwc(gy, gy_pads, dtype)
        col = im2col(gp, (kh, kw), (1, 1), (dh, dw), g)
        gemm_into(col, flipped_weight_matrix(w, g, dtype), None, out_nchw)
        return
    # col2im: grad_col = grad_y @ wmat^T, then each tap's column block is added back where it was read
    wmat = weight_matrix(w, g, dtype)  # (G, K, C_out/G)
    gy = pad_nhwc(gy, (0, 0, 0, 0), dtype, slot="grad_y")  # contiguous rows (a no-op if already)
    gcol = workspace.buffer("col", (g, m, kh * kw * cg), dtype, gy.device)
    torch.bmm(gy.view(m, g, c_out // g).transpose(0, 1), wmat.transpose(1, 2), out=gcol)
    gcol = gcol.view(g, n, ho, wo, kh, kw, cg)
    gxp = workspace.buffer("col2im", (n, hp, wp, g, cg), dtype, gy.device).zero_()
    for i in range(kh):
        for j in range(kw):
            tap = gxp[:, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
            tap += gcol[:, :, :, :, i, j].permute(1, 2, 3, 0, 4)  # (N, Ho, Wo, G, C/G)
    out_nchw.permute(0, 2, 3, 1).copy_(gxp.view(n, hp, wp, c)[:, top:top + h, left:left + wd])
