"""Functional forms of the from-scratch layers, drop-in for ``torch.nn.functional``.

``conv2d``, ``max_pool2d`` and ``batch_norm`` take the arguments of their ``torch.nn.functional``
namesakes (ints or pairs, ``padding="same"/"valid"``, batched (N, C, H, W) or unbatched (C, H, W)
inputs) and return the same values, dtypes and memory formats. No native convolution, pooling or
batch-norm kernel runs, forwards or backwards: the arithmetic is GEMMs, strided views, reductions
and elementwise operations, and each backward pass is written out by hand. How each one works is
explained in the docstrings of ``_conv.py``, ``_pool.py`` and ``_norm.py``.

Bad arguments raise ``ValueError`` naming the offending value, under the conditions on which
torch raises its errors. ``pad2d`` (reflect / replicate / circular / zero padding by indexing)
serves ``Conv2d``'s ``padding_mode``. On the CPU the layers keep their large temporaries in a
reusable per-thread workspace (``workspace_bytes()`` says how much, ``clear_workspace()`` frees it,
``set_workspace_limit()`` caps it; see ``_workspace.py`` for why).
"""

from __future__ import annotations

import contextlib

import torch

from dllab.layers import _workspace
from dllab.layers._conv import Conv2dFunction, suggest_memory_format
from dllab.layers._norm import BatchNormTrainFunction, scale_shift
from dllab.layers._pool import MaxPool2dFunction
from dllab.layers._workspace import clear_workspace, set_workspace_limit, workspace_bytes, workspace_limit

__all__ = ["conv2d", "max_pool2d", "batch_norm", "pad2d", "conv_output_size", "pool_output_size",
           "same_padding", "workspace_bytes", "clear_workspace", "set_workspace_limit", "workspace_limit"]


def eager_under_compile(fn):
    """Run ``fn`` eagerly inside ``torch.compile``d code: dynamo breaks the graph around it.

    The layers' CPU workspace (cached buffers, views made with ``as_strided``, sizes read on the
    host) is not something dynamo can trace: a compiled model with from-scratch layers failed at
    its first step. Eagerly, each call costs 0.4 us more; compiled, the rest of the model (ReLUs,
    additions, the head) is still compiled between the layers. The modules' ``forward`` methods
    are marked too, so that dynamo does not compile each of them as a frame of its own (one per
    stride and shape, up to its recompile limit). (Their GPU paths did not make one graph either:
    dynamo broke the graph 28 times in a small net of them.)
    """
    return torch.compiler.disable(fn)


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _pair(value, name: str) -> tuple[int, int]:
    """An int or a sequence of one or two ints -> (int, int); ValueError otherwise."""
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            value = (value[0], value[0])
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        pair = tuple(value)
    else:
        pair = (value, value)
    for v in pair:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def same_padding(kernel_size, dilation) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding that keeps H and W at stride 1, as torch's ``padding="same"``.

    The total ``dilation * (kernel - 1)`` is split evenly, the odd one going to the bottom/right.
    """
    (kh, kw), (dh, dw) = _pair(kernel_size, "kernel_size"), _pair(dilation, "dilation")
    th, tw = dh * (kh - 1), dw * (kw - 1)
    return th // 2, th - th // 2, tw // 2, tw - tw // 2


def conv_output_size(size: int, kernel: int, stride: int, pad_total: int, dilation: int) -> int:
    """Output length of a convolution: ``(size + pad_total - dilation*(kernel-1) - 1) // stride + 1``."""
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def pool_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool) -> int:
    """Output length of a max-pool; with ``ceil_mode`` the last window must start inside the input
    or its left padding (torch's rule)."""
    span = size + 2 * pad - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype active for ``device``'s type, or None."""
    kind = device.type
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return None
    return None


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Autocast's rule: float32/float16/bfloat16 tensors go to ``dtype``; float64 and others stay."""
    if t is None or t.dtype == dtype or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return t
    return t.to(dtype)


