"""Where an attack iteration's time goes on this backend: the layer-level figures behind ``models/layers.py``.

    python -m eval.probe_layers [--batch 100] [--repeats 20] [--json PATH] [--train-step] [--dataset cifar10]

Times (milliseconds per call, the minimum over ``--repeats`` calls after a warm-up; batch of MNIST-shaped
inputs, random values) each problem the custom layers fix, natively (``lax``, JAX's own transpose rules)
and with this package's layers:

1. the forward of MagNet's second MNIST convolution standing alone, (B, 26, 26, 32) -> (B, 24, 24, 32):
   ``"VALID"`` natively, the same with padding (1, 1) natively (more FLOPs), ``"VALID"`` computed with one
   extra padded row (the form :func:`~magnet_mi_jax.models.layers.conv_general_dilated` differentiates
   through on CPU under default compilation), and ``"VALID"`` natively compiled by
   :func:`~magnet_mi_jax.models.layers.cpu_jit` (lone convolutions on Eigen);
2. the input gradient of the first convolution (one input channel), (B, 28, 28, 1) -> (B, 26, 26, 32): JAX's
   transpose vs the custom VJP (matmul + col2im);
3. the gradient of a 2x2 max pool of (B, 24, 24, 32): ``select_and_scatter`` vs the fused custom VJP, and
   the forward of ReLU + that pool as ``reduce_window``, as a reduction over reshaped window axes, and as the
   maximum of the window positions' strided views (the custom VJP's forward rule);
4. the whole classifier's input gradient inside a ``lax.fori_loop`` of 10 steps (per step): the plain network
   (native convolutions and pools) vs the same function through :func:`~magnet_mi_jax.attacks.fast_vjp`,
   compiled by ``jax.jit`` and by :func:`~magnet_mi_jax.models.layers.cpu_jit`;
   beside it the forward pass alone, of the plain network and of :class:`~magnet_mi_jax.models.MnistClassifier`
   (this package's layers).

5. a training step of ``--dataset``'s classifier (default MNIST) as ``train.trainer`` runs it (SGD with
   Nesterov momentum, dropout, cross-entropy, the dataset's augmentation; batch 128 whatever ``--batch``
   says, MagNet's batch size), compiled by ``jax.jit`` and by :func:`~magnet_mi_jax.models.layers.cpu_jit`
   (what the trainer uses), beside its FLOP limit: XLA's FLOP count of the step at the rate of the jitted
   forward pass (see :func:`probe_train_step`). ``--train-step`` times only this problem.

The plain network of 4. is MagNet's MNIST classifier written with ``lax`` primitives only; it is checked to
give the same logits as :class:`~magnet_mi_jax.models.MnistClassifier` on the same (random) parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from magnet_mi_jax.attacks import fast_vjp
from magnet_mi_jax.models import MnistClassifier, layers
from magnet_mi_jax import cli, datasets

DN = ("NHWC", "HWIO", "NHWC")


def _best_ms(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return 1e3 * best


def plain_mnist_classifier(params, x):
    """MagNet's MNIST classifier (inference) with ``lax`` convolutions and ``lax.reduce_window`` pools."""
    p = params["params"]
    for i in range(4):
        x = jax.nn.relu(lax.conv_general_dilated(x, p[f"conv{i}"]["kernel"], (1, 1), "VALID", dimension_numbers=DN)
                        + p[f"conv{i}"]["bias"])
        if i % 2 == 1:
            x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    x = x.reshape(x.shape[0], -1)
    for name in ("dense0", "dense1"):
        x = jax.nn.relu(x @ p[name]["kernel"] + p[name]["bias"])
    return x @ p["logits"]["kernel"] + p["logits"]["bias"]


