"""MNIST and CIFAR-10: loading, MagNet splits and the selection of attacked images.

Two real sources, one result type:

* ``source="files"`` reads the official distribution files from a local folder: MNIST's four
  ``*-idx?-ubyte.gz`` files, CIFAR-10's binary version ``cifar-10-batches-bin/*.bin``. The folder is the
  ``data_dir`` argument (``--data-dir`` on every entry point) or the environment variable
  ``MAGNET_MI_DATA_DIR``. Either the dataset's files themselves or a parent holding ``mnist/`` and
  ``cifar10/`` may be given.
* ``source="tfds"`` reads a prepared TensorFlow Datasets copy with ``tfds.data_source`` (NumPy, no
  TensorFlow needed at read time).
* ``source="auto"`` (the default) uses the files when a folder is configured and TFDS otherwise; if TFDS has
  no prepared copy and cannot download one, the error says how to point at local files.

Every loader returns float32 NHWC images in [0, 1] and int32 labels. The MagNet split (Trevillie/MagNet)
takes the first 5,000 training images as validation and the rest as training.

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

DATA_DIR_ENV = "MAGNET_MI_DATA_DIR"
DATASETS = ("mnist", "cifar10")
VALIDATION_SIZE = 5000
NUM_CLASSES = 10
IMAGE_SHAPES = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}

#: The published md5 checksums of the official distribution files.
OFFICIAL_MD5 = {
    "mnist": {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
              "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
              "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
              "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
    "cifar10": {"data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
                "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
                "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
                "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
                "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
                "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d"},
}

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
CIFAR10_RECORD_BYTES = 1 + 32 * 32 * 3
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801


class DataError(ValueError):
    """A dataset could not be found or read; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One dataset, split the MagNet way.

    Attributes:
      name: ``"mnist"`` or ``"cifar10"``.
      train_x: (N_train, H, W, C) float32 in [0, 1]; training images (index 5,000 on of the official train set).
      train_y: (N_train,) int32 labels.
      val_x: (5000, H, W, C) float32; the first 5,000 official training images.
      val_y: (5000,) int32.
      test_x: (10000, H, W, C) float32.
      test_y: (10000,) int32.
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
        return IMAGE_SHAPES[self.name]


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
    official = OFFICIAL_MD5.get(ds.name, {})
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
    """Parses an IDX1 label file (magic 0x00000801) into a (N,) uint8 array of labels 0..9."""
    if len(raw) < 8:
        raise DataError(f"{what}: {len(raw)} bytes is too short for an IDX1 header (8 bytes)")
    magic, n = np.frombuffer(raw[:8], dtype=">u4")
    if magic != _IDX_LABELS_MAGIC:
        raise DataError(f"{what}: wrong magic number 0x{int(magic):08x}, expected 0x{_IDX_LABELS_MAGIC:08x} (IDX1 labels)")
    if len(raw) != 8 + int(n):
        raise DataError(f"{what}: header says {n} labels but the file has {len(raw) - 8} (truncated?)")
    labels = np.frombuffer(raw, dtype=np.uint8, offset=8)
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DataError(f"{what}: label {labels.max()} out of range 0..{NUM_CLASSES - 1}")
    return labels


def parse_cifar10_bin(raw: bytes, *, what: str = "cifar-10 batch") -> tuple[np.ndarray, np.ndarray]:
    """Parses CIFAR-10 binary records (1 label byte, then 1024 R, G and B bytes) into NHWC uint8 and labels."""
    if len(raw) == 0 or len(raw) % CIFAR10_RECORD_BYTES:
        raise DataError(f"{what}: {len(raw)} bytes is not a whole number of {CIFAR10_RECORD_BYTES}-byte records (truncated?)")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR10_RECORD_BYTES)
    labels = records[:, 0]
    if labels.max() >= NUM_CLASSES:
        raise DataError(f"{what}: label {labels.max()} out of range 0..{NUM_CLASSES - 1} (not a CIFAR-10 binary file?)")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _find_dir(root: Path, name: str) -> Path:
    """The folder under ``root`` that holds ``name``'s files: root itself or a conventional child."""
    if name == "mnist":
        candidates = [root, root / "mnist", root / "MNIST" / "raw"]
        marker = MNIST_FILES["test_labels"]
    else:
        candidates = [root, root / "cifar-10-batches-bin", root / "cifar10" / "cifar-10-batches-bin", root / "cifar10"]
        marker = CIFAR10_TEST_FILE
    for candidate in candidates:
        if (candidate / marker).is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise DataError(f"no {name} files found under {root}: looked for {marker} in {tried}")


