"""Loading the registered datasets, MagNet splits and the selection of attacked images.

What differs between datasets (file format and names, shape, classes) is its config in
:mod:`magnet_mi_jax.datasets`; this module reads any registered dataset by its declared ``file_format``
(:data:`FORMATS`: MNIST's IDX files, CIFAR-10's binary records, or ``.npz`` arrays for new datasets).

Sources, one result type:

* ``source="files"`` reads the distribution files from a local folder: MNIST's four ``*-idx?-ubyte.gz``
  files, CIFAR-10's binary version ``cifar-10-batches-bin/*.bin``. The folder is the ``data_dir`` argument
  (``--data-dir`` on every entry point) or the environment variable ``MAGNET_MI_DATA_DIR``. Either the
  dataset's files themselves or a parent holding them in one of the config's ``folders`` (``mnist/``,
  ``cifar10/``) may be given.
* ``source="tfds"`` reads a prepared TensorFlow Datasets copy with ``tfds.data_source`` (NumPy, no
  TensorFlow needed at read time).
* ``source="auto"`` (the default) uses the files when a folder is configured and TFDS otherwise; if TFDS has
  no prepared copy and cannot download one, the error says how to point at local files.

Every loader returns float32 NHWC images in [0, 1] and int32 labels. The MagNet split (Trevillie/MagNet)
takes the first ``validation_size`` (5,000) training images as validation and the rest as training.

Note on order: the official files keep the official order. TFDS stores examples in its own order, so the
positional validation split differs between the two sources; ``Dataset.source`` records which was used.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from magnet_mi_jax import datasets
from magnet_mi_jax.datasets import DatasetConfig

DATA_DIR_ENV = "MAGNET_MI_DATA_DIR"
CIFAR10_RECORD_BYTES = 1 + 32 * 32 * 3
_CIFAR10_BIN_CLASSES = 10

_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801


class DataError(ValueError):
    """A dataset could not be found or read; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One dataset, split the MagNet way.

    Attributes:
      name: a registered dataset name (:func:`magnet_mi_jax.datasets.names`).
      train_x: (N_train, H, W, C) float32 in [0, 1]; training images (index 5,000 on of the official train set).
      train_y: (N_train,) int32 labels.
      val_x: (N_val, H, W, C) float32; the first 5,000 official training images (the config's validation_size).
      val_y: (N_val,) int32.
      test_x: (N_test, H, W, C) float32 (10,000 for MNIST and CIFAR-10).
      test_y: (N_test,) int32.
      source: ``"files"`` or ``"tfds"``.
      md5: file name -> md5 of each file read (empty for TFDS).
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: str
    md5: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.test_x.shape[1:])

    @property
    def config(self) -> DatasetConfig:
        """The dataset's registered config."""
        return datasets.get(self.name)


# --------------------------------------------------------------------------------------------------
# Raw official files.
# --------------------------------------------------------------------------------------------------


def check_model_data(ds: Dataset, card: dict, model: str) -> None:
    """Compares the data files a model's card records with those loaded (``ds.md5``).

    Nothing to compare when either side has no md5s (TFDS, old cards). A file whose md5 differs is an error
    when the card recorded the official file (the loaded one is then not the official data, e.g. training
    files replaced by test files), otherwise a warning naming the files.

    Raises:
      DataError: the model was trained on an official file and another file of that name was loaded.
    """
    recorded = card.get("data_md5") or {}
    if not recorded or not ds.md5:
        return
    differ = {f: (recorded[f], ds.md5.get(f)) for f in recorded if ds.md5.get(f) != recorded[f]}
    if not differ:
        return
    official = datasets.get(ds.name).official_md5 if ds.name in datasets.names() else {}
    text = "; ".join(f"{f}: card {want}, loaded {got}" for f, (want, got) in differ.items())
    if any(official.get(f) == want for f, (want, _) in differ.items()):
        raise DataError(f"{model} was trained on the official {ds.name} files, but other files were loaded ({text}); "
                        "point --data-dir at the official files")
    warnings.warn(f"{model} was trained on other data files than those loaded ({text})", stacklevel=2)


