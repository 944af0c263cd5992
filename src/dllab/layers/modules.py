"""``Conv2d``, ``MaxPool2d`` and ``BatchNorm2d`` modules, drop-in for their ``torch.nn`` twins.

Same constructor arguments and defaults, attribute names, parameter and buffer names (so the
``state_dict`` keys and shapes are the same and a state dict moves either way), the same
initialisation distributions (drawn in the same order, so the same seed gives the same numbers),
the same ``extra_repr`` and the same train/eval behaviour. The arithmetic is in
``dllab.layers.functional``.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn as nn
from torch.nn import init
from torch.nn.modules.batchnorm import _NormBase

from dllab.layers import _conv
from dllab.layers import functional as F
from dllab.layers.functional import PADDING_MODES, _pair


class Conv2d(nn.Module):
    """2-D convolution layer; ``torch.nn.Conv2d``'s arguments, parameters and initialisation.

    weight: (out_channels, in_channels / groups, kh, kw) ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    (``kaiming_uniform_(a=sqrt(5))``, as torch), bias: (out_channels,) ~ the same bound.
    padding_mode "reflect" / "replicate" / "circular" pads explicitly with ``pad2d`` first.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
            raise ValueError(f"groups must be a positive integer, got groups={groups!r}")
        if in_channels % groups != 0:
            raise ValueError(f"in_channels must be divisible by groups, got in_channels={in_channels}, groups={groups}")
        if out_channels % groups != 0:
            raise ValueError(f"out_channels must be divisible by groups, got out_channels={out_channels}, groups={groups}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        kernel_size, stride, dilation = _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), _pair(dilation, "dilation")
        if min(kernel_size) < 1 or min(stride) < 1 or min(dilation) < 1:
            raise ValueError(f"kernel_size, stride and dilation must be positive, got kernel_size={kernel_size}, "
                             f"stride={stride}, dilation={dilation}")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"invalid padding string {padding!r}, should be one of ('valid', 'same')")
            if padding == "same" and stride != (1, 1):
                raise ValueError(f"padding='same' is not supported for strided convolutions, got stride={stride}")
            top, bottom, left, right = F.same_padding(kernel_size, dilation) if padding == "same" else (0, 0, 0, 0)
        else:
            padding = _pair(padding, "padding")
            if min(padding) < 0:
                raise ValueError(f"padding must be non-negative, got padding={padding}")
            top, bottom, left, right = padding[0], padding[0], padding[1], padding[1]
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.transposed = False
        self.output_padding = (0, 0)
        self.groups = groups
        self.padding_mode = padding_mode
        # torch's name, order (left, right, top, bottom: the F.pad convention) and type
        pads = [left, right, top, bottom]
        self._reversed_padding_repeated_twice = pads if isinstance(padding, str) else tuple(pads)
        self.weight = nn.Parameter(torch.empty((out_channels, in_channels // groups, *kernel_size), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's initialisation: kaiming_uniform_(a=sqrt(5)) for the weight, U(+-1/sqrt(fan_in)) for the bias."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            if fan_in != 0:
                bound = 1 / math.sqrt(fan_in)
                init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        s = "{in_channels}, {out_channels}, kernel_size={kernel_size}, stride={stride}"
        if self.padding != (0,) * len(self.padding):
            s += ", padding={padding}"
        if self.dilation != (1,) * len(self.dilation):
            s += ", dilation={dilation}"
        if self.groups != 1:
            s += ", groups={groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += ", padding_mode={padding_mode}"
        return s.format(**self.__dict__)

    @F.eager_under_compile
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            padded = F.pad2d(input, tuple(self._reversed_padding_repeated_twice), mode=self.padding_mode)
            return F.conv2d(padded, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class TorchConv2d(nn.Conv2d):
    """A subclass of ``torch.nn.Conv2d`` (same arguments, parameters, ``state_dict`` and kernels) with
    measured exceptions: the convolution of dllab's ``layers="torch"`` backend.

    The exceptions hold on a CPU that multiplies bf16 natively, for a convolution computing in bf16
    (bf16 tensors, or float ones under CPU autocast) with groups 1, numeric zero padding and a 4-D
    input (``_conv.gemm_route``):

    - with output images of at most 64 pixels and a weight that needs its gradient (grad mode
      on), the weight gradient is one im2col GEMM (``_conv.conv_weight_grad``) instead of oneDNN's,
      which is 1.8-4.8x slower there (``_conv.GEMM_WEIGHT_GRAD_MAX_PIXELS``);
    - with output images of at most 16 pixels, the forward pass and the input gradient are dllab's
      im2col GEMMs as well (``_conv.conv_forward``, ``_conv.conv_input_grad``), also under
      ``torch.no_grad``: oneDNN's bf16 kernels are 1.5x slower there (``_conv.GEMM_CONV_MAX_PIXELS``).

    The results differ from ``nn.Conv2d``'s by the summation order of the bf16 GEMMs only. A
    backward that is differentiated again is torch's own. Everything else is
    ``nn.Conv2d.forward``: other dtypes and devices, ``torch.compile``, TorchScript,
    ``torch.jit.trace``, ``torch.fx`` tracing, ``torch.func`` transforms and forward-mode AD.
    Limitation: module-type tables (``torch.ao.quantization``'s ``fuse_modules``) do not know the subclass.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._conv_forward(input, self.weight, self.bias)
        return self._routed_forward(input)

    @torch.jit.unused
    def _routed_forward(self, input: torch.Tensor) -> torch.Tensor:
        cast = F._autocast_dtype(input.device) if isinstance(input, torch.Tensor) else None
        route = self._gemm_route(input, cast)
        if route is None:
            return self._conv_forward(input, self.weight, self.bias)
        dtype, everything = route
        x, w, b = (F._cast(t, dtype) for t in (input, self.weight, self.bias))  # autocast's casts, if any
        with torch.autocast(input.device.type, enabled=False) if cast else contextlib.nullcontext():
            if everything and not (torch.is_grad_enabled() and any(
                    t is not None and t.requires_grad for t in (x, w, b))):  # nothing to differentiate
                return _conv.gemm_conv2d(x, w, b, self.stride, self.padding, self.dilation)
            return _conv.TorchConvFunction.apply(x, w, b, self.stride, self.padding, self.dilation, everything)

    def _gemm_route(self, input, cast: torch.dtype | None) -> tuple[torch.dtype, bool] | None:
        """(dtype this call computes in, whether the forward and input gradient are GEMMs too) if
        the call takes one of the class docstring's routes, else None. ``cast``: the active
        autocast dtype, if any."""
        if (isinstance(input, torch.fx.Proxy) or not isinstance(input, torch.Tensor) or input.dim() != 4
                or self.padding_mode != "zeros" or isinstance(self.padding, str)
                or torch.compiler.is_compiling() or torch.jit.is_tracing()
                or torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0):
            return None
        if cast is not None:  # autocast's rule: float tensors compute in its dtype, float64 stays
            dtype = cast if input.dtype in (torch.float32, torch.float16, torch.bfloat16) else input.dtype
        else:  # no autocast: torch's rule, every operand of one dtype (else F.conv2d raises)
            dtype = input.dtype
            if self.weight.dtype != dtype or (self.bias is not None and self.bias.dtype != dtype):
                return None
        ho, wo = (F.conv_output_size(input.shape[2 + i], self.kernel_size[i], self.stride[i], 2 * self.padding[i],
                                     self.dilation[i]) for i in (0, 1))
        if ho < 1 or wo < 1:  # an empty output: torch's own error message
            return None
        route = _conv.gemm_route(dtype, input.device, self.groups, ho * wo)
        if route == "all":
            return dtype, True
        if route == "weight-grad" and self.weight.requires_grad and torch.is_grad_enabled():
            return dtype, False
        return None


class MaxPool2d(nn.Module):
    """2-D max-pooling layer; ``torch.nn.MaxPool2d``'s arguments (stride defaults to kernel_size)."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices: bool = False,
                 ceil_mode: bool = False) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride if (stride is not None) else kernel_size
        self.padding = padding
        self.dilation = dilation
        self.return_indices = return_indices
        self.ceil_mode = ceil_mode

    def extra_repr(self) -> str:
        return ("kernel_size={kernel_size}, stride={stride}, padding={padding}, dilation={dilation}, "
                "ceil_mode={ceil_mode}".format(**self.__dict__))

    @F.eager_under_compile
    def forward(self, input: torch.Tensor):
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class BatchNorm2d(nn.Module):
    """Batch normalisation over (N, C, H, W); ``torch.nn.BatchNorm2d``'s arguments, parameters and buffers.

    Parameters ``weight`` (ones) and ``bias`` (zeros) when ``affine``; buffers ``running_mean``
    (zeros), ``running_var`` (ones) and ``num_batches_tracked`` when ``track_running_stats``.
    ``momentum=None`` keeps a cumulative average (factor 1 / num_batches_tracked). In eval mode the
    running statistics are used, unless there are none (``track_running_stats=False``), in which
    case batch statistics are used as in training.
    """

    _version = 2

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 0:
            raise ValueError(f"num_features must be a non-negative integer, got {num_features!r}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def extra_repr(self) -> str:
        """The installed torch's own BatchNorm2d text (its format changed between versions: torch
        2.14 shows ``bias=``), plus ``bias=False`` where that torch's text cannot say it."""
        text = _NormBase.extra_repr(self)
        if self.affine and self.bias is None and "bias=" not in text:
            text = text.replace(", track_running_stats", ", bias=False, track_running_stats")
        return text

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # state dicts from before num_batches_tracked existed (version < 2) load with a count of 0
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = (self.num_batches_tracked if self.num_batches_tracked.device != torch.device("meta")
                               else torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @F.eager_under_compile
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input of size {list(input.shape)})")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(input, self.running_mean if track else None, self.running_var if track else None,
                            self.weight, self.bias, use_batch_stats, factor, self.eps)
