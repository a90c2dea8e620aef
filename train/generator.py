"""Trains the conditional alpha-GAN: ``python -m train.generator --dataset mnist|cifar10``.

The networks and losses are :mod:`magnet_mi_jax.models.alpha_gan` (E, G, D, C; reconstruction, image-,
code-adversarial and auxiliary-class terms). One jitted pure step updates all four networks; the run state is
a :class:`train.trainer.TrainState` whose ``params`` hold the four networks (``"params"``) and a moving average
of E and G (``"ema"``), and whose ``opt_state`` holds one Adam state per player (``"eg"``, ``"d"``, ``"c"``).
Evaluation and the exported weights use the averaged E and G.

Run state lives in ``--workdir`` (default ``workdirs/<dataset>/generator``): interrupt at any time and rerun
the same command to resume. At the end the weights go to ``checkpoints/<dataset>/generator`` with a card
(``meta.json``) holding the command, seed, config, wall time and the measured numbers:

* ``test_reconstruction_l1``: mean |x - G(E(x), y)| over the first ``eval_images`` test images;
* ``conditional_accuracy``: the trained classifier's accuracy on G(E(x), e_j) being class j, over all K
  conditions j and the same test images (the paper's Figure 2 as a number), with the per-condition values;
* ``reconstruction_accuracy``: the classifier's accuracy on G(E(x), y) being y.

Variants (``--variant``, :data:`VARIANTS`): ``paper`` (the default) is the plain conditional alpha-GAN the MI
paper describes; ``class_aware`` is the generator shipped first; ``no_code_label`` lies between them.

Configs: Adam 2e-4 (b1 0.5) for each player, batch 64, lambda = 50 on the per-pixel mean L1 error, moving
average 0.999 of E and G. ``class_aware``: code weight 5 (with the label-conditioned code discriminator this is
what removes the class from the code; at weight 1 the code discriminator kept winning and G(E(x), j) copied
the input's digit), auxiliary-class weight 3. Chosen with 600-step runs on 12,800 MNIST images; the MNIST
epoch count fits a ~40-minute run on 2 CPU cores. The CIFAR-10 config is the same recipe, untuned; its config
asks for 100 epochs (a GPU job), and the shipped CIFAR-10 generator is the ``paper`` variant trained for 10 epochs
on 2 CPU cores (``--epochs 10``, 5,436 s; its card has the command): conditional accuracy 16.5%, i.e. it ignores
the condition, as the ``paper`` variant does on MNIST (16.3%).

The classifier is ``--classifier-checkpoints``, else the one in ``--checkpoints``, else the repository's
``checkpoints/<dataset>/classifier``; without one the classifier-based numbers are recorded as null, and the
card names the classifier used (its command, accuracy and ``params_sha256``). Per-epoch validation uses the first ``eval_images`` validation
images.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from magnet_mi_jax import checkpoint, cli, datasets
from magnet_mi_jax.models import alpha_gan
from train import alpha_gan_step, common, trainer


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    epochs: int = 5                        # the MNIST run; each dataset's config overrides what differs
    batch_size: int = 64
    learning_rate: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    reconstruction_weight: float = 50.0   # lambda of the L1 term (per-pixel mean)
    code_weight: float = 5.0               # makes the code independent of the class (see alpha_gan)
    class_weight: float = 3.0              # auxiliary-classifier terms of L_EG and L_D
    adversarial: str = "nonsaturating"     # or "logratio" (Rosca et al.)
    ema_decay: float = 0.999               # moving average of E and G; the exported E and G are the average
    eval_images: int = 1000
    variant: str = "class_aware"           # a name from VARIANTS; the fields below follow it
    image_label: bool = True               # D conditioned on the label by projection
    code_label: bool = True                # C conditioned on the label
    relabelled: bool = True                # fakes include G(E(x), y') with a wrong label y'

    def loss_weights(self) -> alpha_gan_step.LossWeights:
        return alpha_gan_step.LossWeights(reconstruction=self.reconstruction_weight, code=self.code_weight,
                                     classes=self.class_weight, adversarial=self.adversarial,
                                     image_label=self.image_label, code_label=self.code_label,
                                     relabelled=self.relabelled)


#: Generator variants by name: the fields each sets on a dataset's config.
#:
#: * ``paper``: the plain conditional alpha-GAN the MI paper describes: the class is appended to G's input and
#:   nothing else knows it (no auxiliary classifier, unconditional D and C, no relabelled fakes); code weight 1,
#:   the alpha-GAN's (Rosca et al.) unit weight, since 5 was chosen for the label-conditioned C below.
#: * ``class_aware``: the variant shipped first: AC-GAN auxiliary classifier (weight 3), projection D,
#:   label-conditioned C (weight 5, which strips the class from the code), relabelled fakes. It maximises
#:   conditional accuracy.
#: * ``no_code_label``: ``class_aware`` with Rosca et al.'s unconditional C(z): the code may keep the class.
VARIANTS = {
    "paper": dict(class_weight=0.0, code_weight=1.0, image_label=False, code_label=False, relabelled=False),
    "class_aware": dict(class_weight=3.0, code_weight=5.0, image_label=True, code_label=True, relabelled=True),
    "no_code_label": dict(class_weight=3.0, code_weight=5.0, image_label=True, code_label=False, relabelled=True),
}
DEFAULT_VARIANT = "paper"

def variant_config(dataset: str, variant: str) -> GeneratorConfig:
    """The defaults with the dataset config's ``training["generator"]`` (MNIST: 5 epochs; CIFAR-10: 100 epochs
    at batch 64) and a named variant's fields."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown generator variant {variant!r}; known: {sorted(VARIANTS)}")
    base = GeneratorConfig(**datasets.get(dataset).training.get("generator", {}))
    return dataclasses.replace(base, variant=variant, **VARIANTS[variant])


