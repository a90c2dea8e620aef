"""Shared fixtures: the bit-exact official data in ../shared/data and small trained models.

The data folder is ``$MAGNET_MI_DATA_DIR`` if set, else ``../shared/data`` beside the checkout. Nothing
here downloads.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magnet_mi_jax import checkpoint, data
from magnet_mi_jax.models import MnistClassifier, alpha_gan, mnist_ae_i, mnist_ae_ii
from train.common import small_classifier

REPO = Path(__file__).resolve().parent.parent
XLA_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
# A folder that keeps the session's small trained models across test runs, for mutation testing, where each
# mutant is a new pytest process (docs/testing.md). Unset (always in CI): each run trains its own.
MODELS_ENV = "MAGNET_MI_TEST_MODELS"


def pytest_configure(config):
    """One persistent XLA compilation cache per test session, shared with the processes the tests start
    (entry points, jax.distributed workers, the SIGKILLed campaign): many tests compile the same attack,
    defense and training graphs in new closures or new processes, and XLA's compile dominates their time.
    Only the compiled executables are cached (keyed by the HLO, the compile options and the jax version), so
    results cannot change; a cache dir given in the environment is used and kept."""
    if not os.environ.get(XLA_CACHE_ENV):
        config._magnet_mi_xla_cache = tempfile.mkdtemp(prefix="magnet-mi-jax-xla-cache-")
        os.environ[XLA_CACHE_ENV] = config._magnet_mi_xla_cache
    jax.config.update("jax_compilation_cache_dir", os.environ[XLA_CACHE_ENV])


def pytest_unconfigure(config):
    made = getattr(config, "_magnet_mi_xla_cache", None)
    if made:
        shutil.rmtree(made, ignore_errors=True)
        os.environ.pop(XLA_CACHE_ENV, None)


def pytest_collection_modifyitems(config, items):
    """Inside mutmut (it sets ``$MUTANT_UNDER_TEST`` in every phase: "" for its clean run, a mutant's name in a
    worker), skip the tests that start processes of their own: a SIGKILLed or two-process campaign under a
    forked worker's CPU limit never reached a verdict, and in a clean run beside other work the two
    ``jax.distributed`` processes missed gloo's connect timeout (docs/testing.md). A skipped test kills no
    mutant, so this can only lower the measured score. Everywhere else (CI, a plain pytest run: the variable is
    unset) nothing is skipped.

    In a mutant's worker, also run the test files fastest first (by the durations mutmut recorded in its clean
    run): mutmut hands pytest the covering tests in set order and stops at the first failure (``-x``), so a
    mutant of ``entropy`` killed by a one-second MI test could first spend many minutes in the table tests.
    Files stay whole, so module-scoped fixtures are built once; the verdict cannot change, only its time."""
    if "MUTANT_UNDER_TEST" not in os.environ:
        return
    skip = pytest.mark.skip(reason="starts processes; not run inside mutmut")
    for item in items:
        if item.get_closest_marker("spawns_processes"):
            item.add_marker(skip)
    if os.environ["MUTANT_UNDER_TEST"]:
        items[:] = fastest_files_first(items, _mutmut_durations())


def _mutmut_durations() -> dict[str, float]:
    """Seconds per test node id from mutmut's stats file (mutants/mutmut-stats.json), {} if absent."""
    try:
        return json.loads((REPO / "mutmut-stats.json").read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return {}


def fastest_files_first(items: list, durations: dict[str, float]) -> list:
    """``items`` grouped by file, the files in ascending order of their tests' summed ``durations`` (a test
    missing from them counts 0; ties keep the order in which the files first appear), each file's tests in
    their given order."""

    def file_of(item) -> str:
        return item.nodeid.split("::")[0]

    seconds: dict[str, float] = {}
    first_seen: dict[str, int] = {}
    for position, item in enumerate(items):
        seconds[file_of(item)] = seconds.get(file_of(item), 0.0) + durations.get(item.nodeid, 0.0)
        first_seen.setdefault(file_of(item), position)
    return sorted(items, key=lambda item: (seconds[file_of(item)], first_seen[file_of(item)]))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get(data.DATA_DIR_ENV) or REPO.parent / "shared" / "data")
    if not (path / "mnist" / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.fail(f"official test data not found at {path}; set {data.DATA_DIR_ENV}")
    return path


@pytest.fixture(scope="session")
def mnist(data_dir) -> data.Dataset:
    return data.load_dataset("mnist", data_dir=data_dir, source="files")


@pytest.fixture(scope="session")
def cifar10(data_dir) -> data.Dataset:
    return data.load_dataset("cifar10", data_dir=data_dir, source="files")


@pytest.fixture(scope="session")
def tiny_mnist_classifier(mnist, tmp_path_factory):
    """(module, params, test_accuracy): MagNet's MNIST classifier after two epochs on 12,800 training images.

    About 97-98% test accuracy in about a minute of CPU; deterministic (seed 0). For tests of attacks and
    detectors that need a real trained network without the shipped weights. Trained once per test run: under
    pytest-xdist the first worker to need it trains it and saves its parameters in the run's shared temporary
    folder, and the others read them back (bit for bit: msgpack keeps every float32). With
    ``$MAGNET_MI_TEST_MODELS`` set, that folder is kept across runs (mutation testing only: no mutated module
    trains it, so every mutant's run may read it back).
    """
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):        # each worker's basetemp is a subfolder of the run's
        shared = shared.parent
    if os.environ.get(MODELS_ENV):                   # kept across runs (mutation testing)
        shared = Path(os.environ[MODELS_ENV])
        shared.mkdir(parents=True, exist_ok=True)
    saved = shared / "tiny_mnist_classifier.msgpack"
    with open(shared / "tiny_mnist_classifier.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)             # released when the file closes
        if saved.is_file():
            module = MnistClassifier()
            params = jax.tree.map(jnp.asarray, flax.serialization.msgpack_restore(saved.read_bytes()))
        else:
            module, params = small_classifier(mnist.train_x, mnist.train_y, n=12800, epochs=2, seed=0)
            partial = saved.with_suffix(".partial")
            partial.write_bytes(flax.serialization.msgpack_serialize(jax.device_get(params)))
            partial.rename(saved)
    logits = jax.jit(module.apply)(params, mnist.test_x[:2000])
    acc = float(np.mean(np.argmax(logits, -1) == mnist.test_y[:2000]))
    return module, params, acc


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory, mnist, tiny_mnist_classifier):
    """Checkpoints of a tiny trained classifier and untrained AEs/GAN, and a 400-image slice of MNIST."""
    root = tmp_path_factory.mktemp("tables")
    ckpt = root / "checkpoints"
    module, params, _ = tiny_mnist_classifier
    checkpoint.save_params(ckpt / "mnist" / "classifier", params, {"command": "fixture"})
    for name, build in (("ae_i", mnist_ae_i), ("ae_ii", mnist_ae_ii)):
        checkpoint.save_params(ckpt / "mnist" / name, checkpoint.init_params(build(), "mnist", jax.random.key(1)),
                               {"command": "untrained"})
    gan = alpha_gan.mnist_alpha_gan()
    checkpoint.save_params(ckpt / "mnist" / "generator", alpha_gan.init_params(gan, jax.random.key(2)),
                           {"command": "untrained"})
    small = dataclasses.replace(mnist, val_x=mnist.val_x[:400], val_y=mnist.val_y[:400],
                                test_x=mnist.test_x[:400], test_y=mnist.test_y[:400])
    return ckpt, small
