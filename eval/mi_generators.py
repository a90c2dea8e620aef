"""The MI detector with each generator variant: what G(E(x), e_j) contributes, on examples already crafted.

    python -m eval.mi_generators --dataset mnist \
        --generators paper=runs/mnist/generators/paper class_aware=checkpoints \
        --results results/mnist-classifiers/magnet_recipe --out results/mnist/mi_generators

The MI detector's only new ingredient over MagNet is the conditional table P[j, i] = softmax(Z(G(E(x), e_j)))_i
(p(X = i | Y = j)); whether it separates natural from adversarial inputs depends on the generator. For each
generator (a checkpoint root holding ``<dataset>/generator``; the classifier and auto-encoders are those of the
``eval.tables`` runs given), on the first ``n_natural`` validation images (negatives) and on the successful
adversarial examples of every cell of the runs (positives; no new attack is crafted), this measures:

* the distributions (quantiles) of H(X|Y) = sum_j p_Y(j) H(P[j, :]), of 1 - mean_j P[j, j] (``offdiag``: 0
  when G answers every condition crisply) and of the Jaccard distance d_J (literal reading), at T = 1;
* ROC AUC and TPR at ``fpr`` (0.5%, the MI detector's rate) of every MI quantity (both readings, every
  temperature) and of ``offdiag``, per attack pooled over kappa (AUC < 0.5: lower on adversarial inputs);
* the accuracy MagNet and MI-MagNet (the default reading and temperature, thresholds calibrated as
  ``eval.tables`` does) would have in each cell with this generator, and the generator's conditional
  accuracy with the runs' classifier on the first 1,000 test images.

Outputs: ``<out>.md``, ``<out>.json`` and ``<out>.png`` (histograms of d_J and H(X|Y), natural vs adversarial).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eval import protocol, scoring
from magnet_mi_jax import checkpoint, cli, data, datasets
from magnet_mi_jax.attacks import registry
from magnet_mi_jax.detectors import calibrate, make_defense_fn, map_batches
from magnet_mi_jax.detectors.mi import conditional_logits
from magnet_mi_jax.models import alpha_gan

__all__ = ["QUANTILES", "KEY_SCORES", "parse_generators", "load_cells", "off_diagonal", "study_generator", "run",
           "render_markdown", "plot", "main"]

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
#: the scores the report's summary tables show (every score is in the JSON)
KEY_SCORES = ("dJ_literal_T1", "dJ_consistent_T1", "MI_literal_T1", "HXgY_T1", "offdiag_T1", "dJ_literal_T10",
              "HXgY_T10")


def parse_generators(items: Sequence[str]) -> dict[str, str]:
    """``["name=root", ...]`` -> {name: root}; names unique."""
    out = {}
    for item in items:
        name, sep, root = item.partition("=")
        if not sep or not name or not root:
            raise ValueError(f"--generators takes name=checkpoint_root items, got {item!r}")
        if name in out:
            raise ValueError(f"generator name {name!r} given twice")
        out[name] = root
    return out


def load_cells(results: Sequence[str | Path], ds: data.Dataset, classifier_params: Any
               ) -> tuple[dict[tuple[str, float], dict[str, np.ndarray]], list[str]]:
    """(attack, kappa) -> cell arrays plus ``labels`` (the attacked images' true labels), from ``eval.tables``
    runs (partial tables too: a cell holds the images of its shards present).

    Every run's shards must have been crafted on ``classifier_params`` (their cache keys are recomputed), and a
    cell given by two runs is an error.
    """
    cells, commands = {}, []
    for folder in map(Path, results):
        table = scoring.read_table(folder)
        if table["config"].get("dataset") != ds.name:
            raise scoring.AnalysisError(f"{folder / 'table.json'} is a {table['config'].get('dataset')} run")
        config = scoring.tables_config(table)
        labels = ds.test_y[np.asarray(table["indices"], np.int64)]
        for key, cell in scoring.load_cells(folder, table, ds, classifier_params).items():
            if key in cells:
                raise scoring.AnalysisError(f"cell {key[0]}/{key[1]:g} is given by two runs")
            shards = [scoring.shard_from_name(n, config) for n in table["cells"][f"{key[0]}/{key[1]:g}"]["shards"]]
            rows = np.concatenate([np.arange(s.start, s.stop) for s in shards])
            if len(rows) != len(cell["adv"]):
                raise scoring.AnalysisError(f"cell {key[0]}/{key[1]:g} of {folder}: its shards hold "
                                                 f"{len(cell['adv'])} images, their names say {len(rows)}")
            cells[key] = {**cell, "labels": labels[rows]}
        commands.append(table.get("command") or "")
    return cells, commands


def off_diagonal(table_logits: jnp.ndarray) -> jnp.ndarray:
    """1 - mean_j P[j, j] at T = 1 (0 when G(E(x), e_j) is class j with certainty for every j):
    (B, K, K) conditional logits -> (B,)."""
    p = jax.nn.softmax(table_logits, axis=-1)
    return 1.0 - jnp.mean(jnp.diagonal(p, axis1=1, axis2=2), axis=-1)


def _quantiles(v: np.ndarray) -> list[float] | None:
    return [float(q) for q in np.quantile(v, QUANTILES)] if len(v) else None


def study_generator(dataset_name: str, applies: Mapping[str, Any], params: Mapping[str, Any], ds: data.Dataset,
                    cells: Mapping[tuple[str, float], Mapping[str, np.ndarray]], *, n_natural: int,
                    temperatures: Sequence[float], fpr: float, batch_size: int
                    ) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Every measurement of one generator (module docstring), as JSON-ready values, and the samples
    :func:`plot` draws (group -> score -> values)."""
    magnet = datasets.get(dataset_name).magnet
    k = int(np.max(ds.test_y)) + 1
    score_fn = scoring.make_score_fn(magnet, applies, temperatures)
    cond = jax.jit(functools.partial(conditional_logits, applies["classifier"], params["classifier"],
                                     applies["encoder"], params["encoder"], applies["generator"],
                                     params["generator"], num_classes=k))

    def scores_of(x: np.ndarray) -> dict[str, np.ndarray]:
        flat = scoring.flatten_scores(map_batches(lambda v: score_fn(params, v), x, batch_size), temperatures)
        flat["offdiag_T1"] = np.asarray(map_batches(lambda v: off_diagonal(cond(v)), x, batch_size), np.float64)
        return flat

    natural = scores_of(ds.val_x[:n_natural])
    adversarial = {}
    for key, cell in cells.items():
        ok = cell["success"].astype(bool)
        adversarial[key] = scores_of(cell["adv"][ok]) if ok.any() else {n: np.zeros(0) for n in natural}
    metrics = scoring.analyse(natural, adversarial, fpr)

    attacks = list(dict.fromkeys(a for a, _ in cells))
    pooled_adv = scoring.pool_over_kappa(adversarial)
    distributions = {n: {"natural": _quantiles(natural[n]), **{a: _quantiles(pooled_adv[a][n]) for a in attacks}}
                     for n in ("HXgY_T1", "offdiag_T1", "dJ_literal_T1")}

    # The defenses as eval.tables builds them, with this generator.
    spec = datasets.get(dataset_name).mi_magnet()
    forward = make_defense_fn(spec, applies)
    val = map_batches(lambda v: forward(params, v), ds.val_x, batch_size)
    thresholds = calibrate(spec, val.scores, allow_fewer=len(ds.val_x) < ds.config.validation_size)
    accuracy = {}
    for (attack, kappa), cell in cells.items():
        outputs = map_batches(lambda v: forward(params, v), cell["adv"], batch_size)
        row = protocol.evaluate_cell(outputs, thresholds, magnet, spec, cell["labels"], cell, val.scores)
        accuracy[f"{attack}/{kappa:g}"] = {"attack": attack, "kappa": kappa,
                                          "magnet": row["magnet"]["accuracy"],
                                          "mi_magnet": row["mi_magnet"]["accuracy"],
                                          "mi_flag_rate": row["detector_flag_rate"].get("MI")}
    clean = protocol.clean_row(magnet, spec, map_batches(lambda v: forward(params, v), ds.test_x, batch_size),
                             ds.test_y, thresholds)
    test_logits = map_batches(cond, ds.test_x[:1000], batch_size)
    measured = {"conditional_accuracy": float(alpha_gan.conditional_accuracy(jnp.asarray(test_logits))),
                "thresholds": {n: float(v) for n, v in thresholds.items()}, "clean": clean,
                "distributions": distributions, "pooled": metrics["pooled"], "cells": metrics["cells"],
                "accuracy": accuracy}
    samples = {"natural": {n: natural[n] for n in PLOTTED}, **{a: {n: pooled_adv[a][n] for n in PLOTTED}
                                                               for a in attacks}}
    return measured, samples


def run(dataset_name: str, generators: Mapping[str, str], results: Sequence[str | Path], *,
        checkpoints: str | None = None, data_dir: str | None = None, source: str = "auto", dataset: data.Dataset | None = None,
        n_natural: int = scoring.DEFAULT_N_NATURAL,
        temperatures: Sequence[float] = scoring.DEFAULT_TEMPERATURES, fpr: float = scoring.DEFAULT_FPR,
        batch_size: int = 250, command: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """Studies every generator on the cells of ``results`` (finished ``eval.tables`` runs sharing one
    classifier); returns (the samples :func:`plot` draws, the JSON result); writes no file.

    The classifier and auto-encoders come from ``checkpoints`` (default: the first run's ``--checkpoints``);
    each generator from its own root."""
    start = time.time()
    if not generators:
        raise ValueError("give at least one generator")
    ds = dataset if dataset is not None else data.load_dataset(dataset_name, data_dir=data_dir, source=source)
    if not 1 <= n_natural <= len(ds.val_x):
        raise scoring.AnalysisError(f"n_natural={n_natural}, but the validation split has {len(ds.val_x)} images")
    first = scoring.read_table(Path(results[0]))
    base = checkpoints if checkpoints is not None else scoring.run_checkpoints(first)
    applies, params, cards = protocol.load_networks(dataset_name, base,
                                                  names=datasets.get(dataset_name).magnet.network_keys)
    protocol.check_cards_against_data(cards, ds)
    cells, commands = load_cells(results, ds, params["classifier"])
    temps = tuple(float(t) for t in temperatures)
    out, samples = {}, {}
    for name, root in generators.items():
        g_applies, g_params, g_cards = protocol.load_networks(dataset_name, root, names=("generator",))
        protocol.check_cards_against_data(g_cards, ds)
        card = g_cards["generator"]
        print(f"generator {name} ({root}): scoring {n_natural} natural images and {len(cells)} cells",
              file=sys.stderr)
        measured, samples[name] = study_generator(dataset_name, {**applies, **g_applies}, {**params, **g_params}, ds, cells,
                                   n_natural=n_natural, temperatures=temps, fpr=fpr, batch_size=batch_size)
        out[name] = {"checkpoints": root, "variant": card.get("config", {}).get("variant", "class_aware"),
                     "card": protocol.card_summary(card), **measured}
    return samples, {"dataset": dataset_name, "results": [str(r) for r in results], "results_commands": commands,
            "n_natural": int(n_natural), "fpr": float(fpr), "temperatures": list(temps), "quantiles": list(QUANTILES),
            "classifier_and_autoencoders": base, "models": {k: protocol.card_summary(c) for k, c in cards.items()},
            "generators": out, **cli.provenance(command), "wall_seconds": round(time.time() - start, 1)}


def _auc(m: Mapping[str, Any]) -> str:
    return "-" if m["auc"] is None else f"{m['auc']:.3f} / {100 * m['tpr']:.1f}"


def render_markdown(result: Mapping[str, Any]) -> str:
    gens = result["generators"]
    names = list(gens)
    attacks = list(next(iter(gens.values()))["pooled"])
    fpr = 100 * result["fpr"]
    lines = [f"# The MI detector with each generator ({result['dataset']})", "",
             f"`{result['command']}`", "",
             f"git {result['git_commit']}, {result['device']}, {result['wall_seconds']:.0f} s. Natural: the first "
             f"{result['n_natural']} validation images. Adversarial: the successful examples of "
             + ", ".join(f"`{r}`" for r in result["results"]) + " (classifier and auto-encoders from "
             f"`{result['classifier_and_autoencoders'] or 'checkpoints'}`).", "",
             "## Generators", "",
             "Conditional accuracy: the classifier's accuracy on G(E(x), e_j) being j, all j, first 1,000 test "
             "images. MI threshold: d_J (literal, T = 1) at the MI detector's 0.5% rate on 1,000 validation images; "
             "its false-positive rate and the clean accuracies are measured on all 10,000 test images.", "",
             "| generator | variant | checkpoints | conditional accuracy | MI threshold | MI test FPR | "
             "clean MagNet | clean MI-MagNet |", "|---|---|---|---|---|---|---|---|"]
    for n in names:
        g = gens[n]
        c = g["clean"]
        lines.append(f"| {n} | {g['variant']} | `{g['checkpoints']}` | {100 * g['conditional_accuracy']:.2f}% | "
                     f"{g['thresholds']['MI']:.6g} | {c['test_false_positive_rate']['MI']:.2f}% | "
                     f"{c['magnet']:.2f}% | {c['mi_magnet']:.2f}% |")
    lines += ["", "## Distributions at T = 1 (quantiles 5 / 25 / 50 / 75 / 95 %)", ""]
    for q in ("HXgY_T1", "offdiag_T1", "dJ_literal_T1"):
        lines += [f"### {q}", "", "| generator | natural | " + " | ".join(registry.title(a) for a in attacks) + " |",
                  "|---|---|" + "---|" * len(attacks)]
        for n in names:
            d = gens[n]["distributions"][q]
            fmt = lambda v: "-" if v is None else " / ".join(f"{x:.3g}" for x in v)  # noqa: E731
            lines.append(f"| {n} | {fmt(d['natural'])} | " + " | ".join(fmt(d[a]) for a in attacks) + " |")
        lines.append("")
    lines += [f"## ROC AUC / TPR (%) at {fpr:g}% FPR, pooled over kappa", "",
              "AUC < 0.5: the score is lower on adversarial inputs (its reversal has AUC 1 - AUC).", ""]
    for attack in attacks:
        lines += [f"### {registry.title(attack)}", "", "| score | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for s in KEY_SCORES:
            lines.append(f"| {s} | " + " | ".join(_auc(gens[n]["pooled"][attack]["scores"][s]) for n in names) + " |")
        lines.append("")
    lines += ["## Accuracy (%) of the defenses in each cell with each generator", "",
              "MagNet does not use the generator (its column is the same for all).", "",
              "| cell | MagNet | " + " | ".join(f"MI-MagNet ({n})" for n in names) + " |",
              "|---|---|" + "---|" * len(names)]
    for key, row in gens[names[0]]["accuracy"].items():
        lines.append(f"| {key} | {row['magnet']:.1f} | " + " | ".join(
            f"{gens[n]['accuracy'][key]['mi_magnet']:.1f} (MI flags {gens[n]['accuracy'][key]['mi_flag_rate']:.0f}%)"
            for n in names) + " |")
    return "\n".join(lines) + "\n"


#: score -> (axis label, how values are drawn: a (low, high) clip range, or "log10")
PLOTTED = {"dJ_literal_T1": ("d_J (literal, T = 1), clipped to [-3, 2]", (-3.0, 2.0)),
           "HXgY_T1": ("log10 H(X|Y) (T = 1), floored at 1e-12", "log10")}


def plot(samples: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]], path: Path) -> None:
    """Histograms, one column per generator: rows :data:`PLOTTED`; natural vs each attack (pooled over kappa).

    ``samples``: generator -> group ("natural" or an attack) -> score name -> values."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(samples)
    fig, axes = plt.subplots(len(PLOTTED), len(names), figsize=(4.2 * len(names), 3.2 * len(PLOTTED)), squeeze=False)
    for col, gen in enumerate(names):
        for row, (score, (label, drawn)) in enumerate(PLOTTED.items()):
            ax = axes[row, col]
            groups = {g: v[score] for g, v in samples[gen].items() if len(v[score])}
            values = {g: np.log10(np.maximum(v, 1e-12)) if drawn == "log10" else np.clip(v, *drawn)
                      for g, v in groups.items()}
            lo = min(float(v.min()) for v in values.values())
            hi = max(float(v.max()) for v in values.values())
            bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 40)
            for g, v in values.items():
                ax.hist(v, bins=bins, density=True, histtype="step", linewidth=1.4,
                        label="natural" if g == "natural" else registry.title(g))
            ax.set_xlabel(label)
            ax.set_title(gen if row == 0 else "")
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_data_flags(parser, checkpoints_help="classifier and auto-encoders (default: the first run's --checkpoints)")
    parser.add_argument("--generators", nargs="+", required=True, help="name=checkpoint_root items")
    parser.add_argument("--results", nargs="+", required=True, help="finished eval.tables runs (one classifier)")
    parser.add_argument("--out", required=True, help="output path without extension (.md, .json, .png)")
    parser.add_argument("--n-natural", dest="n_natural", type=int, default=scoring.DEFAULT_N_NATURAL)
    parser.add_argument("--fpr", type=float, default=scoring.DEFAULT_FPR)
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=250)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing study at --out")
    args = parser.parse_args(argv)
    try:
        generators = parse_generators(args.generators)
    except ValueError as err:
        parser.error(str(err))
    existing = [str(p) for p in (Path(args.out).with_suffix(e) for e in (".md", ".json", ".png")) if p.exists()]
    if existing and not args.overwrite:
        parser.error(f"{', '.join(existing)} exist; pass --overwrite to replace them, or choose another --out")
    command = cli.command_line("eval.mi_generators", argv)
    try:
        samples, result = run(args.dataset, generators, args.results, checkpoints=args.checkpoints,
                              data_dir=args.data_dir, source=args.source,
                     n_natural=args.n_natural, fpr=args.fpr, batch_size=args.batch_size, command=command)
    except (scoring.AnalysisError, checkpoint.CheckpointError, data.DataError) as err:
        parser.exit(2, f"error: {err}\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = render_markdown(result)
    out.with_suffix(".md").write_text(md)
    plot(samples, out.with_suffix(".png"))
    print(md)
    return result


if __name__ == "__main__":
    cli.run_main(main)
