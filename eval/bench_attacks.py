"""Benchmark: our jitted EAD and C&W-L2 against Foolbox 3 on the same classifier, images and settings.

    python -m eval.bench_attacks [--dataset mnist] [--images 100] [--iterations 100] [--search-steps 5]
                                 [--const 0.01] [--kappa 0] [--attacks ead,cw] [--no-foolbox] [--json PATH]

Writes a Markdown report to stdout (and JSON with ``--json``). Ours is every attack run of the registry
(:mod:`magnet_mi_jax.attacks.registry`, ``--attacks`` names runs) called exactly as ``eval.tables`` calls it,
with the settings below as its protocol; the cell compared with Foolbox is :data:`FOOLBOX_CELLS`' (EAD's EN
rule: the one Foolbox implements; the run keeps both rules' best examples, as the tables do, one more
comparison per iteration than the EN-only calls that the figures in BENCHMARKS.md made before commit c63177b).
For each attack and implementation:

* image-iterations per second = images x iterations x search steps / wall time of the whole call (after a
  warm-up call that compiles; the same inputs), best of ``--repeats``;
* success rate at the given kappa, re-judged here for every implementation in the same way (the plain model's
  logits on the returned image: ``max_{j != t} Z_j > Z_t + kappa``, 1e-4 tolerance for float noise), mean
  L1 and L2 distortion over each one's successes and over the images where both succeeded;
* for ours, the "limit ratio" (one attack iteration / one forward pass of the classifier; the FLOP limit is
  about 2 for C&W and 3 for EAD) and the "overhead ratio" (one attack iteration / one bare forward+backward
  pass, i.e. ``jax.grad`` of the summed logits in the input; the physical limit is about 1 for C&W and 1.5
  for EAD). Forward and forward+backward are timed on the same batch in the same process.

Foolbox 3 (``pip install foolbox``, the ``bench`` extra) runs on its JAX backend with the *same* Flax model,
given as a plain logits function (``foolbox-eager``: how its documentation uses a JAX model; every operation
dispatched eagerly) and as a jitted one (``foolbox-jit``: its best case; its per-iteration Python, eager
elementwise work and host syncs remain). Foolbox returns an all-zero image where it found nothing; those are
counted as failures here (the images they would count as "adversarial" are not the attack's work).
Settings are matched: EAD with the EN rule, beta, step size and its square-root decay, initial const, binary
search steps and iterations, abort-early off; C&W with Adam's step size. The classifier is the shipped
``checkpoints/<dataset>/classifier``; without it, a small classifier is trained first (2 epochs on 12,800
images, as the test fixture) and the report says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from magnet_mi_jax import checkpoint, cli, data, datasets
from magnet_mi_jax.attacks import AttackResult, common, fast_vjp, registry
from magnet_mi_jax.models import layers
from train.common import small_classifier

FOOLBOX_CELLS = {"ead": "ead_en", "cw": "cw_l2"}
"""Attack run -> the cell of ours that its Foolbox 3 counterpart computes (runs not named here: ours only)."""


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """The attack settings both implementations get, as the registry's protocol (``AttackRun.craft``).

    Foolbox's EAD uses the textbook momentum k/(k+3) and neither Foolbox attack aborts early, so ours does the
    same here (the tables use the reference code's momentum and C&W's abort-early: ``eval.protocol``).
    """

    iterations: int
    search_steps: int
    initial_const: float
    learning_rate: float
    beta: float = 1e-2
    ead_momentum: str = "textbook"
    cw_abort_early: bool = False


def craft(run: registry.AttackRun, module, params, x0, labels, kappa: float,
          settings: BenchSettings) -> dict[str, AttackResult]:
    """One call of a registered attack run at one kappa: {cell: AttackResult with (B, ...) fields}."""
    out = run.craft(module.apply, params, x0, labels, jnp.full((1, 1), kappa, jnp.float32), settings)
    return {cell: jax.tree.map(lambda a: a[0], res) for cell, res in out.items()}


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Best wall time in seconds of ``fn()`` (blocking on its result) and its last result; one warm-up first."""
    out = jax.block_until_ready(fn())
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best, out


