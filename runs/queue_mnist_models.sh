#!/usr/bin/env bash
# The MNIST models by MagNet's recipe, their comparison with the shipped ones, then the Table 1 campaign's shards,
# one after another. Every step resumes (training from its work folder, eval.tables from its shards): rerun this
# script to continue. The classifier (step 0) is finished and exported in runs/mnist/export; its command was
#   python -m train.classifier --dataset mnist --epochs 50 --seed 0 --workdir runs/mnist/classifier \
#     --checkpoints runs/mnist/export
set -u
cd "$(dirname "$0")/.."
. .venv/bin/activate
export MAGNET_MI_DATA_DIR="${MAGNET_MI_DATA_DIR:-$(cd .. && pwd)/shared/data}"
# EAD at the paper's settings, kappa 10 and 30, 100 images: shipped classifier vs MagNet's recipe (both with the
# shipped auto-encoders and generator). The new classifier's shards go to the campaign's cache, which reuses
# them if that classifier ships.
common="--dataset mnist --n-images 100 --kappas 10,30 --attacks ead_l1,ead_en"
while pgrep -f "eval.tables $common --out results/mnist-classifiers/shipped" >/dev/null; do sleep 30; done
python -m eval.tables $common --out results/mnist-classifiers/shipped --overwrite \
  --cache results/mnist-classifiers/cache >> runs/logs/compare_shipped.log 2>&1 || exit 1
python -m eval.tables $common --checkpoints runs/mnist/compare_root --out results/mnist-classifiers/magnet_recipe \
  --overwrite --cache results/mnist/cache >> runs/logs/compare_magnet_recipe.log 2>&1 || exit 1
python -m eval.compare_classifiers --dataset mnist --models shipped=checkpoints magnet_recipe=runs/mnist/compare_root \
  --tables shipped=results/mnist-classifiers/shipped magnet_recipe=results/mnist-classifiers/magnet_recipe \
  --out results/mnist-classifiers >> runs/logs/compare.log 2>&1 || exit 1
# MagNet and MI-MagNet against adaptive attacks (issue 15), with the shipped models, at a CPU size: about
# 2-3 h here, most of it the attacks on MI-MagNet (the generator and classifier for all 10 conditions).
python -m eval.adaptive --dataset mnist --n-images 100 --kappas 0,10,20 --attacks ead_en,ead_l1,cw \
  --iterations 100 --search-steps 5 --const 0.1 >> runs/logs/adaptive.log 2>&1 || exit 1
for which in ae_i ae_ii; do
  python -m train.autoencoder --dataset mnist --which $which --seed 0 --workdir runs/mnist/$which \
    --checkpoints runs/mnist/export >> runs/logs/mnist_$which.log 2>&1 || exit 1
done
# The campaign: Table 1 at the paper's protocol. Shards depend on the classifier only, so they stay valid
# whichever auto-encoders and generator the table is finally evaluated with.
python -m eval.tables --dataset mnist --checkpoints runs/mnist/compare_root --out runs/mnist/table1-partial \
  --overwrite --partial --cache results/mnist/cache >> runs/logs/campaign.log 2>&1 || exit 1
