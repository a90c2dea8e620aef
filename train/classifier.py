"""Trains MagNet's classifier: ``python -m train.classifier --dataset mnist|cifar10``.

Configs (MagNet's training parameters; Trevillie/MagNet ``train_models.py``):

* MNIST: SGD lr 0.01 (Keras decay 1e-6 per step), momentum 0.9 Nesterov, batch 128, cross-entropy on logits.
  MagNet trains 50 epochs; the shipped weights use fewer (see the README for the exact command, the measured
  test accuracy and the wall time).
* CIFAR-10: the same optimiser with random shifts of up to 10% (3 px, edge padding) and horizontal flips.

Run state lives in ``--workdir`` (default ``workdirs/<dataset>/classifier``): interrupt at any time and rerun
the same command to resume. At the end the weights go to ``checkpoints/<dataset>/classifier`` with a card
(``meta.json``) holding the command, seed, config and the measured test accuracy.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from magnet_mi_jax import checkpoint, cli, datasets
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


def config_for(dataset: str) -> ClassifierConfig:
    """The dataset's recipe: the defaults with its config's ``training["classifier"]`` (MNIST: 50 epochs;
    CIFAR-10: 200 epochs with augmentation)."""
    return ClassifierConfig(**datasets.get(dataset).training.get("classifier", {}))


def optimizer(config: ClassifierConfig) -> optax.GradientTransformation:
    schedule = lambda step: config.learning_rate / (1.0 + config.lr_decay * step)  # noqa: E731
    return optax.sgd(schedule, momentum=config.momentum, nesterov=True)


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


def main(argv: list[str] | None = None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    command = cli.command_line("train.classifier", argv)
    config = common.override(config_for(args.dataset), args)
    ds = common.load_data(args)
    run_config = common.run_config(args, "classifier", config, ds)
    common.check_export_target(args, "classifier", run_config)

    spec = checkpoint.model_spec(args.dataset, "classifier")
    module = spec.build()
    init_key, state_key = jax.random.split(jax.random.key(args.seed))
    params = checkpoint.init_params(module, args.dataset, init_key)
    tx = optimizer(config)
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
