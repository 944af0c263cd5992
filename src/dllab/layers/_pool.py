"""2-D max-pooling from strided window views, and a backward pass that routes each gradient to its argmax.

Forward. Think of the input as padded with -inf, so that padding never wins a comparison
(torch's rule that the padding is at most half the kernel guarantees every window holds a real
cell). Tap (i, j) of *every* window at once is one strided slice of the padded input ``xp``:

    xp[:, :, i*dh : i*dh + sh*(Ho-1) + 1 : sh,  j*dw : j*dw + sw*(Wo-1) + 1 : sw]    # (N, C, Ho, Wo)

A running maximum visits the kh*kw taps in row-major order, ``t = i*kw + j``: the output
starts as tap 0, and tap t replaces it wherever it is strictly greater, recording the window's
choice (as that cell's offset ``i*dh*W + j*dw`` from the window's first cell). Every step is a
few elementwise kernels over output-sized views; nothing of the size of all the windows is
materialised. The padded copy itself is not made either: tap (i, j) is read from x for the
rectangle of outputs where it lies inside x, and the rest of the output keeps what it had (the
padding's -inf never wins), with the output starting at -inf when tap 0 falls in the padding.
(In NCHW with a column stride the -inf-padded input is copied once, split by column phase, so
that every view reads unit-stride rows.) On the CPU the passes run a few images at a time, so
the running maximum stays in the cache between them. A GPU takes :func:`_forward_windows` instead:
one copy of all windows and one reduction (14 kernels in all, no host sync, where the running
maximum took 47 and one sync), since there a launch costs more than the copy.

Ties. Replacing only on ``>`` keeps the *first* maximal tap, which is what torch's max-pool
kernels do: they scan the window row by row and replace the running maximum only when
``val > max`` (strictly). So a window whose maximum occurs several times sends its gradient to
the first occurrence.
NaN: torch's kernels test ``val > max || isnan(val)``, so a NaN wins and the *last* NaN of the
window is chosen, and a window whose real cells are all -inf reports its first real cell (never
a padding cell). Inputs whose output holds a NaN or -inf (one cheap test on the output's sum) are
pooled again by :func:`_forward_windows`, which copies all the windows, reduces them with one
``max`` (first maximal tap) and then applies those two rules.

Indices. ``return_indices`` gives, like torch, the flat position ``h*W + w`` of the chosen cell in
its (H, W) input plane: ``(p*sh - ph + i*dh) * W + (q*sw - pw + j*dw)`` for output (p, q) and tap
(i, j), i.e. a per-output base plus a per-tap offset.

Backward. Only the chosen cell of each window influenced the output, so
``grad_x[n, c, index] += grad_y[n, c, p, q]``: one ``scatter_add`` over the flattened planes.
When windows overlap (stride < kernel) a cell that is the maximum of several windows receives the
sum of their gradients, as in torch.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

from dllab.layers import _workspace as workspace
from dllab.layers._conv import suggest_memory_format

POOL_CHUNK_BYTES = 2**20  # output bytes per chunk of images in the running maximum (see max_pool2d_forward)


def padded_input(x: torch.Tensor, kernel, stride, padding, dilation, out_hw, channels_last: bool) -> torch.Tensor:
    """x (N, C, H, W) inside a -inf (or dtype-minimum) border wide enough for every window of the
    (Ho, Wo) output; x itself if no border is needed."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), (ho, wo) = kernel, stride, padding, dilation, out_hw
    # ceil_mode may let the last window run past the right/bottom padding
    hp = max(h + 2 * ph, sh * (ho - 1) + dh * (kh - 1) + 1)
    wp = max(w + 2 * pw, sw * (wo - 1) + dw * (kw - 1) + 1)
    if (hp, wp) == (h, w):
        return x
    low = -torch.inf if x.is_floating_point() else torch.iinfo(x.dtype).min
    border = (ph, hp - h - ph, pw, wp - w - pw)
    if channels_last:
        xp = workspace.bordered("pool", (n, hp, wp, c), border, x.dtype, x.device, low).permute(0, 3, 1, 2)
    else:
        xp = workspace.bordered("pool", (n, c, hp, wp), border, x.dtype, x.device, low)
    xp[:, :, ph:ph + h, pw:pw + w] = x  # only the interior is written: the border stays -inf
    return xp


