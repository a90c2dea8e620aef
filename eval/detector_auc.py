"""ROC AUC of every detector score on natural vs adversarial images of an eval.tables run.

    python -m eval.detector_auc --dataset mnist --results results/mnist-quick

Measures which MI reading and temperature separates natural from adversarial inputs (docs/design.md,
section 5), beside MagNet's own detectors. Inputs:

* the attack cells of an :mod:`eval.tables` run (``<results>/table.json`` and ``<results>/cache/*.npz``):
  for every (attack, kappa) cell, the adversarial examples whose attack succeeded (positives);
* natural inputs: the first ``n_natural`` (default 1,000, the MI detector's calibration set) validation
  images (negatives);
* the networks of the run (``--checkpoints``, else the run's own ``--checkpoints``, else the default); the
  cache key of each cell (a hash of the attack settings, the attacked indices, the classifier's weights and
  the data files) is recomputed and must match, so adversarial examples are never scored against another
  classifier than the one they were crafted on.

Scores (larger = more suspicious; defined in :mod:`eval.scoring`): MagNet's detectors from the dataset's preset,
and the MI detector at each temperature T as ``dJ_<reading>_T<T>`` (d_J = 1 - I(X;Y)/H(X,Y)), ``MI_<reading>_T<T>``
(I(X;Y)) under both readings and ``HXgY_T<T>`` (H(X|Y)), all from one shared forward pass per batch.

Metrics per score and cell (and pooled over the kappas of each attack): ROC AUC (Mann-Whitney, ties count
1/2; AUC < 0.5 means the score is *lower* on adversarial inputs and 1 - AUC is the AUC of the reversed
score) and the TPR at FPR 0.5% with the threshold calibrated on the natural scores (MagNet's rule:
n = floor(N r), threshold = the n-th largest natural score, flag iff score >= threshold), in both
directions (``tpr`` for "larger = adversarial", ``tpr_reversed`` for "smaller = adversarial").

Outputs: a Markdown report on stdout and in ``--md`` (default ``<results>/detector_auc.md``); JSON with
``--json`` (default ``<results>/detector_auc.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from eval import protocol
from eval.scoring import (DEFAULT_FPR, DEFAULT_N_NATURAL, DEFAULT_TEMPERATURES, AnalysisError, analyse, load_cells,
                          flatten_scores, make_score_fn, read_table, run_checkpoints, score_names)
from magnet_mi_jax import checkpoint, cli, data, datasets
from magnet_mi_jax.attacks import registry
from magnet_mi_jax.detectors import map_batches
from magnet_mi_jax.detectors.mi import READINGS

__all__ = ["render_markdown", "run", "main"]

# --------------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------------


def _fmt(m: Mapping[str, Any]) -> str:
    if m["auc"] is None:
        return "-"
    return f"{m['auc']:.3f} / {100 * m['tpr']:.1f}"


def render_markdown(result: Mapping[str, Any]) -> str:
    """Per-attack tables (rows: scores; columns: kappa and pooled) of "AUC / TPR% at the FPR"."""
    fpr_pct = 100 * result["fpr"]
    names = result["scores"]
    lines = [f"# Detector ROC AUC on {result['dataset']}: natural vs successful adversarial examples", "",
             f"Natural: the first {result['n_natural']} validation images. Adversarial: the successful examples "
             f"of each cell of `{result['table_json']}`{' (QUICK PRESET run)' if result['quick'] else ''}. "
             f"Each entry: ROC AUC / TPR (%) at FPR {fpr_pct:g}% (threshold from the natural scores), larger "
             "score = adversarial. AUC < 0.5: the score is lower on adversarial inputs (1 - AUC for the reversed "
             "score; its TPR is in the JSON as `tpr_reversed`).", ""]
    lines += [f"> warning: {w}" for w in result.get("warnings", [])] + ([""] if result.get("warnings") else [])
    pooled = result["pooled"]
    attacks = list(pooled)
    header = ["score"] + [f"{registry.title(a)} (n={pooled[a]['n_adversarial']})" for a in attacks]
    lines += ["## Pooled over kappa", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_fmt(pooled[a]["scores"][name]) for a in attacks) + " |")
    lines += ["", "Best score by AUC (pooled): " + "; ".join(
        f"{registry.title(a)}: {_best(pooled[a]['scores'])}" for a in attacks), ""]
    for attack in attacks:
        keys = [k for k, c in result["cells"].items() if c["attack"] == attack]
        cols = [f"kappa {result['cells'][k]['kappa']:g} (n={result['cells'][k]['n_adversarial']})" for k in keys]
        header = ["score"] + cols + ["pooled"]
        lines += [f"## {registry.title(attack)}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for name in names:
            row = [_fmt(result["cells"][k]["scores"][name]) for k in keys] + [_fmt(pooled[attack]["scores"][name])]
            lines.append(f"| {name} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["Scores: " + "; ".join(f"`{n}` {d}" for n, d in names.items()) + ".", "",
              f"Commit `{result['git_commit']}`, device {result['device']}, wall time {result['wall_seconds']:.0f} s.",
              f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def _best(scores: Mapping[str, Mapping[str, Any]]) -> str:
    valid = {n: m["auc"] for n, m in scores.items() if m["auc"] is not None}
    if not valid:
        return "-"
    name = max(valid, key=valid.get)
    mi = {n: a for n, a in valid.items() if n.startswith(("dJ_", "MI_", "HXgY_"))}
    best_mi = max(mi, key=mi.get) if mi else None
    text = f"`{name}` {valid[name]:.3f}"
    if best_mi and best_mi != name:
        text += f" (best MI score `{best_mi}` {mi[best_mi]:.3f})"
    return text



# --------------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------------


def run(results: str | Path, *, dataset_name: str, checkpoints: str | None = None, data_dir: str | None = None,
        source: str = "auto", dataset: data.Dataset | None = None, n_natural: int = DEFAULT_N_NATURAL,
        temperatures: Sequence[float] = DEFAULT_TEMPERATURES, fpr: float = DEFAULT_FPR, batch_size: int = 250,
        check_cache_key: bool = True, command: str = "") -> dict[str, Any]:
    """Scores natural and adversarial images and returns the JSON result (no files written).

    Args:
      results: folder of an ``eval.tables`` run (``table.json`` and ``cache/``).
      dataset_name: ``"mnist"`` or ``"cifar10"``; must be the run's.
      checkpoints: trained weights; None uses the run's recorded ``--checkpoints`` (else the default folder).
      data_dir: official dataset files (default ``$MAGNET_MI_DATA_DIR``).
      source: ``"auto"``, ``"files"`` or ``"tfds"``.
      dataset: an already loaded :class:`~magnet_mi_jax.data.Dataset` (skips loading).
      n_natural: how many leading validation images are the natural inputs (N).
      temperatures: the MI temperatures T.
      fpr: false-positive rate r of the TPR (threshold: the floor(N r)-th largest natural score).
      batch_size: images per jitted pass (the conditional table runs K times as many rows).
      check_cache_key: refuse cells whose cache key does not match the loaded classifier and data.
      command: the command line, recorded in the result.

    Returns:
      The result: ``cells`` and ``pooled`` metrics (:func:`analyse`), ``scores`` (name -> description),
      ``natural_summary``, ``warnings`` (model cards that differ from those the run recorded) and provenance.

    Raises:
      AnalysisError: missing results folder, table.json or cache file; another dataset; too few validation
        images; a cache key that does not match the loaded classifier.
    """
    start = time.time()
    results = Path(results)
    table = read_table(results)
    if table["config"].get("dataset") != dataset_name:
        raise AnalysisError(f"{results / 'table.json'} is a {table['config'].get('dataset')} run, not {dataset_name}")
    ds = dataset if dataset is not None else data.load_dataset(dataset_name, data_dir=data_dir, source=source)
    if n_natural < 1 or n_natural > len(ds.val_x):
        raise AnalysisError(f"n_natural={n_natural}, but the validation split has {len(ds.val_x)} images")
    ckpt = checkpoints if checkpoints is not None else run_checkpoints(table)
    applies, params, cards = protocol.load_networks(dataset_name, ckpt)
    try:
        protocol.check_cards_against_data(cards, ds)
    except data.DataError as err:
        raise AnalysisError(str(err)) from err
    cells = load_cells(results, table, ds, params["classifier"], check_cache_key)
    warnings = []
    for name, card in cards.items():  # the cache key pins the classifier only; compare the other models' cards
        recorded = table.get("models", {}).get(name)
        loaded = protocol.card_summary(card)
        if recorded is not None and json.loads(json.dumps(loaded)) != recorded:
            warnings.append(f"model {name}: its card differs from the one the tables run recorded (retrained since?)")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)

    magnet = datasets.get(dataset_name).magnet
    temps = tuple(float(t) for t in temperatures)
    score_fn = make_score_fn(magnet, applies, temps)
    scores_of = lambda x: flatten_scores(map_batches(lambda v: score_fn(params, v), x, batch_size), temps)  # noqa: E731
    print(f"scoring {n_natural} natural validation images and the successful examples of {len(cells)} cells",
          file=sys.stderr)
    natural = scores_of(ds.val_x[:n_natural])
    empty = {name: np.zeros(0) for name in natural}
    adversarial = {}
    for (attack, kappa), cell in cells.items():
        success = cell["success"].astype(bool)
        adversarial[(attack, kappa)] = scores_of(cell["adv"][success]) if success.any() else empty
    for what, group in [("natural images", natural)] + [(f"cell {a}/{k:g}", s) for (a, k), s in adversarial.items()]:
        bad = [name for name, values in group.items() if not np.all(np.isfinite(values))]
        if bad:
            raise AnalysisError(f"scores {bad} are not finite on some {what}")
    metrics = analyse(natural, adversarial, fpr)
    return {
        "dataset": dataset_name, "results": str(results), "table_json": str(results / "table.json"),
        "quick": bool(table["config"].get("quick", False)), "n_natural": int(n_natural), "fpr": float(fpr),
        "temperatures": list(temps), "readings": list(READINGS), "checkpoints": ckpt,
        "scores": score_names(magnet, temps),
        "natural_summary": {n: {"mean": float(v.mean()), "median": float(np.median(v))} for n, v in natural.items()},
        **metrics,
        "models": {k: protocol.card_summary(c) for k, c in cards.items()},
        "warnings": warnings,
        **cli.provenance(command), "wall_seconds": round(time.time() - start, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_data_flags(parser, checkpoints_help="trained weights (default: the run's --checkpoints)")
    parser.add_argument("--results", required=True, help="folder of an eval.tables run (table.json and cache/)")
    parser.add_argument("--n-natural", dest="n_natural", type=int, default=DEFAULT_N_NATURAL)
    parser.add_argument("--temperatures", default=",".join(f"{t:g}" for t in DEFAULT_TEMPERATURES),
                        help="comma-separated MI temperatures")
    parser.add_argument("--fpr", type=float, default=DEFAULT_FPR)
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=250)
    parser.add_argument("--no-check-cache-key", dest="check_cache_key", action="store_false",
                        help="score cells even if their cache key does not match the loaded classifier")
    parser.add_argument("--json", default=None, help="JSON output (default <results>/detector_auc.json)")
    parser.add_argument("--md", default=None, help="Markdown output (default <results>/detector_auc.md)")
    cli.add_overwrite_flag(parser)
    args = parser.parse_args(argv)
    json_path = Path(args.json) if args.json else Path(args.results) / "detector_auc.json"
    md_path = Path(args.md) if args.md else Path(args.results) / "detector_auc.md"
    cli.refuse_to_overwrite([json_path, md_path], args.overwrite)
    try:
        temperatures = tuple(float(t) for t in args.temperatures.split(","))
    except ValueError:
        parser.error(f"--temperatures must be comma-separated numbers, got {args.temperatures!r}")
    command = cli.command_line("eval.detector_auc", argv)
    try:
        result = run(args.results, dataset_name=args.dataset, checkpoints=args.checkpoints, data_dir=args.data_dir,
                     source=args.source, n_natural=args.n_natural, temperatures=temperatures, fpr=args.fpr,
                     batch_size=args.batch_size, check_cache_key=args.check_cache_key, command=command)
    except (AnalysisError, checkpoint.CheckpointError, data.DataError) as err:
        parser.exit(2, f"error: {err}\n")
    md = render_markdown(result)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(md)
    print(md)
    print(f"wrote {md_path} and {json_path}", file=sys.stderr)
    return result


if __name__ == "__main__":
    cli.run_main(main)
