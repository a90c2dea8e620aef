"""Trains a MagNet denoising auto-encoder: ``python -m train.autoencoder --dataset mnist --which ae_i``.

MagNet's recipe (Trevillie/MagNet ``train_defense.py``, ``defensive_models.py``):

    min_theta  E_x || AE_theta(clip(x + sigma * n, 0, 1)) - x ||_2^2 / D  +  1e-9 * sum_layers ||a_l||_2^2 / B,
    n ~ N(0, I),  sigma = 0.1 (MNIST) or 0.025 (CIFAR-10),

with Adam, batch 256, 100 epochs; ``a_l`` is each layer's output (Keras' L2 activity regulariser, averaged over
the batch).

Variants (``--variant``), each a complete config; the card records which:

* ``magnet`` (the default): MagNet's recipe exactly as its code runs it: Keras' Adam at a constant 1e-3, and
  the noise drawn **once** for the whole run (one fixed noisy copy of the training set, seeded by ``--seed``).
* ``cosine``: Adam from 1e-2 decaying to 1e-4 (cosine) over the run, the noise drawn afresh for every batch
  from the step's key. Measured reason it exists: with the all-sigmoid MagNet architecture, Adam at 1e-3 sits on
  the plateau "output the mean image" for the first epochs (validation MSE 0.099-0.100 after 3 epochs), while
  1e-2 leaves it within two (0.0045 after 3); the earlier shipped auto-encoders were trained this way for 20
  epochs.

Models: ``ae_i`` (MNIST detector I and reformer), ``ae_ii`` (MNIST detector II), ``ae`` (CIFAR-10).
The card records the test reconstruction errors: mean squared error and mean absolute error per pixel.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from magnet_mi_jax import checkpoint, cli, datasets
from magnet_mi_jax.utils import map_batches
from train import common, trainer



NOISE_DRAWS = ("fixed", "fresh")


@dataclasses.dataclass(frozen=True)
class AutoEncoderConfig:
    noise_sigma: float = 0.1      # MagNet's MNIST value; each dataset's config overrides what differs
    epochs: int = 100
    batch_size: int = 256
    learning_rate: float = 1e-3
    cosine_decay: bool = False    # True: decay to learning_rate / 100 over the run; False: MagNet's constant lr
    activity_l2: float = 1e-9
    noise: str = "fixed"          # "fixed": one noisy copy of the training set (MagNet); "fresh": new per batch

    def __post_init__(self):
        if self.noise not in NOISE_DRAWS:
            raise ValueError(f"noise must be one of {NOISE_DRAWS}, got {self.noise!r}")


def config_for(dataset: str) -> AutoEncoderConfig:
    """MagNet's recipe for the dataset: the defaults with its config's ``training["autoencoder"]`` (noise 0.1 on
    MNIST, 0.025 on CIFAR-10)."""
    return AutoEncoderConfig(**datasets.get(dataset).training.get("autoencoder", {}))


VARIANTS = {
    "magnet": config_for,
    "cosine": lambda dataset: dataclasses.replace(config_for(dataset), learning_rate=1e-2, cosine_decay=True,
                                                  noise="fresh"),
}


def fixed_noisy_copy(x: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """MagNet's training inputs: ``clip(x + sigma * n, 0, 1)`` with one draw of ``n ~ N(0, I)`` for the run."""
    noise = np.random.default_rng([seed, 0x0A0E]).standard_normal(x.shape, dtype=np.float32)
    return np.clip(x + np.float32(sigma) * noise, 0.0, 1.0)


def make_loss_fn(module, config: AutoEncoderConfig):
    def loss_fn(params, batch, key):
        x = batch["image"]                                                  # (B, H, W, C)
        if config.noise == "fixed":                                         # drawn once: batch["noisy"]
            noisy = batch["noisy"]
        else:
            noisy = jnp.clip(x + config.noise_sigma * jax.random.normal(key, x.shape), 0.0, 1.0)
        recon, state = module.apply(params, noisy, mutable=["activity"])
        mse = jnp.mean((recon - x) ** 2)
        activity = sum(jnp.sum(a ** 2) for a in jax.tree.leaves(state["activity"])) / x.shape[0]
        return mse + config.activity_l2 * activity, {"mse": mse}

    return loss_fn


def reconstruction_errors(module, params, x: np.ndarray) -> dict[str, float]:
    """Mean squared and mean absolute per-pixel reconstruction error of clean images ``x``."""
    apply = jax.jit(lambda chunk: module.apply(params, chunk))
    recon = map_batches(apply, x, 1000)
    diff = recon - x
    return {"mse": float(np.mean(diff ** 2)), "mae": float(np.mean(np.abs(diff)))}


def main(argv: list[str] | None = None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--which", required=True,
                        help="the auto-encoder, by its name in the dataset's config: ae_i / ae_ii (MNIST), ae (CIFAR-10)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="magnet",
                        help="training recipe (default: magnet, MagNet's own; see the module docstring)")
    args = parser.parse_args(argv)
    which = datasets.get(args.dataset).networks_of("autoencoder")
    if args.which not in which:
        parser.error(f"--which {args.which} is not a {args.dataset} auto-encoder; choose from {which}")
    command = cli.command_line("train.autoencoder", argv)
    config = common.override(VARIANTS[args.variant](args.dataset), args)
    ds = common.load_data(args)
    # The cosine schedule spans the whole run, so its length is part of the configuration.
    resumable = () if config.cosine_decay else ("epochs",)
    run_config = common.run_config(args, args.which, config, ds, resumable)
    common.check_export_target(args, args.which, run_config)

    module = checkpoint.model_spec(args.dataset, args.which).build()
    init_key, state_key = jax.random.split(jax.random.key(args.seed))
    params = checkpoint.init_params(module, args.dataset, init_key)
    total_steps = len(ds.train_x) // config.batch_size * config.epochs
    tx = optax.adam(optax.cosine_decay_schedule(config.learning_rate, total_steps, alpha=0.01)
                    if config.cosine_decay else config.learning_rate)
    state = trainer.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), state_key)

    update_fn = trainer.make_update_fn(make_loss_fn(module, config), tx)
    loop = trainer.LoopConfig(epochs=config.epochs, batch_size=config.batch_size, seed=args.seed,
                              workdir=common.workdir(args, args.which))
    arrays = {"image": ds.train_x}
    if config.noise == "fixed":
        arrays["noisy"] = fixed_noisy_copy(ds.train_x, config.noise_sigma, args.seed)
    state, history = trainer.fit(loop, state, update_fn, arrays,
                                 lambda p: reconstruction_errors(module, p, ds.val_x),
                                 desc=f"{args.dataset} {args.which}",
                                 run_config=run_config)
    test = reconstruction_errors(module, state.params, ds.test_x)
    metrics = {"variant": args.variant, "test_mse": test["mse"], "test_mae": test["mae"],
               "train_seconds": float(np.sum([h["seconds"] for h in history])) if history else None}
    common.export(args, args.which, state.params, config, ds, command, metrics, history, run_config)
    return metrics


if __name__ == "__main__":
    common.cli(main)
