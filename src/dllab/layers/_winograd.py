"""3x3 stride-1 convolutions by Winograd's minimal filtering F(2x2, 3x3).

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016
(https://arxiv.org/abs/1509.09308), section 4.

The idea. Cut the output into 2x2 tiles. The tile at (2p, 2q) reads the 4x4 patch ``d`` of the
padded input that starts there, and for one input and one output channel it equals

    Y = A^T [ (G g G^T) * (B^T d B) ] A          (* elementwise, all matrices below)

with the 3x3 kernel ``g`` and

    B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
    A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]

(each is the correlation that CNNs call convolution, as in the paper). Summed over input channels,
the 16 elementwise products of one tile become 16 matrix products: for each of the 16 positions k
of the 4x4 transformed patch, ``M[k] (tiles, C_out) = V[k] (tiles, C) @ U[k] (C, C_out)``, with
``V = B^T d B`` of every tile and ``U = G g G^T`` of every kernel. That is 16 multiplications per
tile and channel pair where im2col's GEMM makes 36 (4 output pixels x 9 taps): 2.25x fewer, and
the transformed input holds 4 values per output pixel and channel where im2col's ``col`` holds 9.

Here. The input is read as NHWC; the 4x4 patches of a chunk of images are one strided view
(tiles overlap by 2 pixels), copied tap-major into ``D`` (16, tiles * C). The two transforms are
GEMMs with the 16 x 16 matrix ``B^T (x) B^T`` and the 4 x 16 matrix ``A^T (x) A^T`` (Kronecker
products: ``vec(B^T d B) = (B^T (x) B^T) vec(d)`` for a row-major vec), the products one batched
GEMM over the 16 positions. The work goes in pieces whose ``D`` is about ``CHUNK_BYTES``, so that
the five steps of a piece find their operands in the cache: a few whole images, or rows of tiles
of one image when an image alone is larger than that (``_pieces``).

The weight gradient is the same idea turned around, F(3x3, 2x2): per 2x2 tile of dL/dy, the 3x3
kernel gradient is the correlation of the tile's 4x4 input patch with that 2x2 tile, so it is
``A'^T [ (G' gy G'^T) * (B'^T d B') ] A'`` with F(3x3, 2x2)'s matrices (``_SMALL``), summed over
tiles: 16 GEMMs (C_out x tiles) @ (tiles x C), one batched GEMM per piece, accumulated.

Where it is used (``applies``): on the CPU, for float32 and float64 tensors, 3x3 kernels, stride 1,
no dilation, one group, and at least ``MIN_CHANNELS`` input and output channels: the forward pass,
the input gradient (the same convolution of the padded dL/dy with the kernel flipped in both
spatial axes and its channels swapped) and the weight gradient. Measured on the AMX Xeon
(docs/speed.md). Half-precision tensors keep im2col, also where their GEMMs run in float32: the
transforms add up to 9 numbers before the one rounding of the result, and a bias added after a
half-precision rounding would round twice.

Non-finite and huge inputs. The transforms take differences, so an inf in the input would give
NaN (inf - inf) where torch gives inf, and values near the float range could overflow where
torch's direct sums do not: each use checks its operands first (``well_scaled``, one max-abs
pass over each) and leaves such inputs to im2col.

Accuracy. The transforms only add, subtract and halve, so each output is the same sum as im2col's
in another order, with the input and kernel values combined before they are multiplied. In float32
the relative error of a ResNet layer's outputs and gradients against float64 was at most 7e-7
(im2col's and torch's: 4e-7), and 1.2e-6 with inputs offset by 100 or scaled by 1e4; float64
agrees with torch to 1e-10 and better (tests/test_layers.py).
"""

from __future__ import annotations

import torch

from dllab.layers import _workspace as workspace

WINOGRAD = True  # off: every 3x3 convolution takes im2col (tests and benchmarks compare the two)
MIN_CHANNELS = 16  # fewer input or output channels (stems): im2col, whose GEMMs are small anyway
CHUNK_BYTES = 4 * 2**20  # bytes of the transformed input of one chunk of images

