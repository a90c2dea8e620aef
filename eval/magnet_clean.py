"""MagNet (or MI-MagNet) on natural test images: thresholds from the validation split, clean accuracy, false
positives.

    python -m eval.magnet_clean --dataset mnist [--mi] [--data-dir D] [--checkpoints C] [--json out.json]

The defense is the dataset config's (:mod:`magnet_mi_jax.datasets`): its MagNet preset, or with ``--mi`` the
same with its MI detector added (the detectors the tables evaluate).

Calibrates every detector of the dataset's MagNet preset (docs/design.md, section 4) on the 5,000 validation images
(threshold = n-th largest natural score, n = floor(N r)), then on the 10,000 test images reports

* clean accuracy with MagNet: passes every detector AND argmax Z(R(x)) is right (paper: MNIST 99.13%,
  CIFAR-10 83.33%), with MagNet's breakdown (detectors only, reformer only, no defense);
* each detector's false-positive rate on the validation (calibration) and test images, and of all together;
* the reformer's effect: accuracy of Z(x) vs Z(R(x)) and how many predictions R changes.

The trained weights come from ``checkpoints/<dataset>/`` (:func:`magnet_mi_jax.checkpoint.load_model`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from magnet_mi_jax import cli, data, datasets
from eval.protocol import check_cards_against_data, load_networks
from eval.report import paper_clean
from magnet_mi_jax.detectors import (MagNet, MIMagNet, calibrate, clean_accuracy, decide, flags,
                                     make_defense_fn, map_batches, num_rejected)

def evaluate_clean(spec: MagNet | MIMagNet, applies: Mapping[str, Any], params: Mapping[str, Any], ds: data.Dataset,
                   batch_size: int = 500, val_limit: Optional[int] = None,
                   test_limit: Optional[int] = None) -> dict[str, Any]:
    """Calibrates ``spec`` on ``ds``'s validation split and measures it on the test split.

    Args:
      spec: a MagNet defense, or MI-MagNet.
      applies: key -> apply function; params: key -> parameters.
      ds: the dataset (MagNet split).
      batch_size: images per jitted call.
      val_limit: calibrate on the first N validation images only (smoke tests; below the detectors'
        calibration_size this departs from MagNet).
      test_limit: evaluate on the first N test images only (smoke tests).

    Returns:
      A JSON-serialisable dict (fractions in [0, 1]).
    """
    forward = make_defense_fn(spec, applies)
    run = lambda v: forward(params, v)  # noqa: E731
    val_x = ds.val_x[:val_limit]
    test_x, test_y = ds.test_x[:test_limit], ds.test_y[:test_limit]
    val = map_batches(run, val_x, batch_size)
    thresholds = calibrate(spec, val.scores, allow_fewer=val_limit is not None)
    test = map_batches(run, test_x, batch_size)

    flags_val = {d.name: np.asarray(flags(val.scores[d.name][:d.calibration_size], thresholds[d.name]))
                 for d in spec.detectors}
    decision = decide(spec, test, thresholds)
    flags_test = {n: np.asarray(f) for n, f in decision.flags.items()}
    flagged = np.asarray(decision.flagged)
    pred, pred_r = test.logits.argmax(-1), test.reformed_logits.argmax(-1)
    acc = clean_accuracy(flagged, pred_r == test_y, pred == test_y)
    detectors = {}
    for det in spec.detectors:
        n_cal = min(det.calibration_size, len(val_x))
        detectors[det.name] = {
            "config": {k: v for k, v in vars(det).items() if k != "name"},
            "threshold": thresholds[det.name],
            "n_rejected_target": num_rejected(n_cal, det.fpr),
            "val_fpr": float(np.mean(flags_val[det.name])),
            "test_fpr": float(np.mean(flags_test[det.name])),
        }
    return {
        "thresholds": thresholds,
        "detectors": detectors,
        "test_fpr_any": float(np.mean(flagged)),
        "clean_accuracy": acc._asdict(),
        "reformer": {"accuracy_original": acc.none, "accuracy_reformed": acc.reformer_only,
                     "changed_predictions": float(np.mean(pred != pred_r)),
                     "fixed": int(np.sum((pred != test_y) & (pred_r == test_y))),
                     "broken": int(np.sum((pred == test_y) & (pred_r != test_y)))},
        "n_val": int(len(val_x)), "n_test": int(len(test_x)),
    }


def format_report(dataset: str, result: Mapping[str, Any]) -> str:
    paper = paper_clean(dataset)
    defense = result.get("defense", "magnet")
    title = {"magnet": "MagNet", "mi_magnet": "MI-MagNet"}[defense]
    acc = result["clean_accuracy"]
    cfgs = {name: ", ".join(f"{k}={v}" for k, v in d["config"].items() if k != "calibration_size")
            for name, d in result["detectors"].items()}
    w = max(len(c) for c in cfgs.values()) if cfgs else 6
    lines = [f"{title} on clean {dataset} test images ({result['n_test']} test, {result['n_val']} validation)",
             "", f"{'detector':<10} {'config':<{w}} {'threshold':>12} {'val FPR':>8} {'test FPR':>9}"]
    for name, d in result["detectors"].items():
        lines.append(f"{name:<10} {cfgs[name]:<{w}} {d['threshold']:>12.6g} {100 * d['val_fpr']:>7.2f}% "
                     f"{100 * d['test_fpr']:>8.2f}%")
    lines += [f"{'any':<10} {'':<{w}} {'':>12} {'':>8} {100 * result['test_fpr_any']:>8.2f}%", "",
              f"clean accuracy, detectors + reformer: {100 * acc['both']:.2f}%"
              + (f"   (paper {paper[defense]:.2f}%)" if paper else ""),
              f"clean accuracy, detectors only:       {100 * acc['detector_only']:.2f}%",
              f"clean accuracy, reformer only:        {100 * acc['reformer_only']:.2f}%",
              f"clean accuracy, no defense:           {100 * acc['none']:.2f}%"
              + (f"   (paper {paper['no_defense']:.2f}%)" if paper else ""),
              f"reformer: changes {100 * result['reformer']['changed_predictions']:.2f}% of predictions, "
              f"fixes {result['reformer']['fixed']}, breaks {result['reformer']['broken']}"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_data_flags(parser)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--val-limit", type=int, default=None, help="smoke tests: calibrate on N validation images")
    parser.add_argument("--test-limit", type=int, default=None, help="smoke tests: evaluate on N test images")
    parser.add_argument("--json", default=None, help="also write the result as JSON to this file")
    parser.add_argument("--mi", action="store_true",
                        help="MI-MagNet: the dataset's MagNet preset with its MI detector (needs the generator)")
    cli.add_overwrite_flag(parser)
    args = parser.parse_args(argv)
    cli.refuse_to_overwrite([args.json], args.overwrite)

    config = datasets.get(args.dataset)
    spec = config.mi_magnet() if args.mi else config.magnet
    names = config.magnet.network_keys + ((config.generator,) if args.mi else ())
    ds = cli.load_data(args)
    applies, params, cards = load_networks(args.dataset, args.checkpoints, names=names)
    check_cards_against_data(cards, ds)
    start = time.time()
    result = evaluate_clean(spec, applies, params, ds, args.batch_size, args.val_limit, args.test_limit)
    result.update(dataset=args.dataset, defense="mi_magnet" if args.mi else "magnet", seconds=round(time.time() - start, 1),
                  **cli.provenance(cli.command_line("eval.magnet_clean", argv), ds),
                  models={k: {kk: c.get(kk) for kk in ("command", "git_commit", "metrics") if kk in c}
                          for k, c in cards.items()})
    print(format_report(args.dataset, result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float) + "\n")
    return result


if __name__ == "__main__":
    cli.run_main(main)
