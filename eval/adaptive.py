"""MagNet and MI-MagNet against attackers who know them: adaptive EAD and C&W-L2 beside the oblivious attacks.

For each attack (``ead_en``, ``ead_l1``, ``cw_l2``: the cells of :mod:`magnet_mi_jax.attacks.registry`), each kappa and each attacked defense (``magnet``,
``mi_magnet``), :mod:`magnet_mi_jax.attacks.adaptive` crafts examples against that whole defense (through its
reformer, penalising every detector above a fourfold stricter threshold); the oblivious attack (on the bare
classifier, as in Table 1) runs on the same images with the same settings. Every set of examples is then
judged by *both* defenses, which gives the transfer numbers (examples adapted to MagNet, tried on
MI-MagNet, and the reverse) for free. Per cell: each defense's accuracy (MagNet's metric: right if flagged or
if R(x) is classified correctly), the attack's success rate against the defense it targeted and its mean
distortions, and per detector the ROC AUC and the TPR at 5% FPR of natural test images against the attack's
successful examples, with ROC curves in ``roc.png``.

Command (the committed results/mnist-adaptive/ was made by the command recorded in its table.json)::

    python -m eval.adaptive --dataset mnist --n-images 100 --kappas 0,10,20 --attacks ead_en,ead_l1,cw_l2 \\
        --iterations 100 --search-steps 5 --const 0.1

(these are the defaults: ``python -m eval.adaptive --dataset mnist`` is the same run). 100 iterations x 5
search steps from c0 = 0.1 is a CPU budget, not the paper's 1,000 x 9 from 1e-3: more iterations can only
make the adaptive attacks stronger (in expectation), so read its accuracies as upper bounds on the defenses' robustness.

Each attack call's examples are cached in ``<out>/cache`` (content-keyed like eval.tables' shards), so an
interrupted run loses at most the call in progress; rerunning the command resumes. Each call's seconds are
recorded in table.json (``attack_seconds``): the attacks on MI-MagNet dominate, since every iteration runs the
generator and the classifier for all K conditions, forward and backward.

Before commit 709baf8 this module called C&W's cell ``cw`` (the registry's is ``cw_l2``); results made then
(results/mnist-adaptive/) keep that name. ``--attacks`` still accepts it, and their cached examples and
configuration are read under the new name (:data:`LEGACY_CELLS`), so rerunning their recorded command resumes
from their cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from magnet_mi_jax import cli, data, datasets
from magnet_mi_jax.attacks import ATTACK_VERSION, adaptive, cw_l2, ead, registry
from magnet_mi_jax.detectors import (attack_accuracy, calibrate, decide, make_defense_fn,
                                     map_batches, roc_auc, roc_curve, tpr_at_fpr)
from eval import protocol

ATTACKS = ("ead_en", "ead_l1", "cw_l2")
LEGACY_CELLS = {"cw": "cw_l2"}
"""Cell names of results made before the registry's names (module docstring) -> the registry's."""


def current_cell(name: str) -> str:
    """The registry's name of a cell named ``name`` by any version of this module."""
    return LEGACY_CELLS.get(name, name)
