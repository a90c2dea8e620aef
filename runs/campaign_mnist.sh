#!/usr/bin/env bash
# Table 1's campaign at the paper's protocol with the classifier trained by MagNet's recipe (runs/mnist/export,
# linked from runs/mnist/compare_root). Shards land in results/mnist/cache (committed as they finish); every rerun
# resumes from them. The earlier steps (classifier comparison, adaptive evaluation, AE training) are in
# runs/queue_mnist_models.sh and are finished.
set -u
cd "$(dirname "$0")/.."
. .venv/bin/activate
export MAGNET_MI_DATA_DIR="${MAGNET_MI_DATA_DIR:-$(cd .. && pwd)/shared/data}"
python -m eval.tables --dataset mnist --checkpoints runs/mnist/compare_root --out runs/mnist/table1-partial \
  --overwrite --partial --cache results/mnist/cache >> runs/logs/campaign.log 2>&1
# Once every shard exists, Table 1's last steps (nothing crafted; each skipped if done).
if python -c "import json, sys; sys.exit(not json.load(open('runs/mnist/table1-partial/table.json'))['complete'])"; then
  runs/finish_table1_mnist.sh
fi