def md5sum(path: str | os.PathLike) -> str:
    """The md5 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_gzip(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as err:  # BadGzipFile is an OSError; a cut stream raises EOFError.
        raise DataError(f"{path} is not a readable gzip file (truncated or corrupt?): {err}") from err


def parse_idx_images(raw: bytes, *, what: str = "idx images") -> np.ndarray:
    """Parses an IDX3 image file (magic 0x00000803) into a (N, rows, cols) uint8 array."""
    if len(raw) < 16:
        raise DataError(f"{what}: {len(raw)} bytes is too short for an IDX3 header (16 bytes)")
    magic, n, rows, cols = np.frombuffer(raw[:16], dtype=">u4")
    if magic != _IDX_IMAGES_MAGIC:
        raise DataError(f"{what}: wrong magic number 0x{int(magic):08x}, expected 0x{_IDX_IMAGES_MAGIC:08x} (IDX3 images)")
    expected = 16 + int(n) * int(rows) * int(cols)
    if len(raw) != expected:
        raise DataError(f"{what}: header says {n} images of {rows}x{cols} ({expected} bytes) but the file has {len(raw)} bytes (truncated?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(int(n), int(rows), int(cols))


def parse_idx_labels(raw: bytes, *, what: str = "idx labels") -> np.ndarray:
    """Parses an IDX1 label file (magic 0x00000801) into a (N,) uint8 array (the range is checked per dataset)."""
    if len(raw) < 8:
        raise DataError(f"{what}: {len(raw)} bytes is too short for an IDX1 header (8 bytes)")
    magic, n = np.frombuffer(raw[:8], dtype=">u4")
    if magic != _IDX_LABELS_MAGIC:
        raise DataError(f"{what}: wrong magic number 0x{int(magic):08x}, expected 0x{_IDX_LABELS_MAGIC:08x} (IDX1 labels)")
    if len(raw) != 8 + int(n):
        raise DataError(f"{what}: header says {n} labels but the file has {len(raw) - 8} (truncated?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=8)


def parse_cifar10_bin(raw: bytes, *, what: str = "cifar-10 batch") -> tuple[np.ndarray, np.ndarray]:
    """Parses CIFAR-10 binary records (1 label byte, then 1024 R, G and B bytes) into NHWC uint8 and labels."""
    if len(raw) == 0 or len(raw) % CIFAR10_RECORD_BYTES:
        raise DataError(f"{what}: {len(raw)} bytes is not a whole number of {CIFAR10_RECORD_BYTES}-byte records (truncated?)")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR10_RECORD_BYTES)
    labels = records[:, 0]
    if labels.max() >= _CIFAR10_BIN_CLASSES:
        raise DataError(f"{what}: label {labels.max()} out of range 0..{_CIFAR10_BIN_CLASSES - 1} "
                        "(not a CIFAR-10 binary file?)")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _find_dir(root: Path, config: DatasetConfig | str) -> Path:
    """The folder under ``root`` that holds the dataset's files: root itself or one of the config's ``folders``."""
    config = datasets.get(config) if isinstance(config, str) else config
    candidates = [root / sub if sub else root for sub in config.folders]
    marker = list(config.files.values())[-1][0]           # the test files, the last role
    for candidate in candidates:
        if (candidate / marker).is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise DataError(f"no {config.name} files found under {root}: looked for {marker} in {tried}")


def _to_float(images_u8: np.ndarray) -> np.ndarray:
    return images_u8.astype(np.float32) / np.float32(255.0)


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]     # train_x, train_y, test_x, test_y (uint8, int)


def _checked_path(folder: Path, fname: str, md5: dict[str, str]) -> Path:
    path = folder / fname
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    md5[fname] = md5sum(path)
    return path


def read_idx(config: DatasetConfig, folder: Path, md5: dict[str, str]) -> Arrays:
    """Format ``"idx"``: gzipped IDX files, roles ``train_images``, ``train_labels``, ``test_images``,
    ``test_labels`` (MNIST's distribution)."""
    arrays = {}
    for role in ("train_images", "train_labels", "test_images", "test_labels"):
        (fname,) = config.files[role]
        path = folder / fname
        raw = _read_gzip(path)
        md5[fname] = md5sum(path)
        parse = parse_idx_images if role.endswith("images") else parse_idx_labels
        arrays[role] = parse(raw, what=str(path))
    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise DataError(f"{config.title} {split}: {len(arrays[f'{split}_images'])} images but "
                            f"{len(arrays[f'{split}_labels'])} labels")
    return (arrays["train_images"][..., None], arrays["train_labels"], arrays["test_images"][..., None],
            arrays["test_labels"])


def read_cifar_bin(config: DatasetConfig, folder: Path, md5: dict[str, str]) -> Arrays:
    """Format ``"cifar_bin"``: CIFAR-10's binary records, roles ``train`` (several files) and ``test``."""
    def read(role: str) -> tuple[np.ndarray, np.ndarray]:
        parts = [parse_cifar10_bin(_checked_path(folder, f, md5).read_bytes(), what=str(folder / f))
                 for f in config.files[role]]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    return (*read("train"), *read("test"))


def read_npz(config: DatasetConfig, folder: Path, md5: dict[str, str]) -> Arrays:
    """Format ``"npz"``: one ``.npz`` per role (``train``, ``test``) holding ``images`` (N, H, W, C) uint8 and
    ``labels`` (N,) integers; read without pickle. The simplest way to add a dataset."""
    out = []
    for role in ("train", "test"):
        (fname,) = config.files[role]
        path = _checked_path(folder, fname, md5)
        try:
            with np.load(path, allow_pickle=False) as arrays:
                images, labels = arrays["images"], arrays["labels"]
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"{path} is not an .npz with arrays 'images' and 'labels' ({type(err).__name__}: "
                            f"{err})") from err
        if images.dtype != np.uint8 or images.ndim != 4 or labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"{path}: need images (N, H, W, C) uint8 and labels (N,), got {images.dtype} "
                            f"{images.shape} and {labels.shape}")
        out += [images, labels]
    return tuple(out)


