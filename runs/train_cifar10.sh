#!/usr/bin/env bash
# CIFAR-10's networks on this 2-core CPU (issue 14), one after another; every step resumes from its work folder
# (rerun this script to continue). The classifier: MagNet's network and optimiser (SGD, Nesterov 0.9, batch 128,
# shift + flip augmentation) on a schedule sized for about 8 CPU hours: 24 epochs of ~13-16 minutes (BENCHMARKS.md),
# one epoch of linear warm-up to 0.015, then cosine decay to 0, He-normal kernels. Why these: README, "Trained
# weights" (the range tests in results/cifar10/lr_range*.json). If that first cycle ends below the 85% test
# accuracy issue 14 asks for (decided before it ended: 81.2% validation accuracy at epoch 20), its weights move to
# checkpoints/variants/cifar10_first_cycle and a second cycle of 16 epochs (two thirds of the first, what the CPU
# budget allows; same warm-up and peak rate) starts from them (--init-from) and is what ships. The auto-encoder: MagNet's
# recipe as configured (100 epochs of ~40 s). The generator: the default (paper) variant for 10 epochs instead of
# the config's 100, sized to the CPU (an epoch of 703 steps took ~25 minutes in a probe beside other work); it
# needs the shipped classifier for its conditional accuracy, so it comes last. Then the evaluations
# (runs/eval_cifar10.sh).
set -u
cd "$(dirname "$0")/.."
. .venv/bin/activate
export MAGNET_MI_DATA_DIR="${MAGNET_MI_DATA_DIR:-$(cd .. && pwd)/shared/data}"
first=checkpoints/variants/cifar10_first_cycle
if [ ! -f "$first/cifar10/classifier/meta.json" ]; then
  python -m train.classifier --dataset cifar10 --epochs 24 --schedule warmup_cosine --warmup-epochs 1 --lr 0.015 \
    --init he_normal --seed 0 --workdir runs/cifar10/classifier >> runs/logs/cifar10_classifier.log 2>&1 || exit 1
  if python -c "import json, sys; sys.exit(json.load(open('checkpoints/cifar10/classifier/meta.json'))['metrics']['test_accuracy'] >= 0.85)"; then
    mkdir -p "$first/cifar10" && mv checkpoints/cifar10/classifier "$first/cifar10/classifier" || exit 1
  fi
fi
python -m train.autoencoder --dataset cifar10 --which ae --seed 0 --workdir runs/cifar10/ae \
  >> runs/logs/cifar10_ae.log 2>&1 || exit 1
if [ -f "$first/cifar10/classifier/meta.json" ]; then
  python -m train.classifier --dataset cifar10 --epochs 16 --schedule warmup_cosine --warmup-epochs 1 --lr 0.015 \
    --init-from "$first/cifar10/classifier" --seed 0 --workdir runs/cifar10/classifier_cycle2 \
    >> runs/logs/cifar10_classifier_cycle2.log 2>&1 || exit 1
fi
# the finished run's optimiser states are not committed (42 MB), only its history: the shipped card marks it done
[ -f checkpoints/cifar10/generator/meta.json ] || python -m train.generator --dataset cifar10 --epochs 10 --seed 0 \
  --workdir runs/cifar10/generator >> runs/logs/cifar10_generator.log 2>&1 || exit 1
runs/eval_cifar10.sh || exit 1