DEFENSES = ("magnet", "mi_magnet")
DEFENSE_TITLES = {"magnet": "MagNet", "mi_magnet": "MI-MagNet"}
TARGETS = ("oblivious",) + DEFENSES        # who the examples were crafted against
ROC_FPR = 0.05


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
    """One adaptive evaluation. Defaults: the CPU-sized run committed in results/<dataset>-adaptive/."""

    dataset: str = "mnist"
    n_images: int = 100
    kappas: tuple[float, ...] = (0.0, 10.0, 20.0)
    attacks: tuple[str, ...] = ATTACKS
    targets: tuple[str, ...] = TARGETS
    iterations: int = 100
    search_steps: int = 5
    const: float = 0.1
    beta: float = 1e-2
    penalty: float = 1.0
    fpr_factor: float = adaptive.DEFAULT_FPR_FACTOR
    normalize: bool = True
    seed: int = 0

    def __post_init__(self):
        datasets.get(self.dataset)          # an unregistered name is an error naming the registered ones
        bad = [a for a in self.attacks if a not in ATTACKS]
        if bad or not self.attacks:
            raise ValueError(f"attacks must be a non-empty subset of {ATTACKS}; got {list(self.attacks)}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"targets must be a non-empty subset of {TARGETS}; got {list(self.targets)}")
        if not self.kappas or min(self.kappas) < 0:
            raise ValueError(f"kappas must be non-empty and >= 0; got {list(self.kappas)}")
        for name in ("n_images", "iterations", "search_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")

    @property
    def families(self) -> tuple[str, ...]:
        """Attack runs needed: one EAD run gives both decision rules."""
        return tuple(dict.fromkeys(registry.run_of(a).name for a in self.attacks))


def call_key(config: AdaptiveConfig, family: str, target: str, context: Mapping[str, str]) -> str:
    """Content key of one attack call's examples: every setting that changes them, the images, the weights."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("attacks", "targets")}
    blob = json.dumps({"config": fields, "family": family, "target": target, "context": dict(context),
                       "attack_version": ATTACK_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def craft(config: AdaptiveConfig, family: str, target: str, applies, params, specs, thresholds, strict, x, y
          ) -> dict[str, dict[str, np.ndarray]]:
    """One attack call over the kappa grid: {cell: {"adv", "success", "l1", "l2", "linf"} with (G, B)}."""
    kappa = np.asarray(config.kappas, np.float32)[:, None]
    common = dict(kappa=kappa, const=config.const, iterations=config.iterations, search_steps=config.search_steps)
    if family == "ead":
        common.update(beta=config.beta, rule=("en", "l1"))
    if target == "oblivious":
        attack = ead if family == "ead" else cw_l2
        out = attack(applies["classifier"], x, y, params=params["classifier"], **common)
    else:
        spec = specs[target]
        attack = adaptive.adaptive_ead if family == "ead" else adaptive.adaptive_cw_l2
        out = attack(spec, applies, params, x, y, thresholds={n: thresholds[n] for n in spec.detector_names},
                     attack_thresholds={n: strict[n] for n in spec.detector_names}, penalty=config.penalty,
                     normalize=config.normalize, **common)
    if family == "ead":
        cells = {cell: out[rule] for cell, rule in registry.EAD_RULES.items()}
    else:
        (cell,) = registry.get(family).cells
        cells = {cell: out}
    return {cell: {k: np.asarray(getattr(res, k)) for k in ("adv", "success", "l1", "l2", "linf")}
            for cell, res in cells.items()}


def save_call(path: Path, cells: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Atomic, compressed, pickle-free."""
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **{f"{a}__{k}": v for a, c in cells.items() for k, v in c.items()})
    os.replace(tmp, path)


def load_call(path: Path) -> dict[str, dict[str, np.ndarray]] | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            cells: dict[str, dict[str, np.ndarray]] = {}
            for key in f.files:
                attack, field = key.split("__")
                cells.setdefault(current_cell(attack), {})[field] = f[key]
        return cells
    except (OSError, ValueError) as err:
        raise ValueError(f"cached examples {path} are unreadable ({err}); delete the file to recompute it") from err


