"""Learning-rate range test of a dataset's classifier: ``python -m train.lr_range --dataset cifar10``.

Smith's test (L. N. Smith, "Cyclical Learning Rates for Training Neural Networks", WACV 2017, section 3.3):
from the initialisation, train ``--steps`` steps of the dataset's recipe (optimiser, batch size, augmentation,
dropout; :mod:`train.classifier`) while the learning rate grows geometrically,

    lr_s = lr_min * (lr_max / lr_min) ** (s / (S - 1)),    s = 0 .. S - 1,

and record the training loss of every step. The loss, smoothed by a bias-corrected exponential moving average
(``--beta``), falls fastest at some rate and blows up past another; a one-cycle or warm-up + cosine schedule
peaks between the two. The run stops early once the smoothed loss exceeds 4x its minimum (divergence).

Prints one line per tenth of the run and a summary (the rate of steepest descent of the smoothed loss per unit
log lr, and the rate where it diverged); ``--json`` keeps every step. Nothing is exported: this chooses a
schedule, it does not train weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from magnet_mi_jax import checkpoint, cli
from train import classifier, common, trainer

DIVERGENCE_FACTOR = 4.0


def smoothed(losses: np.ndarray, beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average: m_s = beta m_{s-1} + (1 - beta) l_s, reported m_s / (1 - beta^(s+1))."""
    out = np.empty(len(losses))
    m = 0.0
    for s, loss in enumerate(losses):
        m = beta * m + (1.0 - beta) * loss
        out[s] = m / (1.0 - beta ** (s + 1))
    return out


def summarise(lrs: np.ndarray, losses: np.ndarray, beta: float, skip: int = 10) -> dict[str, float | None]:
    """The rate where the smoothed loss falls fastest per unit log(lr), and the first rate where it diverged.

    ``skip`` first steps are ignored for the steepest descent (the average has seen too little there).
    """
    if len(lrs) != len(losses) or len(lrs) < skip + 3:
        raise ValueError(f"need matching lrs and losses, more than {skip + 2} steps; got {len(lrs)}, {len(losses)}")
    smooth = smoothed(losses, beta)
    slope = np.gradient(smooth, np.log(lrs))
    steepest = skip + int(np.argmin(slope[skip:]))
    running_min = np.minimum.accumulate(smooth)
    diverged = np.flatnonzero(smooth > DIVERGENCE_FACTOR * running_min)
    return {"steepest_lr": float(lrs[steepest]), "steepest_slope": float(slope[steepest]),
            "min_smoothed_loss_lr": float(lrs[int(np.argmin(smooth))]),
            "diverged_lr": float(lrs[diverged[0]]) if diverged.size else None}


def lr_range(dataset: str, train_x: np.ndarray, train_y: np.ndarray, *, steps: int = 300, lr_min: float = 1e-4,
             lr_max: float = 1.0, seed: int = 0, beta: float = 0.98, batch_size: int | None = None,
             init: str = "default", log=functools.partial(print, flush=True)) -> dict:
    """Runs the test; returns ``{"lrs", "losses", "seconds_per_step", "summary", ...}`` (lists per step)."""
    if not 0 < lr_min < lr_max:
        raise ValueError(f"need 0 < lr_min < lr_max, got {lr_min}, {lr_max}")
    config = classifier.config_for(dataset)
    config = dataclasses.replace(config, init=init, **({} if batch_size is None else {"batch_size": batch_size}))
    n = len(train_x)
    if n < config.batch_size:
        raise ValueError(f"{n} training images is fewer than one batch of {config.batch_size}")
    module = checkpoint.model_spec(dataset, "classifier").build()
    init_key, state_key = jax.random.split(jax.random.key(seed))
    params = classifier.initial_params(module, dataset, config.init, init_key)
    schedule = optax.exponential_decay(lr_min, transition_steps=max(steps - 1, 1), decay_rate=lr_max / lr_min)
    tx = optax.sgd(schedule, momentum=config.momentum, nesterov=True)
    state = trainer.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), state_key)
    update_fn = trainer.make_update_fn(classifier.make_loss_fn(module, config, train_x.shape[1:]), tx)

    per_epoch = n // config.batch_size
    lrs, losses = [], []
    t0 = None
    for s in range(steps):
        epoch, i = divmod(s, per_epoch)
        idx = trainer.epoch_order(seed, epoch, n)[i * config.batch_size:(i + 1) * config.batch_size]
        state, metrics = update_fn(state, {"image": train_x[idx], "label": train_y[idx]})
        lrs.append(float(schedule(s)))
        losses.append(float(metrics["loss"]))          # one sync per step: the run must see divergence
        if s == 0:
            t0 = time.perf_counter()                   # the first step includes compilation
        smooth = smoothed(np.asarray(losses), beta)
        if (s + 1) % max(steps // 10, 1) == 0:
            log(f"step {s + 1}/{steps}: lr {lrs[-1]:.3g}, loss {losses[-1]:.4f}, smoothed {smooth[-1]:.4f}")
        if s > 10 and smooth[-1] > DIVERGENCE_FACTOR * smooth.min():
            log(f"step {s + 1}: smoothed loss {smooth[-1]:.3f} > {DIVERGENCE_FACTOR:g} x its minimum: stopped")
            break
    seconds = (time.perf_counter() - t0) / max(len(losses) - 1, 1)
    return {"dataset": dataset, "config": dataclasses.asdict(config), "steps_run": len(losses), "lr_min": lr_min,
            "lr_max": lr_max, "beta": beta, "seed": seed, "seconds_per_step": seconds,
            "summary": summarise(np.asarray(lrs), np.asarray(losses), beta), "lrs": lrs, "losses": losses}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_data_flags(parser, checkpoints=False)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr-min", type=float, default=1e-4)
    parser.add_argument("--lr-max", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.98, help="smoothing of the loss (EMA)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the dataset's recipe")
    parser.add_argument("--init", choices=tuple(classifier.INITS), default="default", help="kernel initialisation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write every step's lr and loss here")
    cli.add_overwrite_flag(parser)
    args = parser.parse_args(argv)
    cli.refuse_to_overwrite([args.json], args.overwrite)
    commit = cli.git_commit()        # the code the run starts with, whatever is committed while it runs
    ds = cli.load_data(args)
    report = lr_range(args.dataset, ds.train_x, ds.train_y, steps=args.steps, lr_min=args.lr_min,
                      lr_max=args.lr_max, seed=args.seed, beta=args.beta, batch_size=args.batch_size,
                      init=args.init)
    report.update(cli.provenance(cli.command_line("train.lr_range", argv), ds, commit=commit))
    summary = report["summary"]
    print(f"{report['steps_run']} steps, {report['seconds_per_step']:.2f} s per step; steepest descent at lr "
          f"{summary['steepest_lr']:.3g}; diverged at {summary['diverged_lr']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
            fh.write("\n")
    return report


if __name__ == "__main__":
    common.cli(main)
