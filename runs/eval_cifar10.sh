#!/usr/bin/env bash
# CIFAR-10's evaluations (issue 14), run by runs/train_cifar10.sh once the shipped weights exist; rerun to
# continue: a finished step is skipped (its output exists), the table resumes from its committed shards.
# 1. the generator's Figure 2 and conditional accuracy; 2. MagNet's and MI-MagNet's clean accuracy (thresholds from
# the validation split); 3. Table 2 at the CPU preset (--quick: 50 images, kappa 0/20/40/80, 50 iterations x 6
# search steps); 4. the detector AUCs of that table's adversarial examples.
set -u
cd "$(dirname "$0")/.."
. .venv/bin/activate
export MAGNET_MI_DATA_DIR="${MAGNET_MI_DATA_DIR:-$(cd .. && pwd)/shared/data}"
log=runs/logs/eval_cifar10.log
mkdir -p results/cifar10/generators
[ -f results/cifar10/generators/paper_figure2.json ] || python -m eval.figure_generator --dataset cifar10 \
  --out results/cifar10/generators/paper_figure2.png >> "$log" 2>&1 || exit 1
[ -f results/cifar10/magnet_clean.json ] || python -m eval.magnet_clean --dataset cifar10 \
  --json results/cifar10/magnet_clean.json >> "$log" 2>&1 || exit 1
[ -f results/cifar10/mi_magnet_clean.json ] || python -m eval.magnet_clean --dataset cifar10 --mi \
  --json results/cifar10/mi_magnet_clean.json >> "$log" 2>&1 || exit 1
python -m eval.tables --dataset cifar10 --quick >> "$log" 2>&1 || exit 1
[ -f results/cifar10-quick/detector_auc.json ] || python -m eval.detector_auc --dataset cifar10 \
  --results results/cifar10-quick >> "$log" 2>&1 || exit 1