_SMALL = {  # F(2x2, 3x3): the forward pass and the input gradient
    "BT": ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    "G": ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
    "AT": ((1, 1, 1, 0), (0, 1, -1, -1)),
    # F(3x3, 2x2): the weight gradient, a 3x3 "output" (the kernel) from 4x4 input patches and
    # 2x2 tiles of dL/dy as the "kernel"
    "BT32": ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, -1, 0, 1)),
    "G32": ((1, 0), (0.5, 0.5), (0.5, -0.5), (0, 1)),
    "AT32": ((1, 1, 1, 0), (0, 1, -1, 0), (0, 1, 1, 1)),
}
_MATRICES: dict[tuple, torch.Tensor] = {}


def _matrix(name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The Kronecker square of one of ``_SMALL``'s matrices (``B^T (x) B^T`` is (16, 16), ``G (x) G``
    (16, 9), ``A^T (x) A^T`` (4, 16); for F(3x3, 2x2) (16, 16), (16, 4) and (9, 16)), cached."""
    key = (name, dtype, device)
    if key not in _MATRICES:
        small = torch.tensor(_SMALL[name], dtype=torch.float64)
        with torch.inference_mode(False):  # a normal tensor, usable in training after an evaluation
            _MATRICES[key] = torch.kron(small, small).to(dtype=dtype, device=device)
    return _MATRICES[key]


def applies(c_in: int, w_shape, stride, dilation, groups: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a convolution of tensors of ``dtype`` (the input's, not the GEMMs') is computed here
    (see the module docstring)."""
    c_out, _, kh, kw = w_shape
    return (WINOGRAD and (kh, kw) == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
            and groups == 1 and dtype in (torch.float32, torch.float64) and workspace.uses_cpu_paths(device)
            and min(c_in, c_out) >= MIN_CHANNELS)


def max_abs(t: torch.Tensor) -> float:
    """The largest |value| of ``t`` (NaN if it holds one; 0 if empty), in one pass: ``torch.aminmax``
    is vectorised, 10x faster than ``vector_norm(t, inf)`` on the CPU here."""
    if t.numel() == 0:
        return 0.0
    low, high = torch.aminmax(t)  # (both NaN if t holds a NaN)
    return max(abs(float(low)), abs(float(high)))


def well_scaled(a: torch.Tensor | float, b: torch.Tensor | float, terms: int, dtype: torch.dtype) -> bool:
    """Whether Winograd gives what im2col gives for operands ``a`` and ``b`` (tensors, or their
    :func:`max_abs` already taken) of a sum of ``terms`` products in ``dtype``: both finite, and
    small enough that its transforms cannot overflow where a direct sum would not (they grow a
    product by at most 81x, 9x for each of the input and output transforms). Otherwise (an inf in
    an activation, say, where Winograd's differences would make NaN from inf - inf and torch gives
    inf) the caller takes im2col. CPU only, so reading the answer costs no device sync."""
    na = a if isinstance(a, float) else max_abs(a)
    nb = b if isinstance(b, float) else max_abs(b)
    return na * nb * 81.0 * max(terms, 1) < torch.finfo(dtype).max  # False for NaN and inf too


def tile_pads(h: int, w: int, pads) -> tuple[int, int, int, int]:
    """``pads`` (top, bottom, left, right) of an (h, w) input, with the bottom and right grown by one
    where the output has an odd size: every 2x2 tile then lies inside the padded input."""
    top, bottom, left, right = pads
    return top, bottom + (h + top + bottom - 2) % 2, left, right + (w + left + right - 2) % 2


def weight_transform(w: torch.Tensor, dtype: torch.dtype, flipped: bool = False) -> torch.Tensor:
    """``U = G g G^T`` of every kernel of ``w`` (C_out, C, 3, 3), as (16, C, C_out) in ``dtype``.

    ``flipped``: the kernel of the input gradient instead, ``w`` flipped in both spatial axes with
    its channels swapped, as (16, C_out, C)."""
    c_out, c = w.shape[:2]
    taps = w.flip(2, 3).transpose(0, 1) if flipped else w  # (K_out, K_in, 3, 3)
    w9 = taps.permute(2, 3, 1, 0).to(dtype).reshape(9, -1)  # (3*3, K_in * K_out), one copy
    return torch.mm(_matrix("G", dtype, w.device), w9).view(16, taps.shape[1], taps.shape[0])


