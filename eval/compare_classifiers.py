"""Compares trained classifiers on what Table 1 depends on: ``python -m eval.compare_classifiers``.

    python -m eval.compare_classifiers --dataset mnist \
        --models shipped=checkpoints magnet_recipe=runs/mnist/compare_root \
        --tables shipped=results/mnist-classifiers/shipped magnet_recipe=results/mnist-classifiers/magnet_recipe \
        --out results/mnist-classifiers

kappa is in logit units, so how confident a classifier is decides how far an attack with confidence kappa must
move an image, and with it what MagNet's reconstruction detectors see. For each model (``NAME=CHECKPOINT_ROOT``)
this measures, on the test images it classifies correctly:

* the top-2 logit margin ``m(x) = Z_t(x) - max_{j != t} Z_j(x)``: quantiles, and the share of images whose
  margin already exceeds each kappa of the grid;
* test accuracy.

With ``--tables NAME=DIR`` it adds, from an :mod:`eval.tables` run of that model (for example at the paper's
attack settings on 100 images and kappa 10 and 30), each cell's attack success, mean L1 and L2 distortion of the
successful examples, and MagNet's and MI-MagNet's accuracy. Writes ``comparison.md``, ``comparison.json`` and
``margins.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from magnet_mi_jax import checkpoint, cli, data
from magnet_mi_jax.utils import map_batches

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def top2_margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``Z_t - max_{j != t} Z_j`` per example; (N, K), (N,) -> (N,)."""
    logits = np.asarray(logits, np.float64)
    true = logits[np.arange(len(labels)), labels]
    other = np.where(np.arange(logits.shape[1])[None, :] == labels[:, None], -np.inf, logits).max(1)
    return true - other


def margin_summary(margins: np.ndarray, kappas) -> dict[str, Any]:
    """Quantiles of the margins and the share (%) of them above each kappa."""
    return {"n": int(len(margins)),
            "quantiles": {f"q{int(100 * q):02d}": float(np.quantile(margins, q)) for q in QUANTILES},
            "mean": float(margins.mean()),
            "share_above_kappa": {f"{k:g}": round(100.0 * float(np.mean(margins > k)), 2) for k in kappas}}


def measure_model(dataset: str, root: str, ds: data.Dataset, kappas) -> tuple[dict[str, Any], np.ndarray]:
    module, params, card = checkpoint.load_model(dataset, "classifier", root)
    apply = jax.jit(module.apply)
    logits = map_batches(lambda x: apply(params, x), ds.test_x, 1000)
    correct = logits.argmax(-1) == ds.test_y
    margins = top2_margins(logits[correct], ds.test_y[correct])
    return {"checkpoints": root, "card_command": card.get("command"), "params_sha256": card.get("params_sha256"),
            "test_accuracy": round(100.0 * float(correct.mean()), 2),
            "margins": margin_summary(margins, kappas)}, margins


def table_cells(table_dir: str) -> dict[str, Any]:
    """Per cell of an eval.tables run: success, distortions, both defenses' accuracy; plus its protocol."""
    table = json.loads((Path(table_dir) / "table.json").read_text())
    cells = {key: {"attack_success_rate": c["attack_success_rate"], "mean_l1": c["mean_l1"],
                   "mean_l2": c["mean_l2"], "magnet": c["magnet"]["accuracy"],
                   "mi_magnet": c["mi_magnet"]["accuracy"], "paper": c["paper"]}
             for key, c in table["cells"].items()}
    return {"dir": table_dir, "command": table.get("command"), "deviations_from_paper":
            table.get("deviations_from_paper"), "complete": table.get("complete", True), "cells": cells}