def probe(batch: int = 100, repeats: int = 20) -> dict[str, dict[str, float]]:
    keys = jax.random.split(jax.random.key(0), 6)
    out: dict[str, dict[str, float]] = {}

    x26 = jax.random.uniform(keys[0], (batch, 26, 26, 32))
    w32 = jax.random.normal(keys[1], (3, 3, 32, 32)) * 0.1
    native = jax.jit(lambda x, w, pad: lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=DN),
                     static_argnums=2)
    # the padded-row form that layers.conv_general_dilated differentiates through on CPU (default compilation)
    ours = jax.jit(lambda x, w: layers._conv_cpu(x, w, ((0, 0), (0, 0)), lax.conv_dimension_numbers(
        x.shape, w.shape, DN), None))
    out["conv_forward_26x26x32"] = {
        "native_valid": _best_ms(lambda: native(x26, w32, "VALID"), repeats),
        "native_padding_1_1": _best_ms(lambda: native(x26, w32, ((1, 1), (1, 1))), repeats),
        "layers_padded_row": _best_ms(lambda: ours(x26, w32), repeats)}
    if jax.default_backend() == "cpu" and layers.cpu_compiler_options() is not None:
        eigen = layers.cpu_jit(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=DN))
        np.testing.assert_allclose(eigen(x26, w32), native(x26, w32, "VALID"), rtol=1e-4, atol=1e-4)
        out["conv_forward_26x26x32"]["native_valid_cpu_jit"] = _best_ms(lambda: eigen(x26, w32), repeats)

    x28 = jax.random.uniform(keys[2], (batch, 28, 28, 1))
    w1 = jax.random.normal(keys[3], (3, 3, 1, 32)) * 0.1
    g26 = jax.random.normal(keys[4], (batch, 26, 26, 32))

    def input_grad(conv):  # w and g are arguments: as constants XLA would fold the (x-independent) gradient
        return jax.jit(lambda x, w, g: jax.grad(
            lambda x: jnp.sum(conv(x, w, (1, 1), "VALID", dimension_numbers=DN) * g))(x))
    native_g, ours_g = input_grad(lax.conv_general_dilated), input_grad(layers.conv_general_dilated)
    np.testing.assert_allclose(ours_g(x28, w1, g26), native_g(x28, w1, g26), rtol=1e-4, atol=1e-4)
    out["first_conv_input_gradient"] = {"native": _best_ms(lambda: native_g(x28, w1, g26), repeats),
                                        "layers": _best_ms(lambda: ours_g(x28, w1, g26), repeats)}

    x24 = jax.random.uniform(keys[5], (batch, 24, 24, 32))
    g12 = jax.random.normal(keys[0], (batch, 12, 12, 32))

    def pool_grad(pool):
        return jax.jit(lambda x, g: jax.grad(lambda x: jnp.sum(pool(x) * g))(x))
    native_pool = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")  # noqa: E731
    native_p = pool_grad(native_pool)
    ours_p = pool_grad(lambda x: layers.max_pool(x, (2, 2), (2, 2)))
    np.testing.assert_array_equal(ours_p(x24, g12), native_p(x24, g12))
    out["max_pool_gradient_24x24x32"] = {"native": _best_ms(lambda: native_p(x24, g12), repeats),
                                         "layers": _best_ms(lambda: ours_p(x24, g12), repeats)}
    b32 = jax.random.normal(keys[1], (32,))
    pools = {"native_reduce_window": native_pool,
             "reshape_reduce": lambda x: x.reshape(x.shape[0], 12, 2, 12, 2, 32).max(axis=(2, 4)),
             "layers_strided_views": lambda x: layers._pool_strided(x, (1, 2, 2, 1))}
    pools = {k: jax.jit(lambda x, b, f=f: f(jax.nn.relu(x + b))) for k, f in pools.items()}
    for f in pools.values():
        np.testing.assert_array_equal(f(x24, b32), pools["native_reduce_window"](x24, b32))
    out["relu_then_max_pool_forward_24x24x32"] = {k: _best_ms(lambda f=f: f(x24, b32), repeats)
                                                  for k, f in pools.items()}

    params = MnistClassifier().init(jax.random.key(1), jnp.zeros((1, 28, 28, 1)))
    np.testing.assert_allclose(plain_mnist_classifier(params, x28), MnistClassifier().apply(params, x28),
                               rtol=1e-4, atol=1e-4)
    steps = 10

    def loop(fn):
        grad = jax.grad(lambda x, p: jnp.sum(fn(p, x)))
        return jax.jit(lambda x, p: lax.fori_loop(0, steps, lambda _, x: jnp.clip(x - 1e-3 * grad(x, p), 0, 1), x))
    native_l, fast_l = loop(plain_mnist_classifier), loop(fast_vjp(plain_mnist_classifier))
    fast_cpu_jit_l = layers.cpu_jit(loop(fast_vjp(plain_mnist_classifier)))
    forward, module_forward = jax.jit(plain_mnist_classifier), jax.jit(MnistClassifier().apply)
    np.testing.assert_allclose(fast_cpu_jit_l(x28, params), native_l(x28, params), rtol=1e-4, atol=1e-4)
    loop_repeats = max(repeats // 4, 2)
    out["classifier_gradient_step_in_loop"] = {
        "forward": _best_ms(lambda: forward(params, x28), repeats),
        "forward_with_layers": _best_ms(lambda: module_forward(params, x28), repeats),
        "native_per_step": _best_ms(lambda: native_l(x28, params), loop_repeats) / steps,
        "fast_vjp_per_step": _best_ms(lambda: fast_l(x28, params), loop_repeats) / steps,
        "fast_vjp_cpu_jit_per_step": _best_ms(lambda: fast_cpu_jit_l(x28, params), loop_repeats) / steps}
    return out


def probe_train_step(repeats: int = 20, batch: int = 128, dataset: str = "mnist") -> dict[str, dict[str, float]]:
    """Problem 5: one training step of ``dataset``'s classifier, ``jax.jit`` vs ``cpu_jit``, against its FLOP limit.

    Besides the two steps (ms each), reports what bounds them on this backend:

    * ``step_gflop`` and ``forward_gflop``: XLA's own count of the floating-point operations of the compiled
      step and of the compiled forward pass at the same batch (``compiled.cost_analysis()["flops"]``);
    * ``forward_ms``: the jitted inference forward pass (one fused graph on CPU), the fastest way this backend
      runs these convolutions, and ``forward_gflops_per_s`` its rate;
    * ``flop_limit_ms``: the step's FLOPs at the forward pass's rate, i.e. the time a step would take if every
      operation of the backward pass ran as fast as the fused forward; ``cpu_jit_over_limit`` the measured step
      over that limit (1 = no time lost beyond the arithmetic);
    * ``matmul_2048_gflops_per_s``: a 2048 x 2048 float32 matrix product's rate, the backend's attainable
      arithmetic rate, and ``matmul_limit_ms`` / ``cpu_jit_over_matmul_limit`` the step against it.
    """
    import optax

    from magnet_mi_jax import checkpoint
    from train import classifier, trainer
    image_shape = datasets.get(dataset).image_shape
    module = checkpoint.model_spec(dataset, "classifier").build()
    config = classifier.config_for(dataset)
    tx = classifier.optimizer(config, steps_per_epoch=1)  # keras_decay ignores it
    params = checkpoint.init_params(module, dataset, jax.random.key(0))
    state = trainer.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.key(1))
    rng = np.random.default_rng(0)
    batch_ = {"image": jnp.asarray(rng.random((batch, *image_shape), np.float32)),
              "label": jnp.asarray(rng.integers(0, 10, batch), jnp.int32)}
    loss_fn = classifier.make_loss_fn(module, config, image_shape)

    def step(state, b):
        key = jax.random.fold_in(state.key, state.step)
        grads, _ = jax.grad(loss_fn, has_aux=True)(state.params, b, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return trainer.TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state, state.key)

    steps = {"jit": jax.jit(step), "cpu_jit": layers.cpu_jit(step)}
    ref, fast = steps["jit"](state, batch_), steps["cpu_jit"](state, batch_)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), ref.params, fast.params)
    out = {f"{name}_batch{batch}": _best_ms(lambda f=f: f(state, batch_), repeats) for name, f in steps.items()}

    forward = jax.jit(module.apply)
    out["forward_ms"] = _best_ms(lambda: forward(params, batch_["image"]), repeats)
    out["step_gflop"] = _gflop(steps["cpu_jit"], state, batch_)
    out["forward_gflop"] = _gflop(forward, params, batch_["image"])
    out["forward_gflops_per_s"] = out["forward_gflop"] / (out["forward_ms"] / 1e3)
    out["flop_limit_ms"] = out["step_gflop"] / out["forward_gflops_per_s"] * 1e3
    out["cpu_jit_over_limit"] = out[f"cpu_jit_batch{batch}"] / out["flop_limit_ms"]
    a = jnp.asarray(rng.random((2048, 2048), np.float32))
    matmul = jax.jit(jnp.matmul)
    out["matmul_2048_gflops_per_s"] = 2 * 2048**3 / 1e9 / (_best_ms(lambda: matmul(a, a), repeats) / 1e3)
    out["matmul_limit_ms"] = out["step_gflop"] / out["matmul_2048_gflops_per_s"] * 1e3
    out["cpu_jit_over_matmul_limit"] = out[f"cpu_jit_batch{batch}"] / out["matmul_limit_ms"]
    return {f"{dataset}_classifier_training_step": out}


