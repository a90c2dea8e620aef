"""Data loaders against the published facts of the official files: their md5 sums (as the datasets' own pages
and torchvision / TFDS publish them), sizes and per-class counts (LeCun's MNIST page; CIFAR-10's 1,000 test images
per class). The constants below are those facts; docs/design.md, section 1, says where the files come from."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
from pathlib import Path

from magnet_mi_jax import data, datasets

MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
CIFAR_MD5 = {
    "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
    "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
    "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
    "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
    "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
    "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
}
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR_BATCH1_COUNTS = [1005, 974, 1032, 1016, 999, 937, 1030, 1001, 1025, 981]


def test_mnist_md5_counts_and_split(mnist):
    assert mnist.md5 == MNIST_MD5
    assert mnist.source == "files"
    assert mnist.train_x.shape == (55000, 28, 28, 1) and mnist.val_x.shape == (5000, 28, 28, 1)
    assert mnist.test_x.shape == (10000, 28, 28, 1)
    for arr in (mnist.train_x, mnist.val_x, mnist.test_x):
        assert arr.dtype == np.float32 and arr.min() == 0.0 and arr.max() == 1.0
    for arr in (mnist.train_y, mnist.val_y, mnist.test_y):
        assert arr.dtype == np.int32
    all_train = np.concatenate([mnist.val_y, mnist.train_y])          # official order: validation first
    np.testing.assert_array_equal(np.bincount(all_train, minlength=10), MNIST_TRAIN_COUNTS)
    np.testing.assert_array_equal(np.bincount(mnist.test_y, minlength=10), MNIST_TEST_COUNTS)
    pixel_mean = np.concatenate([mnist.val_x, mnist.train_x]).mean() * 255
    assert abs(pixel_mean - 33.318) < 1e-3
    # The well-known first labels of the official files.
    np.testing.assert_array_equal(mnist.val_y[:10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
    np.testing.assert_array_equal(mnist.test_y[:10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])


def test_cifar10_md5_counts_order_and_layout(cifar10):
    assert cifar10.md5 == CIFAR_MD5
    assert cifar10.train_x.shape == (45000, 32, 32, 3) and cifar10.val_x.shape == (5000, 32, 32, 3)
    assert cifar10.test_x.shape == (10000, 32, 32, 3) and cifar10.train_x.dtype == np.float32
    all_train_y = np.concatenate([cifar10.val_y, cifar10.train_y])
    all_train_x = np.concatenate([cifar10.val_x, cifar10.train_x])
    np.testing.assert_array_equal(np.bincount(all_train_y, minlength=10), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(all_train_y[:10000], minlength=10), CIFAR_BATCH1_COUNTS)
    np.testing.assert_array_equal(np.bincount(cifar10.test_y, minlength=10), [1000] * 10)
    np.testing.assert_array_equal(all_train_y[:10], [6, 9, 9, 4, 1, 1, 2, 7, 8, 3])
    np.testing.assert_array_equal(cifar10.test_y[:10], [3, 8, 8, 0, 6, 6, 1, 6, 3, 1])
    # Planes R, G, B map to the last axis: the per-channel means are the well-known ones.
    np.testing.assert_allclose(all_train_x.mean(axis=(0, 1, 2), dtype=np.float64), [0.49139968, 0.48215841, 0.44653091], atol=1e-6)


def test_cifar_record_layout_is_rgb_planes():
    record = np.zeros(data.CIFAR10_RECORD_BYTES, np.uint8)
    record[0] = 7
    record[1 + 0 * 1024 + 5 * 32 + 9] = 11   # R plane, row 5, column 9
    record[1 + 1 * 1024 + 5 * 32 + 9] = 22   # G
    record[1 + 2 * 1024 + 31 * 32 + 0] = 33  # B plane, row 31, column 0
    images, labels = data.parse_cifar10_bin(record.tobytes())
    assert labels.tolist() == [7]
    assert images[0, 5, 9].tolist() == [11, 22, 0]
    assert images[0, 31, 0, 2] == 33


def _copy_mnist(src, dst):
    (dst / "mnist").mkdir()
    for name in MNIST_MD5:
        shutil.copy(src / "mnist" / name, dst / "mnist" / name)
    return dst / "mnist"


def test_missing_file_is_named(tmp_path, data_dir):
    folder = _copy_mnist(data_dir, tmp_path)
    (folder / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(data.DataError, match="missing file: .*train-images-idx3-ubyte.gz"):
        data.load_dataset("mnist", data_dir=tmp_path)


def test_truncated_gzip_is_reported(tmp_path, data_dir):
    folder = _copy_mnist(data_dir, tmp_path)
    path = folder / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(data.DataError, match="t10k-images.*(truncated|corrupt)"):
        data.load_dataset("mnist", data_dir=tmp_path)


def test_truncated_idx_payload_is_reported(tmp_path, data_dir):
    folder = _copy_mnist(data_dir, tmp_path)
    path = folder / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-784]))                    # one image short, valid gzip
    with pytest.raises(data.DataError, match="header says 10000 images.*truncated"):
        data.load_dataset("mnist", data_dir=tmp_path)


def test_wrong_magic_is_reported(tmp_path, data_dir):
    folder = _copy_mnist(data_dir, tmp_path)
    # Labels where images are expected: magic 0x00000801 instead of 0x00000803.
    shutil.copy(folder / "t10k-labels-idx1-ubyte.gz", folder / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(data.DataError, match="wrong magic number 0x00000801, expected 0x00000803"):
        data.load_dataset("mnist", data_dir=tmp_path)


def test_truncated_cifar_file_is_reported(tmp_path, data_dir):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    src = data_dir / "cifar10" / "cifar-10-batches-bin"
    for name in CIFAR_MD5:
        (folder / name).symlink_to(src / name)
    (folder / "data_batch_3.bin").unlink()
    (folder / "data_batch_3.bin").write_bytes((src / "data_batch_3.bin").read_bytes()[:-10])
    with pytest.raises(data.DataError, match="data_batch_3.bin.*not a whole number of 3073-byte records"):
        data.load_dataset("cifar10", data_dir=tmp_path)


def test_bad_names_and_folders(tmp_path, monkeypatch):
    with pytest.raises(data.DataError, match="unknown dataset 'svhn'"):
        data.load_dataset("svhn", data_dir=tmp_path)
    with pytest.raises(data.DataError, match="unknown source"):
        data.load_dataset("mnist", data_dir=tmp_path, source="web")
    with pytest.raises(data.DataError, match="no mnist files found under"):
        data.load_dataset("mnist", data_dir=tmp_path)
    with pytest.raises(data.DataError, match="is not a folder"):
        data.load_dataset("mnist", data_dir=tmp_path / "nope")
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with pytest.raises(data.DataError, match="--data-dir"):
        data.load_dataset("mnist", source="files")


def test_env_var_selects_the_folder(monkeypatch, data_dir):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(data_dir))
    ds = data.load_dataset("mnist")
    assert ds.source == "files" and ds.md5 == MNIST_MD5


def test_offline_tfds_error_says_how_to_use_local_files(tmp_path, monkeypatch):
    # An empty TFDS data dir with no network: preparing fails, and the message points at the local files.
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    import tensorflow_datasets as tfds

    def no_network(*args, **kwargs):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(tfds, "data_source", no_network)
    with pytest.raises(data.DataError, match=f"--data-dir DIR .*{data.DATA_DIR_ENV}=DIR"):
        data.load_dataset("mnist", source="tfds")


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_path_with_tfds_mock_data(name, shape, monkeypatch):
    import tensorflow_datasets as tfds
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with tfds.testing.mock_data(num_examples=5200, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load_dataset(name, source="tfds")
    assert ds.source == "tfds" and ds.md5 == {}
    assert ds.val_x.shape == (5000, *shape) and ds.train_x.shape == (200, *shape)
    assert ds.test_x.shape == (5200, *shape) and ds.test_x.dtype == np.float32
    assert 0.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0
    assert ds.train_y.dtype == np.int32 and set(np.unique(ds.test_y)) <= set(range(10))


def test_select_attack_indices_is_seeded_and_correct_only():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 500)
    preds = np.where(rng.random(500) < 0.8, labels, (labels + 1) % 10)
    a = data.select_attack_indices(labels, preds, n=100, seed=3)
    b = data.select_attack_indices(labels, preds, n=100, seed=3)
    c = data.select_attack_indices(labels, preds, n=100, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(set(a.tolist())) == 100 and np.all(preds[a] == labels[a])
    # Order is the shuffle's: the first selected index is the first correct one in the permutation.
    perm = np.random.default_rng(3).permutation(500)
    assert a[0] == perm[preds[perm] == labels[perm]][0]
    assert data.indices_hash(a) == data.indices_hash(b) != data.indices_hash(c)
    with pytest.raises(ValueError, match="only .* correctly classified"):
        data.select_attack_indices(labels, preds, n=499, seed=0)


def test_model_cards_are_checked_against_the_loaded_files(mnist):
    import dataclasses
    import warnings
    official = {"data_md5": dict(datasets.get("mnist").official_md5)}
    data.check_model_data(mnist, official, "mnist/classifier")                  # the official files: fine
    data.check_model_data(mnist, {}, "mnist/classifier")                        # an old card: nothing to compare
    swapped = dataclasses.replace(mnist, md5={**mnist.md5, "train-images-idx3-ubyte.gz": "0" * 32})
    with pytest.raises(data.DataError, match=r"trained on the official mnist files.*train-images-idx3-ubyte.gz"):
        data.check_model_data(swapped, official, "mnist/classifier")
    other = {"data_md5": {**official["data_md5"], "train-images-idx3-ubyte.gz": "1" * 32}}
    with pytest.warns(UserWarning, match="other data files than those loaded"):
        data.check_model_data(swapped, other, "mnist/classifier")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.check_model_data(dataclasses.replace(mnist, md5={}), official, "mnist/classifier")   # TFDS: no md5s
    assert mnist.md5 == datasets.get("mnist").official_md5


# ------------------------------------------------------------------------------------- downloads (loopback HTTP)

@pytest.fixture()
def http_server(tmp_path):
    """A loopback HTTP server over a folder; ``truncate`` names files it cuts off after half their bytes."""
    import functools
    import http.server
    import threading
    root = tmp_path / "served"
    root.mkdir()
    truncate: set[str] = set()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def copyfile(self, source, outputfile):
            if self.path.lstrip("/") in truncate:            # promise the whole file, send half, hang up
                blob = source.read()
                outputfile.write(blob[: len(blob) // 2])
                self.close_connection = True
                return
            super().copyfile(source, outputfile)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/", truncate
    server.shutdown()


def test_mnist_download_from_a_loopback_server_is_verified_and_loads(http_server, tmp_path, data_dir, monkeypatch):
    import shutil
    from magnet_mi_jax import download
    served, url, truncate = http_server
    mnist_dir = data._find_dir(Path(data_dir), "mnist")
    for fname in (f for (f,) in datasets.get("mnist").files.values()):
        shutil.copy(mnist_dir / fname, served / fname)
    cache = tmp_path / "cache"
    # An interrupted transfer: an error naming the URL, and nothing left that looks complete.
    truncate.add("t10k-images-idx3-ubyte.gz")
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz"):
        download.fetch_official("mnist", cache, base_url=url, progress=False)
    assert not (cache / "mnist" / "t10k-images-idx3-ubyte.gz").exists()
    assert not list((cache / "mnist").glob("*.part"))
    truncate.clear()
    # A corrupted file (right size, wrong bytes): discarded, with both checksums in the message.
    good = (served / "t10k-labels-idx1-ubyte.gz").read_bytes()         # not fetched yet: the run stopped before
    (served / "t10k-labels-idx1-ubyte.gz").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(data.DataError, match=r"t10k-labels-idx1-ubyte.gz from .* has md5 \w+, expected "
                                             r"ec29112dd5afa0611ce80d1b7f02629c"):
        download.fetch_official("mnist", cache, base_url=url, progress=False)
    assert not (cache / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()
    (served / "t10k-labels-idx1-ubyte.gz").write_bytes(good)
    folder = download.fetch_official("mnist", cache, base_url=url, progress=False)
    assert {f: data.md5sum(folder / f) for f in (f for (f,) in datasets.get("mnist").files.values())} == datasets.get("mnist").official_md5
    # What is verified is not fetched again (the server is gone from the files' point of view).
    for f in served.iterdir():
        f.unlink()
    assert download.fetch_official("mnist", cache, base_url=url, progress=False) == folder
    # source="auto" without a folder uses the download cache.
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv(download.CACHE_ENV, str(cache))
    ds = data.load_dataset("mnist")
    assert ds.source == "files" and ds.md5 == MNIST_MD5 and ds.test_x.shape == (10000, 28, 28, 1)


def test_cifar_archive_download_extracts_and_verifies_its_members(http_server, tmp_path):
    import io
    import tarfile
    from magnet_mi_jax import download
    served, url, _ = http_server
    rng = np.random.default_rng(0)
    members = {f: rng.integers(0, 10, size=3 * data.CIFAR10_RECORD_BYTES, dtype=np.uint8).tobytes()
               for f in (f for files in datasets.get("cifar10").files.values() for f in files)}
    archive = served / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for fname, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{fname}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    md5 = {f: __import__("hashlib").md5(b).hexdigest() for f, b in members.items()}
    with pytest.raises(data.DataError, match="cifar-10-binary.tar.gz .* expected c32a1d4ab5d03f1284b67883e8d87530"):
        download.fetch_official("cifar10", tmp_path / "c", base_url=url, md5=md5, progress=False)
    folder = download.fetch_official("cifar10", tmp_path / "c", base_url=url, md5=md5, progress=False,
                                     archive_md5=data.md5sum(archive))
    assert {f: (folder / f).read_bytes() for f in members} == members
    assert not (folder / "cifar-10-binary.tar.gz").exists()        # the archive is dropped once extracted