def render_markdown(result: Mapping[str, Any]) -> str:
    kappas = result["kappas"]
    lines = ["# Classifiers compared on what Table 1 depends on", "",
             f"Commit `{result['git_commit']}`, device {result['device']}. Command: `{result['command']}`", "",
             "## Top-2 logit margin on correctly classified test images", "",
             "| model | test acc % | q05 | q25 | median | q75 | q95 | " +
             " | ".join(f"> {k:g} %" for k in kappas) + " |",
             "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(kappas)]
    for name, m in result["models"].items():
        q = m["margins"]["quantiles"]
        lines.append(f"| {name} | {m['test_accuracy']:.2f} | " + " | ".join(f"{q[k]:.1f}" for k in q) + " | " +
                     " | ".join(f"{m['margins']['share_above_kappa'][f'{k:g}']:.1f}" for k in kappas) + " |")
    if result["tables"]:
        lines += ["", "## Attacks and defenses (from each model's eval.tables run)", "",
                  "| model | cell | success % | mean L1 | mean L2 | MagNet % (paper) | MI-MagNet % (paper) |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for name, t in result["tables"].items():
            for key, c in t["cells"].items():
                l1 = "-" if c["mean_l1"] is None else f"{c['mean_l1']:.2f}"
                l2 = "-" if c["mean_l2"] is None else f"{c['mean_l2']:.3f}"
                lines.append(f"| {name} | {key} | {c['attack_success_rate']:.1f} | {l1} | {l2} | "
                             f"{c['magnet']:.1f} ({c['paper'].get('magnet')}) | "
                             f"{c['mi_magnet']:.1f} ({c['paper'].get('mi_magnet')}) |")
        lines += [""] + [f"* {name}: `{t['command']}`" + (f" (departs from the paper's protocol: "
                                                          f"{t['deviations_from_paper']})"
                                                          if t["deviations_from_paper"] else "")
                         for name, t in result["tables"].items()]
    return "\n".join(lines) + "\n"


def plot_margins(margins: Mapping[str, np.ndarray], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    hi = max(float(np.quantile(m, 0.995)) for m in margins.values())
    bins = np.linspace(0, hi, 60)
    for name, m in margins.items():
        ax.hist(m, bins=bins, histtype="step", density=True, label=f"{name} (median {np.median(m):.1f})")
    ax.set_xlabel("top-2 logit margin Z_t - max_j Z_j (correct test images)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in values or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"error: {flag} takes NAME=PATH, got {item!r}")
        out[name] = value
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_data_flags(parser, checkpoints=False)
    parser.add_argument("--models", nargs="+", required=True, help="NAME=CHECKPOINT_ROOT, one per model")
    parser.add_argument("--tables", nargs="*", default=None, help="NAME=RESULTS_DIR of an eval.tables run")
    parser.add_argument("--out", required=True)
    cli.add_overwrite_flag(parser)
    args = parser.parse_args(argv)
    out = Path(args.out)
    cli.refuse_to_overwrite([out / "comparison.json", out / "comparison.md", out / "margins.png"], args.overwrite)
    models, tables = _pairs(args.models, "--models"), _pairs(args.tables, "--tables")
    unknown = set(tables) - set(models)
    if unknown:
        parser.error(f"--tables names {sorted(unknown)} that are not among --models")
    kappas = tuple(float(k) for k in range(0, 41, 10)) if args.dataset == "mnist" else (0.0, 20.0, 40.0, 80.0)
    try:
        ds = cli.load_data(args)
        measured = {name: measure_model(args.dataset, root, ds, kappas) for name, root in models.items()}
    except (checkpoint.CheckpointError, data.DataError) as err:
        parser.exit(2, f"error: {err}\n")
    result = {"dataset": args.dataset, "kappas": kappas, "models": {n: m for n, (m, _) in measured.items()},
              "tables": {n: table_cells(d) for n, d in tables.items()},
              **cli.provenance(cli.command_line("eval.compare_classifiers", argv), ds)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "comparison.md").write_text(render_markdown(result))
    plot_margins({n: m for n, (_, m) in measured.items()}, out / "margins.png")
    sys.stdout.write(render_markdown(result))
    return result


if __name__ == "__main__":
    cli.run_main(main)
