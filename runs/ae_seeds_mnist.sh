#!/usr/bin/env bash
# How much of MagNet's accuracy against C&W-L2 is the auto-encoders' training seed? MagNet's two MNIST
# auto-encoders trained again by the shipped recipe with other seeds (the shipped ones are seed 0), then Table 1's
# C&W-L2 column evaluated with each pair on the campaign's committed shards (the attacks are oblivious: their
# examples depend on the classifier only, so nothing is crafted). Each step resumes or skips what exists: rerun
# to continue. Usage: runs/ae_seeds_mnist.sh [SEED ...]   (default: 1 2)
set -u
cd "$(dirname "$0")/.."
. .venv/bin/activate
export MAGNET_MI_DATA_DIR="${MAGNET_MI_DATA_DIR:-$(cd .. && pwd)/shared/data}"
seeds=("$@"); [ $# -eq 0 ] && seeds=(1 2)
for seed in "${seeds[@]}"; do
  run=runs/mnist/ae_seed$seed
  for which in ae_i ae_ii; do
    [ -f $run/root/mnist/$which/meta.json ] && continue
    python -m train.autoencoder --dataset mnist --which $which --seed $seed --workdir $run/$which \
      --checkpoints $run/root >> runs/logs/mnist_ae_seed$seed.log 2>&1 || exit 1
  done
  # the shipped classifier and generator beside this seed's auto-encoders
  for model in classifier generator; do
    ln -sfn "$(realpath --relative-to=$run/root/mnist checkpoints/mnist/$model)" $run/root/mnist/$model
  done
  out=results/mnist-ablations/ae_seed$seed
  [ -f $out/table.json ] && continue
  python -m eval.tables --dataset mnist --checkpoints $run/root --attacks cw_l2 --no-craft \
    --cache results/mnist/cache --out $out >> runs/logs/mnist_ae_seed$seed.log 2>&1 || exit 1
done
