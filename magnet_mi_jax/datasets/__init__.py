"""Datasets by name: one config module per dataset, registered once.

A :class:`DatasetConfig` names everything that differs between datasets: the file format and files, the image
shape and classes, the networks (and so the checkpoint names and training commands), MagNet's preset and the MI
detector, the training overrides, the table protocols and the paper's table. Loading data
(:func:`magnet_mi_jax.data.load_dataset`), loading checkpoints, the training entry points and the evaluation
read it; an unregistered name is an :class:`UnknownDatasetError` naming the registered ones.

Adding a dataset is one module ending in ``CONFIG = register(DatasetConfig(...))`` (see ``mnist.py``) plus its
files; ``docs/extending.md`` shows the recipe the tests exercise.

Example::

    >>> from magnet_mi_jax import datasets
    >>> datasets.get("mnist").image_shape
    (28, 28, 1)
    >>> datasets.names()
    ('mnist', 'cifar10')
"""

from magnet_mi_jax.datasets._config import (NETWORK_KINDS, PROTOCOLS, DatasetConfig, NetworkSpec,
                                            UnknownDatasetError, get, names, register, unregister)
# The built-in configs register on import, in this order.
from magnet_mi_jax.datasets import mnist  # noqa: F401,E402  isort: skip
from magnet_mi_jax.datasets import cifar10  # noqa: F401,E402  isort: skip

__all__ = ["NETWORK_KINDS", "PROTOCOLS", "DatasetConfig", "NetworkSpec", "UnknownDatasetError", "get", "names",
           "register", "unregister"]
