"""The training loop every entry point shares: jitted pure update, explicit keys, orbax resume, progress bar.

The state is a plain pytree (:class:`TrainState`); one jitted ``update_fn(state, batch) -> (state, metrics)``
advances it, drawing its randomness from ``fold_in(state.key, state.step)``. Batches come from a seeded
permutation per epoch, so step ``s`` always sees the same images: a run interrupted at any step and
restarted from its last checkpoint continues bit for bit where it stopped (on the same backend).

Checkpoints (orbax ``CheckpointManager``, keyed by global step) are written at the end of every epoch, every
``checkpoint_every`` steps, and on exit (including Ctrl-C); a restart with the same ``workdir`` resumes.
A work folder belongs to one configuration: ``run_config.json`` records it when the run starts, and a resume
with any other configuration (seed, learning rate, batch size, data, ...) is refused with the differing fields
named, instead of silently continuing the old run under a card that describes the new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from magnet_mi_jax.models.layers import cpu_jit

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run_config.json"


class RunConfigError(RuntimeError):
    """A work folder holds a run of another configuration (or of an unknown one); the message says which."""

Batch = dict[str, jnp.ndarray]
LossFn = Callable[[Any, Batch, jax.Array], tuple[jnp.ndarray, dict[str, jnp.ndarray]]]


class TrainState(NamedTuple):
    """Everything a run needs to continue: a plain pytree."""

    step: jnp.ndarray          # () int32, global step
    params: Any
    opt_state: Any
    key: jax.Array             # base PRNG key; step s uses fold_in(key, s)


def make_update_fn(loss_fn: LossFn, optimizer: optax.GradientTransformation):
    """The jitted pure step: (state, batch) -> (state, metrics).

    ``loss_fn(params, batch, key) -> (loss, metrics)`` is differentiated w.r.t. ``params``. Compiled with
    :func:`~magnet_mi_jax.models.layers.cpu_jit`: on CPU the convolutions that stand alone under
    differentiation run on Eigen (multi-threaded) instead of single-threaded YNNPACK, which makes the MNIST
    classifier's training step 1.5-2.5x faster on 2 cores (BENCHMARKS.md; ``python -m eval.probe_layers
    --train-step``); elsewhere plain jit.
    """

    @cpu_jit
    def update_fn(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jnp.ndarray]]:
        key = jax.random.fold_in(state.key, state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state, state.key), {"loss": loss, **metrics}

    return update_fn


@dataclasses.dataclass
class LoopConfig:
    epochs: int
    batch_size: int
    seed: int
    workdir: Path
    checkpoint_every: int = 500     # steps between mid-epoch checkpoints
    log_every: int = 20             # steps between progress-bar updates (each one syncs with the host)
    max_to_keep: int = 2


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The permutation of the training set used in ``epoch`` (deterministic in seed and epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def check_run_config(workdir: Path, run_config: dict[str, Any] | None, has_checkpoints: bool) -> None:
    """Records ``run_config`` in a new work folder; refuses to resume one recorded with another configuration.

    Raises:
      RunConfigError: the folder's recorded configuration differs (the message names each differing field,
        stored and requested value), or it holds checkpoints without any record.
    """
    if run_config is None:
        return
    workdir = Path(workdir)
    path = workdir / RUN_CONFIG_FILE
    wanted = json.loads(json.dumps(run_config, sort_keys=True, default=str))    # as it reads back from JSON
    if path.is_file():
        diffs = config_differences(json.loads(path.read_text()), wanted, "in the folder")
        if diffs:
            raise RunConfigError(
                f"{workdir} holds a run of another configuration; it cannot be resumed with this one:\n  "
                + "\n  ".join(diffs)
                + "\nUse another --workdir, or --fresh to discard that run and start this one from scratch.")
        return
    if has_checkpoints:
        raise RunConfigError(f"{workdir} holds checkpoints but no {RUN_CONFIG_FILE} recording their configuration, "
                             "so they cannot be resumed safely; use another --workdir, or --fresh to discard them")
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def config_differences(stored: dict[str, Any], wanted: dict[str, Any], where: str) -> list[str]:
    """One line per (dotted) field whose value differs between two nested configurations."""
    flat_stored, flat_wanted = _flatten(stored), _flatten(wanted)
    return [f"{k}: {flat_stored.get(k, '<absent>')!r} {where}, {flat_wanted.get(k, '<absent>')!r} now"
            for k in sorted(set(flat_stored) | set(flat_wanted)) if flat_stored.get(k) != flat_wanted.get(k)]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def fit(config: LoopConfig, state: TrainState, update_fn, arrays: dict[str, np.ndarray],
        evaluate: Callable[[Any], dict[str, float]] | None = None, desc: str = "train",
        run_config: dict[str, Any] | None = None) -> tuple[TrainState, list]:
    """Runs (or resumes) training for ``config.epochs`` epochs over ``arrays`` (same-length NumPy arrays).

    Args:
      config: loop settings; ``config.workdir`` holds the resumable checkpoints.
      state: the freshly initialised state; replaced by the latest checkpoint in ``workdir`` if there is one.
      update_fn: from :func:`make_update_fn`.
      arrays: e.g. ``{"image": (N, H, W, C), "label": (N,)}``; batches are dicts of the same keys.
      evaluate: params -> metrics, run at the end of every epoch (validation).
      desc: progress-bar label.
      run_config: JSON-able description of everything that determines the run (model, seed, optimiser and
        data settings); recorded in the work folder and compared on resume (:func:`check_run_config`). Leave
        out what may change between invocations (e.g. the epoch count when the schedule does not depend on it).

    Returns:
      The final state and the per-epoch records of the whole run, restarts included (train metrics averaged
      over the epoch's steps run in the last attempt, eval metrics, seconds).
    """
    n = len(next(iter(arrays.values())))
    steps_per_epoch = n // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{n} training examples is fewer than one batch of {config.batch_size}")
    total_steps = steps_per_epoch * config.epochs

    manager = ocp.CheckpointManager(
        Path(config.workdir).resolve() / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=config.max_to_keep, create=True),
    )
    history_path = Path(config.workdir) / "history.jsonl"
    latest = manager.latest_step()
    try:
        check_run_config(config.workdir, run_config, latest is not None)
    except RunConfigError:
        manager.close()
        raise
    if latest is not None and latest > total_steps:
        manager.close()
        raise RunConfigError(f"{config.workdir} holds a run at step {latest}, past the {total_steps} steps of "
                             f"{config.epochs} epochs requested now; ask for at least "
                             f"{-(-latest // steps_per_epoch)} epochs, or use another --workdir or --fresh")
    if latest is not None:
        state = manager.restore(latest, args=ocp.args.StandardRestore(jax.device_get(state)))
        state = TrainState(*state)
        log.info("resumed from %s at step %d", config.workdir, int(state.step))
        print(f"resuming {desc} from step {int(state.step)} ({config.workdir})")

    def save(force: bool = False):
        step = int(state.step)
        if manager.latest_step() != step:
            manager.save(step, args=ocp.args.StandardSave(jax.device_get(state)), force=force)

    with _terminate_as_exit():
        try:
            start_step = int(state.step)
            for epoch in range(start_step // steps_per_epoch, config.epochs):
                order = epoch_order(config.seed, epoch, n)
                first = int(state.step) - epoch * steps_per_epoch
                sums: dict[str, jnp.ndarray] = {}
                t0 = time.perf_counter()
                bar = tqdm(range(first, steps_per_epoch), desc=f"{desc} epoch {epoch + 1}/{config.epochs}",
                           initial=first, total=steps_per_epoch, leave=False, dynamic_ncols=True, mininterval=1.0)
                for i in bar:
                    idx = order[i * config.batch_size:(i + 1) * config.batch_size]
                    batch = {k: v[idx] for k, v in arrays.items()}
                    state, metrics = update_fn(state, batch)
                    sums = metrics if not sums else jax.tree.map(jnp.add, sums, metrics)
                    if (i + 1) % config.log_every == 0:
                        done = i + 1 - first
                        bar.set_postfix({k: f"{float(v) / done:.4f}" for k, v in sums.items()})
                    if (i + 1) % config.checkpoint_every == 0 and i + 1 < steps_per_epoch:
                        save()
                bar.close()
                record = {"epoch": epoch + 1, "step": int(state.step), "seconds": time.perf_counter() - t0}
                done = steps_per_epoch - first
                record.update({f"train_{k}": float(v) / done for k, v in sums.items()})
                if evaluate is not None:
                    record.update({f"val_{k}": float(v) for k, v in evaluate(state.params).items()})
                with open(history_path, "a") as f:
                    f.write(_json_line(record))
                print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
                save()
        finally:  # on normal exit, Ctrl-C, SIGTERM or an error: keep what has been computed
            save(force=True)
            manager.wait_until_finished()
            manager.close()
    assert int(state.step) == total_steps, (int(state.step), total_steps)
    return state, read_history(history_path)


def read_history(path: Path) -> list[dict]:
    """Per-epoch records of a run, across restarts (the last record of each epoch wins)."""
    if not Path(path).is_file():
        return []
    records = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["epoch"]] = record
    return [records[e] for e in sorted(records)]


@contextlib.contextmanager
def _terminate_as_exit():
    """Turns SIGTERM (kill, job schedulers) into SystemExit so that ``fit`` saves before the process ends."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _json_line(record: dict) -> str:
    return json.dumps(record) + "\n"
