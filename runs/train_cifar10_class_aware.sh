#!/usr/bin/env bash
# The CIFAR-10 generator's class_aware variant (issue 14's conditional-accuracy target; the generator study of
# issue 10 on CIFAR-10), resumable from its work folder: 8 epochs, what one session's CPU allowed (an epoch of
# this variant took 626-890 s, 1.5-2x the paper variant's: relabelled fakes and the auxiliary
# classifier; started with --epochs 10, cut to 6 after epoch 3 and set to 8 in epoch 6: each restart resumes). The
# export goes to runs/cifar10/generators/class_aware (not the shipped checkpoints); its conditional accuracy is
# measured with the shipped classifier. The finished generator is copied to
# checkpoints/variants/cifar10_class_aware/cifar10/generator (README, "Trained weights").
set -u
cd "$(dirname "$0")/.."
. .venv/bin/activate
export MAGNET_MI_DATA_DIR="${MAGNET_MI_DATA_DIR:-$(cd .. && pwd)/shared/data}"
python -m train.generator --dataset cifar10 --variant class_aware --epochs 8 --seed 0 \
  --workdir runs/cifar10/generator_class_aware --checkpoints runs/cifar10/generators/class_aware \
  >> runs/logs/cifar10_generator_class_aware.log 2>&1
