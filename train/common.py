"""Command-line plumbing the entry points share: arguments, data, export of the trained weights."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from magnet_mi_jax import checkpoint, data
from magnet_mi_jax import cli as magnet_cli
from train import trainer


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    magnet_cli.add_data_flags(parser, checkpoints_help="where the trained weights are exported (default: the "
                                                       "repository's checkpoints/)")
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epoch count")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="override the config's learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=None,
                        help="train on the first N training images only (smoke tests)")
    parser.add_argument("--workdir", default=None,
                        help="resumable run state (default: workdirs/<dataset>/<model>); rerun to resume")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace trained weights of another configuration at the export target (default: "
                             "refuse, so a smoke run never silently replaces shipped weights)")
    parser.add_argument("--fresh", action="store_true",
                        help="discard the run state in --workdir and start from scratch (default: resume it, "
                             "which is refused if it was started with another configuration)")
    return parser


def override(config, args: argparse.Namespace):
    """The config with the command-line overrides applied."""
    changes = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size),
                                 ("learning_rate", args.lr)) if v is not None}
    return dataclasses.replace(config, **changes)


def load_data(args: argparse.Namespace) -> data.Dataset:
    ds = magnet_cli.load_data(args)
    if args.train_limit is not None:
        ds = dataclasses.replace(ds, train_x=ds.train_x[:args.train_limit], train_y=ds.train_y[:args.train_limit])
    return ds


def workdir(args: argparse.Namespace, name: str) -> Path:
    """The run's work folder; emptied first with ``--fresh``."""
    path = Path(args.workdir) if args.workdir else Path("workdirs") / args.dataset / name
    if getattr(args, "fresh", False) and path.exists():
        for entry in ("checkpoints", "history.jsonl", trainer.RUN_CONFIG_FILE):
            target = path / entry
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        print(f"--fresh: discarded the run state in {path}")
    return path


def run_config(args: argparse.Namespace, name: str, config, ds: data.Dataset,
               resumable_fields: tuple[str, ...] = ("epochs",)) -> dict[str, Any]:
    """What determines a training run, for :func:`train.trainer.check_run_config`.

    ``resumable_fields`` of ``config`` may change between invocations (by default the epoch count, which
    extends or finishes a run when nothing else depends on it).
    """
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in resumable_fields}
    return {"model": f"{args.dataset}/{name}", "seed": args.seed, "train_limit": args.train_limit,
            "data_source": ds.source, "data_md5": ds.md5, "config": fields}


class ExportError(RuntimeError):
    """The export target holds trained weights of another configuration."""


def export_dir(args: argparse.Namespace, name: str) -> Path:
    return checkpoint.checkpoints_dir(args.checkpoints) / args.dataset / name


def check_export_target(args: argparse.Namespace, name: str, run: dict[str, Any]) -> None:
    """Refuses (without ``--overwrite``) to export over weights whose card describes another configuration.

    Called before training starts and again before writing. The same configuration (e.g. a run extended by more
    epochs) may replace its own earlier export. ``run`` is :func:`run_config`'s description of this run.

    Raises:
      ExportError: naming the folder, the differing fields and the ways out.
    """
    target = export_dir(args, name)
    card = checkpoint.read_meta(target)
    if not card or getattr(args, "overwrite", False):
        return
    stored = card.get("run_config") or {
        "model": card.get("model"), "seed": card.get("seed"), "train_limit": card.get("train_limit"),
        "data_source": card.get("data_source"), "data_md5": card.get("data_md5"),
        "config": {k: v for k, v in (card.get("config") or {}).items() if k in run["config"]}}
    diffs = trainer.config_differences(stored, json.loads(json.dumps(run, default=str)), "there")
    if diffs:
        raise ExportError(f"{target} holds trained weights of another configuration (card: "
                          f"{card.get('command', '?')}):\n  " + "\n  ".join(diffs) +
                          "\nExport elsewhere with --checkpoints DIR, or pass --overwrite to replace them.")


def export(args: argparse.Namespace, name: str, params: Any, config, ds: data.Dataset, command: str,
           metrics: dict[str, Any], history: list[dict], run: dict[str, Any]) -> Path:
    """Writes the trained weights and their card to ``<checkpoints>/<dataset>/<name>`` (refusing, without
    ``--overwrite``, to replace weights of another configuration: :func:`check_export_target`). ``run`` is
    the run's :func:`run_config`. Weights identical to those already there (a finished run invoked again, e.g.
    by a script that resumes a chain of runs) are left as they are, card included, so that the card keeps the
    commit they were trained at."""
    check_export_target(args, name, run)
    out = export_dir(args, name)
    card = checkpoint.read_meta(out)
    if card and card.get("params_sha256") == checkpoint.params_digest(params) and not getattr(args, "overwrite", False):
        print(f"{args.dataset}/{name} in {out} already holds these weights (params_sha256 {card['params_sha256'][:12]}"
              f"...): left as it is")
        return out
    meta = {
        "model": f"{args.dataset}/{name}",
        "run_config": run,
        **magnet_cli.provenance(command, ds),
        "seed": args.seed,
        "config": dataclasses.asdict(config),
        "train_limit": args.train_limit,
        "metrics": metrics,
        "history": history,
    }
    checkpoint.save_params(out, params, meta)
    print(f"saved {args.dataset}/{name} to {out}: " + ", ".join(f"{k}={v}" for k, v in metrics.items()))
    return out


def cli(main: Callable[[], Any]) -> None:
    """:func:`magnet_mi_jax.cli.run_main` with the training errors (work folder or export target) too."""
    magnet_cli.run_main(main, (ExportError, trainer.RunConfigError))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def small_classifier(train_x: np.ndarray, train_y: np.ndarray, *, n: int = 12800, epochs: int = 2,
                     seed: int = 0):
    """``(module, params)``: MagNet's MNIST classifier after ``epochs`` of SGD on the first ``n`` training images.

    A real trained network in about a minute of CPU (about 97-98% MNIST test accuracy with the defaults):
    the test fixture and the benchmark's stand-in when the shipped weights are absent. SGD 0.05, momentum 0.9
    Nesterov, batch 128, dropout on; deterministic for a given ``seed``.
    """
    from magnet_mi_jax.models import MnistClassifier
    module = MnistClassifier()
    params = module.init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1)))
    tx = optax.sgd(0.05, momentum=0.9, nesterov=True)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y, key):
        def loss_fn(p):
            logits = module.apply(p, x, train=True, rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    x, y = train_x[:n], train_y[:n]
    steps = len(x) // 128
    for i in range(epochs * steps):
        sl = slice((i % steps) * 128, (i % steps + 1) * 128)
        params, opt_state = step(params, opt_state, x[sl], y[sl], jax.random.key(seed + i))
    return module, params