def _judge(apply_jit, params, x0, labels, adv, kappa: float) -> dict[str, np.ndarray]:
    adv = jnp.asarray(adv)
    z_t, other = common.true_and_other(apply_jit(params, adv), labels)
    ok = np.asarray(other - z_t > kappa - 1e-4) & np.all(np.isfinite(np.asarray(adv)), axis=(1, 2, 3))
    d = (np.asarray(adv) - np.asarray(x0)).reshape(len(ok), -1)
    return {"success": ok, "l1": np.abs(d).sum(1), "l2": np.sqrt((d ** 2).sum(1))}


def _summary(j: dict[str, np.ndarray], both: np.ndarray) -> dict[str, float]:
    ok = j["success"]
    mean = lambda v, m: float(v[m].mean()) if m.any() else float("nan")  # noqa: E731
    return {"success_rate": float(ok.mean()), "mean_l1": mean(j["l1"], ok), "mean_l2": mean(j["l2"], ok),
            "mean_l1_common": mean(j["l1"], both), "mean_l2_common": mean(j["l2"], both)}


def iteration_ratios(module, params, x0, labels, repeats: int = 5) -> dict[str, float]:
    """Per-iteration cost free of compile and per-call overhead: (time at K=50 - time at K=10) / 40, one
    search step, all candidates interleaved and the best of ``repeats`` rounds kept (robust to other load)."""
    fast = fast_vjp(module.apply)
    fwd = jax.jit(module.apply)                  # the classifier's own forward pass (the denominator)
    # the bare input gradient, compiled as the attacks compile (layers.cpu_jit: lone convolutions on Eigen)
    grad = layers.cpu_jit(jax.grad(lambda p, x: jnp.sum(fast(p, x)), argnums=1))
    cands = {"forward": (lambda: fwd(params, x0), 10), "forward_backward": (lambda: grad(params, x0), 10)}
    for name, run in registry.REGISTRY.items():
        for k in (10, 50):
            settings = BenchSettings(iterations=k, search_steps=1, initial_const=1e-3, learning_rate=1e-2)
            cands[f"{name}{k}"] = ((lambda run, settings: lambda: craft(run, module, params, x0, labels, 0.0,
                                                                        settings))(run, settings), 1)
    for f, _ in cands.values():
        jax.block_until_ready(f())
    best = {k: np.inf for k in cands}
    for _ in range(repeats):
        for key, (f, n) in cands.items():
            t = time.perf_counter()
            for _ in range(n):
                out = f()
            jax.block_until_ready(out)
            best[key] = min(best[key], (time.perf_counter() - t) / n)
    out = {"forward_ms": 1e3 * best["forward"], "forward_backward_ms": 1e3 * best["forward_backward"]}
    for a in registry.REGISTRY:
        it = (best[a + "50"] - best[a + "10"]) / 40
        out[f"{a}_ms_per_iteration"] = 1e3 * it
        out[f"{a}_limit_ratio"] = it / best["forward"]
        out[f"{a}_overhead_ratio"] = it / best["forward_backward"]
    return out


