"""Reproduces the paper's Tables 1 and 2: ``python -m eval.tables --dataset mnist|cifar10 [--quick]``.

Protocol (Hsu et al. 2018, Section 4; docs/design.md, sections 3-6):

1. Load the shipped classifier, MagNet auto-encoders and conditional alpha-GAN (``--checkpoints``); a missing
   model is an error naming the command that trains it, or is trained with ``--train-missing``.
2. Select ``n_images`` correctly classified test images by a seeded shuffle (:func:`data.select_attack_indices`).
3. Calibrate the thresholds on the validation split: MagNet's detectors at their false-positive rates on the
   5,000 validation images, the MI detector at r = 0.005 on the first 1,000.
4. Clean accuracy on the 10,000 test images: no defense, MagNet, MI-strengthened MagNet.
5. For every attack (C&W-L2, EAD with the L1 rule, EAD with the EN rule) and every kappa of the grid, craft
   untargeted adversarial examples on the bare classifier (oblivious setting) and measure both defenses:
   an example counts as correct if any detector flags it or the reformed input is classified correctly.

Outputs in ``--out`` (default ``results/<dataset>/``, or ``results/<dataset>-quick/`` with ``--quick``):
``table.md`` (the paper's layout; the paper's number and our difference beside every cell), ``table.csv``,
``table.json`` (per-cell metrics, clean accuracy, config, seed, selected-index hash, data md5s, git commit,
device, wall time) and ``accuracy_vs_kappa.png``.

Adversarial examples are computed and cached as **shards** (:mod:`eval.protocol`): one attack run x one kappa
x one slice of ``shard_size`` attacked images, in ``<out>/cache/`` (or ``--cache``), named by a hash of
everything that determines them, so a fresh clone finds committed shards. A run resumes at the first missing shard, prints shards done / total with an ETA from the measured shard times,
and writes the table once every shard exists (``--partial``: a clearly labelled table from the shards
present). ``--worker I/N`` crafts only every N-th shard (from the I-th), so N processes can share one
campaign; any of them assembles the table once the shards are all there.

Fidelity to the code the paper ran (recorded in ``table.json``'s config): C&W-L2 with abort-early on, as the
C&W reference code runs it (judged per example here); EAD with abort-early off and FISTA's momentum
``(k+1)/(k+4)`` as the EAD reference code computes it (``--ead-momentum textbook`` for ``k/(k+3)``).

Expected runtime: ``--quick`` on MNIST about 30 minutes on a 2-core CPU. The full MNIST protocol is 180
shards of 100 images (2 attack runs x 9 kappas x 10 slices): about 15-20 hours on a 2-core CPU, minutes on a
GPU (there, ``--shard-size 1000 --kappas-per-call 0`` runs it in two calls).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from magnet_mi_jax import checkpoint, cli, data, datasets
from magnet_mi_jax.attacks import EAD_MOMENTA, registry
from magnet_mi_jax.detectors import calibrate, make_defense_fn, map_batches
from magnet_mi_jax.utils import device_description

from eval.protocol import (DEFENSES, AttackJob, Shard, TablesConfig, assemble_cell, cache_context, card_summary,
                           check_cards_against_data, clean_row, evaluate_cell, load_networks, load_shard,
                           parse_worker, plan_jobs, plan_shards, protocol, run_job, save_shard, shard_path)
from eval.report import paper_clean, paper_tables, plot, render_csv, render_markdown

def train_missing_network(dataset: str, name: str, *, checkpoints: str | None, data_dir: str | None) -> None:
    """Trains a network that has no weights with its training entry point (``--train-missing``)."""
    common = ["--dataset", dataset] + (["--checkpoints", checkpoints] if checkpoints else []) + (
        ["--data-dir", data_dir] if data_dir else [])
    config = datasets.get(dataset)
    print(f"training missing model {dataset}/{name} ({config.train_command(name)})")
    kind = config.networks[name].kind
    if kind == "classifier":
        from train import classifier
        classifier.main(common)
    elif kind == "generator":
        from train import generator
        generator.main(common)
    else:
        from train import autoencoder
        autoencoder.main(common + ["--which", name])


# --------------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------------


def _log_timing(cache_dir: Path, job: AttackJob, seconds: float, config: TablesConfig, commit: str) -> None:
    """Appends one line per attack call to ``<cache>/timings.jsonl`` (the campaign's measured costs); ``commit``
    is the git commit of the code the process loaded (read at its start, not at each call)."""
    record = {"family": job.family, "kappas": list(job.kappas), "images": [job.start, job.stop],
              "seconds": round(seconds, 2), "iterations": registry.get(job.family).settings(config).get("iterations"),
              "search_steps": config.search_steps, "device": device_description(), "git_commit": commit,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(cache_dir / "timings.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


SPLIT_ONLY = ("shard_size", "kappas_per_call")   # how the work is split: never part of a result's identity


def check_overwrite(out: Path, config: TablesConfig, overwrite: bool) -> None:
    """Refuses (unless ``overwrite``) to replace ``out/table.json`` written for another configuration.

    Raises:
      OverwriteError: naming the folder, each differing setting and the ways out.
    """
    path = Path(out) / "table.json"
    if overwrite or not path.is_file():
        return
    try:
        stored = json.loads(path.read_text()).get("config", {})
    except json.JSONDecodeError:
        stored = {}
    wanted = json.loads(json.dumps(dataclasses.asdict(config)))
    diffs = [f"{k}: {stored.get(k)!r} there, {v!r} now" for k, v in sorted(wanted.items())
             if k not in SPLIT_ONLY and stored.get(k) != v]
    if diffs:
        raise cli.OverwriteError(f"{path} holds a table of another configuration:\n  " + "\n  ".join(diffs) +
                             "\nWrite elsewhere with --out DIR, or pass --overwrite to replace it.")
    print(f"{path} exists with the same configuration: it will be rewritten from the shards")


def run(config: TablesConfig, out: Path, *, data_dir: str | None = None, source: str = "auto",
        checkpoints: str | None = None, train_missing: bool = False, command: str = "",
        dataset: data.Dataset | None = None, eval_batch: int = 500, partial: bool = False,
        worker: tuple[int, int] = (0, 1), overwrite: bool = False, cache_dir: str | Path | None = None,
        wait_seconds: float = 0.0, craft: bool = True) -> dict[str, Any]:
    """Runs the protocol and writes every output into ``out``; returns the JSON result.

    Crafts the missing shards (with ``worker=(i, n)`` only every n-th, from the i-th), then writes the table
    if every shard exists, or with ``partial`` a labelled table from the shards present; otherwise returns
    ``{"complete": False, ...}`` and writes no table. Shards live in ``cache_dir`` (default ``out/cache``);
    runs that share it share every shard they have in common (same settings, images and classifier).
    With ``wait_seconds`` > 0 a run whose own share is done waits up to that long for the other workers'
    shards to appear in the cache, then assembles the table. ``craft=False`` crafts nothing (with ``partial``:
    a labelled table of the shards present, to watch a campaign that another process is computing).
    """
    start = time.time()
    made_by = cli.provenance(command)    # the code this process runs, whatever HEAD becomes while it runs
    commit = made_by["git_commit"]
    out = Path(out)
    check_overwrite(out, config, overwrite)
    ds = dataset if dataset is not None else data.load_dataset(config.dataset, data_dir=data_dir, source=source)
    on_missing = (functools.partial(train_missing_network, checkpoints=checkpoints, data_dir=data_dir)
                  if train_missing else None)
    applies, params, cards = load_networks(config.dataset, checkpoints, on_missing=on_missing)
    check_cards_against_data(cards, ds)

    magnet = datasets.get(config.dataset).magnet
    spec = datasets.get(config.dataset).mi_magnet(reading=config.mi_reading, temperature=config.mi_temperature)
    forward = make_defense_fn(spec, applies)
    run_defense = lambda x: forward(params, x)  # noqa: E731

    # The attacked images: correctly classified by the bare classifier (its forward pass alone takes seconds),
    # so that every shard on disk is checked, and the missing ones crafted, before the defense's calibration.
    classify = jax.jit(applies["classifier"])
    test_pred = map_batches(lambda x: classify(params["classifier"], x), ds.test_x, eval_batch).argmax(-1)
    indices = data.select_attack_indices(ds.test_y, test_pred, config.n_images, config.seed)
    x_att, y_att = ds.test_x[indices], ds.test_y[indices]
    context = cache_context(config.dataset, ds, indices, params["classifier"])

    # Every shard on disk is checked here, before any long computation.
    cache_dir = out / "cache" if cache_dir is None else Path(cache_dir)
    shards = plan_shards(config)
    paths = {shard: shard_path(cache_dir, config, shard, context, indices) for shard in shards}
    crafted = {shard: load_shard(paths[shard], shard, ds.image_shape) for shard in shards}
    missing = [shard for shard in shards if crafted[shard] is None]
    worker_index, workers = worker
    mine = [shard for i, shard in enumerate(shards)
            if craft and crafted[shard] is None and i % workers == worker_index]
    jobs = plan_jobs(config, mine)
    print(f"{len(shards) - len(missing)} of {len(shards)} shards present in {cache_dir}; "
          f"crafting {len(mine)} in {len(jobs)} calls" + (f" (worker {worker_index}/{workers})" if workers > 1 else ""))
    made: set[Shard] = set()
    seconds: dict[str, list[float]] = {}
    for n, job in enumerate(jobs):
        t0 = time.time()
        new = run_job(job, applies["classifier"], params["classifier"], x_att, y_att, config)
        took = time.time() - t0
        for kappa, cells in new.items():
            shard = Shard(job.family, kappa, job.index, job.start, job.stop)
            save_shard(paths[shard], cells)
            crafted[shard] = cells
            made.add(shard)
        seconds.setdefault(job.family, []).append(took / len(job.kappas))
        _log_timing(cache_dir, job, took, config, commit)
        left = jobs[n + 1:]
        per_shard = {f: float(np.mean(v)) for f, v in seconds.items()}
        fallback = float(np.mean([t for v in seconds.values() for t in v]))
        eta = sum(per_shard.get(j.family, fallback) * len(j.kappas) for j in left)
        done = sum(c is not None for c in crafted.values())
        print(f"[{done}/{len(shards)} shards] {job.family} kappa {','.join(f'{k:g}' for k in job.kappas)} "
              f"images {job.start}-{job.stop}: {took:.0f} s; this run's remaining {len(left)} calls: "
              f"ETA {eta / 3600:.2f} h", flush=True)

    absent = [shard for shard in shards if crafted[shard] is None]
    deadline = time.time() + wait_seconds
    while absent and time.time() < deadline:          # the other workers' shards, as they land
        time.sleep(min(5.0, max(deadline - time.time(), 0.0)))
        for shard in absent:
            crafted[shard] = load_shard(paths[shard], shard, ds.image_shape)
        absent = [shard for shard in shards if crafted[shard] is None]
    if absent and not partial:
        print(f"{len(absent)} of {len(shards)} shards are still missing (other workers' share, or an interrupted "
              "run): rerun the same command to finish them, or add --partial for a labelled partial table")
        return {"complete": False, "shards_done": len(shards) - len(absent), "shards_total": len(shards)}

    # Natural images: thresholds on validation, clean accuracy on test.
    print(f"calibrating on {len(ds.val_x)} validation images and measuring {len(ds.test_x)} test images")
    val = map_batches(run_defense, ds.val_x, eval_batch)
    thresholds = calibrate(spec, val.scores, allow_fewer=len(ds.val_x) < ds.config.validation_size)
    test = map_batches(run_defense, ds.test_x, eval_batch)
    clean = {**clean_row(magnet, spec, test, ds.test_y, thresholds), "paper": paper_clean(config.dataset)}

    natural_scores = {n: test.scores[n][indices] for n in spec.detector_names}

    # Evaluate both defenses on every cell (with --partial: on the images whose shards exist).
    paper = paper_tables(config.dataset)
    cells: dict[str, Any] = {}
    keys = [(a, k) for a in config.attacks for k in config.kappas]
    bar = tqdm(keys, desc="defenses on cells", dynamic_ncols=True)
    for attack, kappa in bar:
        present = [s for s in shards if s.family == registry.run_of(attack).name and s.kappa == kappa
                   and crafted[s] is not None]
        if not present:
            continue
        rows_idx = np.concatenate([np.arange(s.start, s.stop) for s in present])
        cell = assemble_cell([crafted[s] for s in present], attack)
        outputs = map_batches(run_defense, cell["adv"], eval_batch)
        row = evaluate_cell(outputs, thresholds, magnet, spec, y_att[rows_idx], cell,
                            {n: v[rows_idx] for n, v in natural_scores.items()})
        row.update(attack=attack, kappa=kappa, shards=[paths[s].name for s in present],
                   cached=not any(s in made for s in present),
                   paper={d: paper.get((d, attack, kappa)) for d in DEFENSES})
        cells[f"{attack}/{kappa:g}"] = row
        bar.set_postfix(magnet=row["magnet"]["accuracy"], mi=row["mi_magnet"]["accuracy"],
                        success=row["attack_success_rate"])
    bar.close()

    result = {
        "dataset": config.dataset, "quick": config.quick, "complete": not absent,
        "shards_done": len(shards) - len(absent), "shards_total": len(shards),
        "deviations_from_paper": {k: list(v) for k, v in config.deviations().items()},
        "cache": os.path.relpath(cache_dir.resolve(), out.resolve()),
        "config": dataclasses.asdict(config), "seed": config.seed,
        "indices_hash": context["indices"], "indices": indices.tolist(), "data_md5": ds.md5,
        "data_source": ds.source, **made_by, "wall_seconds": round(time.time() - start, 1), "thresholds": thresholds,
        "clean_accuracy": clean, "cells": cells,
        "models": {k: card_summary(c) for k, c in cards.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (out / "table.md").write_text(render_markdown(result))
    (out / "table.csv").write_text(render_csv(result))
    plot(result, out / "accuracy_vs_kappa.png")
    return result


def distributed_worker(coordinator: str | None = None, num_processes: int | None = None,
                       process_id: int | None = None) -> tuple[int, int]:
    """Joins the ``jax.distributed`` job and returns this process's ``(index, count)`` as a worker.

    Each process crafts its share of the shards on its own local devices (the attacks shard a batch over
    ``jax.local_devices()``) into the shared cache folder; nothing else is exchanged between processes.
    """
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return jax.process_index(), jax.process_count()


def build_config(args: argparse.Namespace) -> TablesConfig:
    try:
        config = protocol(args.dataset, quick=args.quick)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    changes: dict[str, Any] = {}
    for name in ("n_images", "iterations", "cw_iterations", "search_steps", "seed", "shard_size", "kappas_per_call",
                 "ead_momentum", "mi_reading", "mi_temperature"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.cw_abort_early is not None:
        changes["cw_abort_early"] = args.cw_abort_early == "on"
    if args.kappas is not None:
        try:
            changes["kappas"] = tuple(float(k) for k in args.kappas.split(","))
        except ValueError:
            raise SystemExit(f"error: --kappas takes comma-separated numbers, e.g. 0,10,20; got {args.kappas!r}") from None
    if args.attacks is not None:
        unknown = set(args.attacks.split(",")) - set(registry.cell_names())
        if unknown:
            raise SystemExit(f"error: unknown attacks {sorted(unknown)}; choose from {registry.cell_names()}")
        changes["attacks"] = tuple(args.attacks.split(","))
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_data_flags(parser)
    parser.add_argument("--quick", action="store_true", help="the reduced CPU preset (labelled in every output)")
    parser.add_argument("--out", default=None, help="output folder (default results/<dataset>[-quick]/)")
    parser.add_argument("--train-missing", action="store_true", help="train models that have no checkpoint")
    parser.add_argument("--n-images", dest="n_images", type=int, default=None,
                        help="attacked images (default 1,000; --quick: MNIST 100, CIFAR-10 50)")
    parser.add_argument("--kappas", default=None,
                        help="comma-separated kappa grid, e.g. 0,10,20 (default MNIST 0,5,...,40, CIFAR-10 "
                             "0,10,...,80; --quick: MNIST 0,10,...,40, CIFAR-10 0,20,40,80)")
    parser.add_argument("--attacks", default=None, help=f"comma-separated subset of {','.join(registry.cell_names())}")
    parser.add_argument("--iterations", type=int, default=None,
                        help="iterations per search step (default 1,000; --quick: MNIST 100, CIFAR-10 50)")
    parser.add_argument("--cw-iterations", dest="cw_iterations", type=int, default=None,
                        help="C&W's iterations per search step, if not --iterations (--quick MNIST: 1,000)")
    parser.add_argument("--search-steps", dest="search_steps", type=int, default=None,
                        help="binary-search steps over c (default 9; --quick CIFAR-10: 6)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the attacked-image selection (default 0)")
    parser.add_argument("--shard-size", dest="shard_size", type=int, default=None,
                        help="attacked images per shard, the unit of work and caching (default 100; "
                             "another size makes other shards)")
    parser.add_argument("--kappas-per-call", dest="kappas_per_call", type=int, default=None,
                        help="kappas folded into one attack call (0: the whole grid; default 1). More uses a GPU "
                             "better; an interrupted run loses at most one call")
    parser.add_argument("--cw-abort-early", dest="cw_abort_early", choices=("on", "off"), default=None,
                        help="C&W's abort-early (default on, as the C&W reference code)")
    parser.add_argument("--ead-momentum", dest="ead_momentum", choices=EAD_MOMENTA, default=None,
                        help="FISTA momentum of EAD (default reference: (k+1)/(k+4), as the EAD code computes it)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a table of another configuration in --out (default: refuse)")
    parser.add_argument("--cache", default=None,
                        help="folder of the attack shards (default <out>/cache); runs sharing it reuse each "
                             "other's shards where settings, images and classifier agree")
    parser.add_argument("--partial", action="store_true",
                        help="write a labelled table from the shards present even if some are missing")
    parser.add_argument("--no-craft", dest="craft", action="store_false",
                        help="craft no shard: with --partial, a labelled table of the shards present (to watch a "
                             "campaign another process computes)")
    parser.add_argument("--worker", default="0/1",
                        help="I/N: craft only every N-th missing shard, from the I-th (N processes, one cache)")
    parser.add_argument("--distributed", action="store_true",
                        help="run as one process of a jax.distributed job (coordinator and process count from "
                             "--coordinator/--num-processes/--process-id or the cluster's environment): process "
                             "i of n crafts its share of the shards, process 0 waits for the rest and writes the "
                             "table")
    parser.add_argument("--coordinator", default=None, help="with --distributed: host:port of process 0")
    parser.add_argument("--num-processes", dest="num_processes", type=int, default=None)
    parser.add_argument("--process-id", dest="process_id", type=int, default=None)
    parser.add_argument("--wait-hours", dest="wait_hours", type=float, default=48.0,
                        help="with --distributed: how long process 0 waits for the other processes' shards")
    parser.add_argument("--mi-reading", dest="mi_reading", choices=("literal", "consistent"), default=None)
    parser.add_argument("--mi-temperature", dest="mi_temperature", type=float, default=None)
    args = parser.parse_args(argv)
    config = build_config(args)
    try:
        worker = parse_worker(args.worker)
    except ValueError as err:
        parser.error(str(err))
    wait = 0.0
    if args.distributed:
        worker = distributed_worker(args.coordinator, args.num_processes, args.process_id)
        wait = 3600.0 * args.wait_hours if worker[0] == 0 else 0.0
    out = Path(args.out) if args.out else Path("results") / (args.dataset + ("-quick" if config.quick else ""))
    command = cli.command_line("eval.tables", argv)
    try:
        result = run(config, out, data_dir=args.data_dir, source=args.source, checkpoints=args.checkpoints,
                     train_missing=args.train_missing, command=command, partial=args.partial, worker=worker,
                     overwrite=args.overwrite, cache_dir=args.cache, wait_seconds=wait, craft=args.craft)
    except (checkpoint.CheckpointError, data.DataError, cli.OverwriteError) as err:   # one line, exit status 2
        parser.exit(2, f"error: {err}\n")
    if not result["complete"] and "cells" not in result:
        return result
    print(render_markdown(result))
    print(f"wrote {out}/table.md, table.csv, table.json, accuracy_vs_kappa.png")
    return result


if __name__ == "__main__":
    main()
