"""From-scratch Conv2d, MaxPool2d and BatchNorm2d, drop-in for ``torch.nn`` (and ``functional``).

    from dllab.layers import Conv2d, MaxPool2d, BatchNorm2d
    from dllab.layers import functional as LF   # conv2d, max_pool2d, batch_norm, pad2d

Convolution is im2col + one GEMM per group (``_conv.py``), max-pooling a running maximum over
strided slices with first-maximum tie breaking (``_pool.py``), batch norm fused statistics and a
closed-form backward (``_norm.py``). No native convolution, pooling or batch-norm kernel runs.

``TorchConv2d`` is the exception, and not one of the from-scratch layers: ``torch.nn.Conv2d`` with
measured changes (bf16 weight gradients of small images on the CPU, and the whole bf16 convolution
of tiny ones, see its docstring), the convolution of dllab's ``layers="torch"`` backend.
"""

from dllab.layers import functional
from dllab.layers.modules import BatchNorm2d, Conv2d, MaxPool2d, TorchConv2d

__all__ = ["Conv2d", "MaxPool2d", "BatchNorm2d", "TorchConv2d", "functional"]