def _gflop(fn, *args) -> float:
    """XLA's count of the floating-point operations of ``fn(*args)`` as compiled (GFLOP)."""
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost     # older jax: one dict per computation
    return float(cost["flops"]) / 1e9


def to_markdown(report: dict[str, Any]) -> str:
    batch = "training step only" if report.get("train_step_only") else f"batch {report['batch']}"
    lines = [f"## Layer probe: {batch}, best of {report['repeats']} calls", "",
             f"Device {report['device']}, load average {report['loadavg_start'][0]:.2f} -> "
             f"{report['loadavg_end'][0]:.2f}, commit {report['git_commit'][:12]}.", "",
             "| problem | variant | ms |", "|---|---|---:|"]
    for problem, variants in report["probe"].items():
        lines += [f"| {problem} | {v} | {ms:.2f} |" for v, ms in variants.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument("--train-step", action="store_true", help="time only the training step (problem 5)")
    parser.add_argument("--dataset", default="mnist", choices=datasets.names(),
                        help="whose classifier the training step (problem 5) trains")
    cli.add_overwrite_flag(parser)
    args = parser.parse_args(argv)
    cli.refuse_to_overwrite([args.json], args.overwrite)
    load_start = os.getloadavg()
    results = {} if args.train_step else probe(args.batch, args.repeats)
    results.update(probe_train_step(args.repeats, dataset=args.dataset))
    report = {"batch": args.batch, "repeats": args.repeats, "train_step_only": args.train_step,
              **cli.provenance(cli.command_line("eval.probe_layers")),
              "loadavg_start": load_start, "probe": results, "loadavg_end": os.getloadavg()}
    sys.stdout.write(to_markdown(report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
