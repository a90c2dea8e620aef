#!/usr/bin/env bash
# The MNIST generator variants for the generator study (issue 10), one after another; each resumes from its
# work folder. Exports go to runs/mnist/generators/<variant>/mnist/generator (not the shipped checkpoints); the
# conditional accuracy is measured with the shipped classifier. Finished: the paper variant ships as
# checkpoints/mnist/generator, no_code_label as checkpoints/variants/no_code_label.
set -u
cd "$(dirname "$0")/.."
. .venv/bin/activate
export MAGNET_MI_DATA_DIR="${MAGNET_MI_DATA_DIR:-$(cd .. && pwd)/shared/data}"
for variant in paper no_code_label; do
  python -m train.generator --dataset mnist --variant $variant --seed 0 --workdir runs/mnist/generator_$variant \
    --checkpoints runs/mnist/generators/$variant >> runs/logs/mnist_generator_$variant.log 2>&1 || exit 1
done
