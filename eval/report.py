"""The table's report: the paper's numbers beside ours, Markdown and CSV in the paper's layout, the figure.

Reads only a result of ``eval.tables`` (its ``table.json`` dictionary) and the paper's numbers in
``eval/paper/*.csv``, so a table can be re-rendered without recomputing anything.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import scipy.stats

from magnet_mi_jax import datasets
from magnet_mi_jax.attacks import registry

from eval.protocol import ATTACKS, DEFENSES

PAPER_DIR = Path(__file__).resolve().parent / "paper"
DEFENSE_TITLES = {"magnet": "MagNet", "mi_magnet": "MI-MagNet"}

# --------------------------------------------------------------------------------------------------
# Paper numbers.
# --------------------------------------------------------------------------------------------------


def paper_tables(dataset: str) -> dict[tuple[str, str, float], float]:
    """(defense, attack, kappa) -> the paper's accuracy in %, from ``eval/paper/tables.csv`` (empty for a
    dataset the paper did not evaluate)."""
    out = {}
    with open(PAPER_DIR / "tables.csv") as f:
        for row in csv.DictReader(f):
            if row["dataset"] != dataset:
                continue
            for defense in DEFENSES:
                for attack in ATTACKS:
                    out[(defense, attack, float(row["kappa"]))] = float(row[f"{defense}_{attack}"])
    return out


def paper_clean(dataset: str) -> dict[str, float] | None:
    """The paper's clean accuracies (no defense, MagNet, MI-MagNet) in %, or None for a dataset it did not
    evaluate."""
    with open(PAPER_DIR / "clean_accuracy.csv") as f:
        for row in csv.DictReader(f):
            if row["dataset"] == dataset:
                return {k: float(row[k]) for k in ("no_defense", "magnet", "mi_magnet")}
    return None


# --------------------------------------------------------------------------------------------------
# Writers.
# --------------------------------------------------------------------------------------------------


def _fmt_cell(ours: float, paper: float | None) -> str:
    if paper is None:
        return f"{ours:.1f}"
    return f"{ours:.1f} ({paper:.1f}, {ours - paper:+.1f})"


def wilson_interval(k: int, n: int) -> tuple[float, float]:
    """Wilson's 95% score interval of a proportion k / n, in [0, 1] (SciPy's ``binomtest``)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    interval = scipy.stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return float(interval.low), float(interval.high)


def agreement(result: Mapping[str, Any], tolerance: float = 3.0) -> dict[str, int]:
    """How the table's cells compare with the paper's: of the ``compared`` cells (defense x attack x kappa with
    a paper number), ``within_tolerance`` lie within ``tolerance`` points of it and ``inside_interval`` have
    the paper's number inside the cell's 95% Wilson interval (its accuracy measured on ``n_images`` images)."""
    compared = within = inside = 0
    for cell in result["cells"].values():
        for defense in DEFENSES:
            paper = cell["paper"].get(defense)
            if paper is None or not cell["n_images"]:
                continue
            ours = cell[defense]["accuracy"]
            low, high = wilson_interval(round(ours * cell["n_images"] / 100.0), cell["n_images"])
            compared += 1
            within += abs(ours - paper) <= tolerance
            inside += 100.0 * low <= paper <= 100.0 * high
    return {"compared": compared, "within_tolerance": within, "inside_interval": inside}


def _iterations_text(cfg: Mapping[str, Any]) -> str:
    if cfg.get("cw_iterations") is None or cfg["cw_iterations"] == cfg["iterations"]:
        return f"{cfg['iterations']} iterations"
    return f"{cfg['iterations']} iterations (C&W {cfg['cw_iterations']})"


