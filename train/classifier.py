"""Trains MagNet's classifier: ``python -m train.classifier --dataset mnist|cifar10``.

Configs (MagNet's training parameters; Trevillie/MagNet ``train_models.py``):

* MNIST: SGD lr 0.01 (Keras decay 1e-6 per step), momentum 0.9 Nesterov, batch 128, cross-entropy on logits.
  MagNet trains 50 epochs; the shipped weights use fewer (see the README for the exact command, the measured
  test accuracy and the wall time).
* CIFAR-10: the same optimiser with random shifts of up to 10% (3 px, edge padding) and horizontal flips.

Kernel initialisation (``--init``, :data:`INITS`): the network's own (the default), Keras' ``glorot_uniform``
or ``he_normal``.

Learning-rate schedules (``--schedule``, :data:`SCHEDULES`): ``keras_decay`` (MagNet's, the default) or
``warmup_cosine`` (linear warm-up over ``--warmup-epochs`` to ``--lr``, then a cosine decay to 0 at the last
step: a run a fraction of MagNet's length still ends at a small learning rate; what the shipped CIFAR-10 weights
use, see the README). The cosine schedule depends on the epoch count, so a ``warmup_cosine`` run cannot be
extended by more epochs (its work folder refuses the change); a ``keras_decay`` run can.

Warm restart (``--init-from DIR``): start from exported weights (a model folder: ``params/`` and its card
``meta.json``) instead of a random draw, with a fresh optimiser state and schedule: a second training cycle, as
in SGDR (Loshchilov & Hutter, 2017). The run's record and its card name the starting weights by their sha256 and
the command that trained them.

Run state lives in ``--workdir`` (default ``workdirs/<dataset>/classifier``): interrupt at any time and rerun
the same command to resume. At the end the weights go to ``checkpoints/<dataset>/classifier`` with a card
(``meta.json``) holding the command, seed, config and the measured test accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from magnet_mi_jax import checkpoint, cli, data, datasets
from magnet_mi_jax.utils import map_batches
from train import common, trainer


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    epochs: int = 50              # MagNet's MNIST recipe; each dataset's config overrides what differs
    batch_size: int = 128
    learning_rate: float = 0.01
    momentum: float = 0.9
    lr_decay: float = 1e-6        # Keras SGD decay: lr_t = lr / (1 + decay * t)
    augment: bool = False         # random shift (10%) + horizontal flip
    schedule: str = "keras_decay"  # a key of SCHEDULES
    warmup_epochs: float = 0.0    # warmup_cosine only
    init: str = "default"         # a key of INITS: how the convolution and dense kernels start


#: Fields added after the first cards were written: left out of a run's record while at their default, so that
#: the records written before them (which describe runs at those defaults) stay resumable and comparable.
LATER_FIELDS = ("schedule", "warmup_epochs", "init")


def keras_decay(config: ClassifierConfig, steps_per_epoch: int) -> optax.Schedule:
    """MagNet's schedule (Keras SGD ``decay``): lr_t = lr / (1 + decay * t), t the step."""
    del steps_per_epoch
    return lambda step: config.learning_rate / (1.0 + config.lr_decay * step)


def warmup_cosine(config: ClassifierConfig, steps_per_epoch: int) -> optax.Schedule:
    """Linear warm-up from 0 to lr over ``warmup_epochs``, then cosine decay to 0 at ``epochs``' last step."""
    total = config.epochs * steps_per_epoch
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if not 0 <= warmup < total:
        raise ValueError(f"warmup_epochs={config.warmup_epochs} must lie in [0, epochs={config.epochs})")
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, total, end_value=0.0)


#: Learning-rate schedules by name: ``(config, steps_per_epoch) -> optax.Schedule``.
SCHEDULES = {"keras_decay": keras_decay, "warmup_cosine": warmup_cosine}

#: Kernel initialisers by name (biases start at 0 in all): ``default`` keeps the network's own (Flax's LeCun
#: normal, Var = 1/fan_in); ``glorot_uniform`` is Keras' default, what MagNet's Keras networks started from
#: (Var = 2/(fan_in + fan_out)); ``he_normal`` (Var = 2/fan_in, He et al. 2015) keeps the activations' variance
#: through ReLU layers, so a deep plain ReLU network's logits do not start near 0.
INITS = {"default": None, "glorot_uniform": jax.nn.initializers.glorot_uniform(),
         "he_normal": jax.nn.initializers.he_normal()}


