"""The paper's Figure 2: ``python -m eval.figure_generator --dataset mnist --out results/mnist/figure2.png``.

A grid of conditional generations G(E(x), e_j): one row per input test image (the input in the first column,
then one column per condition j = 0..K-1). The test images are the first ``--rows`` of a seeded shuffle of
the test set (``--seed``). The command also prints the conditional accuracy (the trained classifier's
accuracy on G(E(x), e_j) being class j over all j) and the reconstruction error on the first ``--eval-images``
test images, and writes them beside the figure as ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

from magnet_mi_jax import checkpoint, cli, datasets
from magnet_mi_jax.models import alpha_gan


def figure_grid(inputs: np.ndarray, generations: np.ndarray, pad: int = 2) -> np.ndarray:
    """Tiles inputs (N, H, W, C) and generations (N, K, H, W, C) into one (N(H+pad)+pad, (K+1)(W+pad)+pad+pad, C)
    image: column 0 is the input, a double gap, then the K conditions."""
    n, k, h, w, c = generations.shape
    if inputs.shape != (n, h, w, c):
        raise ValueError(f"inputs {inputs.shape} do not match generations {generations.shape}")
    grid = np.ones((n * (h + pad) + pad, (k + 1) * (w + pad) + 2 * pad, c), np.float32)
    for r in range(n):
        top = pad + r * (h + pad)
        grid[top:top + h, pad:pad + w] = inputs[r]
        for j in range(k):
            left = 2 * pad + (j + 1) * (w + pad)
            grid[top:top + h, left:left + w] = generations[r, j]
    return grid


def save_figure(grid: np.ndarray, path: Path, column_labels: list[str], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height, width, channels = grid.shape
    fig, ax = plt.subplots(figsize=(width / 28 * 0.6 + 0.4, height / 28 * 0.6 + 0.8), dpi=150)
    ax.imshow(grid[..., 0] if channels == 1 else grid, cmap="gray" if channels == 1 else None, vmin=0, vmax=1,
              interpolation="nearest")
    cell = (width - 4) / len(column_labels)
    ax.set_xticks([2 + cell * (i + 0.5) + (2 if i else 0) for i in range(len(column_labels))])
    ax.set_xticklabels(column_labels, fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks([])
    ax.set_title(title, fontsize=8, pad=14)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_data_flags(parser, checkpoints_help="checkpoint root (default: the repository's)")
    parser.add_argument("--out", required=True, help="PNG path")
    parser.add_argument("--classifier-checkpoints", dest="classifier_checkpoints", default=None,
                        help="root of the classifier that scores the generations (default: --checkpoints)")
    parser.add_argument("--rows", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-images", type=int, default=1000)
    cli.add_overwrite_flag(parser)
    args = parser.parse_args(argv)
    if args.rows < 1 or args.eval_images < 1:
        parser.error("--rows and --eval-images must be positive")
    out = Path(args.out)
    cli.refuse_to_overwrite([out, out.with_suffix(".json")], args.overwrite)

    ds = cli.load_data(args)
    module, params, card = checkpoint.load_model(args.dataset, "generator", args.checkpoints)
    try:
        clf_module, clf_params, _ = checkpoint.load_model(args.dataset, "classifier",
                                                          args.classifier_checkpoints or args.checkpoints)
        clf_apply = jax.jit(clf_module.apply)
        classify = lambda x: clf_apply(clf_params, x)  # noqa: E731
    except checkpoint.CheckpointError as err:             # the figure without the conditional accuracy
        print(f"no classifier for the conditional accuracy: {err}")
        classify = None

    rows = np.random.default_rng(args.seed).permutation(len(ds.test_x))[:args.rows]
    generations = np.asarray(jax.jit(alpha_gan.generate_all_conditions, static_argnums=0)(
        module, params, ds.test_x[rows]))
    metrics = alpha_gan.measure(module, params, ds.test_x[:args.eval_images], ds.test_y[:args.eval_images], classify)

    names = list(datasets.get(args.dataset).class_names)
    acc = metrics.get("conditional_accuracy")
    title = (f"G(E(x), j) on {args.dataset} test images; conditional accuracy "
             f"{'n/a' if acc is None else f'{100 * acc:.2f}%'} over {args.eval_images} images x "
             f"{module.num_classes} conditions")
    save_figure(figure_grid(ds.test_x[rows], generations), out, ["input", *names], title)
    report = {"figure": str(out), "test_indices": rows.tolist(), "eval_images": args.eval_images,
              "generator_command": card.get("command"),
              "generator_variant": card.get("config", {}).get("variant", "class_aware"), **metrics}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    print(f"reconstruction L1 (mean |x - G(E(x), y)|, first {args.eval_images} test images): "
          f"{metrics['reconstruction_l1']:.4f}")
    if acc is None:
        print("conditional accuracy: n/a (no trained classifier)")
    else:
        print(f"conditional accuracy (classifier says j on G(E(x), e_j), all j): {100 * acc:.2f}%")
        print("per condition: " + " ".join(f"{j}:{100 * v:.1f}" for j, v in
                                           enumerate(metrics["conditional_accuracy_per_class"])))
    return report


if __name__ == "__main__":
    cli.run_main(main)
