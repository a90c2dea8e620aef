"""Reproduces the paper's Tables 1 and 2: ``python -m eval.tables --dataset mnist|cifar10 [--quick]``.

Protocol (Hsu et al. 2018, Section 4; DESIGN.md section 6):

1. Load the shipped classifier, MagNet auto-encoders and conditional alpha-GAN (``--checkpoints``); a missing
   model is an error naming the command that trains it, or is trained with ``--train-missing``.
2. Select ``n_images`` correctly classified test images by a seeded shuffle (:func:`data.select_attack_indices`).
3. Calibrate the thresholds on the validation split: MagNet's detectors at their false-positive rates on the
   5,000 validation images, the MI detector at r = 0.005 on the first 1,000.
4. Clean accuracy on the 10,000 test images: no defense, MagNet, MI-strengthened MagNet.
5. For every attack (C&W-L2, EAD with the L1 rule, EAD with the EN rule) and every kappa of the grid, craft
   untargeted adversarial examples on the bare classifier (oblivious setting) and measure both defenses:
   an example counts as correct if any detector flags it or the reformed input is classified correctly.

Outputs in ``--out`` (default ``results/<dataset>/``, or ``results/<dataset>-quick/`` with ``--quick``):
``table.md`` (the paper's layout; the paper's number and our difference beside every cell), ``table.csv``,
``table.json`` (per-cell metrics, clean accuracy, config, seed, selected-index hash, data md5s, git commit,
device, wall time) and ``accuracy_vs_kappa.png``.

Adversarial examples are cached in ``<out>/cache/`` as ``.npz`` files (read with ``allow_pickle=False``) keyed
by (attack, kappa, a hash of everything that determines them), so an interrupted run resumes at the first
missing cell and a rerun with the same config recomputes no attack.

Expected runtime: ``--quick`` on MNIST about 30 minutes on a 2-core CPU (1,753 s measured: five C&W calls of
9,000 iterations at about 4.7 min each; five EAD calls of 900 iterations, each giving both rules, at about
45 s). The full MNIST protocol (18 attack calls x 1,000 images x 9,000 iterations) needs a GPU.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from magnet_mi_jax import attacks, checkpoint, data
from magnet_mi_jax.detectors import (MAGNET_PRESETS, attack_accuracy, calibrate, clean_accuracy, decide,
                                     make_defense_fn, map_batches, mi_magnet, roc_auc)
from magnet_mi_jax.models import alpha_gan
from magnet_mi_jax.utils import device_description, git_commit

PAPER_DIR = Path(__file__).resolve().parent / "paper"
ATTACKS = ("cw_l2", "ead_l1", "ead_en")
ATTACK_TITLES = {"cw_l2": "C&W-L2", "ead_l1": "EAD-L1", "ead_en": "EAD-EN"}
DEFENSES = ("magnet", "mi_magnet")
DEFENSE_TITLES = {"magnet": "MagNet", "mi_magnet": "MI-MagNet"}
CACHE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class TablesConfig:
    """Everything that determines a table. Defaults: the paper's protocol (DESIGN.md sections 4-6)."""

    dataset: str
    kappas: tuple[float, ...]
    n_images: int = 1000
    attacks: tuple[str, ...] = ATTACKS
    iterations: int = 1000
    search_steps: int = 9
    initial_const: float = 1e-3
    beta: float = 1e-2
    learning_rate: float = 1e-2
    seed: int = 0
    attack_batch: int = 1000
    kappas_per_call: int = 1
    cw_iterations: int | None = None
    mi_reading: str = "literal"
    mi_temperature: float = 1.0
    quick: bool = False

    def __post_init__(self):
        for name in ("n_images", "iterations", "search_steps", "attack_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cw_iterations is not None and self.cw_iterations < 1:
            raise ValueError(f"cw_iterations must be >= 1 (or None), got {self.cw_iterations}")
        if self.kappas_per_call < 0:
            raise ValueError(f"kappas_per_call must be >= 0 (0: the whole grid), got {self.kappas_per_call}")
        if not self.kappas or min(self.kappas) < 0:
            raise ValueError(f"kappas must be a non-empty grid of values >= 0, got {self.kappas}")
        unknown = set(self.attacks) - set(ATTACKS)
        if unknown or not self.attacks:
            raise ValueError(f"attacks must be a non-empty subset of {ATTACKS}, got {self.attacks}")

    def iterations_for(self, attack: str) -> int:
        """Iterations per search step of ``attack`` (``cw_iterations`` overrides ``iterations`` for C&W)."""
        return self.cw_iterations if attack == "cw_l2" and self.cw_iterations is not None else self.iterations

    def attack_settings(self, attack: str, kappa: float) -> dict[str, Any]:
        """The settings one cell's adversarial examples depend on (hashed into its cache key).

        ``attack_batch`` and ``kappas_per_call`` are not among them: they only change how the work is split
        into calls (every quantity of the attacks is per example)."""
        settings = {"attack": attack, "kappa": float(kappa), "iterations": self.iterations_for(attack),
                    "search_steps": self.search_steps, "initial_const": self.initial_const,
                    "learning_rate": self.learning_rate}
        if attack.startswith("ead"):
            settings["beta"] = self.beta
        return settings


FULL = {
    "mnist": TablesConfig(dataset="mnist", kappas=tuple(float(k) for k in range(0, 41, 5))),
    "cifar10": TablesConfig(dataset="cifar10", kappas=tuple(float(k) for k in range(0, 81, 10))),
}
QUICK = {
    # EAD works in pixel space and converges in 100 iterations; C&W keeps the paper's 1,000: its tanh-space
    # Adam moves w by about lr = 0.01 per step, and a black MNIST pixel starts at w = atanh(-0.999999) = -7.25.
    "mnist": dataclasses.replace(FULL["mnist"], n_images=100, kappas=(0.0, 10.0, 20.0, 30.0, 40.0),
                                 iterations=100, cw_iterations=1000, search_steps=9, quick=True),
    "cifar10": dataclasses.replace(FULL["cifar10"], n_images=50, kappas=(0.0, 20.0, 40.0, 80.0),
                                   iterations=50, search_steps=6, quick=True),
}


# --------------------------------------------------------------------------------------------------
# Paper numbers.
# --------------------------------------------------------------------------------------------------


def paper_tables(dataset: str) -> dict[tuple[str, str, float], float]:
    """(defense, attack, kappa) -> the paper's accuracy in %, from ``eval/paper/tables.csv``."""
    out = {}
    with open(PAPER_DIR / "tables.csv") as f:
        for row in csv.DictReader(f):
            if row["dataset"] != dataset:
                continue
            for defense in DEFENSES:
                for attack in ATTACKS:
                    out[(defense, attack, float(row["kappa"]))] = float(row[f"{defense}_{attack}"])
    return out


def paper_clean(dataset: str) -> dict[str, float]:
    with open(PAPER_DIR / "clean_accuracy.csv") as f:
        for row in csv.DictReader(f):
            if row["dataset"] == dataset:
                return {k: float(row[k]) for k in ("no_defense", "magnet", "mi_magnet")}
    raise KeyError(dataset)


# --------------------------------------------------------------------------------------------------
# Networks.
# --------------------------------------------------------------------------------------------------


def params_hash(tree: Any) -> str:
    """sha256 (16 hex) of a parameter pytree's leaves, in tree order."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return digest.hexdigest()[:16]


def cache_context(dataset: str, ds: data.Dataset, indices: np.ndarray, classifier_params: Any) -> dict[str, str]:
    """What, besides the attack settings, determines a cell's adversarial examples (hashed into its cache key):
    the dataset, the attacked indices, the classifier's weights and the data files (``ds``'s md5s, else its
    source)."""
    return {"dataset": dataset, "indices": data.indices_hash(indices), "classifier": params_hash(classifier_params),
            "data": hashlib.sha256(json.dumps(ds.md5, sort_keys=True).encode()).hexdigest()[:16]
            if ds.md5 else ds.source}


CARD_FIELDS = ("command", "git_commit", "metrics", "seed")


def card_summary(card: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a model card a result records (``CARD_FIELDS``; None where absent)."""
    return {k: card.get(k) for k in CARD_FIELDS}