def initial_params(module, dataset: str, init: str, key: jax.Array):
    """``{"params": ...}`` of ``module`` for ``dataset``, its kernels drawn by ``INITS[init]``.

    ``default`` is exactly the module's own initialisation from ``key`` (so runs made before this option
    existed are reproduced); otherwise every leaf named ``kernel`` (HWIO convolutions, (in, out) dense layers:
    fan-in and fan-out are read from those layouts) is redrawn with its own key; the other leaves keep the
    module's initialisation.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    params = checkpoint.init_params(module, dataset, key)
    if INITS[init] is None:
        return params
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(paths))
    leaves = [INITS[init](k, leaf.shape, leaf.dtype) if getattr(path[-1], "key", None) == "kernel" else leaf
              for k, (path, leaf) in zip(keys, paths)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def config_for(dataset: str) -> ClassifierConfig:
    """The dataset's recipe: the defaults with its config's ``training["classifier"]`` (MNIST: 50 epochs;
    CIFAR-10: 200 epochs with augmentation)."""
    return ClassifierConfig(**datasets.get(dataset).training.get("classifier", {}))


def optimizer(config: ClassifierConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """MagNet's optimiser, SGD with Nesterov momentum, on ``config.schedule``'s learning rates."""
    if config.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {config.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    return optax.sgd(SCHEDULES[config.schedule](config, steps_per_epoch), momentum=config.momentum, nesterov=True)


def augment(images: jnp.ndarray, key: jax.Array, max_shift: int) -> jnp.ndarray:
    """Random translation by up to ``max_shift`` pixels (edge padding) and random horizontal flip.

    images: (B, H, W, C) -> (B, H, W, C).
    """
    b, h, w, _ = images.shape
    k_shift, k_flip = jax.random.split(key)
    shifts = jax.random.randint(k_shift, (b, 2), 0, 2 * max_shift + 1)
    flips = jax.random.bernoulli(k_flip, 0.5, (b,))
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge")

    def one(img, shift, flip):
        out = jax.lax.dynamic_slice(img, (shift[0], shift[1], 0), (h, w, img.shape[-1]))
        return jnp.where(flip, out[:, ::-1], out)

    return jax.vmap(one)(padded, shifts, flips)


def make_loss_fn(module, config: ClassifierConfig, image_shape):
    max_shift = int(round(0.1 * image_shape[0]))

    def loss_fn(params, batch, key):
        k_aug, k_drop = jax.random.split(key)
        x = augment(batch["image"], k_aug, max_shift) if config.augment else batch["image"]
        logits = module.apply(params, x, train=True, rngs={"dropout": k_drop})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, {"accuracy": acc}

    return loss_fn


class RunPlan(NamedTuple):
    """A classifier run as its command line describes it, before any training."""

    args: argparse.Namespace
    command: str
    config: ClassifierConfig
    ds: data.Dataset
    steps_per_epoch: int
    run_config: dict          # what the work folder and the exported card record (train.common.run_config)
    start_params: Any = None  # the --init-from weights, or None for a random initialisation


def warm_start(directory: str, dataset: str) -> tuple[Any, dict]:
    """The weights exported in ``directory`` and how the run records them (``--init-from``).

    Returns:
      ``(params, record)``: the parameters, checked against their card's sha256, and ``{"params_sha256",
      "command"}`` from that card (not the path, so a moved checkout still resumes the run).

    Raises:
      CheckpointError: no weights there, a card of another model, or weights that do not match their card.
    """
    card = checkpoint.read_meta(directory)
    want = f"{dataset}/classifier"
    if card.get("model") != want:
        raise checkpoint.CheckpointError(
            f"--init-from {directory}: its card (meta.json) describes {card.get('model', 'nothing')!r}, "
            f"not {want!r}")
    if "params_sha256" not in card:
        raise checkpoint.CheckpointError(f"--init-from {directory}: its card has no params_sha256 to check the "
                                         "weights against")
    module = checkpoint.model_spec(dataset, "classifier").build()
    params = checkpoint.load_params(directory, checkpoint.init_params(module, dataset, jax.random.key(0)))
    checkpoint.verify_digest(directory, params, card)
    return params, {"params_sha256": card["params_sha256"], "command": card.get("command")}


def plan(argv: list[str] | None = None) -> RunPlan:
    """Parses the command line, loads the data and describes the run (no training, nothing written)."""
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--schedule", choices=tuple(SCHEDULES), default=None,
                        help="learning-rate schedule (default: the dataset's config, MagNet's keras_decay)")
    parser.add_argument("--warmup-epochs", type=float, default=None, help="warm-up length of warmup_cosine")
    parser.add_argument("--init", choices=tuple(INITS), default=None,
                        help="kernel initialisation (default: the network's own, Flax's LeCun normal)")
    parser.add_argument("--init-from", default=None, metavar="DIR",
                        help="start from the weights exported in DIR (params/ and meta.json) instead of a random "
                             "initialisation: another training cycle on a fresh optimiser and schedule")
    args = parser.parse_args(argv)
    if args.init_from is not None and args.init is not None:
        parser.error("--init-from starts from trained weights; --init draws random ones: give one of them")
    config = common.override(config_for(args.dataset), args)
    config = dataclasses.replace(config, **{k: v for k, v in (("schedule", args.schedule), ("init", args.init),
                                                              ("warmup_epochs", args.warmup_epochs)) if v is not None})
    ds = common.load_data(args)
    steps_per_epoch = len(ds.train_x) // config.batch_size
    optimizer(config, steps_per_epoch)      # an unknown schedule or a bad warm-up fails before any work
    # Keras decay does not depend on the run's length, so such a run may be extended by more epochs; a cosine
    # run records its epoch count.
    defaults = ClassifierConfig()
    unrecorded = tuple(f for f in LATER_FIELDS if getattr(config, f) == getattr(defaults, f))
    run_config = common.run_config(args, "classifier", config, ds,
                                   resumable_fields=unrecorded + (("epochs",) if config.schedule == "keras_decay"
                                                                  else ()))
    start_params = None
    if args.init_from is not None:     # recorded only when given: earlier records stay resumable
        start_params, run_config["init_from"] = warm_start(args.init_from, args.dataset)
    return RunPlan(args, cli.command_line("train.classifier", argv), config, ds, steps_per_epoch, run_config,
                   start_params)


def main(argv: list[str] | None = None) -> dict:
    args, command, config, ds, steps_per_epoch, run_config, start_params = plan(argv)
    common.check_export_target(args, "classifier", run_config)

    spec = checkpoint.model_spec(args.dataset, "classifier")
    module = spec.build()
    init_key, state_key = jax.random.split(jax.random.key(args.seed))
    params = initial_params(module, args.dataset, config.init, init_key) if start_params is None else start_params
    tx = optimizer(config, steps_per_epoch)
    state = trainer.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), state_key)

    predict = jax.jit(functools.partial(module.apply))

    def logits_of(params, x):
        return map_batches(lambda chunk: predict(params, chunk), x, 1000)

    def evaluate(params):
        return {"accuracy": common.accuracy(logits_of(params, ds.val_x), ds.val_y)}

    update_fn = trainer.make_update_fn(make_loss_fn(module, config, ds.image_shape), tx)
    loop = trainer.LoopConfig(epochs=config.epochs, batch_size=config.batch_size, seed=args.seed,
                              workdir=common.workdir(args, "classifier"))
    state, history = trainer.fit(loop, state, update_fn, {"image": ds.train_x, "label": ds.train_y},
                                 evaluate, desc=f"{args.dataset} classifier",
                                 run_config=run_config)
    metrics = {
        "test_accuracy": common.accuracy(logits_of(state.params, ds.test_x), ds.test_y),
        "val_accuracy": evaluate(state.params)["accuracy"],
        "train_seconds": float(np.sum([h["seconds"] for h in history])) if history else None,
    }
    common.export(args, "classifier", state.params, config, ds, command, metrics, history, run_config)
    return metrics


if __name__ == "__main__":
    common.cli(main)