def render_markdown(result: Mapping[str, Any]) -> str:
    """The paper's table layout, every cell "ours (paper, difference)" in % accuracy."""
    cfg = result["config"]
    lines = []
    dataset = datasets.get(cfg["dataset"])
    title = f"{dataset.paper_table} ({dataset.title})" if dataset.paper_table else dataset.title
    if not result.get("complete", True):
        lines += [f"> **PARTIAL**: {result['shards_done']} of {result['shards_total']} shards crafted; each cell "
                  "is measured on the images whose shards exist (its `n_images` in table.json), and cells "
                  "without any are `-`. Not the finished table.", ""]
    if cfg["quick"]:
        lines += ["> **QUICK PRESET**: a reduced protocol for a CPU smoke run "
                  f"({cfg['n_images']} images, kappa {', '.join(f'{k:g}' for k in cfg['kappas'])}, "
                  f"{_iterations_text(cfg)} x {cfg['search_steps']} search steps). "
                  "Not comparable cell for cell with the paper's 1,000 images x 1,000 iterations x 9 steps.", ""]
    elif result.get("deviations_from_paper"):
        lines += ["> **NOT THE PAPER'S PROTOCOL**: " + "; ".join(
            f"{k} = {v[0]} (paper: {v[1]})" for k, v in result["deviations_from_paper"].items()) + ".", ""]
    lines += [f"# {title}: accuracy (%) on adversarial examples, MagNet vs MI-strengthened MagNet", "",
              "Each cell: ours (paper, ours - paper). Untargeted, oblivious setting; "
              f"{cfg['n_images']} correctly classified test images (seed {cfg['seed']}).", ""]
    header = ["kappa"] + [f"{DEFENSE_TITLES[d]} {registry.title(a)}" for d in DEFENSES for a in cfg["attacks"]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kappa in cfg["kappas"]:
        cells = []
        for defense in DEFENSES:
            for attack in cfg["attacks"]:
                c = result["cells"].get(f"{attack}/{kappa:g}")
                text = "-" if c is None else _fmt_cell(c[defense]["accuracy"], c["paper"].get(defense))
                cells.append(text + (" †" if c is not None and c["n_success"] == 0 else ""))
        lines.append(f"| {kappa:g} | " + " | ".join(cells) + " |")
    clean = result["clean_accuracy"]
    agree = agreement(result)
    if agree["compared"]:
        lines += ["", f"Against the paper: {agree['within_tolerance']} of {agree['compared']} cells lie within 3 points "
                  f"of its number; in {agree['inside_interval']} its number lies inside our 95% interval (Wilson, "
                  "on the cell's images)."]
    if any(c["n_success"] == 0 for c in result["cells"].values()):
        lines += ["", "† The attack found no adversarial example in this cell: its accuracy is measured on the "
                  "unperturbed images and says nothing about robustness."]
    paper_clean_row = clean.get("paper") or {}
    lines += ["", f"Clean test accuracy (%), all {clean.get('n_test', 10_000):,} test images:", "",
              "| | no defense | MagNet | MI-MagNet |", "|---|---|---|---|",
              "| ours (paper, diff) | " + " | ".join(_fmt_cell(clean[k], paper_clean_row.get(k))
                                                    for k in ("no_defense", "magnet", "mi_magnet")) + " |", ""]
    lines += ["Attack statistics (successful examples):", "",
              "| attack | kappa | success % | mean L1 | mean L2 |", "|---|---|---|---|---|"]
    for key, c in result["cells"].items():
        attack, kappa = key.split("/")
        l1 = "-" if c["mean_l1"] is None else f"{c['mean_l1']:.2f}"
        l2 = "-" if c["mean_l2"] is None else f"{c['mean_l2']:.3f}"
        lines.append(f"| {registry.title(attack)} | {kappa} | {c['attack_success_rate']:.1f} | {l1} | {l2} |")
    lines += ["", f"MI detector: reading `{cfg['mi_reading']}`, T = {cfg['mi_temperature']:g}. "
              f"Commit `{result['git_commit']}`, device {result['device']}, wall time {result['wall_seconds']:.0f} s.",
              f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def render_csv(result: Mapping[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["dataset", "quick", "protocol", "n_images", "attack", "kappa", "defense", "accuracy", "paper", "diff",
                     "detector_only", "reformer_only", "accuracy_successful_only", "attack_success_rate",
                     "mean_l1", "mean_l2"])
    cfg = result["config"]
    protocol = ("partial " if not result.get("complete", True) else "") + (
        "quick" if cfg["quick"] else "reduced" if result.get("deviations_from_paper") else "paper")
    for key, c in result["cells"].items():
        attack, kappa = key.split("/")
        for defense in DEFENSES:
            d, paper = c[defense], c["paper"].get(defense)
            writer.writerow([cfg["dataset"], cfg["quick"], protocol, c["n_images"], attack, kappa, defense,
                             d["accuracy"], paper,
                             None if paper is None else round(d["accuracy"] - paper, 2), d["detector_only"],
                             d["reformer_only"], d["accuracy_successful_only"], c["attack_success_rate"],
                             c["mean_l1"], c["mean_l2"]])
    return buf.getvalue()


def plot(result: Mapping[str, Any], path: Path) -> None:
    """Accuracy vs kappa, one panel per attack: MagNet and MI-MagNet (ours solid, paper dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    paper = paper_tables(cfg["dataset"])
    fig, axes = plt.subplots(1, len(cfg["attacks"]), figsize=(4.2 * len(cfg["attacks"]), 3.6), sharey=True)
    axes = np.atleast_1d(axes)
    colors = {"magnet": "tab:blue", "mi_magnet": "tab:red"}
    for ax, attack in zip(axes, cfg["attacks"]):
        for defense in DEFENSES:
            ks = [k for k in cfg["kappas"] if f"{attack}/{k:g}" in result["cells"]]
            ax.plot(ks, [result["cells"][f"{attack}/{k:g}"][defense]["accuracy"] for k in ks], "o-",
                    color=colors[defense], label=f"{DEFENSE_TITLES[defense]} (ours)")
            pk = sorted(k for (d, a, k) in paper if d == defense and a == attack)
            ax.plot(pk, [paper[(defense, attack, k)] for k in pk], "--", color=colors[defense], alpha=0.7,
                    label=f"{DEFENSE_TITLES[defense]} (paper)")
        ax.set_title(registry.title(attack))
        ax.set_xlabel("kappa")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy on adversarial examples (%)")
    axes[-1].legend(fontsize=8, loc="lower right")
    suffix = (" [QUICK PRESET]" if cfg["quick"] else " [NOT THE PAPER'S PROTOCOL]" if result.get("deviations_from_paper")
              else "") + ("" if result.get("complete", True) else " [PARTIAL]")
    fig.suptitle(f"{cfg['dataset']}: MagNet vs MI-MagNet{suffix}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