def load_networks(dataset: str, checkpoints: str | None, train_missing: bool = False, data_dir: str | None = None,
                  names: tuple[str, ...] | None = None):
    """``(applies, params, cards)`` for the networks ``names`` (default: the classifier, the MagNet
    auto-encoders and the alpha-GAN, whose ``"generator"`` checkpoint gives ``"encoder"`` and ``"generator"``)."""
    names = list(MAGNET_PRESETS[dataset].network_keys) + ["generator"] if names is None else list(names)
    applies, params, cards = {}, {}, {}
    for name in names:
        try:
            module, p, card = checkpoint.load_model(dataset, name, checkpoints)
        except checkpoint.CheckpointError as err:
            if not train_missing or "no trained" not in str(err):
                raise
            _train(dataset, name, checkpoints, data_dir)
            module, p, card = checkpoint.load_model(dataset, name, checkpoints)
        cards[name] = card
        if name == "generator":
            applies["encoder"], params["encoder"] = alpha_gan.encoder_fn(module), p
            applies["generator"], params["generator"] = alpha_gan.generator_fn(module), p
        else:
            applies[name], params[name] = module.apply, p
    return applies, params, cards


def _train(dataset: str, name: str, checkpoints: str | None, data_dir: str | None) -> None:
    common = ["--dataset", dataset] + (["--checkpoints", checkpoints] if checkpoints else []) + (
        ["--data-dir", data_dir] if data_dir else [])
    print(f"training missing model {dataset}/{name} ({checkpoint.model_spec(dataset, name).train_command})")
    if name == "classifier":
        from train import classifier
        classifier.main(common)
    elif name == "generator":
        from train import generator
        generator.main(common)
    else:
        from train import autoencoder
        autoencoder.main(common + ["--which", name])


