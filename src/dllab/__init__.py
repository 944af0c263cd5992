"""dllab: learn and do deep learning on images, built on PyTorch."""

__version__ = "0.1.0"