def _to_float(images_u8: np.ndarray) -> np.ndarray:
    return images_u8.astype(np.float32) / np.float32(255.0)


def load_mnist_files(data_dir: str | os.PathLike) -> Dataset:
    """Loads MNIST from the four official ``.gz`` IDX files in ``data_dir`` (or ``data_dir/mnist``)."""
    folder = _find_dir(Path(data_dir), "mnist")
    arrays, md5 = {}, {}
    for key, fname in MNIST_FILES.items():
        path = folder / fname
        raw = _read_gzip(path)
        md5[fname] = md5sum(path)
        parse = parse_idx_images if key.endswith("images") else parse_idx_labels
        arrays[key] = parse(raw, what=str(path))
    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise DataError(f"MNIST {split}: {len(arrays[f'{split}_images'])} images but {len(arrays[f'{split}_labels'])} labels")
    train_x = _to_float(arrays["train_images"])[..., None]
    test_x = _to_float(arrays["test_images"])[..., None]
    return _split("mnist", train_x, arrays["train_labels"], test_x, arrays["test_labels"], "files", md5)


def load_cifar10_files(data_dir: str | os.PathLike) -> Dataset:
    """Loads CIFAR-10 from the official binary version (``data_batch_1..5.bin``, ``test_batch.bin``)."""
    folder = _find_dir(Path(data_dir), "cifar10")
    md5: dict[str, str] = {}

    def read(fname: str) -> tuple[np.ndarray, np.ndarray]:
        path = folder / fname
        if not path.is_file():
            raise DataError(f"missing file: {path}")
        md5[fname] = md5sum(path)
        return parse_cifar10_bin(path.read_bytes(), what=str(path))

    parts = [read(f) for f in CIFAR10_TRAIN_FILES]
    train_x = _to_float(np.concatenate([p[0] for p in parts]))
    train_y = np.concatenate([p[1] for p in parts])
    test_u8, test_y = read(CIFAR10_TEST_FILE)
    return _split("cifar10", train_x, train_y, _to_float(test_u8), test_y, "files", md5)


def _split(name, train_x, train_y, test_x, test_y, source, md5) -> Dataset:
    if len(train_x) <= VALIDATION_SIZE:
        raise DataError(f"{name}: {len(train_x)} training images, need more than {VALIDATION_SIZE} for the MagNet split")
    train_y = np.asarray(train_y, dtype=np.int32)
    return Dataset(
        name=name,
        train_x=train_x[VALIDATION_SIZE:], train_y=train_y[VALIDATION_SIZE:],
        val_x=train_x[:VALIDATION_SIZE], val_y=train_y[:VALIDATION_SIZE],
        test_x=test_x, test_y=np.asarray(test_y, dtype=np.int32),
        source=source, md5=md5,
    )


# --------------------------------------------------------------------------------------------------
# TensorFlow Datasets.
# --------------------------------------------------------------------------------------------------


def _local_files_hint(name: str) -> str:
    files = ", ".join(MNIST_FILES.values()) if name == "mnist" else "cifar-10-batches-bin/*.bin"
    return (f"Point at the official {name} files instead: pass --data-dir DIR (or data_dir=DIR), or set "
            f"{DATA_DIR_ENV}=DIR, where DIR holds {files} (or a '{name}/' folder with them). "
            f"In a checkout of this project the test data lives in ../shared/data.")


def load_tfds(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Loads a dataset through ``tfds.data_source`` (array_record files, read as NumPy).

    Args:
      name: ``"mnist"`` or ``"cifar10"``.
      data_dir: TFDS data directory (TFDS's default when None).
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise DataError(f"tensorflow-datasets is not installed. {_local_files_hint(name)}") from err
    try:
        sources = tfds.data_source(name, split=["train", "test"], data_dir=data_dir)
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
    expected = IMAGE_SHAPES[name]
    if train_u8.shape[1:] != expected:
        raise DataError(f"TFDS '{name}' images have shape {train_u8.shape[1:]}, expected {expected}")
    return _split(name, _to_float(train_u8), train_y, _to_float(test_u8), test_y, "tfds", {})


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
      name: ``"mnist"`` or ``"cifar10"``.
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
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
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
    loader: Callable[[Path], Dataset] = load_mnist_files if name == "mnist" else load_cifar10_files
    return loader(folder)


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
