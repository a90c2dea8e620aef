#!/usr/bin/env bash
# Table 1's last steps, once the campaign (runs/campaign_mnist.sh) has every shard in results/mnist/cache:
# nothing here crafts an attack. Each step is skipped if its output exists (nothing committed is overwritten);
# rerun to continue. Logs: runs/logs/finish_table1.log. Usage: runs/finish_table1_mnist.sh
#   1. the finished table with the shipped models: results/mnist/table.{md,csv,json}, accuracy_vs_kappa.png
#      (eval.tables without --partial writes no table while a shard is missing; the script stops then);
#   2. the detector AUCs at full scale: results/mnist/detector_auc.{md,json}, detector_roc.png;
#   3. the generator study on the finished table: results/mnist/mi_generators_table1.{md,json,png};
#   4. the auto-encoder seed ablation on every attack: results/mnist-ablations/ae_seed<S>_all/.
set -u
cd "$(dirname "$0")/.."
. .venv/bin/activate
export MAGNET_MI_DATA_DIR="${MAGNET_MI_DATA_DIR:-$(cd .. && pwd)/shared/data}"
mkdir -p runs/logs
log=runs/logs/finish_table1.log
step() { echo "[$(date -u +%FT%TZ)] $*" >> $log; "$@" >> $log 2>&1; }

[ -f results/mnist/table.json ] || step python -m eval.tables --dataset mnist --no-craft || exit 1
[ -f results/mnist/table.json ] || { echo "shards still missing: results/mnist/table.json not written" >> $log; exit 1; }
[ -f results/mnist/detector_auc.json ] || step python -m eval.detector_auc --dataset mnist --results results/mnist \
  || exit 1
[ -f results/mnist/mi_generators_table1.json ] || step python -m eval.mi_generators --dataset mnist \
  --generators paper=checkpoints class_aware=checkpoints/variants/class_aware \
  no_code_label=checkpoints/variants/no_code_label --results results/mnist --out results/mnist/mi_generators_table1 \
  || exit 1
for seed in 1 2; do
  root=runs/mnist/ae_seed$seed/root
  [ -f $root/mnist/ae_ii/meta.json ] || { echo "seed $seed: no auto-encoders (runs/ae_seeds_mnist.sh $seed)" >> $log; continue; }
  out=results/mnist-ablations/ae_seed${seed}_all
  [ -f $out/table.json ] || step python -m eval.tables --dataset mnist --checkpoints $root --no-craft \
    --cache results/mnist/cache --out $out || exit 1
done
echo "[$(date -u +%FT%TZ)] Table 1 finished" >> $log