#: File formats by name: ``reader(config, folder, md5) -> (train_x, train_y, test_x, test_y)`` (uint8 images),
#: recording each file's md5 into ``md5``. A config's ``file_format`` names one.
FORMATS: dict[str, Callable[[DatasetConfig, Path, dict[str, str]], Arrays]] = {
    "idx": read_idx, "cifar_bin": read_cifar_bin, "npz": read_npz}


def load_files(config: DatasetConfig | str, data_dir: str | os.PathLike) -> Dataset:
    """Loads a dataset from its files in ``data_dir`` (or one of the config's ``folders`` under it)."""
    config = datasets.get(config) if isinstance(config, str) else config
    if config.file_format not in FORMATS:
        raise DataError(f"{config.name}: unknown file format {config.file_format!r}; known: {', '.join(FORMATS)}")
    folder = _find_dir(Path(data_dir), config)
    md5: dict[str, str] = {}
    train_u8, train_y, test_u8, test_y = FORMATS[config.file_format](config, folder, md5)
    if config.test_size is not None and len(test_u8) != config.test_size:
        raise DataError(f"{config.name} files in {folder}: {len(test_u8)} test images, the config says "
                        f"{config.test_size}")
    return _split(config, _to_float(train_u8), train_y, _to_float(test_u8), test_y, "files", md5)


def _split(config: DatasetConfig, train_x, train_y, test_x, test_y, source, md5) -> Dataset:
    """Checks shapes, sizes and label range against the config, then holds out the validation images."""
    name, n_val = config.name, config.validation_size
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if tuple(x.shape[1:]) != config.image_shape:
            raise DataError(f"{name} {split}: images of shape {tuple(x.shape[1:])}, the config says {config.image_shape}")
        if len(y) and (np.min(y) < 0 or np.max(y) >= config.num_classes):
            raise DataError(f"{name} {split}: label {np.max(y) if np.max(y) > 0 else np.min(y)} out of range "
                            f"0..{config.num_classes - 1}")
    if len(train_x) <= n_val:
        raise DataError(f"{name}: {len(train_x)} training images, need more than {n_val} for the MagNet split")
    train_y = np.asarray(train_y, dtype=np.int32)
    return Dataset(
        name=name,
        train_x=train_x[n_val:], train_y=train_y[n_val:],
        val_x=train_x[:n_val], val_y=train_y[:n_val],
        test_x=test_x, test_y=np.asarray(test_y, dtype=np.int32),
        source=source, md5=md5,
    )


# --------------------------------------------------------------------------------------------------
# TensorFlow Datasets.
# --------------------------------------------------------------------------------------------------


def _local_files_hint(name: str) -> str:
    config = datasets.get(name)
    files = ", ".join(f for group in config.files.values() for f in group)
    folders = " or ".join(f"'{sub}/'" for sub in config.folders if sub)
    return (f"Point at the {config.title} files instead: pass --data-dir DIR (or data_dir=DIR), or set "
            f"{DATA_DIR_ENV}=DIR, where DIR holds {files}" + (f" (or a {folders} folder with them)" if folders else "")
            + ". In a checkout of this project the test data lives in ../shared/data.")