def max_pool2d_forward(x: torch.Tensor, kernel, stride, padding, dilation, out_hw):
    """(values, flat indices) of a max-pool of (N, C, H, W) ``x``; see the module docstring.

    A running maximum over the kh*kw taps: ``values`` starts as tap 0 and each later tap replaces
    it where it is strictly greater (so the first maximal tap wins, as in torch), recording that
    tap's cell offset. Each step streams over output-sized strided views (in channels-last their
    innermost dimension is the contiguous channel one), so nothing of the size of all the
    windows is copied. When the output holds a NaN or -inf, where torch's choices differ from a
    plain comparison, those inputs go through :func:`_forward_windows` instead.
    """
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), (ho, wo) = kernel, stride, padding, dilation, out_hw
    if not x.is_floating_point() or x.numel() == 0 or n * c * ho * wo == 0:
        return _forward_windows(x, kernel, stride, padding, dilation, out_hw)
    if kh * dh * w + kw * dw >= 2**24:  # float32 offsets (below) would not be exact: a gigantic window
        return _forward_windows(x, kernel, stride, padding, dilation, out_hw)
    if not workspace.uses_cpu_paths(x.device):  # a GPU: few launches and no host sync (_forward_windows)
        return _forward_windows(x, kernel, stride, padding, dilation, out_hw)
    channels_last = suggest_memory_format(x) == torch.channels_last
    everywhere = (slice(None), slice(None))
    if channels_last or sw == 1:
        # The taps read x itself, not a padded copy: tap (i, j) of output (p, q) is the cell
        # (p*sh - ph + i*dh, q*sw - pw + j*dw), and each tap updates only the rectangle of outputs
        # whose cell lies inside x. Elsewhere that cell is padding (-inf), which never wins.
        taps = []  # (tap number, output rectangle, view of x)
        for i in range(kh):
            p0, p1 = _inside(h, ho, sh, ph, i * dh)
            for j in range(kw):
                q0, q1 = _inside(w, wo, sw, pw, j * dw)
                if p0 < p1 and q0 < q1:
                    r0, c0 = p0 * sh - ph + i * dh, q0 * sw - pw + j * dw
                    taps.append((i * kw + j, (slice(p0, p1), slice(q0, q1)),
                                 x[:, :, r0:r0 + sh * (p1 - p0 - 1) + 1:sh, c0:c0 + sw * (q1 - q0 - 1) + 1:sw]))
        if not taps:  # no window holds a real cell (torch allows that with dilation): torch's answer
            return _forward_windows(x, kernel, stride, padding, dilation, out_hw)
        covers = taps[0][0] == 0 and taps[0][2].shape[2:] == (ho, wo)  # tap 0 is inside x for every output
    else:
        # NCHW with a column stride: those views would step through memory sw elements at a time,
        # which elementwise kernels do not vectorise. Split the columns of the -inf-padded input by
        # phase (column % sw) once, so that every tap reads unit-stride rows: tap (i, j) starts at
        # column j*dw, i.e. phase (j*dw) % sw, position (j*dw) // sw within it. (In channels-last a
        # column step skips C contiguous values, which vectorise; a phase split there saved about
        # what its copy cost.)
        xp = padded_input(x, kernel, stride, padding, dilation, out_hw, channels_last)
        hp, wp = xp.shape[2:]
        phases = {}
        for j in range(kw):
            p = (j * dw) % sw
            if p not in phases:
                phases[p] = workspace.buffer(f"pool_phase{len(phases)}", (n, c, hp, (wp - p + sw - 1) // sw),
                                             x.dtype, x.device)
                phases[p].copy_(xp[:, :, :, p::sw])
        taps = [(i * kw + j, everywhere,
                 phases[(j * dw) % sw][:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, (j * dw) // sw:(j * dw) // sw + wo])
                for i in range(kh) for j in range(kw)]
        covers = True

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    values = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    # What is tracked is not the tap number but the chosen cell's offset from the window's base
    # cell, i*dh*W + j*dw, so that the flat index is one addition away. It is kept in float32
    # (exact below 2**24): comparisons written as 1.0/0.0 floats and lerp are vectorised kernels,
    # where masked_fill_ and bool outputs are not (5-7 ms against 0.1-0.2 ms per tap for a
    # 64x64x16x16 output on this project's CPU). offset = lerp(offset, tap's offset, v > values).
    offset = workspace.buffer_like("pool_off", values, torch.float32)
    greater = workspace.buffer_like("pool_gt", values, torch.float32)
    tap_offsets = torch.tensor([float(i * dh * w + j * dw) for i in range(kh) for j in range(kw)],
                               device=x.device)  # one transfer; tap_offsets[t] is a 0-d view
    idx = torch.empty_like(values, dtype=torch.int64)
    exact = (h + 2 * ph) * (w + 2 * pw) < 2**24  # the base cells' numbers are exact in float32 too
    base = _window_base(out_hw, w, stride, padding, x.device, torch.float32 if exact else torch.int64)
    # The 3*(kh*kw - 1) passes run over a few images at a time, so that their running maximum
    # stays in the cache from one pass to the next (1.15x faster than whole-batch passes for a
    # 64x64x16x16 output here); on other devices the whole batch is one chunk.
    per_image = c * ho * wo * values.element_size()
    chunk = max(1, POOL_CHUNK_BYTES // per_image) if workspace.uses_cpu_paths(x.device) else n
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    sums = torch.empty(-(-n // chunk), dtype=acc, device=x.device)  # per chunk: finite unless NaN or -inf
    # per tap: (its offset, its view of x, and the output rectangle's views of values, offset,
    # greater), made once, so that a chunk is one slice of each (small layers feel every op)
    steps = [(tap_offsets[t], view, values[:, :, rows, cols], offset[:, :, rows, cols], greater[:, :, rows, cols])
             for t, (rows, cols), view in (taps[1:] if covers else taps)]
    for k, b0 in enumerate(range(0, n, chunk)):
        b = slice(b0, b0 + chunk)
        vals, off = values[b], offset[b]
        off.zero_()
        if covers:  # start from tap 0
            vals.copy_(taps[0][2][b])
        else:  # start from padding: every real cell beats it
            vals.fill_(-torch.inf)
        for tap_offset, view, cur, chosen, mask in steps:
            v, cur, chosen, mask = view[b], cur[b], chosen[b], mask[b]
            torch.gt(v, cur, out=mask)
            torch.maximum(cur, v, out=cur)
            chosen.lerp_(tap_offset, mask)
        torch.sum(vals, (0, 1, 2, 3), dtype=acc, out=sums[k])
        if exact:
            idx[b].copy_(off.add_(base))
    if not bool(torch.isfinite(sums).all()):  # NaN or -inf maxima: torch's choices, see docstring
        return _forward_windows(x, kernel, stride, padding, dilation, out_hw)
    if not exact:
        idx.copy_(offset).add_(base)
    return values, idx


@functools.lru_cache(maxsize=1024)  # asked at every forward call, with the same few geometries
def has_empty_windows(h: int, w: int, kernel, stride, padding, dilation, out_hw) -> bool:
    """Whether some window lies wholly in the padding (possible with dilation: a 2x1 kernel of
    dilation 2 over one padded row). torch then reports -inf and an index past the plane, whose
    gradient it drops; :class:`MaxPool2dFunction` does the same. (Arguments are ints and tuples.)"""
    def axis_empty(size, out, k, s, p, d):
        return any(all(not 0 <= o * s - p + i * d < size for i in range(k)) for o in range(out))

    (kh, kw), (sh, sw), (ph, pw), (dh, dw), (ho, wo) = kernel, stride, padding, dilation, out_hw
    return axis_empty(h, ho, kh, sh, ph, dh) or axis_empty(w, wo, kw, sw, pw, dw)


def _inside(size: int, out: int, stride: int, pad: int, tap: int) -> tuple[int, int]:
    """Outputs [lo, hi) along one axis whose cell ``o*stride - pad + tap`` lies in [0, size)."""
    return max(0, -(-(pad - tap) // stride)), min(out, (size - 1 + pad - tap) // stride + 1)


def _forward_windows(x: torch.Tensor, kernel, stride, padding, dilation, out_hw):
    """(values, flat indices) of a max-pool of (N, C, H, W) ``x`` from a copy of all windows, with
    torch's choices for NaN and all -inf windows (see the module docstring).

    This is the GPU's route for every input: one copy of the windows and one reduction, where the
    running maximum takes three kernels per tap. On the CPU the torch rules for NaN and -inf are
    applied only when one cheap test on the output says they are needed; on a GPU that test would
    make the host wait for the device at every call, so both rules are applied everywhere,
    branch-free (a few more elementwise kernels, no host sync).
    """
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), (ho, wo) = kernel, stride, padding, dilation, out_hw
    channels_last = suggest_memory_format(x) == torch.channels_last
    xp = padded_input(x, kernel, stride, padding, dilation, out_hw, channels_last)
    s_n, s_c, s_h, s_w = xp.stride()
    taps = xp.as_strided((kh, kw, n, c, ho, wo), (dh * s_h, dw * s_w, s_n, s_c, sh * s_h, sw * s_w),
                         xp.storage_offset())
    # windows, tap-major: raw memory (kh*kw, N, C, Ho, Wo), or (kh*kw, N, Ho, Wo, C) for channels-last
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    raw_shape = (kh, kw, n, ho, wo, c) if channels_last else (kh, kw, n, c, ho, wo)
    raw = workspace.buffer("pool_win", raw_shape, x.dtype, x.device)
    buf = raw.permute(0, 1, 2, 5, 3, 4) if channels_last else raw  # (kh, kw, N, C, Ho, Wo)
    buf.copy_(taps)
    win = buf.flatten(0, 1)  # (kh*kw, N, C, Ho, Wo), a view
    values = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    tap = workspace.buffer_like("pool_tap", values, torch.int64)
    # in memory this is a plain (kh*kw, M) -> (M,) reduction, whatever the layout
    flat = (lambda t: t.permute(0, 2, 3, 1).reshape(-1)) if channels_last else (lambda t: t.view(-1))
    torch.max(raw.view(kh * kw, -1), 0, out=(flat(values), flat(tap)))  # first maximal tap per window
    low = -torch.inf if x.is_floating_point() else torch.iinfo(x.dtype).min
    on_cpu = workspace.uses_cpu_paths(x.device)
    if not on_cpu:
        special = True  # applied everywhere: reading a test's answer is a host sync on a GPU
    elif x.is_floating_point():
        special = not bool(torch.isfinite(values.sum()))
    else:
        special = bool((values == low).any())
    if special:  # NaN or -inf maxima (one cheap test on the sum): torch's choices, see docstring
        if x.is_floating_point():
            # the last NaN tap of a window that has one: the largest of t * isnan over the taps t, in
            # the smallest integer type that holds kh*kw (one byte per window cell for 3x3)
            ids = _geometry("tap_ids", out_hw, w, kernel, stride, padding, dilation, x.device)
            nan_tap = torch.isnan(win).to(ids.dtype).mul_(ids).amax(0)
            torch.where(torch.isnan(values), nan_tap, tap, out=tap)
        # a window whose real cells are all -inf: the first real cell, not a padding cell
        torch.where(values == low, _geometry("first_real_tap", out_hw, w, kernel, stride, padding, dilation,
                                             x.device), tap, out=tap)
    if on_cpu:
        return values, _flat_indices(tap, values, w, kernel, stride, padding, dilation)
    # elsewhere two kernels: each tap's offset from its window's first cell, looked up, plus that cell
    offsets = _geometry("tap_offsets", out_hw, w, kernel, stride, padding, dilation, x.device)
    base = _geometry("window_base", out_hw, w, kernel, stride, padding, dilation, x.device)
    idx = torch.empty_like(values, dtype=torch.int64)  # the layout of the values, as torch gives it
    return values, torch.add(offsets.take(tap), base, out=idx)


_GEOMETRY: dict[tuple, torch.Tensor] = {}
GEOMETRY_CACHE_SIZE = 1024  # tables kept (a few KiB each for ResNet shapes), least recently used dropped


def _geometry(what: str, out_hw, w: int, kernel, stride, padding, dilation, device) -> torch.Tensor:
    """A constant int64 table of one pooling geometry on ``device``, made once and cached: on a GPU
    each call would otherwise launch a dozen tiny kernels to rebuild it.

    - ``first_real_tap`` (Ho, Wo): the tap ``i*kw + j`` of each window's first cell inside the
      input (torch's choice for a window whose real cells are all -inf);
    - ``tap_ids`` (kh*kw, 1, 1, 1, 1): the tap numbers, in the smallest integer type that holds them;
    - ``tap_offsets`` (kh*kw,): tap ``i*kw + j``'s flat offset ``i*dh*W + j*dw`` from its window's
      first cell;
    - ``window_base`` (Ho, Wo): the flat index of each window's first cell (:func:`_window_base`).
    """
    key = (what, tuple(out_hw), w, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), device)
    table = _GEOMETRY.pop(key, None)
    if table is None:
        (ho, wo), (kh, kw), (sh, sw), (ph, pw), (dh, dw) = out_hw, kernel, stride, padding, dilation
        with torch.inference_mode(False):  # a normal tensor, usable in training after an evaluation
            if what == "first_real_tap":
                i0 = [max(0, ph - p * sh + dh - 1) // dh for p in range(ho)]
                j0 = [max(0, pw - q * sw + dw - 1) // dw for q in range(wo)]
                table = torch.tensor([[i * kw + j for j in j0] for i in i0], dtype=torch.int64, device=device)
            elif what == "tap_ids":
                table = torch.arange(kh * kw, dtype=torch.uint8 if kh * kw <= 2**8 else torch.int32,
                                     device=device).view(-1, 1, 1, 1, 1)
            elif what == "tap_offsets":
                table = torch.tensor([i * dh * w + j * dw for i in range(kh) for j in range(kw)],
                                     dtype=torch.int64, device=device)
            else:
                table = _window_base(out_hw, w, stride, padding, device, torch.int64)
        if len(_GEOMETRY) >= GEOMETRY_CACHE_SIZE:  # (another thread may have dropped it already)
            _GEOMETRY.pop(next(iter(_GEOMETRY), None), None)
    _GEOMETRY[key] = table  # most recently used last
    return table


def _window_base(out_hw, w: int, stride, padding, device, dtype) -> torch.Tensor:
    """(Ho, Wo) flat index ``h*W + w`` of each window's first cell: row ``p*sh - ph``, column ``q*sw - pw``."""
    (ho, wo), (sh, sw), (ph, pw) = out_hw, stride, padding
    rows = torch.arange(ho, device=device, dtype=dtype) * sh - ph
    cols = torch.arange(wo, device=device, dtype=dtype) * sw - pw
    return rows.view(ho, 1) * w + cols.view(1, wo)


def _flat_indices(tap, values, w, kernel, stride, padding, dilation):
    """Flat index ``h*W + w`` of each window's chosen cell, from its int64 tap number ``tap``.

    Tap ``t = i*kw + j`` lies ``i*dh`` rows and ``j*dw`` columns from the window's first cell (its
    base), so the index is ``base + i*dh*W + j*dw`` with ``i = t // kw``, ``j = t - i*kw``,
    evaluated as elementwise arithmetic (a table lookup by ``tap`` was 10x slower on the CPU).
    """
    kw, (dh, dw) = kernel[1], dilation
    i = torch.div(tap, kw, rounding_mode="floor")
    idx = torch.empty_like(values, dtype=torch.int64)
    idx.copy_(i.mul_(dh * w - kw * dw).add_(tap, alpha=dw))  # i*dh*W + (t - i*kw)*dw
    return idx.add_(_window_base(values.shape[2:], w, stride, padding, values.device, torch.int64))


class MaxPool2dFunction(torch.autograd.Function):
    """(y, indices) = max_pool2d(x); backward scatters grad_y to the argmax cells."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, out_hw):
        y, idx = max_pool2d_forward(x, kernel, stride, padding, dilation, out_hw)
        ctx.save_for_backward(idx)
        ctx.empty_windows = has_empty_windows(x.shape[2], x.shape[3], *map(tuple, (kernel, stride, padding, dilation,
                                                                                    out_hw)))
        ctx.x_shape = x.shape
        ctx.fmt = suggest_memory_format(x)
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)  # no zero tensor for the indices' (absent) gradient
        return y, idx

    @staticmethod
    @once_differentiable  # a second derivative would need this backward's own graph: not kept
    def backward(ctx, grad_y, _grad_idx):
        if grad_y is None:
            return None, None, None, None, None, None
        (idx,) = ctx.saved_tensors
        n, c, h, w = ctx.x_shape
        if ctx.empty_windows:  # their index lies past the plane: their gradient is dropped, as torch does
            inside = idx < h * w
            idx, grad_y = torch.where(inside, idx, 0), torch.where(inside, grad_y, 0)
        if ctx.fmt == torch.channels_last:  # scatter along the pixels of (N, H*W, C): C stays contiguous
            grad_x = torch.zeros((n, h * w, c), dtype=grad_y.dtype, device=grad_y.device)
            grad_x.scatter_add_(1, idx.permute(0, 2, 3, 1).reshape(n, -1, c),
                                grad_y.permute(0, 2, 3, 1).reshape(n, -1, c))  # 2x faster than along dim 2 of (N, C, H*W)
            return grad_x.view(n, h, w, c).permute(0, 3, 1, 2), None, None, None, None, None
        grad_x = torch.zeros(ctx.x_shape, dtype=grad_y.dtype, device=grad_y.device)
        grad_x.view(n, c, h * w).scatter_add_(2, idx.reshape(n, c, -1), grad_y.reshape(n, c, -1))
        return grad_x, None, None, None, None, None