# --------------------------------------------------------------------------------------------------
# Attacks with an on-disk cache.
# --------------------------------------------------------------------------------------------------

ATTACK_FIELDS = ("adv", "success", "l0", "l1", "l2", "linf", "const")


def cache_path(cache_dir: Path, config: TablesConfig, attack: str, kappa: float, context: Mapping[str, str]) -> Path:
    """``<cache>/<attack>_kappa<k>_<hash>.npz``; the hash covers the attack settings and ``context``
    (dataset, selected indices, classifier weights, data files)."""
    key = json.dumps({"format": CACHE_FORMAT, **config.attack_settings(attack, kappa), **context}, sort_keys=True)
    return cache_dir / f"{attack}_kappa{kappa:g}_{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"


def save_cell(path: Path, result: Mapping[str, np.ndarray]) -> None:
    """Writes a cell atomically (temporary file, then rename): a crash never leaves a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: np.asarray(result[k]) for k in ATTACK_FIELDS})
    os.replace(tmp, path)


def load_cell(path: Path, n: int, image_shape: tuple[int, ...]) -> dict[str, np.ndarray] | None:
    """A cached cell, or None if absent. A corrupt or mismatched file is an error naming the file."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            cell = {k: f[k] for k in ATTACK_FIELDS}
    except (OSError, ValueError, KeyError) as err:
        raise RuntimeError(f"corrupt attack cache {path}: {err}; delete it to recompute the cell") from err
    if cell["adv"].shape != (n, *image_shape) or cell["success"].shape != (n,):
        raise RuntimeError(f"attack cache {path} holds {cell['adv'].shape}, expected {(n, *image_shape)}; delete it")
    return cell


EAD_RULES = {"ead_l1": "l1", "ead_en": "en"}