def load_tfds(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Loads a dataset through ``tfds.data_source`` (array_record files, read as NumPy).

    Args:
      name: a registered dataset whose config names its ``tfds_name``.
      data_dir: TFDS data directory (TFDS's default when None).
    """
    config = datasets.get(name)
    if config.tfds_name is None:
        raise DataError(f"{name} has no TensorFlow Datasets name in its config. {_local_files_hint(name)}")
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise DataError(f"tensorflow-datasets is not installed. {_local_files_hint(name)}") from err
    try:
        sources = tfds.data_source(config.tfds_name, split=["train", "test"], data_dir=data_dir)
    except Exception as err:  # network, missing TensorFlow for preparation, missing files: all end the same way
        raise DataError(f"TFDS could not provide '{name}' ({type(err).__name__}: {err}). {_local_files_hint(name)}") from err

    def to_arrays(source) -> tuple[np.ndarray, np.ndarray]:
        n = len(source)
        if n == 0:
            raise DataError(f"TFDS returned an empty split for '{name}'")
        records = [source[i] for i in range(n)]
        images = np.stack([np.asarray(r["image"], dtype=np.uint8) for r in records])
        labels = np.asarray([int(r["label"]) for r in records], dtype=np.int32)
        return images, labels

    (train_u8, train_y), (test_u8, test_y) = to_arrays(sources[0]), to_arrays(sources[1])
    expected = config.image_shape
    if train_u8.shape[1:] != expected:
        raise DataError(f"TFDS '{name}' images have shape {train_u8.shape[1:]}, expected {expected}")
    return _split(config, _to_float(train_u8), train_y, _to_float(test_u8), test_y, "tfds", {})


# --------------------------------------------------------------------------------------------------
# The one entry point.
# --------------------------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """``data_dir`` if given, else ``$MAGNET_MI_DATA_DIR`` if set, else None. The folder must exist."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        origin = "data_dir" if data_dir is not None else DATA_DIR_ENV
        raise DataError(f"{origin}={chosen!s} is not a folder")
    return path


SOURCES = ("auto", "files", "download", "tfds")


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, source: str = "auto",
                 tfds_data_dir: str | os.PathLike | None = None) -> Dataset:
    """Loads ``name`` with the MagNet split.

    Args:
      name: a registered dataset (:func:`magnet_mi_jax.datasets.names`: ``"mnist"``, ``"cifar10"``, ...).
      data_dir: folder with the official files; defaults to ``$MAGNET_MI_DATA_DIR``.
      source: ``"files"`` (the folder), ``"download"`` (the official files, fetched once into
        ``$MAGNET_MI_CACHE``, default ``~/.cache/magnet_mi_jax``, and verified by md5:
        :mod:`magnet_mi_jax.download`), ``"tfds"`` (TensorFlow Datasets), or ``"auto"``: the folder when one is
        configured, else the download cache.
      tfds_data_dir: TFDS's own data directory, for ``source="tfds"``.

    Returns:
      A :class:`Dataset` with float32 NHWC images in [0, 1] and int32 labels.

    Raises:
      DataError: unknown name or source, missing or corrupt files, or no source available.
    """
    try:
        config = datasets.get(name)
    except datasets.UnknownDatasetError as err:
        raise DataError(str(err)) from None
    if source not in SOURCES:
        raise DataError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    folder = resolve_data_dir(data_dir) if source in ("auto", "files") else None
    if source == "files" and folder is None:
        raise DataError(f"source='files' needs a folder. {_local_files_hint(name)}")
    if source == "tfds":
        return load_tfds(name, tfds_data_dir)
    if folder is None:                                   # "download", or "auto" without a configured folder
        from magnet_mi_jax import download
        folder = download.fetch_official(name)
    return load_files(config, folder)


def select_attack_indices(test_labels: np.ndarray, test_predictions: np.ndarray, n: int = 1000,
                          seed: int = 0) -> np.ndarray:
    """The EAD driver's selection: a seeded shuffle of the test indices, kept where the classifier is right.

    Args:
      test_labels: (N,) int true labels.
      test_predictions: (N,) int predicted labels of the undefended classifier.
      n: how many images to select.
      seed: seed of the shuffle (``np.random.default_rng(seed).permutation(N)``).

    Returns:
      (n,) int64 indices into the test set, in shuffle order, all correctly classified.
    """
    test_labels = np.asarray(test_labels)
    test_predictions = np.asarray(test_predictions)
    if test_labels.shape != test_predictions.shape or test_labels.ndim != 1:
        raise ValueError(f"labels {test_labels.shape} and predictions {test_predictions.shape} must be equal 1-D shapes")
    order = np.random.default_rng(seed).permutation(len(test_labels))
    correct = order[test_predictions[order] == test_labels[order]]
    if len(correct) < n:
        raise ValueError(f"only {len(correct)} correctly classified test images, {n} requested")
    return correct[:n].astype(np.int64)


def indices_hash(indices: np.ndarray) -> str:
    """A short sha256 of an index array (int64 little-endian), recorded with every result."""
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()[:16]