@eager_under_compile
def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1,
           padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """2-D convolution (cross-correlation, like ``F.conv2d``) by im2col + GEMM.

    input: (N, C_in, H, W) or unbatched (C_in, H, W); weight: (C_out, C_in/groups, kh, kw);
    bias: (C_out,) or None; stride, padding, dilation: int or pair; padding may also be "valid"
    (no padding) or "same" (output size = input size; stride 1 only). Returns (N, C_out, Ho, Wo)
    with ``Ho = (H + 2*pad - dilation*(kh-1) - 1) // stride + 1``, in the input's memory format.
    Under ``torch.autocast`` the operands are cast to the autocast dtype, as for ``F.conv2d``.
    """
    if not isinstance(input, torch.Tensor) or input.dim() not in (3, 4):
        shape = list(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
        raise ValueError(f"expected a 3D (unbatched) or 4D (batched) input to conv2d, got input of size {shape}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"expected a 4D weight (C_out, C_in/groups, kh, kw), got weight of size {shape}")
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive integer, got groups={groups!r}")
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    if min(stride) < 1:
        raise ValueError(f"stride must be positive, got stride={stride}")
    if min(dilation) < 1:
        raise ValueError(f"dilation must be positive, got dilation={dilation}")
    c_out, cg, kh, kw = weight.shape
    if c_out % groups:
        raise ValueError(f"groups={groups} does not divide out_channels={c_out} (weight of size {list(weight.shape)})")
    if x.shape[1] != cg * groups:
        raise ValueError(f"groups={groups} and weight of size {list(weight.shape)} expect input with "
                         f"{cg * groups} channels, got {x.shape[1]} channels (input of size {list(input.shape)})")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != c_out):
        raise ValueError(f"expected bias of size [{c_out}] for weight of size {list(weight.shape)}, "
                         f"got bias of size {list(bias.shape)}")
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' is not supported for strided convolutions, got stride={stride}")
            pads = same_padding((kh, kw), dilation)
        else:
            raise ValueError(f"invalid padding string {padding!r}; expected 'same', 'valid', an int or a pair")
    else:
        ph, pw = _pair(padding, "padding")
        if min(ph, pw) < 0:
            raise ValueError(f"padding must be non-negative, got padding={padding!r}")
        pads = (ph, ph, pw, pw)
    hp, wp = x.shape[2] + pads[0] + pads[1], x.shape[3] + pads[2] + pads[3]
    if hp < dilation[0] * (kh - 1) + 1 or wp < dilation[1] * (kw - 1) + 1:
        raise ValueError(f"padded input size per channel ({hp} x {wp}) is smaller than the dilated kernel "
                         f"({dilation[0] * (kh - 1) + 1} x {dilation[1] * (kw - 1) + 1}); input of size "
                         f"{list(input.shape)}, kernel ({kh} x {kw}), padding {padding!r}, dilation {dilation}")
    cast = _autocast_dtype(x.device)
    if cast is not None:
        x, weight, bias = _cast(x, cast), _cast(weight, cast), _cast(bias, cast)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"input ({x.dtype}, {x.device}) and {name} ({t.dtype}, {t.device}) must have "
                             "the same dtype and device")
    if not x.is_floating_point():
        raise ValueError(f"conv2d needs a floating-point input, got {x.dtype}")
    ctx = torch.autocast(x.device.type, enabled=False) if cast is not None else contextlib.nullcontext()
    with ctx:
        y = Conv2dFunction.apply(x, weight, bias, stride, pads, dilation, groups)
    return y.squeeze(0) if unbatched else y


@eager_under_compile
def max_pool2d(input: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
               ceil_mode: bool = False, return_indices: bool = False):
    """2-D max-pooling, as ``F.max_pool2d``: returns values, or (values, indices) with
    ``return_indices=True``; indices are flat positions ``h*W + w`` in each input plane.

    stride defaults to kernel_size; padding (implicit -inf) must be at most kernel_size // 2;
    ``ceil_mode`` rounds the output size up, keeping only windows that start inside the input or
    its left/top padding. Gradients go to the first maximal cell of each window (see ``_pool.py``).
    """
    if not isinstance(input, torch.Tensor) or input.dim() not in (3, 4):
        shape = list(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
        raise ValueError(f"expected a 3D (unbatched) or 4D (batched) input to max_pool2d, got input of size {shape}")
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    if x.shape[1] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"expected non-empty channel and spatial dimensions, got input of size {list(input.shape)}")
    kernel = _pair(kernel_size, "kernel_size")
    stride = kernel if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) \
        else _pair(stride, "stride")
    padding, dilation = _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(kernel) < 1:
        raise ValueError(f"kernel_size must be positive, got kernel_size={kernel}")
    if min(stride) < 1:
        raise ValueError(f"stride must be positive, got stride={stride}")
    if min(dilation) < 1:
        raise ValueError(f"dilation must be positive, got dilation={dilation}")
    if min(padding) < 0 or padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise ValueError(f"padding must be between 0 and kernel_size // 2, got padding={padding} "
                         f"for kernel_size={kernel}")
    h, w = x.shape[2], x.shape[3]
    ho = pool_output_size(h, kernel[0], stride[0], padding[0], dilation[0], ceil_mode)
    wo = pool_output_size(w, kernel[1], stride[1], padding[1], dilation[1], ceil_mode)
    if ho < 1 or wo < 1:
        raise ValueError(f"max_pool2d output would be empty ({ho} x {wo}) for input of size {list(input.shape)}, "
                         f"kernel_size={kernel}, stride={stride}, padding={padding}, dilation={dilation}")
    y, idx = MaxPool2dFunction.apply(x, kernel, stride, padding, dilation, (ho, wo))
    if unbatched:
        y, idx = y.squeeze(0), idx.squeeze(0)
    return (y, idx) if return_indices else y