def _pieces(n: int, th: int, tw: int, c: int, itemsize: int):
    """(image, images, first tile row, tile rows) of each piece: whole images, as many as fit
    ``CHUNK_BYTES`` of transformed input, or, where one image does not fit, blocks of its rows of
    tiles."""
    if n == 0 or th == 0 or tw == 0:
        return []
    per_row = 16 * tw * c * itemsize
    rows = max(1, CHUNK_BYTES // per_row)
    if rows >= th:  # whole images
        images = max(1, min(n, rows // th))
        return [(b0, min(images, n - b0), 0, th) for b0 in range(0, n, images)]
    return [(b, 1, r0, min(rows, th - r0)) for b in range(n) for r0 in range(0, th, rows)]


def _transformed_patches(xp: torch.Tensor, piece, tw: int, transform: torch.Tensor) -> torch.Tensor:
    """``transform @ d`` (16, tiles * C) for the 4x4 patches ``d`` of one piece of the padded NHWC
    input ``xp``: the patches, 2 pixels apart, copied tap-major (4, 4, nb, rb, tw, C) into the
    workspace, then one GEMM with a 16 x 16 input transform (``B^T (x) B^T`` of F(2x2, 3x3) or of
    F(3x3, 2x2))."""
    b0, nb, r0, rb = piece
    c = xp.shape[3]
    s_n, s_h, s_w, s_c = xp.stride()
    width = nb * rb * tw * c
    patches = xp.as_strided((4, 4, nb, rb, tw, c), (s_h, s_w, s_n, 2 * s_h, 2 * s_w, s_c),
                            xp.storage_offset() + b0 * s_n + 2 * r0 * s_h)
    d = workspace.buffer("wino_d", (16, width), xp.dtype, xp.device)
    d.view(4, 4, nb, rb, tw, c).copy_(patches)
    return torch.mm(transform, d, out=workspace.buffer("wino_v", (16, width), xp.dtype, xp.device))


def conv(xp: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, out_nchw: torch.Tensor) -> None:
    """``out_nchw`` (N, C_out, Ho, Wo), any layout, <- the 3x3 stride-1 convolution of the padded
    NHWC input ``xp`` (N, Hp, Wp, C), contiguous, with the transformed kernels ``u`` (16, C, C_out).

    ``xp`` must hold every tile: Hp - 2 and Wp - 2 even (:func:`tile_pads`); the output may be a
    row and a column smaller than that (an odd size), and keeps its first Ho x Wo pixels.
    """
    n, hp, wp, c = xp.shape
    c_out = u.shape[2]
    ho, wo = out_nchw.shape[2:]
    th, tw = (hp - 2) // 2, (wp - 2) // 2
    dtype, device = xp.dtype, xp.device
    t16, a16 = _matrix("BT", dtype, device), _matrix("AT", dtype, device)
    pieces = _pieces(n, th, tw, c, dtype.itemsize)
    pc_max = max(nb * rb for _, nb, _, rb in pieces) * tw if pieces else 0
    m_buf = workspace.buffer("wino_m", (16, pc_max, c_out), dtype, device)
    y_buf = workspace.buffer("wino_y", (4, pc_max * c_out), dtype, device)
    full = workspace.buffer("wino_out", (pc_max * 4 * c_out,), dtype, device)  # odd sizes, other dtypes
    out_nhwc = out_nchw.permute(0, 2, 3, 1)  # (N, Ho, Wo, C_out), a view of either layout
    b = None if bias is None else bias.to(dtype)
    for b0, nb, r0, rb in pieces:
        pc = nb * rb * tw
        v = _transformed_patches(xp, (b0, nb, r0, rb), tw, t16)  # V = B^T d B of every tile and channel
        m = m_buf[:, :pc]
        torch.bmm(v.view(16, pc, c), u, out=m)  # the 16 products, summed over input channels
        y = y_buf[:, :pc * c_out]
        torch.mm(a16, m.view(16, pc * c_out), out=y)  # Y = A^T M A: (2, 2, tiles, C_out)
        if b is not None:
            y.view(4, pc, c_out).add_(b)  # every output pixel of the tile, before the one rounding
        tiles = y.view(2, 2, nb, rb, tw, c_out).permute(2, 3, 0, 4, 1, 5)  # (nb, rb, 2, tw, 2, C_out)
        rows = slice(2 * r0, min(2 * (r0 + rb), ho))
        dst = out_nhwc[b0:b0 + nb, rows]
        if dst.shape[1:3] == (2 * rb, 2 * tw) and dst.dtype == dtype:
            dst.view(nb, rb, 2, tw, 2, c_out).copy_(tiles)
        else:  # an odd last row or column is cut off, another dtype rounded: through one buffer
            whole = full[:pc * 4 * c_out].view(nb, 2 * rb, 2 * tw, c_out)
            whole.view(nb, rb, 2, tw, 2, c_out).copy_(tiles)
            dst.copy_(whole[:, :dst.shape[1], :wo])


def weight_grad(xp: torch.Tensor, gy: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` (C_out, C, 3, 3), any layout, <- dL/dw of the 3x3 stride-1 convolution of the padded
    NHWC input ``xp`` (N, Hp, Wp, C), contiguous, as :func:`conv` reads it (:func:`tile_pads`), from
    dL/dy seen as NHWC ``gy`` (N, Ho, Wo, C_out), any strides.

    ``dw[o, c, i, j] = sum over images and pixels of gy[o, p, q] * xp[c, p + i, q + j]``: per 2x2 tile
    of dL/dy this is F(3x3, 2x2), the 4x4 input patch of the forward pass against the tile, so
    ``dW[k] (C_out, C) = sum over tiles of GY[k]^T V[k]`` for the 16 transformed positions k, one
    batched GEMM per piece accumulated over the pieces, then ``A^T dW A`` gives the 3x3 kernel:
    2.25x fewer multiplications than im2col's ``grad_y^T @ col``.
    """
    n, hp, wp, c = xp.shape
    c_out = gy.shape[3]
    ho, wo = gy.shape[1:3]
    th, tw = (hp - 2) // 2, (wp - 2) // 2
    dtype, device = xp.dtype, xp.device
    pieces = _pieces(n, th, tw, c, dtype.itemsize)
    if not pieces or th == 0 or tw == 0:  # an empty batch or image: nothing to sum
        out.zero_()
        return
    t16, g16, a9 = (_matrix(m, dtype, device) for m in ("BT32", "G32", "AT32"))
    if (2 * th, 2 * tw) != (ho, wo) or gy.dtype != dtype:  # odd sizes: a zero row / column completes the tiles
        padded = workspace.bordered("wino_gy", (n, 2 * th, 2 * tw, c_out), (0, 2 * th - ho, 0, 2 * tw - wo),
                                    dtype, device)
        padded[:, :ho, :wo].copy_(gy)
        gy = padded
    pc_max = max(nb * rb for _, nb, _, rb in pieces) * tw
    g_buf = workspace.buffer("wino_g", (4, pc_max * c_out), dtype, device)
    gh_buf = workspace.buffer("wino_gh", (16, pc_max * c_out), dtype, device)
    dw = workspace.buffer("wino_dw", (16, c_out, c), dtype, device)  # written by the first piece's GEMM
    for k, (b0, nb, r0, rb) in enumerate(pieces):
        pc = nb * rb * tw
        v = _transformed_patches(xp, (b0, nb, r0, rb), tw, t16)  # B'^T d B' of every tile and channel
        g = g_buf[:, :pc * c_out]  # the 2x2 tiles of dL/dy, tap-major: (2, 2, nb, rb, tw, C_out)
        tiles = gy[b0:b0 + nb, 2 * r0:2 * (r0 + rb)].reshape(nb, rb, 2, tw, 2, c_out)
        g.view(2, 2, nb, rb, tw, c_out).copy_(tiles.permute(2, 4, 0, 1, 3, 5))
        gh = gh_buf[:, :pc * c_out]
        torch.mm(g16, g, out=gh)
        if k == 0:
            torch.bmm(gh.view(16, pc, c_out).transpose(1, 2), v.view(16, pc, c), out=dw)
        else:
            dw.baddbmm_(gh.view(16, pc, c_out).transpose(1, 2), v.view(16, pc, c))
    taps = torch.mm(a9, dw.view(16, c_out * c))  # (3*3, C_out * C)
    out.copy_(taps.view(3, 3, c_out, c).permute(2, 3, 0, 1))
