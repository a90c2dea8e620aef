"""ROC AUC of every detector score on natural vs adversarial images of an eval.tables run.

    python -m eval.detector_auc --dataset mnist --results results/mnist-quick

Measures which MI reading and temperature separates natural from adversarial inputs (docs/design.md,
section 5), beside MagNet's own detectors. Inputs:

* the attack cells of an :mod:`eval.tables` run (``<results>/table.json`` and ``<results>/cache/*.npz``):
  for every (attack, kappa) cell, the adversarial examples whose attack succeeded (positives), and, as a
  second reading, all the cell's outputs (a failed attack returns its original image, so these positives
  include unperturbed test images: the detection rate a defender sees against the attacker, not against
  its successes);
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
score) and the TPR at each false-positive rate r of ``--fpr`` (default 0.5%, MagNet's rate, and 5%) with the
threshold calibrated on the natural scores (MagNet's rule: n = floor(N r), threshold = the n-th largest
natural score, flag iff score >= threshold), in both directions (``tpr`` for "larger = adversarial",
``tpr_reversed`` for "smaller = adversarial").

Outputs: a Markdown report on stdout and in ``--md`` (default ``<results>/detector_auc.md``); JSON with
``--json`` (default ``<results>/detector_auc.json``): ``cells`` and ``pooled`` on the successful examples,
``all_examples`` the same on all of them; the ROC curves pooled over kappa in ``--roc``
(default ``<results>/detector_roc.png``): one row per attack, successful and all examples side by side,
MagNet's detectors and d_J under both readings at each T, on a logarithmic FPR axis with the rates marked.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from eval import protocol
from eval.scoring import (DEFAULT_FPRS, DEFAULT_N_NATURAL, DEFAULT_TEMPERATURES, AnalysisError, analyse, load_cells,
                          flatten_scores, make_score_fn, pool_over_kappa, rate_key, rates_of, read_table,
                          run_checkpoints, score_names)
from magnet_mi_jax import checkpoint, cli, data, datasets
from magnet_mi_jax.attacks import registry
from magnet_mi_jax.detectors import map_batches, roc_auc, roc_curve
from magnet_mi_jax.detectors.mi import READINGS

__all__ = ["render_markdown", "plot_roc", "run", "main"]

# --------------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------------


def _fmt(m: Mapping[str, Any], rates: Sequence[str]) -> str:
    if m["auc"] is None:
        return "-"
    return " / ".join([f"{m['auc']:.3f}"] + [f"{100 * m['at_fpr'][r]['tpr']:.1f}" for r in rates])


def _pooled_table(pooled: Mapping[str, Any], names: Sequence[str], rates: Sequence[str]) -> list[str]:
    attacks = list(pooled)
    header = ["score"] + [f"{registry.title(a)} (n={pooled[a]['n_adversarial']})" for a in attacks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_fmt(pooled[a]["scores"][name], rates) for a in attacks) + " |")
    return lines + ["", "Best score by AUC (pooled): " + "; ".join(
        f"{registry.title(a)}: {_best(pooled[a]['scores'])}" for a in attacks), ""]


def render_markdown(result: Mapping[str, Any]) -> str:
    """Per-attack tables (rows: scores; columns: kappa and pooled) of "AUC / TPR% at each FPR"."""
    rates = [rate_key(r) for r in result["fprs"]]
    at = " / ".join(f"TPR (%) at FPR {100 * r:g}%" for r in result["fprs"])
    names = result["scores"]
    lines = [f"# Detector ROC AUC on {result['dataset']}: natural vs adversarial examples", "",
             f"Natural: the first {result['n_natural']} validation images. Adversarial: the successful examples "
             f"of each cell of `{result['table_json']}`{' (QUICK PRESET run)' if result['quick'] else ''} "
             "(and, in the last section, all its outputs). "
             f"Each entry: ROC AUC / {at} (thresholds from the natural scores), larger "
             "score = adversarial. AUC < 0.5: the score is lower on adversarial inputs (1 - AUC for the reversed "
             "score; its TPR is in the JSON as `tpr_reversed`). ROC curves: "
             f"`{result['roc_figure'] or 'not drawn'}`.", ""]
    lines += [f"> warning: {w}" for w in result.get("warnings", [])] + ([""] if result.get("warnings") else [])
    lines += ["## Successful examples, pooled over kappa", ""] + _pooled_table(result["pooled"], names, rates)
    for attack in result["pooled"]:
        keys = [k for k, c in result["cells"].items() if c["attack"] == attack]
        cols = [f"kappa {result['cells'][k]['kappa']:g} (n={result['cells'][k]['n_adversarial']})" for k in keys]
        header = ["score"] + cols + ["pooled"]
        lines += [f"## {registry.title(attack)}: successful examples", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for name in names:
            row = [_fmt(result["cells"][k]["scores"][name], rates) for k in keys]
            lines.append(f"| {name} | " + " | ".join(row + [_fmt(result["pooled"][attack]["scores"][name], rates)])
                         + " |")
        lines.append("")
    lines += ["## All examples (failed attacks included: their outputs are the original images), pooled over "
              "kappa", "", "Per cell in the JSON (`all_examples`).", ""]
    lines += _pooled_table(result["all_examples"]["pooled"], names, rates)
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



def _is_magnet_score(name: str) -> bool:
    return not name.startswith(("dJ_", "MI_", "HXgY_"))


def plot_roc(natural: Mapping[str, np.ndarray], groups: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
             temperatures: Sequence[float], fprs: Sequence[float], path: str | Path, title: str) -> None:
    """ROC curves, one row per attack and one column per group of adversarial examples.

    Args:
      natural: score name -> (N,) natural scores.
      groups: group title (e.g. "successful") -> attack -> score name -> (M,) adversarial scores.
      temperatures: the T of the d_J curves drawn (both readings at each T, beside MagNet's detectors).
      fprs: rates marked on the (logarithmic) FPR axis. The points of :func:`roc_curve` are joined by
        straight lines (a tie between the two sets counts one half, as in the AUC).
      path: the PNG written.
      title: the figure's title.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    magnet_names = [n for n in natural if _is_magnet_score(n)]
    styles = {t: ls for t, ls in zip(temperatures, ("-", "--", ":", "-."))}
    curves = [(n, dict(color="black", lw=1.2, ls=("-", "--", ":")[i % 3])) for i, n in enumerate(magnet_names)]
    curves += [(f"dJ_{reading}_T{t:g}", dict(color=color, lw=1.0, ls=styles.get(t, "-")))
               for reading, color in (("literal", "tab:red"), ("consistent", "tab:blue")) for t in temperatures]
    attacks = list(next(iter(groups.values())))
    fig, axes = plt.subplots(len(attacks), len(groups), figsize=(4.6 * len(groups), 3.6 * len(attacks)),
                             squeeze=False)
    low = 1.0 / (2 * len(next(iter(natural.values()))))
    for j, (group, by_attack) in enumerate(groups.items()):
        for i, attack in enumerate(attacks):
            ax = axes[i, j]
            adversarial = by_attack[attack]
            n_adv = len(next(iter(adversarial.values())))
            for name, style in curves:
                if n_adv and name in natural:
                    auc = roc_auc(natural[name], adversarial[name])
                    ax.plot(*roc_curve(natural[name], adversarial[name]), label=f"{name} ({auc:.2f})", **style)
            for r in fprs:
                ax.axvline(r, color="gray", lw=0.6, ls=":")
            ax.set_xscale("log")
            ax.set_xlim(low, 1.0)
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{registry.title(attack)}, {group} (n={n_adv})", fontsize=9)
            ax.set_xlabel("false-positive rate (natural images)")
            ax.set_ylabel("true-positive rate")
            if n_adv:
                ax.legend(fontsize=6, loc="upper left")
    fig.suptitle(textwrap.fill(title, 110), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------------


def run(results: str | Path, *, dataset_name: str, checkpoints: str | None = None, data_dir: str | None = None,
        source: str = "auto", dataset: data.Dataset | None = None, n_natural: int = DEFAULT_N_NATURAL,
        temperatures: Sequence[float] = DEFAULT_TEMPERATURES, fprs: float | Sequence[float] = DEFAULT_FPRS,
        batch_size: int = 250, check_cache_key: bool = True, roc: str | Path | None = None,
        command: str = "") -> dict[str, Any]:
    """Scores natural and adversarial images and returns the JSON result (the ROC figure is its only file).

    Args:
      results: folder of an ``eval.tables`` run (``table.json`` and ``cache/``).
      dataset_name: ``"mnist"`` or ``"cifar10"``; must be the run's.
      checkpoints: trained weights; None uses the run's recorded ``--checkpoints`` (else the default folder).
      data_dir: official dataset files (default ``$MAGNET_MI_DATA_DIR``).
      source: ``"auto"``, ``"files"`` or ``"tfds"``.
      dataset: an already loaded :class:`~magnet_mi_jax.data.Dataset` (skips loading).
      n_natural: how many leading validation images are the natural inputs (N).
      temperatures: the MI temperatures T.
      fprs: false-positive rates r of the TPRs (threshold: the floor(N r)-th largest natural score); the
        first is the primary one (the JSON's top-level ``tpr``).
      batch_size: images per jitted pass (the conditional table runs K times as many rows).
      check_cache_key: refuse cells whose cache key does not match the loaded classifier and data.
      roc: where to draw the ROC curves (:func:`plot_roc`); None draws nothing.
      command: the command line, recorded in the result.

    Returns:
      The result: ``cells`` and ``pooled`` metrics (:func:`analyse`) on the successful examples,
      ``all_examples`` the same on every output, ``scores`` (name -> description), ``natural_summary``,
      ``warnings`` (model cards that differ from those the run recorded) and provenance.

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
    every, successful = {}, {}
    for (attack, kappa), cell in cells.items():
        every[(attack, kappa)] = scores_of(cell["adv"])
        success = cell["success"].astype(bool)
        successful[(attack, kappa)] = {name: values[success] for name, values in every[(attack, kappa)].items()}
    for what, group in [("natural images", natural)] + [(f"cell {a}/{k:g}", s) for (a, k), s in every.items()]:
        bad = [name for name, values in group.items() if not np.all(np.isfinite(values))]
        if bad:
            raise AnalysisError(f"scores {bad} are not finite on some {what}")
    fprs = rates_of(fprs)
    metrics = analyse(natural, successful, fprs)
    if roc is not None:
        quick = " (QUICK PRESET run)" if table["config"].get("quick", False) else ""
        plot_roc(natural, {"successful examples": pool_over_kappa(successful),
                           "all examples": pool_over_kappa(every)}, temps, fprs, roc,
                 f"{dataset_name}: ROC of each detector, {n_natural} natural validation images vs the examples of "
                 f"{results / 'table.json'}{quick}, pooled over kappa (AUC in brackets)")
    return {
        "dataset": dataset_name, "results": str(results), "table_json": str(results / "table.json"),
        "quick": bool(table["config"].get("quick", False)), "n_natural": int(n_natural), "fpr": fprs[0],
        "fprs": list(fprs), "roc_figure": None if roc is None else str(roc),
        "temperatures": list(temps), "readings": list(READINGS), "checkpoints": ckpt,
        "scores": score_names(magnet, temps),
        "natural_summary": {n: {"mean": float(v.mean()), "median": float(np.median(v))} for n, v in natural.items()},
        **metrics, "all_examples": analyse(natural, every, fprs),
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
    parser.add_argument("--fpr", default=",".join(f"{r:g}" for r in DEFAULT_FPRS),
                        help="comma-separated false-positive rates of the TPRs; the first is the primary one")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=250)
    parser.add_argument("--no-check-cache-key", dest="check_cache_key", action="store_false",
                        help="score cells even if their cache key does not match the loaded classifier")
    parser.add_argument("--json", default=None, help="JSON output (default <results>/detector_auc.json)")
    parser.add_argument("--md", default=None, help="Markdown output (default <results>/detector_auc.md)")
    parser.add_argument("--roc", default=None, help="ROC curves (default <results>/detector_roc.png)")
    cli.add_overwrite_flag(parser)
    args = parser.parse_args(argv)
    try:
        temperatures = tuple(float(t) for t in args.temperatures.split(","))
    except ValueError:
        parser.error(f"--temperatures must be comma-separated numbers, got {args.temperatures!r}")
    try:
        fprs = tuple(float(r) for r in args.fpr.split(","))
    except ValueError:
        parser.error(f"--fpr must be comma-separated rates, got {args.fpr!r}")
    if len(set(fprs)) != len(fprs) or not all(0.0 < r < 1.0 for r in fprs):
        parser.error(f"--fpr must be distinct rates in (0, 1), got {args.fpr!r}")
    json_path = Path(args.json) if args.json else Path(args.results) / "detector_auc.json"
    md_path = Path(args.md) if args.md else Path(args.results) / "detector_auc.md"
    roc_path = Path(args.roc) if args.roc else Path(args.results) / "detector_roc.png"
    cli.refuse_to_overwrite([json_path, md_path, roc_path], args.overwrite)
    command = cli.command_line("eval.detector_auc", argv)
    roc_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args.results, dataset_name=args.dataset, checkpoints=args.checkpoints, data_dir=args.data_dir,
                     source=args.source, n_natural=args.n_natural, temperatures=temperatures, fprs=fprs,
                     batch_size=args.batch_size, check_cache_key=args.check_cache_key, roc=roc_path,
                     command=command)
    except (AnalysisError, checkpoint.CheckpointError, data.DataError) as err:
        parser.exit(2, f"error: {err}\n")
    md = render_markdown(result)
    for path in (json_path, md_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(md)
    print(md)
    print(f"wrote {md_path}, {json_path} and {roc_path}", file=sys.stderr)
    return result


if __name__ == "__main__":
    cli.run_main(main)