def _check_eps(eps: float, training: bool) -> None:
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got eps={eps}")
    if training and eps == 0:  # a constant channel would divide by zero (torch 2.14 refuses it too)
        raise ValueError(f"batch_norm eps must be positive during training, got eps={eps}")


@eager_under_compile
def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """Batch normalisation of an (N, C, *) input, as ``F.batch_norm`` (Ioffe & Szegedy, 2015).

    training=True: normalise with this batch's per-channel mean and biased variance, and if
    running_mean/running_var are given update them in place with ``momentum`` (the variance with
    Bessel's correction, see ``_norm.py``). training=False: normalise with the running statistics.
    """
    _check_eps(eps, training)
    if isinstance(input, torch.Tensor) and input.shape == (0,):
        # as torch: an empty 1-D input has no channel dimension to check anything against, and
        # comes back empty whatever the statistics, weight and bias
        return input.clone()
    if not isinstance(input, torch.Tensor) or input.dim() < 2:
        shape = list(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
        raise ValueError(f"expected an (N, C, *) input to batch_norm, got input of size {shape}")
    c = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is not None and t.numel() != c:
            raise ValueError(f"{name} should contain {c} elements (one per channel of input of size "
                             f"{list(input.shape)}), not {t.numel()}")
    if not input.is_floating_point():
        raise ValueError(f"batch_norm needs a floating-point input, got {input.dtype}")
    shape = (1, c) + (1,) * (input.dim() - 2)
    if input.numel() == 0:  # an empty batch: empty output, running statistics untouched (as torch)
        one = torch.ones((), dtype=input.dtype, device=input.device)
        scale = one if weight is None else weight.view(shape)
        return input * scale + (0 if bias is None else bias.view(shape))
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var must be given in evaluation mode (training=False)")
        acc = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
        invstd = torch.rsqrt(running_var.to(acc) + eps)
        scale = invstd if weight is None else invstd * weight.to(acc)
        shift = -running_mean.to(acc) * scale if bias is None else bias.to(acc) - running_mean.to(acc) * scale
        return scale_shift(input, scale, shift)
    n = input.numel() // c if c else 0
    if n == 1:
        raise ValueError(f"expected more than 1 value per channel when training, got input of size {list(input.shape)}")
    if momentum is None:  # the module turns momentum=None into 1/num_batches_tracked before calling
        raise ValueError("momentum must be a number in training mode, got momentum=None")
    return BatchNormTrainFunction.apply(input, weight, bias, running_mean, running_var, momentum, eps)


def _pad_index(size: int, before: int, after: int, mode: str, device) -> torch.Tensor:
    """Source index of each of the ``before + size + after`` padded positions along one axis."""
    u = torch.arange(-before, size + after, device=device)
    if mode == "reflect":  # mirror about the edge cells, not repeating them: ... 2 1 | 0 1 2 ... |
        u = u.abs()
        return torch.where(u >= size, 2 * (size - 1) - u, u)
    if mode == "replicate":
        return u.clamp(0, size - 1)
    return u.remainder(size)  # circular


def pad2d(input: torch.Tensor, padding, mode: str = "constant") -> torch.Tensor:
    """Pad the last two dimensions by ``padding = (left, right, top, bottom)``, as ``F.pad``.

    mode: "constant" (zeros), "reflect" (mirror without repeating the edge; pad < size),
    "replicate" (repeat the edge) or "circular" (wrap around; pad <= size). Non-zero modes are an
    ``index_select`` with a computed index per axis, so their backward sums the gradients of every
    copy of a cell back into it.
    """
    if len(padding) != 4 or any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in padding):
        raise ValueError(f"padding must be four non-negative ints (left, right, top, bottom), got {padding!r}")
    left, right, top, bottom = padding
    h, w = input.shape[-2], input.shape[-1]
    if mode in ("constant", "zeros"):
        out = input.new_zeros(input.shape[:-2] + (h + top + bottom, w + left + right))
        out[..., top:top + h, left:left + w] = input
        return out
    if mode not in ("reflect", "replicate", "circular"):
        raise ValueError(f"unknown padding mode {mode!r}; expected constant, reflect, replicate or circular")
    if mode == "reflect" and (max(top, bottom) >= h or max(left, right) >= w):
        raise ValueError(f"reflect padding {padding} must be smaller than the input size ({h} x {w})")
    if mode == "circular" and (max(top, bottom) > h or max(left, right) > w):
        raise ValueError(f"circular padding {padding} must be at most the input size ({h} x {w})")
    if mode == "replicate" and any(padding) and (h == 0 or w == 0):
        raise ValueError(f"replicate padding needs a non-empty input, got size {list(input.shape)}")
    out = input.index_select(-2, _pad_index(h, top, bottom, mode, input.device))
    out = out.index_select(-1, _pad_index(w, left, right, mode, input.device))
    if input.dim() == 4 and suggest_memory_format(input) == torch.channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out