@dataclasses.dataclass(frozen=True)
class AttackJob:
    """One attack call. ``attacks`` share its iterates (EAD-L1 and EAD-EN are the two decision rules of one EAD
    run, :func:`magnet_mi_jax.attacks.ead` with ``rule=("en", "l1")``); ``kappas`` are folded into its batch."""

    attacks: tuple[str, ...]
    kappas: tuple[float, ...]


def plan_jobs(config: TablesConfig, missing: list[tuple[str, float]]) -> list[AttackJob]:
    """Groups the missing (attack, kappa) cells into calls: C&W alone, both EAD rules of a kappa in one run,
    ``config.kappas_per_call`` kappas per call (0: all of them)."""
    per_family: dict[str, dict[float, set[str]]] = {}
    for attack, kappa in missing:
        family = "ead" if attack in EAD_RULES else attack
        per_family.setdefault(family, {}).setdefault(kappa, set()).add(attack)
    jobs = []
    for per_kappa in per_family.values():
        kappas = list(per_kappa)
        step = config.kappas_per_call or len(kappas)
        for i in range(0, len(kappas), step):
            chunk = kappas[i:i + step]
            wanted = set().union(*(per_kappa[k] for k in chunk))
            jobs.append(AttackJob(tuple(a for a in config.attacks if a in wanted), tuple(chunk)))
    return jobs


def run_job(job: AttackJob, logits_fn: Callable, params: Any, x: np.ndarray, y: np.ndarray,
            config: TablesConfig) -> dict[tuple[str, float], dict[str, np.ndarray]]:
    """Crafts every (attack, kappa) cell of ``job``: untargeted, on images ``x`` in batches of ``attack_batch``.

    The kappas run as one grid (G, 1) folded into the batch. Batches go through
    :func:`~magnet_mi_jax.utils.map_batches` (over image indices), which pads a short last batch to the
    compiled shape, so every batch reuses one compilation; the padding is dropped.
    """
    kappa = jnp.asarray(job.kappas, jnp.float32)[:, None]                 # (G, 1)
    common = dict(params=params, kappa=kappa, const=config.initial_const, learning_rate=config.learning_rate,
                  search_steps=config.search_steps)
    if job.attacks == ("cw_l2",):
        def craft(xb, yb):
            return {"cw_l2": attacks.cw_l2(logits_fn, xb, yb, iterations=config.iterations_for("cw_l2"), **common)}
    elif job.attacks and set(job.attacks) <= set(EAD_RULES):
        rules = tuple(EAD_RULES[a] for a in job.attacks)

        def craft(xb, yb):
            out = attacks.ead(logits_fn, xb, yb, beta=config.beta, rule=rules,
                              iterations=config.iterations_for("ead"), **common)
            return {f"ead_{rule}": res for rule, res in out.items()}
    else:
        raise ValueError(f"a job runs cw_l2 alone or EAD rules {tuple(EAD_RULES)}; got {job.attacks}")

    def craft_rows(idx):              # (b,) image indices -> {attack: {field: (b, G, ...)}}
        out = craft(jnp.asarray(x[idx]), jnp.asarray(y[idx], jnp.int32))
        return {a: {k: jnp.swapaxes(getattr(res, k), 0, 1) for k in ATTACK_FIELDS} for a, res in out.items()}

    rows = map_batches(craft_rows, np.arange(len(x)), config.attack_batch)
    return {(a, kappa): {k: rows[a][k][:, g] for k in ATTACK_FIELDS}
            for a in job.attacks for g, kappa in enumerate(job.kappas)}


# --------------------------------------------------------------------------------------------------
# Evaluation.
# --------------------------------------------------------------------------------------------------


def _pct(v: float) -> float:
    return round(100.0 * float(v), 2)