def precision_probe(module, params, x0, repeats: int = 5) -> dict[str, float]:
    """The classifier's forward and forward+backward (``fast_vjp``) in float32 and in bfloat16 (params and
    images cast), ms per call, best of ``repeats`` rounds of 10: does lower precision buy FLOPs here?"""
    fast = fast_vjp(module.apply)
    out = {}
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        p = jax.tree.map(lambda a: a.astype(dtype), params)
        x = x0.astype(dtype)
        fwd = jax.jit(module.apply)
        grad = layers.cpu_jit(jax.grad(lambda p, x: jnp.sum(fast(p, x).astype(jnp.float32)), argnums=1))
        out[f"{name}_forward_ms"] = 1e3 * _timed(lambda: fwd(p, x), 10 * repeats)[0]
        out[f"{name}_forward_backward_ms"] = 1e3 * _timed(lambda: grad(p, x), 10 * repeats)[0]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_start = os.getloadavg()
    ds = data.load_dataset(args.dataset, data_dir=args.data_dir)
    try:
        module, params, card = checkpoint.load_model(args.dataset, "classifier", args.checkpoints)
        weights = f"checkpoints/{args.dataset}/classifier ({card.get('command', '?')})"
    except checkpoint.CheckpointError as err:
        if args.dataset != "mnist":
            raise
        print(f"# {err}\n# training the small test classifier instead", file=sys.stderr)
        module, params = small_classifier(ds.train_x, ds.train_y)
        weights = "tiny classifier (2 epochs on 12,800 images, seed 0)"
    apply_jit = jax.jit(module.apply)
    preds = np.concatenate([np.argmax(np.asarray(apply_jit(params, ds.test_x[i:i + 1000])), -1)
                            for i in range(0, len(ds.test_x), 1000)])
    idx = data.select_attack_indices(ds.test_y, preds, n=args.images, seed=args.seed)
    x0 = jnp.asarray(ds.test_x[idx])
    labels = jnp.asarray(ds.test_y[idx], jnp.int32)
    n, k_it, s_st = args.images, args.iterations, args.search_steps
    total_iters = k_it * s_st

    if args.ratios_only:
        ratios = iteration_ratios(module, params, x0, labels, max(args.repeats, 5))
        if args.precision_probe:
            ratios["precision"] = precision_probe(module, params, x0, max(args.repeats, 5))
        return {"config": {k: v for k, v in vars(args).items() if k != "json"}, "weights": weights,
                **cli.provenance(cli.command_line("eval.bench_attacks")), "cpu_count": os.cpu_count(),
                "loadavg_start": load_start, "ratios": ratios,
                "loadavg_end": os.getloadavg()}

    # ---- the classifier alone, on the same batch
    fwdbwd = jax.jit(jax.grad(lambda p, x: jnp.sum(module.apply(p, x)), argnums=1))
    fast = fast_vjp(module.apply)
    fwdbwd_fast = layers.cpu_jit(jax.grad(lambda p, x: jnp.sum(fast(p, x)), argnums=1))   # as the attacks
    reps = max(args.repeats, 1) * 10
    t_fwd = _timed(lambda: apply_jit(params, x0), reps)[0]
    t_fb = _timed(lambda: fwdbwd(params, x0), reps)[0]
    t_fb_fast = _timed(lambda: fwdbwd_fast(params, x0), reps)[0]
    t_bare = min(t_fb, t_fb_fast)

    settings = BenchSettings(iterations=k_it, search_steps=s_st, initial_const=args.const, learning_rate=args.lr,
                             beta=args.beta)
    results: dict[str, Any] = {}
    judged: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name in args.attacks:
        run = registry.get(name)
        t, out = _timed(lambda: craft(run, module, params, x0, labels, args.kappa, settings), args.repeats)
        res = out[FOOLBOX_CELLS.get(name, run.cells[0])]
        judged[(name, "ours")] = _judge(apply_jit, params, x0, labels, res.adv, args.kappa)
        t_iter = t / total_iters
        results.setdefault(name, {})["ours"] = {
            "seconds": t, "image_iterations_per_s": n * total_iters / t, "ms_per_iteration": 1e3 * t_iter,
            "limit_ratio": t_iter / t_fwd, "overhead_ratio": t_iter / t_bare,
            "reported_success_rate": float(np.mean(np.asarray(res.success)))}

    impl_names = ["ours"]
    if not args.no_foolbox:
        import foolbox as fb
        models = {"foolbox-jit": jax.jit(lambda x: module.apply(params, x)),
                  "foolbox-eager": lambda x: module.apply(params, x)}

        def fb_attack(name, steps, searches):
            if name == "ead":
                return fb.attacks.EADAttack(binary_search_steps=searches, steps=steps, initial_stepsize=args.lr,
                                            confidence=args.kappa, initial_const=args.const,
                                            regularization=args.beta, decision_rule="EN", abort_early=False)
            return fb.attacks.L2CarliniWagnerAttack(binary_search_steps=searches, steps=steps, stepsize=args.lr,
                                                    confidence=args.kappa, initial_const=args.const,
                                                    abort_early=False)
        for impl in args.foolbox_models:
            fmodel = fb.JAXModel(models[impl], bounds=(0.0, 1.0))
            impl_names.append(impl)
            for name in [a for a in args.attacks if a in FOOLBOX_CELLS]:
                fb_attack(name, 2, 1).run(fmodel, x0, labels)          # warm-up (compiles a jitted model)
                t = time.perf_counter()
                adv = jax.block_until_ready(fb_attack(name, k_it, s_st).run(fmodel, x0, labels))
                t = time.perf_counter() - t
                # Foolbox starts from best_advs = zeros and returns them where it found nothing: an all-zero
                # image is its failure marker (misclassified as it may be), so it does not count as a success.
                placeholder = np.all(np.asarray(adv).reshape(n, -1) == 0, axis=1)
                j = _judge(apply_jit, params, x0, labels, adv, args.kappa)
                j["success"] = j["success"] & ~placeholder
                judged[(name, impl)] = j
                results[name][impl] = {"seconds": t, "image_iterations_per_s": n * total_iters / t,
                                       "ms_per_iteration": 1e3 * t / total_iters,
                                       "limit_ratio": t / total_iters / t_fwd,
                                       "zero_images_returned": int(placeholder.sum())}
                results[name][f"speedup_vs_{impl}"] = (results[name]["ours"]["image_iterations_per_s"]
                                                      / results[name][impl]["image_iterations_per_s"])

    for name in args.attacks:
        impls = [i for i in impl_names if (name, i) in judged]
        both = np.logical_and.reduce([judged[(name, i)]["success"] for i in impls])
        for i in impls:
            results[name][i].update(_summary(judged[(name, i)], both))

    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "weights": weights, "images_sha": data.indices_hash(idx),
        **cli.provenance(cli.command_line("eval.bench_attacks")),
        "cpu_count": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "classifier_ms": {"forward": 1e3 * t_fwd, "forward_backward": 1e3 * t_fb,
                          "forward_backward_fast_vjp": 1e3 * t_fb_fast},
        "results": results,
    }