def make_optimizers(config: GeneratorConfig):
    return alpha_gan_step.make_optimizers(config.learning_rate, config.beta1, config.beta2)


@functools.lru_cache(maxsize=4)
def make_update_fn(module: alpha_gan.ConditionalAlphaGAN, config: GeneratorConfig):
    """The jitted step (TrainState, {"image", "label"}) -> (TrainState, metrics); randomness fold_in(key, step).

    Cached on (module, config), both hashable values, so repeated runs in one process compile once.
    """
    weights = config.loss_weights()
    optimizers = make_optimizers(config)

    @jax.jit
    def update_fn(state: trainer.TrainState, batch):
        key = jax.random.fold_in(state.key, state.step)
        params, opt_state, metrics = alpha_gan_step.update_step(module, weights, optimizers,
                                                           {"params": state.params["params"]}, state.opt_state,
                                                           batch["image"], batch["label"], key)
        ema = alpha_gan_step.ema_update(state.params["ema"], alpha_gan_step.generator_networks(params), state.step,
                                   config.ema_decay)
        return trainer.TrainState(state.step + 1, {**params, "ema": ema}, opt_state, state.key), metrics

    return update_fn


def averaged(params) -> dict:
    """The exported tree: the moving averages of E and G with the current D and C.

    ``params`` is the run state's ``{"params": {...four networks}, "ema": {"encoder", "generator"}}``.
    """
    return alpha_gan_step.with_generator_networks({"params": params["params"]}, params["ema"])


def load_classifier(dataset: str, checkpoints):
    """(logits function, card) of the trained classifier, or (None, None) when it has not been trained."""
    try:
        module, params, card = checkpoint.load_model(dataset, "classifier", checkpoints)
    except checkpoint.CheckpointError as err:
        print(f"no classifier for the conditional accuracy: {err}")
        return None, None
    apply = jax.jit(module.apply)
    return (lambda x: apply(params, x)), card


def classifier_root(args) -> str | None:
    """``--classifier-checkpoints``; else ``--checkpoints`` if it holds a trained classifier; else the
    repository's checkpoints (None)."""
    if args.classifier_checkpoints is not None:
        return args.classifier_checkpoints
    own = checkpoint.checkpoints_dir(args.checkpoints) / args.dataset / "classifier" / "params"
    return args.checkpoints if own.is_dir() else None