def judge(outputs, thresholds, specs, labels: np.ndarray, cell: Mapping[str, np.ndarray], kappa_row: int,
          natural: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Both defenses' verdicts on one (attack, target, kappa) set of examples."""
    success = cell["success"][kappa_row].astype(bool)
    reformed_correct = np.asarray(outputs.reformed_logits).argmax(-1) == labels
    original_correct = np.asarray(outputs.logits).argmax(-1) == labels
    row: dict[str, Any] = {"attack_success_rate": protocol.percent(success.mean()), "n_success": int(success.sum()),
                           "n_images": int(len(labels))}
    for d in ("l1", "l2", "linf"):
        row[f"mean_{d}"] = float(cell[d][kappa_row][success].mean()) if success.any() else None
    for defense, spec in specs.items():
        decision = decide(spec, outputs, thresholds)
        flagged = np.asarray(decision.flagged)
        acc = attack_accuracy(flagged, reformed_correct, original_correct)
        row[defense] = {"accuracy": protocol.percent(acc.both), "detected": protocol.percent(flagged.mean()),
                        "reformer_only": protocol.percent(acc.reformer_only)}
    row["detectors"] = {}
    for name, nat in natural.items():
        adv = np.asarray(outputs.scores[name])[success]
        row["detectors"][name] = {
            "flag_rate": protocol.percent(np.mean(np.asarray(outputs.scores[name]) >= thresholds[name])),
            "auc": round(roc_auc(nat, adv), 4) if success.any() else None,
            f"tpr_at_{ROC_FPR:g}_fpr": round(tpr_at_fpr(nat, adv, ROC_FPR).tpr, 4) if success.any() else None}
    return row


def check_overwrite(config: AdaptiveConfig, out: Path, overwrite: bool = False) -> None:
    """Refuses (:class:`cli.OverwriteError`) to write over ``out``'s table of another configuration (its cells
    read under their current names) unless ``overwrite``."""
    if not (out / "table.json").exists() or overwrite:
        return
    old = json.loads((out / "table.json").read_text()).get("config") or {}
    old["attacks"] = [current_cell(a) for a in old.get("attacks", [])]
    if old != json.loads(json.dumps(dataclasses.asdict(config))):
        raise cli.OverwriteError(f"{out} holds an adaptive table of another configuration; choose another "
                                 "--out or pass --overwrite")


def run(config: AdaptiveConfig, out: Path, *, data_dir: str | None = None, source: str = "auto",
        checkpoints: str | None = None, command: str = "", overwrite: bool = False,
        dataset: data.Dataset | None = None, eval_batch: int = 500, natural_limit: int | None = None
        ) -> dict[str, Any]:
    """Crafts (or loads) every call's examples, judges them with both defenses and writes ``out``.

    ``natural_limit`` caps the natural test images of the ROC analysis (tests); default all.
    """
    start = time.time()
    out = Path(out)
    check_overwrite(config, out, overwrite)
    ds = dataset if dataset is not None else data.load_dataset(config.dataset, data_dir=data_dir, source=source)
    applies, params, cards = protocol.load_networks(config.dataset, checkpoints)
    protocol.check_cards_against_data(cards, ds)
    magnet = datasets.get(config.dataset).magnet
    specs = {"magnet": magnet, "mi_magnet": datasets.get(config.dataset).mi_magnet()}
    forward = make_defense_fn(specs["mi_magnet"], applies)
    run_defense = lambda v: forward(params, v)  # noqa: E731

    classify = jax.jit(applies["classifier"])
    pred = map_batches(lambda v: classify(params["classifier"], v), ds.test_x, eval_batch).argmax(-1)
    indices = data.select_attack_indices(ds.test_y, pred, config.n_images, config.seed)
    x, y = ds.test_x[indices], ds.test_y[indices]
    context = protocol.cache_context(config.dataset, ds, indices, params["classifier"])
    context = dict(context, defense=protocol.params_hash(params))

    print(f"calibrating on {len(ds.val_x)} validation images")
    val = map_batches(run_defense, ds.val_x, eval_batch).scores
    small = len(ds.val_x) < ds.config.validation_size
    thresholds = calibrate(specs["mi_magnet"], val, allow_fewer=small)
    strict = adaptive.attacker_thresholds(specs["mi_magnet"], val, config.fpr_factor, allow_fewer=small)
    test_x = ds.test_x if natural_limit is None else ds.test_x[:natural_limit]
    natural = {n: np.asarray(v) for n, v in map_batches(run_defense, test_x, eval_batch).scores.items()}

    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    crafted: dict[tuple[str, str], dict] = {}
    timings = {}
    for family in config.families:
        for target in config.targets:
            path = cache / f"{family}-{target}-{call_key(config, family, target, context)}.npz"
            cells = load_call(path)
            if cells is None:
                t0 = time.time()
                print(f"crafting {family} against {target}: {len(x)} images x {len(config.kappas)} kappas", flush=True)
                cells = craft(config, family, target, applies, params, specs, thresholds, strict, x, y)
                save_call(path, cells)
                timings[f"{family}/{target}"] = round(time.time() - t0, 1)
                print(f"  {timings[f'{family}/{target}']:.0f} s", flush=True)
            crafted[(family, target)] = cells

    rows: dict[str, Any] = {}
    curves: dict[tuple[str, str, float], dict[str, tuple]] = {}
    for attack in config.attacks:
        family = registry.run_of(attack).name
        for target in config.targets:
            cell = crafted[(family, target)][attack]
            for g, kappa in enumerate(config.kappas):
                outputs = map_batches(run_defense, cell["adv"][g], eval_batch)
                row = judge(outputs, thresholds, specs, y, cell, g, natural)
                row.update(attack=attack, target=target, kappa=kappa)
                rows[f"{attack}/{target}/{kappa:g}"] = row
                ok = cell["success"][g].astype(bool)
                curves[(attack, target, kappa)] = {n: roc_curve(natural[n], np.asarray(outputs.scores[n])[ok])
                                                   for n in natural} if ok.any() else {}

    result = {
        "dataset": config.dataset, "config": dataclasses.asdict(config), **cli.provenance(command),
        "wall_seconds": round(time.time() - start, 1),
        "attack_seconds": timings, "thresholds": thresholds, "attacker_thresholds": strict,
        "indices_hash": context["indices"], "n_natural": int(len(test_x)), "data_md5": ds.md5,
        "models": {k: protocol.card_summary(c) for k, c in cards.items()}, "cells": rows,
    }
    (out / "table.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (out / "table.md").write_text(render_markdown(result))
    plot_roc(result, curves, out / "roc.png")
    return result


def render_markdown(result: Mapping[str, Any]) -> str:
    cfg = result["config"]
    lines = [f"# {result['dataset']}: MagNet and MI-MagNet against adaptive attacks",
             "",
             f"`{result['command']}`",
             "",
             f"git {result['git_commit']}, {result['device']}, {result['wall_seconds'] / 3600:.2f} h in all. "
             f"{cfg['n_images']} test images (correctly classified), {cfg['iterations']} iterations x "
             f"{cfg['search_steps']} binary-search steps, c0 = {cfg['const']:g}, beta = {cfg['beta']:g}; adaptive "
             f"penalty c2 = {cfg['penalty']:g} ({'each detector in units of its threshold' if cfg['normalize'] else 'unweighted'}), "
             f"attacker's thresholds at {cfg['fpr_factor']:g}x each detector's false-positive rate.",
             "",
             "Accuracy (%) of each defense (rows: who the examples were crafted against). An attacked image counts "
             "as defended if a detector flags it or the reformed image is classified correctly.",
             ""]
    for attack in cfg["attacks"]:
        lines += [f"## {registry.title(current_cell(attack))}", "",
                  "| crafted against | kappa | success vs its target (%) | mean L1 | mean L2 | MagNet acc. | MI-MagNet acc. |",
                  "|---|---|---|---|---|---|---|"]
        for target in cfg["targets"]:
            for kappa in cfg["kappas"]:
                r = result["cells"].get(f"{attack}/{target}/{kappa:g}")
                if r is None:
                    continue
                f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
                lines.append(f"| {target} | {kappa:g} | {r['attack_success_rate']:.1f} | {f(r['mean_l1'])} | "
                             f"{f(r['mean_l2'])} | {r['magnet']['accuracy']:.1f} | {r['mi_magnet']['accuracy']:.1f} |")
        lines.append("")
        names = list(result["thresholds"])
        lines += [f"Detectors against the successful examples (ROC AUC / TPR at {ROC_FPR:.0%} FPR, natural = "
                  f"{result['n_natural']} test images):", "",
                  "| crafted against | kappa | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for target in cfg["targets"]:
            for kappa in cfg["kappas"]:
                r = result["cells"].get(f"{attack}/{target}/{kappa:g}")
                if r is None:
                    continue
                det = r["detectors"]
                cells = [("-" if det[n]["auc"] is None else
                          f"{det[n]['auc']:.3f} / {100 * det[n][f'tpr_at_{ROC_FPR:g}_fpr']:.0f}%") for n in names]
                lines.append(f"| {target} | {kappa:g} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_roc(result: Mapping[str, Any], curves: Mapping[tuple, Mapping[str, tuple]], path: Path) -> None:
    """One panel per (attack, detector) at the largest kappa: ROC of natural vs each target's examples."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    kappa = max(cfg["kappas"])
    names = list(result["thresholds"])
    fig, axes = plt.subplots(len(cfg["attacks"]), len(names), figsize=(3.2 * len(names), 3.0 * len(cfg["attacks"])),
                             squeeze=False)
    styles = {"oblivious": ("tab:gray", "--"), "magnet": ("tab:blue", "-"), "mi_magnet": ("tab:red", "-")}
    for i, attack in enumerate(cfg["attacks"]):
        for j, name in enumerate(names):
            ax = axes[i, j]
            for target in cfg["targets"]:
                pts = curves.get((attack, target, kappa), {}).get(name)
                if pts is not None:
                    color, ls = styles[target]
                    ax.plot(*pts, ls, color=color, label=f"vs {target}")
            ax.plot([0, 1], [0, 1], ":", color="black", lw=0.8)
            ax.set_title(f"{registry.title(attack)}, detector {name}", fontsize=9)
            ax.set_xlabel("FPR")
            ax.set_ylabel("TPR")
    if axes[0, 0].get_legend_handles_labels()[0]:
        axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{result['dataset']}: ROC of each detector, natural vs successful examples, kappa {kappa:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def build_config(args: argparse.Namespace) -> AdaptiveConfig:
    """The configuration the parsed flags name (unset flags: the dataset's defaults)."""
    base = AdaptiveConfig(dataset=args.dataset)
    fields = {"n_images": args.n_images, "kappas": _floats(args.kappas) if args.kappas else None,
              "attacks": tuple(current_cell(a) for a in _names(args.attacks)) if args.attacks else None,
              "targets": _names(args.targets) if args.targets else None, "iterations": args.iterations,
              "search_steps": args.search_steps, "const": args.const, "penalty": args.penalty, "fpr_factor": args.fpr_factor,
              "seed": args.seed}
    return dataclasses.replace(base, **{k: v for k, v in fields.items() if v is not None},
                               normalize=not args.unnormalized)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.adaptive", description=__doc__.split("\n")[0])
    cli.add_data_flags(parser)
    parser.add_argument("--out", default=None, help="output folder (default results/<dataset>-adaptive/)")
    parser.add_argument("--n-images", dest="n_images", type=int, default=None)
    parser.add_argument("--kappas", default=None, help="comma-separated, e.g. 0,10,20")
    parser.add_argument("--attacks", default=None, help=f"comma-separated subset of {','.join(ATTACKS)}")
    parser.add_argument("--targets", default=None, help=f"comma-separated subset of {','.join(TARGETS)}")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--search-steps", dest="search_steps", type=int, default=None)
    parser.add_argument("--const", type=float, default=None, help="initial c of the binary search (default 1e-3)")
    parser.add_argument("--penalty", type=float, default=None, help="c2, the detector penalty's weight (default 1)")
    parser.add_argument("--fpr-factor", dest="fpr_factor", type=float, default=None,
                        help="the attacker's thresholds at this many times each detector's rate (default 4)")
    parser.add_argument("--unnormalized", action="store_true",
                        help="weight every detector's excess by c2 alone, not by c2 / its threshold")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--overwrite", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    config = build_config(args)
    out = Path(args.out or f"results/{args.dataset}-adaptive")
    command = cli.command_line("eval.adaptive", argv)
    result = run(config, out, data_dir=args.data_dir, source=args.source, checkpoints=args.checkpoints,
                 command=command, overwrite=args.overwrite)
    print((out / "table.md").read_text())
    return result


if __name__ == "__main__":
    cli.run_main(main)
