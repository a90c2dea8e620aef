"""Model registry and the shipped-weights format (orbax-checkpoint + a JSON card).

A shipped model lives in ``<checkpoints>/<dataset>/<name>/``:

* ``params/``: an orbax ``StandardCheckpointer`` directory holding the Flax parameter pytree;
* ``meta.json``: what produced it (command, seed, config, git commit), what it measures (accuracy,
  reconstruction error, ...) and ``params_sha256``, a hash of the parameters that loading verifies, so a
  corrupted or swapped weights file is an error naming it instead of a silently wrong model.

``load_model("mnist", "classifier")`` returns the Flax module, its parameters and the card; which networks a
dataset has, and how each is built, is its config's ``networks`` (:mod:`magnet_mi_jax.datasets`). The default
folder is the repository's ``checkpoints/``; ``$MAGNET_MI_CHECKPOINTS`` or an explicit argument overrides it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from magnet_mi_jax import datasets
from magnet_mi_jax.datasets import NetworkSpec

CHECKPOINTS_ENV = "MAGNET_MI_CHECKPOINTS"
DEFAULT_CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not fit its model; the message names the path."""


def model_spec(dataset: str, name: str) -> NetworkSpec:
    """The :class:`~magnet_mi_jax.datasets.NetworkSpec` of network ``name`` in ``dataset``'s config.

    Raises:
      CheckpointError: the dataset is not registered or its config names no such network.
    """
    try:
        config = datasets.get(dataset)
    except datasets.UnknownDatasetError as err:
        raise CheckpointError(str(err)) from None
    if name not in config.networks:
        raise CheckpointError(f"unknown model {dataset}/{name}; {dataset}'s networks: {', '.join(config.networks)}")
    return config.networks[name]


def checkpoints_dir(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$MAGNET_MI_CHECKPOINTS``, else the repository's ``checkpoints/``."""
    chosen = path if path is not None else os.environ.get(CHECKPOINTS_ENV) or DEFAULT_CHECKPOINTS
    return Path(chosen).expanduser().resolve()


def shipped_roots(root: str | os.PathLike | None = None) -> list[Path]:
    """Every checkpoints root shipped under ``root``: itself, then each folder of ``root/variants/`` by name.

    ``root`` defaults to the repository's ``checkpoints/`` (not ``$MAGNET_MI_CHECKPOINTS``: this lists what the
    repository ships). A variant root holds only the networks it changes, e.g.
    ``variants/short_training/mnist/classifier``; pass one as ``checkpoints`` to :func:`load_model`.

    Example:
        >>> [p.name for p in shipped_roots()][:1]
        ['checkpoints']
    """
    base = Path(root).expanduser().resolve() if root is not None else DEFAULT_CHECKPOINTS
    variants = base / "variants"
    return [base, *sorted(p for p in variants.iterdir() if p.is_dir())] if variants.is_dir() else [base]


def init_params(module: nn.Module, dataset: str, key: jax.Array, batch: int = 1) -> Any:
    """``{"params": ...}`` of ``module`` initialised for ``dataset``'s image shape (other collections dropped)."""
    x = jnp.zeros((batch, *datasets.get(dataset).image_shape), jnp.float32)
    return {"params": module.init(key, x)["params"]}


def network_init(dataset: str, name: str) -> Callable[[nn.Module, jax.Array], Any]:
    """``(module, key) -> params`` for network ``name`` of ``dataset``: its spec's own ``init`` where it has one
    (the alpha-GAN, which also takes a condition), else :func:`init_params` on the dataset's image shape.

    Example:
      >>> init = network_init("mnist", "classifier")
      >>> module = model_spec("mnist", "classifier").build()
      >>> params = jax.jit(init, static_argnums=0)(module, jax.random.key(0))
      >>> sum(leaf.size for leaf in jax.tree.leaves(params))  # MagNet's MNIST classifier
      312202
    """
    spec = model_spec(dataset, name)
    if spec.init is not None:
        return spec.init
    return lambda module, key: init_params(module, dataset, key)


def params_digest(tree: Any) -> str:
    """sha256 (hex) of a parameter pytree's leaves' bytes, in tree order."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return digest.hexdigest()


def save_params(directory: str | os.PathLike, params: Any, meta: dict[str, Any]) -> Path:
    """Writes ``params`` (orbax) and ``meta`` (JSON, with ``params_sha256`` added) into ``directory``, replacing
    what was there."""
    meta = {**meta, "params_sha256": params_digest(params)}
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:      # closed on exit: no async work outlives the call
        checkpointer.save(directory / "params", jax.device_get(params), force=True)
        checkpointer.wait_until_finished()
    (directory / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=_json_default) + "\n")
    return directory


def _json_default(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (np.ndarray, jax.Array)):
        return np.asarray(obj).tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def load_params(directory: str | os.PathLike, template: Any) -> Any:
    """Restores parameters saved by :func:`save_params` into the structure, shapes and dtypes of ``template``.

    Raises:
      CheckpointError: the folder is missing, unreadable, or holds a different structure or shapes.
    """
    directory = Path(directory).resolve()
    params_dir = directory / "params"
    if not params_dir.is_dir():
        raise CheckpointError(f"no checkpoint at {params_dir}")
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype), template)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(params_dir, abstract)
    except Exception as err:  # orbax raises many types for corrupt or mismatched files
        raise CheckpointError(f"cannot restore {params_dir}: corrupt or written for another model "
                              f"({type(err).__name__}: {err})") from err
    got = jax.tree.map(np.shape, restored)
    want = jax.tree.map(np.shape, template)
    if got != want:
        raise CheckpointError(f"{params_dir} holds parameters of other shapes: {got} != {want}")
    return restored


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / "meta.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err


def load_model(dataset: str, name: str, checkpoints: str | os.PathLike | None = None
               ) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The module, parameters and card of a trained model.

    Raises:
      CheckpointError: no such model, or no trained weights (the message gives the command that trains them).
    """
    spec = model_spec(dataset, name)
    module = spec.build()
    directory = checkpoints_dir(checkpoints) / dataset / name
    if not (directory / "params").is_dir():
        root = checkpoints_dir(checkpoints)
        where = "" if root == DEFAULT_CHECKPOINTS else f" --checkpoints {root}"
        raise CheckpointError(f"no trained {dataset}/{name} at {directory}; train it with: "
                              f"{datasets.get(dataset).train_command(name)}{where}")
    template = network_init(dataset, name)(module, jax.random.key(0))
    params, meta = load_params(directory, template), read_meta(directory)
    verify_digest(directory, params, meta)
    return module, params, meta


def verify_digest(directory: str | os.PathLike, params: Any, meta: dict[str, Any]) -> None:
    """Checks ``params`` against the card's ``params_sha256`` (cards written before it existed are not checked).

    Raises:
      CheckpointError: the parameters differ from those the card was written for.
    """
    want = meta.get("params_sha256")
    if want is not None and params_digest(params) != want:
        raise CheckpointError(f"the parameters in {Path(directory) / 'params'} do not match the params_sha256 of "
                              f"{Path(directory) / 'meta.json'}: the weights file is corrupt or was replaced; "
                              "restore it (e.g. git checkout) or retrain the model")