def _precision_markdown(p: dict[str, float] | None) -> str:
    if not p:
        return ""
    return ("\n| precision | forward ms | forward+backward ms |\n|---|---:|---:|\n" + "".join(
        f"| {d} | {p[f'{d}_forward_ms']:.2f} | {p[f'{d}_forward_backward_ms']:.2f} |\n"
        for d in ("float32", "bfloat16")))


_RUN_TITLES = {"ead": "EAD", "cw": "C&W"}


def to_markdown(report: dict[str, Any]) -> str:
    c = report["config"]
    if "ratios" in report:
        r = report["ratios"]
        return (f"## Per-iteration ratios: {c['dataset']}, {c['images']} images (K=50 minus K=10, best of rounds)\n\n"
                f"Device {report['device']}, load average {report['loadavg_start'][0]:.2f} -> "
                f"{report['loadavg_end'][0]:.2f}.\n\n"
                f"| | ms | / forward | / forward+backward |\n|---|---:|---:|---:|\n"
                f"| forward | {r['forward_ms']:.2f} | 1.00 | |\n"
                f"| forward+backward (fast_vjp) | {r['forward_backward_ms']:.2f} | "
                f"{r['forward_backward_ms'] / r['forward_ms']:.2f} | 1.00 |\n"
                + "".join(f"| {_RUN_TITLES.get(a, a)} iteration | {r[f'{a}_ms_per_iteration']:.2f} | "
                          f"{r[f'{a}_limit_ratio']:.2f} | {r[f'{a}_overhead_ratio']:.2f} |\n"
                          for a in registry.REGISTRY if f"{a}_ms_per_iteration" in r)
                + _precision_markdown(r.get("precision")))
    cm = report["classifier_ms"]
    lines = [
        f"## Attack benchmark: {c['dataset']}, {c['images']} images, {c['iterations']} iterations x "
        f"{c['search_steps']} search steps, kappa {c['kappa']}, c0 {c['const']}",
        "",
        f"Device {report['device']} (jax {report['jax']}, {report['cpu_count']} CPUs), load average "
        f"{report['loadavg_start'][0]:.2f} -> {report['loadavg_end'][0]:.2f}; weights: {report['weights']}; "
        f"commit {report['git_commit'][:12]}.",
        "",
        f"Classifier on the batch: forward {cm['forward']:.2f} ms; forward+backward {cm['forward_backward']:.2f} ms "
        f"(with fast_vjp, compiled as the attacks are: {cm['forward_backward_fast_vjp']:.2f} ms).",
        "",
        "| attack | impl | image-iter/s | ms/iter | limit ratio (iter/fwd) | overhead ratio (iter/fwd+bwd) "
        "| success | mean L1 | mean L2 | L1 (both ok) | L2 (both ok) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["results"].items():
        for impl in ("ours", "foolbox-jit", "foolbox-eager"):
            if impl not in r:
                continue
            m = r[impl]
            over = f"{m['overhead_ratio']:.2f}" if "overhead_ratio" in m else "-"
            lines.append(f"| {name} | {impl} | {m['image_iterations_per_s']:.0f} | {m['ms_per_iteration']:.1f} | "
                         f"{m['limit_ratio']:.2f} | {over} | {m['success_rate']:.3f} | {m['mean_l1']:.3f} | "
                         f"{m['mean_l2']:.3f} | {m['mean_l1_common']:.3f} | {m['mean_l2_common']:.3f} |")
        for impl in ("foolbox-jit", "foolbox-eager"):
            if f"speedup_vs_{impl}" in r:
                lines.append(f"| {name} | **speed-up vs {impl}** | **{r[f'speedup_vs_{impl}']:.1f}x** "
                             "| | | | | | | | |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=datasets.names())
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--search-steps", type=int, default=5)
    p.add_argument("--const", type=float, default=0.01, help="initial c (DESIGN default 1e-3)")
    p.add_argument("--kappa", type=float, default=0.0)
    p.add_argument("--beta", type=float, default=1e-2)
    p.add_argument("--lr", type=float, default=1e-2, help="EAD initial step size and C&W Adam step size")
    p.add_argument("--attacks", type=lambda s: s.split(","), default=list(registry.REGISTRY),
                   help=f"comma-separated attack runs of the registry (default all: {','.join(registry.REGISTRY)})")
    p.add_argument("--repeats", type=int, default=1, help="timed calls of ours after the warm-up (best kept)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image selection")
    p.add_argument("--no-foolbox", action="store_true")
    p.add_argument("--ratios-only", action="store_true",
                   help="only the per-iteration limit/overhead ratios of ours (differencing K=50 and K=10)")
    p.add_argument("--precision-probe", action="store_true",
                   help="with --ratios-only: also time the classifier in float32 vs bfloat16")
    p.add_argument("--foolbox-models", type=lambda s: s.split(","), default=["foolbox-jit", "foolbox-eager"],
                   help="Foolbox runs: foolbox-jit (the model function jitted) and/or foolbox-eager (as is)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--checkpoints", default=None)
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    cli.add_overwrite_flag(p)
    args = p.parse_args(argv)
    cli.refuse_to_overwrite([args.json], args.overwrite)
    if not args.attacks or any(a not in registry.REGISTRY for a in args.attacks):
        p.error(f"--attacks takes a comma-separated subset of {','.join(registry.REGISTRY)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    sys.stdout.write(to_markdown(report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2, default=float)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
