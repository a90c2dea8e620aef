"""The dataset config and its registry (implementation of :mod:`magnet_mi_jax.datasets`)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax

from magnet_mi_jax.detectors.defense import MIDetector, MIMagNet
from magnet_mi_jax.detectors.magnet import MagNet

#: Kinds of network a dataset names; each is trained by ``python -m train.<kind>``.
NETWORK_KINDS = ("classifier", "autoencoder", "generator")
#: The table protocols a dataset may name (``eval.tables`` without / with ``--quick``).
PROTOCOLS = ("full", "quick")


class UnknownDatasetError(ValueError):
    """A dataset name that no config registered; the message lists the registered ones."""


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """One network of a dataset: how to build it, how to initialise its parameters, which command trains it.

    Attributes:
      kind: one of :data:`NETWORK_KINDS`. A ``"generator"`` network is the conditional alpha-GAN: loading it gives
        the MI detector's ``"encoder"`` E and ``"generator"`` G.
      build: ``() -> flax.linen.Module``.
      init: ``(module, key) -> params`` for modules whose ``__call__`` does not take one image batch (the
        alpha-GAN also takes a condition); ``None``: ``module.init`` on a zero image batch.
    """

    kind: str
    build: Callable[[], nn.Module]
    init: Optional[Callable[[nn.Module, jax.Array], Any]] = None

    def __post_init__(self):
        if self.kind not in NETWORK_KINDS:
            raise ValueError(f"network kind must be one of {NETWORK_KINDS}, got {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """Everything this project knows about one dataset, in one place.

    Attributes:
      name: registry key, e.g. ``"mnist"`` (also the folder of its checkpoints and the ``--dataset`` value).
      title: display name, e.g. ``"MNIST"``.
      file_format: how its files are read: a key of :data:`magnet_mi_jax.data.FORMATS` (``"idx"``, ``"cifar_bin"``,
        ``"npz"``).
      files: role -> file names, the roles the format reads (``idx``: ``train_images``, ``train_labels``,
        ``test_images``, ``test_labels``; ``cifar_bin`` and ``npz``: ``train``, ``test``).
      image_shape: (H, W, C) of every image.
      num_classes: K.
      class_names: K display names.
      networks: name -> :class:`NetworkSpec`; the checkpoint of network ``n`` lives in ``<checkpoints>/<name>/n``.
      magnet: the MagNet defense as MagNet configured it for this dataset (its keys name ``networks``).
      mi: the MI detector added to ``magnet`` by MI-MagNet (paper: r = 0.005 on 1,000 validation images).
      folders: where under a data folder the files may sit (``""``: the folder itself), tried in order.
      official_md5: file name -> md5 of the official distribution (checked on download; cards compare them).
      download: ``{"url": base}`` (files fetched one by one) or with ``"archive": (name, md5)`` and
        ``"member_dir"`` (one archive); ``None``: no official download.
      tfds_name: the TensorFlow Datasets name, or ``None``.
      validation_size: the leading training images held out for validation (MagNet: 5,000).
      test_size: the number of test images, checked when the files are read (``None``: not checked).
      training: network kind -> overrides of that kind's training config in ``train/`` (plain values).
      protocols: ``"full"`` / ``"quick"`` -> overrides of ``eval.protocol.TablesConfig`` (e.g. ``kappas``).
      paper_table: the paper's title for this dataset's table (``"Table 1"``), or ``None`` if the paper has
        none; its numbers are read from ``eval/paper/*.csv`` by dataset name.
    """

    name: str
    title: str
    file_format: str
    files: Mapping[str, tuple[str, ...]]
    image_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...]
    networks: Mapping[str, NetworkSpec]
    magnet: MagNet
    mi: MIDetector = MIDetector()
    folders: tuple[str, ...] = ("",)
    official_md5: Mapping[str, str] = dataclasses.field(default_factory=dict)
    download: Optional[Mapping[str, Any]] = None
    tfds_name: Optional[str] = None
    validation_size: int = 5000
    test_size: Optional[int] = None
    training: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    protocols: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    paper_table: Optional[str] = None

    def __post_init__(self):
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"dataset name must be lower-case letters, digits and _, got {self.name!r}")
        shape = tuple(self.image_shape)
        if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(f"{self.name}: image_shape must be (H, W, C) of positive ints, got {self.image_shape}")
        object.__setattr__(self, "image_shape", shape)
        if self.num_classes < 2 or len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: need num_classes >= 2 and one class name each, got {self.num_classes} "
                             f"and {len(self.class_names)} names")
        if not self.files or not all(self.files.values()):
            raise ValueError(f"{self.name}: files must name at least one file per role, got {dict(self.files)}")
        for key, spec in self.networks.items():
            if not isinstance(spec, NetworkSpec):
                raise TypeError(f"{self.name}: network {key!r} must be a NetworkSpec, got {type(spec).__name__}")
        missing = [k for k in self.magnet.network_keys if self.networks.get(k) is None]
        if missing:
            raise ValueError(f"{self.name}: the MagNet preset reads networks {missing} that the config does not name")
        kinds = {spec.kind for spec in self.networks.values()}
        if "classifier" not in kinds:
            raise ValueError(f"{self.name}: networks must include a classifier")
        unknown_kinds = set(self.training) - set(NETWORK_KINDS)
        unknown_protocols = set(self.protocols) - set(PROTOCOLS)
        if unknown_kinds or unknown_protocols:
            raise ValueError(f"{self.name}: training keys must be in {NETWORK_KINDS} and protocols in {PROTOCOLS}; "
                             f"got {sorted(unknown_kinds | unknown_protocols)}")
        if self.validation_size < 1:
            raise ValueError(f"{self.name}: validation_size must be >= 1, got {self.validation_size}")

    @property
    def generator(self) -> Optional[str]:
        """The name of the conditional generator network (the MI detector's E and G), or None."""
        return next((k for k, s in self.networks.items() if s.kind == "generator"), None)

    def mi_magnet(self, **mi_changes) -> MIMagNet:
        """MI-strengthened MagNet for this dataset: ``magnet`` with the MI detector ``mi`` (fields changed by
        ``mi_changes``, e.g. ``reading="consistent"``)."""
        return MIMagNet(magnet=self.magnet, mi=dataclasses.replace(self.mi, **mi_changes))

    def networks_of(self, kind: str) -> tuple[str, ...]:
        """The names of the networks of one kind, in config order."""
        return tuple(k for k, s in self.networks.items() if s.kind == kind)

    def train_command(self, network: str) -> str:
        """The command that trains ``network`` with the shipped recipe."""
        kind = self.networks[network].kind
        which = f" --which {network}" if kind == "autoencoder" else ""
        return f"python -m train.{kind} --dataset {self.name}{which}"


_REGISTRY: dict[str, DatasetConfig] = {}


def register(config: DatasetConfig, *, replace: bool = False) -> DatasetConfig:
    """Adds ``config`` under ``config.name`` and returns it (a dataset module ends with ``CONFIG = register(...)``).

    Raises:
      ValueError: the name is taken (pass ``replace=True`` to replace it on purpose).
    """
    if not isinstance(config, DatasetConfig):
        raise TypeError(f"register takes a DatasetConfig, got {type(config).__name__}")
    if config.name in _REGISTRY and not replace:
        raise ValueError(f"dataset {config.name!r} is already registered")
    _REGISTRY[config.name] = config
    return config


def unregister(name: str) -> None:
    """Removes a registered dataset (tests register temporary ones)."""
    get(name)
    del _REGISTRY[name]


def get(name: str) -> DatasetConfig:
    """The registered config of ``name``.

    Raises:
      UnknownDatasetError: no dataset of that name is registered.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownDatasetError(f"unknown dataset {name!r}; registered: {', '.join(names())}") from None


def names() -> tuple[str, ...]:
    """The registered dataset names, in registration order."""
    return tuple(_REGISTRY)