def main(argv: list[str] | None = None) -> dict:
    t_start = time.perf_counter()
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rec-weight", type=float, default=None, help="override lambda (L1 reconstruction)")
    parser.add_argument("--code-weight", type=float, default=None, help="override the code-adversarial weight")
    parser.add_argument("--class-weight", type=float, default=None, help="override the auxiliary-class weight")
    parser.add_argument("--eval-images", type=int, default=None, help="images for validation/test metrics")
    parser.add_argument("--variant", default=DEFAULT_VARIANT, choices=sorted(VARIANTS),
                        help=f"which class-aware parts the alpha-GAN has (default {DEFAULT_VARIANT}: the paper's plain "
                             "conditional alpha-GAN; see VARIANTS)")
    parser.add_argument("--classifier-checkpoints", default=None,
                        help="checkpoint root holding <dataset>/classifier for the conditional accuracy "
                             "(default: --checkpoints if it holds one, else the repository's checkpoints)")
    args = parser.parse_args(argv)
    command = cli.command_line("train.generator", argv)
    config = common.override(variant_config(args.dataset, args.variant), args)
    config = dataclasses.replace(config, **{k: v for k, v in (("reconstruction_weight", args.rec_weight),
                                                              ("code_weight", args.code_weight),
                                                              ("class_weight", args.class_weight),
                                                              ("eval_images", args.eval_images)) if v is not None})
    ds = common.load_data(args)
    resumable = ("epochs", "eval_images")
    run_config = common.run_config(args, "generator", config, ds, resumable)
    common.check_export_target(args, "generator", run_config)

    spec = checkpoint.model_spec(args.dataset, "generator")
    module = spec.build()
    init_key, state_key = jax.random.split(jax.random.key(args.seed))
    params = spec.init(module, init_key)
    optimizers = make_optimizers(config)
    state = trainer.TrainState(jnp.zeros((), jnp.int32), {**params, "ema": alpha_gan_step.generator_networks(params)},
                               alpha_gan_step.init_opt_state(optimizers, params), state_key)
    classify, classifier_card = load_classifier(args.dataset, classifier_root(args))

    n_eval = config.eval_images

    def evaluate(params):
        m = alpha_gan.measure(module, averaged(params), ds.val_x[:n_eval], ds.val_y[:n_eval], classify)
        return {k: v for k, v in m.items() if not isinstance(v, list)}

    update_fn = make_update_fn(module, config)
    loop = trainer.LoopConfig(epochs=config.epochs, batch_size=config.batch_size, seed=args.seed,
                              workdir=common.workdir(args, "generator"))
    state, history = trainer.fit(loop, state, update_fn, {"image": ds.train_x, "label": ds.train_y},
                                 evaluate, desc=f"{args.dataset} generator",
                                 run_config=run_config)
    final = averaged(state.params)
    test = alpha_gan.measure(module, final, ds.test_x[:n_eval], ds.test_y[:n_eval], classify)
    for key in ("conditional_accuracy", "conditional_accuracy_per_class", "reconstruction_accuracy"):
        test.setdefault(key, None)          # no classifier: recorded as null
    metrics = {
        **{f"test_{k}" if k.startswith("reconstruction") else k: v for k, v in test.items()},
        "eval_images": f"first {min(n_eval, len(ds.test_x))} test images",
        "classifier": (None if classifier_card is None else
                       {"command": classifier_card.get("command"),
                        "test_accuracy": classifier_card.get("metrics", {}).get("test_accuracy"),
                        "params_sha256": classifier_card.get("params_sha256")}),
        "train_seconds": float(np.sum([h["seconds"] for h in history])) if history else None,
        "wall_seconds_this_invocation": time.perf_counter() - t_start,
        "parameters": {name: int(sum(np.size(a) for a in jax.tree.leaves(final["params"][name])))
                       for name in alpha_gan.NETWORKS},
    }
    common.export(args, "generator", final, config, ds, command, metrics, history, run_config)
    return metrics


if __name__ == "__main__":
    common.cli(main)