def defense_flags(magnet, spec, outputs, thresholds: Mapping[str, float]
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-detector flags and each defense's verdict (``{"magnet", "mi_magnet"}``), as NumPy, from
    :func:`~magnet_mi_jax.detectors.decide` (flag iff score >= threshold; a defense flags if any detector does)."""
    mi = decide(spec, outputs, thresholds)
    flagged = {"magnet": np.asarray(decide(magnet, outputs, thresholds).flagged), "mi_magnet": np.asarray(mi.flagged)}
    return {n: np.asarray(f) for n, f in mi.flags.items()}, flagged


def evaluate_cell(outputs, thresholds: Mapping[str, float], magnet, spec, labels: np.ndarray,
                  cell: Mapping[str, np.ndarray], natural_scores: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Both defenses' accuracy on one cell's adversarial examples, plus attack statistics and detector AUCs.

    ``magnet`` is the MagNet preset and ``spec`` its MI-strengthened version (:func:`mi_magnet`)."""
    flags, flagged = defense_flags(magnet, spec, outputs, thresholds)
    reformed_correct = outputs.reformed_logits.argmax(-1) == labels
    original_correct = outputs.logits.argmax(-1) == labels
    success = cell["success"].astype(bool)
    row: dict[str, Any] = {
        "attack_success_rate": _pct(success.mean()),
        "mean_l1": float(cell["l1"][success].mean()) if success.any() else None,
        "mean_l2": float(cell["l2"][success].mean()) if success.any() else None,
        "mean_linf": float(cell["linf"][success].mean()) if success.any() else None,
        "n_images": int(len(labels)), "n_success": int(success.sum()),
    }
    for defense in DEFENSES:
        acc = attack_accuracy(flagged[defense], reformed_correct, original_correct)
        on_success = attack_accuracy(flagged[defense], reformed_correct, original_correct, where=success)
        row[defense] = {"accuracy": _pct(acc.both), "detector_only": _pct(acc.detector_only),
                        "reformer_only": _pct(acc.reformer_only),
                        "accuracy_successful_only": _pct(on_success.both) if on_success.count else None,
                        "detected": _pct(flagged[defense].mean())}
    row["detector_flag_rate"] = {n: _pct(flags[n].mean()) for n in flags}
    if success.any():
        row["detector_auc_successful"] = {n: round(roc_auc(natural_scores[n], outputs.scores[n][success]), 4)
                                          for n in thresholds}
    return row


# --------------------------------------------------------------------------------------------------
# Writers.
# --------------------------------------------------------------------------------------------------


def _fmt_cell(ours: float, paper: float | None) -> str:
    if paper is None:
        return f"{ours:.1f}"
    return f"{ours:.1f} ({paper:.1f}, {ours - paper:+.1f})"


def _iterations_text(cfg: Mapping[str, Any]) -> str:
    if cfg.get("cw_iterations") is None or cfg["cw_iterations"] == cfg["iterations"]:
        return f"{cfg['iterations']} iterations"
    return f"{cfg['iterations']} iterations (C&W {cfg['cw_iterations']})"


def render_markdown(result: Mapping[str, Any]) -> str:
    """The paper's table layout, every cell "ours (paper, difference)" in % accuracy."""
    cfg = result["config"]
    lines = []
    title = {"mnist": "Table 1 (MNIST)", "cifar10": "Table 2 (CIFAR-10)"}[cfg["dataset"]]
    if cfg["quick"]:
        lines += ["> **QUICK PRESET**: a reduced protocol for a CPU smoke run "
                  f"({cfg['n_images']} images, kappa {', '.join(f'{k:g}' for k in cfg['kappas'])}, "
                  f"{_iterations_text(cfg)} x {cfg['search_steps']} search steps). "
                  "Not comparable cell for cell with the paper's 1,000 images x 1,000 iterations x 9 steps.", ""]
    lines += [f"# {title}: accuracy (%) on adversarial examples, MagNet vs MI-strengthened MagNet", "",
              "Each cell: ours (paper, ours - paper). Untargeted, oblivious setting; "
              f"{cfg['n_images']} correctly classified test images (seed {cfg['seed']}).", ""]
    header = ["kappa"] + [f"{DEFENSE_TITLES[d]} {ATTACK_TITLES[a]}" for d in DEFENSES for a in cfg["attacks"]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kappa in cfg["kappas"]:
        cells = []
        for defense in DEFENSES:
            for attack in cfg["attacks"]:
                c = result["cells"][f"{attack}/{kappa:g}"]
                cells.append(_fmt_cell(c[defense]["accuracy"], c["paper"].get(defense)))
        lines.append(f"| {kappa:g} | " + " | ".join(cells) + " |")
    clean = result["clean_accuracy"]
    lines += ["", "Clean test accuracy (%), all 10,000 test images:", "",
              "| | no defense | MagNet | MI-MagNet |", "|---|---|---|---|",
              "| ours (paper, diff) | " + " | ".join(_fmt_cell(clean[k], clean["paper"][k])
                                                    for k in ("no_defense", "magnet", "mi_magnet")) + " |", ""]
    lines += ["Attack statistics (successful examples):", "",
              "| attack | kappa | success % | mean L1 | mean L2 |", "|---|---|---|---|---|"]
    for key, c in result["cells"].items():
        attack, kappa = key.split("/")
        l1 = "-" if c["mean_l1"] is None else f"{c['mean_l1']:.2f}"
        l2 = "-" if c["mean_l2"] is None else f"{c['mean_l2']:.3f}"
        lines.append(f"| {ATTACK_TITLES[attack]} | {kappa} | {c['attack_success_rate']:.1f} | {l1} | {l2} |")
    lines += ["", f"MI detector: reading `{cfg['mi_reading']}`, T = {cfg['mi_temperature']:g}. "
              f"Commit `{result['git_commit']}`, device {result['device']}, wall time {result['wall_seconds']:.0f} s.",
              f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def render_csv(result: Mapping[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["dataset", "quick", "attack", "kappa", "defense", "accuracy", "paper", "diff",
                     "detector_only", "reformer_only", "accuracy_successful_only", "attack_success_rate",
                     "mean_l1", "mean_l2"])
    cfg = result["config"]
    for key, c in result["cells"].items():
        attack, kappa = key.split("/")
        for defense in DEFENSES:
            d, paper = c[defense], c["paper"].get(defense)
            writer.writerow([cfg["dataset"], cfg["quick"], attack, kappa, defense, d["accuracy"], paper,
                             None if paper is None else round(d["accuracy"] - paper, 2), d["detector_only"],
                             d["reformer_only"], d["accuracy_successful_only"], c["attack_success_rate"],
                             c["mean_l1"], c["mean_l2"]])
    return buf.getvalue()


def plot(result: Mapping[str, Any], path: Path) -> None:
    """Accuracy vs kappa, one panel per attack: MagNet and MI-MagNet (ours solid, paper dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    paper = paper_tables(cfg["dataset"])
    fig, axes = plt.subplots(1, len(cfg["attacks"]), figsize=(4.2 * len(cfg["attacks"]), 3.6), sharey=True)
    axes = np.atleast_1d(axes)
    colors = {"magnet": "tab:blue", "mi_magnet": "tab:red"}
    for ax, attack in zip(axes, cfg["attacks"]):
        for defense in DEFENSES:
            ks = cfg["kappas"]
            ax.plot(ks, [result["cells"][f"{attack}/{k:g}"][defense]["accuracy"] for k in ks], "o-",
                    color=colors[defense], label=f"{DEFENSE_TITLES[defense]} (ours)")
            pk = sorted(k for (d, a, k) in paper if d == defense and a == attack)
            ax.plot(pk, [paper[(defense, attack, k)] for k in pk], "--", color=colors[defense], alpha=0.7,
                    label=f"{DEFENSE_TITLES[defense]} (paper)")
        ax.set_title(ATTACK_TITLES[attack])
        ax.set_xlabel("kappa")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy on adversarial examples (%)")
    axes[-1].legend(fontsize=8, loc="lower right")
    suffix = " [QUICK PRESET]" if cfg["quick"] else ""
    fig.suptitle(f"{cfg['dataset']}: MagNet vs MI-MagNet{suffix}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------------


def run(config: TablesConfig, out: Path, *, data_dir: str | None = None, source: str = "auto",
        checkpoints: str | None = None, train_missing: bool = False, command: str = "",
        dataset: data.Dataset | None = None, eval_batch: int = 500) -> dict[str, Any]:
    """Runs the protocol and writes every output into ``out``; returns the JSON result."""
    start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = dataset if dataset is not None else data.load_dataset(config.dataset, data_dir=data_dir, source=source)
    applies, params, cards = load_networks(config.dataset, checkpoints, train_missing, data_dir)

    magnet = MAGNET_PRESETS[config.dataset]
    spec = mi_magnet(magnet, reading=config.mi_reading, temperature=config.mi_temperature)
    forward = make_defense_fn(spec, applies)
    run_defense = lambda x: forward(params, x)  # noqa: E731

    # Natural images: thresholds on validation, clean accuracy on test.
    print(f"calibrating on {len(ds.val_x)} validation images and measuring {len(ds.test_x)} test images")
    val = map_batches(run_defense, ds.val_x, eval_batch)
    thresholds = calibrate(spec, val.scores, allow_fewer=len(ds.val_x) < data.VALIDATION_SIZE)
    test = map_batches(run_defense, ds.test_x, eval_batch)
    test_pred = test.logits.argmax(-1)
    flags, flagged = defense_flags(magnet, spec, test, thresholds)
    reformed_correct = test.reformed_logits.argmax(-1) == ds.test_y
    clean = {
        "no_defense": _pct(np.mean(test_pred == ds.test_y)),
        **{d: _pct(clean_accuracy(flagged[d], reformed_correct, test_pred == ds.test_y).both) for d in DEFENSES},
        "test_false_positive_rate": {n: _pct(f.mean()) for n, f in flags.items()},
        "paper": paper_clean(config.dataset),
    }

    indices = data.select_attack_indices(ds.test_y, test_pred, config.n_images, config.seed)
    x_att, y_att = ds.test_x[indices], ds.test_y[indices]
    natural_scores = {n: test.scores[n][indices] for n in spec.detector_names}
    context = cache_context(config.dataset, ds, indices, params["classifier"])

    # Craft the missing cells (cached ones are checked here, before any long computation).
    keys = [(a, k) for a in config.attacks for k in config.kappas]
    paths = {key: cache_path(out / "cache", config, *key, context) for key in keys}
    crafted = {key: load_cell(paths[key], len(indices), ds.image_shape) for key in keys}
    missing = [key for key in keys if crafted[key] is None]
    made_by: dict[tuple[str, float], dict[str, Any]] = {}
    jobs = plan_jobs(config, missing)
    if jobs:
        print(f"{len(keys) - len(missing)} of {len(keys)} cells cached; crafting {len(missing)} in {len(jobs)} calls")
    for job in tqdm(jobs, desc="attack calls", dynamic_ncols=True):
        t0 = time.time()
        new = run_job(job, applies["classifier"], params["classifier"], x_att, y_att, config)
        call = {"attacks": list(job.attacks), "kappas": list(job.kappas), "seconds": round(time.time() - t0, 1)}
        for key in new:
            if crafted[key] is None:
                save_cell(paths[key], new[key])
                crafted[key], made_by[key] = new[key], call

    # Evaluate both defenses on every cell.
    paper = paper_tables(config.dataset)
    cells: dict[str, Any] = {}
    bar = tqdm(keys, desc="defenses on cells", dynamic_ncols=True)
    for attack, kappa in bar:
        cell = crafted[(attack, kappa)]
        outputs = map_batches(run_defense, cell["adv"], eval_batch)
        row = evaluate_cell(outputs, thresholds, magnet, spec, y_att, cell, natural_scores)
        row.update(attack=attack, kappa=kappa, cache=paths[(attack, kappa)].name,
                   cached=(attack, kappa) not in made_by, attack_call=made_by.get((attack, kappa)),
                   paper={d: paper.get((d, attack, kappa)) for d in DEFENSES})
        cells[f"{attack}/{kappa:g}"] = row
        bar.set_postfix(magnet=row["magnet"]["accuracy"], mi=row["mi_magnet"]["accuracy"],
                        success=row["attack_success_rate"])
    bar.close()

    result = {
        "dataset": config.dataset, "quick": config.quick, "config": dataclasses.asdict(config), "seed": config.seed,
        "indices_hash": context["indices"], "indices": indices.tolist(), "data_md5": ds.md5,
        "data_source": ds.source, "git_commit": git_commit(), "device": device_description(),
        "command": command, "wall_seconds": round(time.time() - start, 1), "thresholds": thresholds,
        "clean_accuracy": clean, "cells": cells,
        "models": {k: card_summary(c) for k, c in cards.items()},
    }
    (out / "table.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (out / "table.md").write_text(render_markdown(result))
    (out / "table.csv").write_text(render_csv(result))
    plot(result, out / "accuracy_vs_kappa.png")
    return result


def build_config(args: argparse.Namespace) -> TablesConfig:
    config = (QUICK if args.quick else FULL)[args.dataset]
    changes: dict[str, Any] = {}
    for name in ("n_images", "iterations", "cw_iterations", "search_steps", "seed", "attack_batch", "kappas_per_call",
                 "mi_reading", "mi_temperature"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.kappas is not None:
        changes["kappas"] = tuple(float(k) for k in args.kappas.split(","))
    if args.attacks is not None:
        unknown = set(args.attacks.split(",")) - set(ATTACKS)
        if unknown:
            raise SystemExit(f"error: unknown attacks {sorted(unknown)}; choose from {ATTACKS}")
        changes["attacks"] = tuple(args.attacks.split(","))
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=data.DATASETS, required=True)
    parser.add_argument("--quick", action="store_true", help="the reduced CPU preset (labelled in every output)")
    parser.add_argument("--out", default=None, help="output folder (default results/<dataset>[-quick]/)")
    parser.add_argument("--data-dir", default=None, help=f"official dataset files (default ${data.DATA_DIR_ENV})")
    parser.add_argument("--source", default="auto", choices=("auto", "files", "tfds"))
    parser.add_argument("--checkpoints", default=None, help="trained weights (default: the repository's checkpoints/)")
    parser.add_argument("--train-missing", action="store_true", help="train models that have no checkpoint")
    parser.add_argument("--n-images", dest="n_images", type=int, default=None)
    parser.add_argument("--kappas", default=None, help="comma-separated kappa grid, e.g. 0,10,20")
    parser.add_argument("--attacks", default=None, help=f"comma-separated subset of {','.join(ATTACKS)}")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--cw-iterations", dest="cw_iterations", type=int, default=None,
                        help="C&W's iterations per search step, if not --iterations")
    parser.add_argument("--search-steps", dest="search_steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--attack-batch", dest="attack_batch", type=int, default=None,
                        help="images per attack call (default 1,000)")
    parser.add_argument("--kappas-per-call", dest="kappas_per_call", type=int, default=None,
                        help="kappas folded into one attack call (0: the whole grid; default 1). More uses a GPU "
                             "better; an interrupted run loses at most one call")
    parser.add_argument("--mi-reading", dest="mi_reading", choices=("literal", "consistent"), default=None)
    parser.add_argument("--mi-temperature", dest="mi_temperature", type=float, default=None)
    args = parser.parse_args(argv)
    config = build_config(args)
    out = Path(args.out) if args.out else Path("results") / (args.dataset + ("-quick" if config.quick else ""))
    command = " ".join(["python", "-m", "eval.tables", *(sys.argv[1:] if argv is None else argv)])
    try:
        result = run(config, out, data_dir=args.data_dir, source=args.source, checkpoints=args.checkpoints,
                     train_missing=args.train_missing, command=command)
    except (checkpoint.CheckpointError, data.DataError) as err:
        parser.exit(2, f"error: {err}\n")
    print(render_markdown(result))
    print(f"wrote {out}/table.md, table.csv, table.json, accuracy_vs_kappa.png")
    return result


if __name__ == "__main__":
    main()
