"""Reproduces the paper's Tables 1 and 2: ``python -m eval.tables --dataset mnist|cifar10 [--quick]``.

Protocol (Hsu et al. 2018, Section 4; docs/design.md, sections 3-6):

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

Adversarial examples are computed and cached as **shards**: one attack run (C&W-L2, or EAD, whose one run
gives both decision rules) x one kappa x one slice of ``shard_size`` attacked images, written atomically as
compressed ``.npz`` files (read with ``allow_pickle=False``) in ``<out>/cache/``, named by a hash of
everything that determines them (every attack setting, the attack-code version, the data files, the shard's
image indices, the classifier's weights) and by nothing else, so a fresh clone finds committed shards. A run
resumes at the first missing shard, prints shards done / total with an ETA from the measured shard times,
and writes the table once every shard exists (``--partial``: a clearly labelled table from the shards
present). ``--worker I/N`` crafts only every N-th shard (from the I-th), so N processes can share one
campaign; any of them assembles the table once the shards are all there.

Fidelity to the code the paper ran (recorded in ``table.json``'s config): C&W-L2 with abort-early on, as the
C&W reference code runs it (judged per example here); EAD with abort-early off and FISTA's momentum
``(k+1)/(k+4)`` as the EAD reference code computes it (``--ead-momentum textbook`` for ``k/(k+3)``).

Expected runtime: ``--quick`` on MNIST about 30 minutes on a 2-core CPU. The full MNIST protocol is 180
shards of 100 images (2 attack runs x 9 kappas x 10 slices): about 15-20 hours on a 2-core CPU, minutes on a
GPU (there, ``--shard-size 1000 --kappas-per-call 0`` runs it in two calls).
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
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from magnet_mi_jax import checkpoint, data, datasets
from magnet_mi_jax.attacks import registry
from magnet_mi_jax.detectors import (attack_accuracy, calibrate, clean_accuracy, decide,
                                     make_defense_fn, map_batches, roc_auc)
from magnet_mi_jax.attacks import EAD_MOMENTA
from magnet_mi_jax.models import alpha_gan
from magnet_mi_jax.utils import device_description, git_commit

PAPER_DIR = Path(__file__).resolve().parent / "paper"
ATTACKS = ("cw_l2", "ead_l1", "ead_en")   # the paper's attacks; any cell of magnet_mi_jax.attacks.registry runs
DEFENSES = ("magnet", "mi_magnet")
DEFENSE_TITLES = {"magnet": "MagNet", "mi_magnet": "MI-MagNet"}
CACHE_FORMAT = 2     # 2: shards (attack run x kappa x image slice), compressed


@dataclasses.dataclass(frozen=True)
class TablesConfig:
    """Everything that determines a table. Defaults: the paper's protocol (docs/design.md, sections 3-6)."""

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
    shard_size: int = 100
    kappas_per_call: int = 1
    cw_iterations: int | None = None
    cw_abort_early: bool = True          # the C&W reference code's default
    ead_momentum: str = "reference"      # (k+1)/(k+4), as the EAD reference code computes it
    mi_reading: str = "literal"
    mi_temperature: float = 1.0
    quick: bool = False

    def __post_init__(self):
        if self.ead_momentum not in EAD_MOMENTA:
            raise ValueError(f"ead_momentum must be one of {EAD_MOMENTA}, got {self.ead_momentum!r}")
        for name in ("n_images", "iterations", "search_steps", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cw_iterations is not None and self.cw_iterations < 1:
            raise ValueError(f"cw_iterations must be >= 1 (or None), got {self.cw_iterations}")
        if self.kappas_per_call < 0:
            raise ValueError(f"kappas_per_call must be >= 0 (0: the whole grid), got {self.kappas_per_call}")
        if not self.kappas or not all(np.isfinite(k) and k >= 0 for k in self.kappas):
            raise ValueError(f"kappas must be a non-empty grid of finite values >= 0, got {self.kappas}")
        if len(set(self.kappas)) != len(self.kappas):
            raise ValueError(f"kappas must not repeat a value, got {self.kappas}")
        test_size = datasets.get(self.dataset).test_size       # an unregistered dataset is an error here
        if test_size is not None and self.n_images > test_size:
            raise ValueError(f"n_images must be at most the {test_size} test images, got {self.n_images}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not (np.isfinite(self.mi_temperature) and self.mi_temperature > 0):
            raise ValueError(f"mi_temperature must be a finite value > 0, got {self.mi_temperature}")
        unknown = set(self.attacks) - set(registry.cell_names())
        if unknown or not self.attacks:
            raise ValueError(f"attacks must be a non-empty subset of {registry.cell_names()}, got {self.attacks}")

    def family_settings(self, family: str, kappa: float) -> dict[str, Any]:
        """The settings one attack run's adversarial examples depend on (hashed into its shards' keys): the
        registered run's :meth:`~magnet_mi_jax.attacks.registry.AttackRun.key_settings`.

        ``shard_size`` and ``kappas_per_call`` are not among them: they only change how the work is split into
        calls (every quantity of the attacks is per example; a shard's key holds its own image indices)."""
        return registry.get(family).key_settings(self, kappa)

    def families(self) -> tuple[str, ...]:
        """The attack runs this config needs, in table order."""
        return tuple(dict.fromkeys(registry.run_of(a).name for a in self.attacks))

    def deviations(self) -> dict[str, tuple[Any, Any]]:
        """Every attack-protocol setting that differs from the paper's (:func:`protocol`): name -> (ours, paper's)."""
        full = protocol(self.dataset)
        names = ("n_images", "kappas", "iterations", "cw_iterations", "search_steps", "initial_const", "beta",
                 "learning_rate", "cw_abort_early", "ead_momentum")
        return {n: (getattr(self, n), getattr(full, n)) for n in names if getattr(self, n) != getattr(full, n)}


def protocol(dataset: str, quick: bool = False) -> TablesConfig:
    """The dataset's table protocol from its config (:mod:`magnet_mi_jax.datasets`): ``protocols["full"]`` on the
    defaults above (the paper's), and with ``quick`` the reduced CPU preset ``protocols["quick"]`` on top.

    Raises:
      ValueError: the dataset is not registered, or ``quick`` and its config names no quick protocol.
    """
    config = datasets.get(dataset)
    full = TablesConfig(dataset=dataset, **config.protocols.get("full", {}))
    if not quick:
        return full
    if "quick" not in config.protocols:
        raise ValueError(f"{dataset}'s config names no quick protocol")
    return dataclasses.replace(full, **config.protocols["quick"], quick=True)


# --------------------------------------------------------------------------------------------------
# Paper numbers.
# --------------------------------------------------------------------------------------------------


def paper_tables(dataset: str) -> dict[tuple[str, str, float], float]:
    """(defense, attack, kappa) -> the paper's accuracy in %, from ``eval/paper/tables.csv`` (empty for a
    dataset the paper did not evaluate)."""
    out = {}
    with open(PAPER_DIR / "tables.csv") as f:
        for row in csv.DictReader(f):
            if row["dataset"] != dataset:
                continue
            for defense in DEFENSES:
                for attack in ATTACKS:
                    out[(defense, attack, float(row["kappa"]))] = float(row[f"{defense}_{attack}"])
    return out


def paper_clean(dataset: str) -> dict[str, float] | None:
    """The paper's clean accuracies (no defense, MagNet, MI-MagNet) in %, or None for a dataset it did not
    evaluate."""
    with open(PAPER_DIR / "clean_accuracy.csv") as f:
        for row in csv.DictReader(f):
            if row["dataset"] == dataset:
                return {k: float(row[k]) for k in ("no_defense", "magnet", "mi_magnet")}
    return None


# --------------------------------------------------------------------------------------------------
# Networks.
# --------------------------------------------------------------------------------------------------


def params_hash(tree: Any) -> str:
    """The first 16 hex digits of :func:`~magnet_mi_jax.checkpoint.params_digest` (shard keys use it)."""
    return checkpoint.params_digest(tree)[:16]


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
    config = datasets.get(dataset)
    names = list(config.magnet.network_keys) + [config.generator] if names is None else list(names)
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
        if config.networks[name].kind == "generator":
            applies["encoder"], params["encoder"] = alpha_gan.encoder_fn(module), p
            applies["generator"], params["generator"] = alpha_gan.generator_fn(module), p
        else:
            applies[name], params[name] = module.apply, p
    return applies, params, cards


def check_cards_against_data(cards: Mapping[str, Mapping[str, Any]], ds: data.Dataset) -> None:
    """:func:`magnet_mi_jax.data.check_model_data` for every loaded model's card."""
    for name, card in cards.items():
        data.check_model_data(ds, dict(card), f"{ds.name}/{name}")


def _train(dataset: str, name: str, checkpoints: str | None, data_dir: str | None) -> None:
    common = ["--dataset", dataset] + (["--checkpoints", checkpoints] if checkpoints else []) + (
        ["--data-dir", data_dir] if data_dir else [])
    config = datasets.get(dataset)
    print(f"training missing model {dataset}/{name} ({config.train_command(name)})")
    kind = config.networks[name].kind
    if kind == "classifier":
        from train import classifier
        classifier.main(common)
    elif kind == "generator":
        from train import generator
        generator.main(common)
    else:
        from train import autoencoder
        autoencoder.main(common + ["--which", name])


# --------------------------------------------------------------------------------------------------
# Attacks with an on-disk cache.
# --------------------------------------------------------------------------------------------------

ATTACK_FIELDS = ("adv", "success", "l0", "l1", "l2", "linf", "const")


@dataclasses.dataclass(frozen=True)
class Shard:
    """One unit of work and of caching: attack run ``family`` at ``kappa`` on attacked images [start, stop)."""

    family: str
    kappa: float
    index: int
    start: int
    stop: int


def plan_shards(config: TablesConfig) -> list[Shard]:
    """Every shard of the protocol, in the order they are crafted (attack run, kappa, image slice)."""
    slices = [(i, s, min(s + config.shard_size, config.n_images))
              for i, s in enumerate(range(0, config.n_images, config.shard_size))]
    return [Shard(family, float(kappa), i, start, stop)
            for family in config.families() for kappa in config.kappas for i, start, stop in slices]


def shard_path(cache_dir: Path, config: TablesConfig, shard: Shard, context: Mapping[str, str],
               indices: np.ndarray) -> Path:
    """``<cache>/<family>_kappa<k>_s<index>_<hash>.npz``; the hash covers the run's settings, ``context``
    (dataset, classifier weights, data files) and the shard's own image indices, nothing else."""
    key = json.dumps({"format": CACHE_FORMAT, **config.family_settings(shard.family, shard.kappa), **context,
                      "indices": data.indices_hash(indices[shard.start:shard.stop])}, sort_keys=True)
    return cache_dir / (f"{shard.family}_kappa{shard.kappa:g}_s{shard.index:03d}_"
                        f"{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz")


def save_shard(path: Path, cells: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Writes ``{attack: {field: array}}`` compressed and atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, **{f"{a}.{k}": np.asarray(cell[k]) for a, cell in cells.items() for k in ATTACK_FIELDS})
    os.replace(tmp, path)


def load_shard(path: Path, shard: Shard, image_shape: tuple[int, ...]) -> dict[str, dict[str, np.ndarray]] | None:
    """A shard's ``{attack: {field: array}}``, or None if absent. A corrupt or mismatched file is an error
    naming the file."""
    if not path.is_file():
        return None
    n = shard.stop - shard.start
    try:
        with np.load(path, allow_pickle=False) as f:
            cells = {a: {k: f[f"{a}.{k}"] for k in ATTACK_FIELDS} for a in registry.get(shard.family).cells}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise RuntimeError(f"corrupt attack shard {path}: {type(err).__name__}: {err}; "
                           "delete it to recompute it") from err
    for attack, cell in cells.items():
        if cell["adv"].shape != (n, *image_shape) or cell["success"].shape != (n,):
            raise RuntimeError(f"attack shard {path} holds {attack} of shape {cell['adv'].shape}, expected "
                               f"{(n, *image_shape)}; delete it to recompute it")
    return cells


def assemble_cell(shards: list[Mapping[str, Mapping[str, np.ndarray]]], attack: str) -> dict[str, np.ndarray]:
    """One attack's cell from its shards, in image order."""
    return {k: np.concatenate([s[attack][k] for s in shards]) for k in ATTACK_FIELDS}


@dataclasses.dataclass(frozen=True)
class AttackJob:
    """One attack call: run ``family`` on the images of shard slice ``index`` for every kappa of ``kappas`` (the
    grid is folded into the batch). One call of the EAD run gives both decision rules."""

    family: str
    kappas: tuple[float, ...]
    index: int
    start: int
    stop: int


def plan_jobs(config: TablesConfig, missing: list[Shard]) -> list[AttackJob]:
    """Groups missing shards of one run and image slice into calls of ``config.kappas_per_call`` kappas
    (0: all of them), in crafting order."""
    groups: dict[tuple[str, int], list[Shard]] = {}
    for shard in missing:
        groups.setdefault((shard.family, shard.index), []).append(shard)
    jobs = []
    for (family, index), shards in groups.items():
        step = config.kappas_per_call or len(shards)
        for i in range(0, len(shards), step):
            chunk = shards[i:i + step]
            jobs.append(AttackJob(family, tuple(s.kappa for s in chunk), index, chunk[0].start, chunk[0].stop))
    order = {(s.family, s.kappa, s.index): n for n, s in enumerate(missing)}
    return sorted(jobs, key=lambda j: order[(j.family, j.kappas[0], j.index)])


def run_job(job: AttackJob, logits_fn: Callable, params: Any, x: np.ndarray, y: np.ndarray,
            config: TablesConfig) -> dict[float, dict[str, dict[str, np.ndarray]]]:
    """Crafts ``job``: untargeted attacks on the attacked images ``x[job.start:job.stop]``.

    Returns ``{kappa: {attack: {field: (n, ...)}}}``. The slice runs as one batch of ``config.shard_size``
    (a short last slice is padded by :func:`~magnet_mi_jax.utils.map_batches`, so every call reuses one
    compilation; the padding is dropped).
    """
    kappa = jnp.asarray(job.kappas, jnp.float32)[:, None]                 # (G, 1)
    run = registry.get(job.family)

    def craft(xb, yb):
        return run.craft(logits_fn, params, xb, yb, kappa, config)

    def craft_rows(idx):              # (b,) image indices -> {attack: {field: (b, G, ...)}}
        out = craft(jnp.asarray(x[idx]), jnp.asarray(y[idx], jnp.int32))
        return {a: {k: jnp.swapaxes(getattr(res, k), 0, 1) for k in ATTACK_FIELDS} for a, res in out.items()}

    rows = map_batches(craft_rows, np.arange(job.start, job.stop), config.shard_size)
    return {kappa: {a: {k: rows[a][k][:, g] for k in ATTACK_FIELDS} for a in run.cells}
            for g, kappa in enumerate(job.kappas)}


def parse_worker(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--worker takes I/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--worker I/N needs 0 <= I < N, got {text!r}")
    return i, n


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


def clean_row(magnet, spec, outputs, labels: np.ndarray, thresholds: Mapping[str, float]) -> dict[str, Any]:
    """Clean accuracy (%) with no defense and with each defense, and each detector's false-positive rate (%),
    from the defense pass on natural images (``outputs``) and their ``labels``; the no-defense column counts
    the defense pass's own logits."""
    plain_correct = outputs.logits.argmax(-1) == labels
    flags, flagged = defense_flags(magnet, spec, outputs, thresholds)
    reformed_correct = outputs.reformed_logits.argmax(-1) == labels
    return {"n_test": int(len(labels)), "no_defense": _pct(np.mean(plain_correct)),
            **{d: _pct(clean_accuracy(flagged[d], reformed_correct, plain_correct).both) for d in DEFENSES},
            "test_false_positive_rate": {n: _pct(f.mean()) for n, f in flags.items()}}


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
    dataset = datasets.get(cfg["dataset"])
    title = f"{dataset.paper_table} ({dataset.title})" if dataset.paper_table else dataset.title
    if not result.get("complete", True):
        lines += [f"> **PARTIAL**: {result['shards_done']} of {result['shards_total']} shards crafted; each cell "
                  "is measured on the images whose shards exist (its `n_images` in table.json), and cells "
                  "without any are `-`. Not the finished table.", ""]
    if cfg["quick"]:
        lines += ["> **QUICK PRESET**: a reduced protocol for a CPU smoke run "
                  f"({cfg['n_images']} images, kappa {', '.join(f'{k:g}' for k in cfg['kappas'])}, "
                  f"{_iterations_text(cfg)} x {cfg['search_steps']} search steps). "
                  "Not comparable cell for cell with the paper's 1,000 images x 1,000 iterations x 9 steps.", ""]
    elif result.get("deviations_from_paper"):
        lines += ["> **NOT THE PAPER'S PROTOCOL**: " + "; ".join(
            f"{k} = {v[0]} (paper: {v[1]})" for k, v in result["deviations_from_paper"].items()) + ".", ""]
    lines += [f"# {title}: accuracy (%) on adversarial examples, MagNet vs MI-strengthened MagNet", "",
              "Each cell: ours (paper, ours - paper). Untargeted, oblivious setting; "
              f"{cfg['n_images']} correctly classified test images (seed {cfg['seed']}).", ""]
    header = ["kappa"] + [f"{DEFENSE_TITLES[d]} {registry.title(a)}" for d in DEFENSES for a in cfg["attacks"]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kappa in cfg["kappas"]:
        cells = []
        for defense in DEFENSES:
            for attack in cfg["attacks"]:
                c = result["cells"].get(f"{attack}/{kappa:g}")
                text = "-" if c is None else _fmt_cell(c[defense]["accuracy"], c["paper"].get(defense))
                cells.append(text + (" †" if c is not None and c["n_success"] == 0 else ""))
        lines.append(f"| {kappa:g} | " + " | ".join(cells) + " |")
    clean = result["clean_accuracy"]
    if any(c["n_success"] == 0 for c in result["cells"].values()):
        lines += ["", "† The attack found no adversarial example in this cell: its accuracy is measured on the "
                  "unperturbed images and says nothing about robustness."]
    paper_clean_row = clean.get("paper") or {}
    lines += ["", f"Clean test accuracy (%), all {clean.get('n_test', 10_000):,} test images:", "",
              "| | no defense | MagNet | MI-MagNet |", "|---|---|---|---|",
              "| ours (paper, diff) | " + " | ".join(_fmt_cell(clean[k], paper_clean_row.get(k))
                                                    for k in ("no_defense", "magnet", "mi_magnet")) + " |", ""]
    lines += ["Attack statistics (successful examples):", "",
              "| attack | kappa | success % | mean L1 | mean L2 |", "|---|---|---|---|---|"]
    for key, c in result["cells"].items():
        attack, kappa = key.split("/")
        l1 = "-" if c["mean_l1"] is None else f"{c['mean_l1']:.2f}"
        l2 = "-" if c["mean_l2"] is None else f"{c['mean_l2']:.3f}"
        lines.append(f"| {registry.title(attack)} | {kappa} | {c['attack_success_rate']:.1f} | {l1} | {l2} |")
    lines += ["", f"MI detector: reading `{cfg['mi_reading']}`, T = {cfg['mi_temperature']:g}. "
              f"Commit `{result['git_commit']}`, device {result['device']}, wall time {result['wall_seconds']:.0f} s.",
              f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def render_csv(result: Mapping[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["dataset", "quick", "protocol", "n_images", "attack", "kappa", "defense", "accuracy", "paper", "diff",
                     "detector_only", "reformer_only", "accuracy_successful_only", "attack_success_rate",
                     "mean_l1", "mean_l2"])
    cfg = result["config"]
    protocol = ("partial " if not result.get("complete", True) else "") + (
        "quick" if cfg["quick"] else "reduced" if result.get("deviations_from_paper") else "paper")
    for key, c in result["cells"].items():
        attack, kappa = key.split("/")
        for defense in DEFENSES:
            d, paper = c[defense], c["paper"].get(defense)
            writer.writerow([cfg["dataset"], cfg["quick"], protocol, c["n_images"], attack, kappa, defense,
                             d["accuracy"], paper,
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
            ks = [k for k in cfg["kappas"] if f"{attack}/{k:g}" in result["cells"]]
            ax.plot(ks, [result["cells"][f"{attack}/{k:g}"][defense]["accuracy"] for k in ks], "o-",
                    color=colors[defense], label=f"{DEFENSE_TITLES[defense]} (ours)")
            pk = sorted(k for (d, a, k) in paper if d == defense and a == attack)
            ax.plot(pk, [paper[(defense, attack, k)] for k in pk], "--", color=colors[defense], alpha=0.7,
                    label=f"{DEFENSE_TITLES[defense]} (paper)")
        ax.set_title(registry.title(attack))
        ax.set_xlabel("kappa")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy on adversarial examples (%)")
    axes[-1].legend(fontsize=8, loc="lower right")
    suffix = (" [QUICK PRESET]" if cfg["quick"] else " [NOT THE PAPER'S PROTOCOL]" if result.get("deviations_from_paper")
              else "") + ("" if result.get("complete", True) else " [PARTIAL]")
    fig.suptitle(f"{cfg['dataset']}: MagNet vs MI-MagNet{suffix}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------------


def _log_timing(cache_dir: Path, job: AttackJob, seconds: float, config: TablesConfig, commit: str) -> None:
    """Appends one line per attack call to ``<cache>/timings.jsonl`` (the campaign's measured costs); ``commit``
    is the git commit of the code the process loaded (read at its start, not at each call)."""
    record = {"family": job.family, "kappas": list(job.kappas), "images": [job.start, job.stop],
              "seconds": round(seconds, 2), "iterations": registry.get(job.family).settings(config).get("iterations"),
              "search_steps": config.search_steps, "device": device_description(), "git_commit": commit,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(cache_dir / "timings.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


class OverwriteError(RuntimeError):
    """The output folder holds a table of another configuration."""


SPLIT_ONLY = ("shard_size", "kappas_per_call")   # how the work is split: never part of a result's identity


def check_overwrite(out: Path, config: TablesConfig, overwrite: bool) -> None:
    """Refuses (unless ``overwrite``) to replace ``out/table.json`` written for another configuration.

    Raises:
      OverwriteError: naming the folder, each differing setting and the ways out.
    """
    path = Path(out) / "table.json"
    if overwrite or not path.is_file():
        return
    try:
        stored = json.loads(path.read_text()).get("config", {})
    except json.JSONDecodeError:
        stored = {}
    wanted = json.loads(json.dumps(dataclasses.asdict(config)))
    diffs = [f"{k}: {stored.get(k)!r} there, {v!r} now" for k, v in sorted(wanted.items())
             if k not in SPLIT_ONLY and stored.get(k) != v]
    if diffs:
        raise OverwriteError(f"{path} holds a table of another configuration:\n  " + "\n  ".join(diffs) +
                             "\nWrite elsewhere with --out DIR, or pass --overwrite to replace it.")
    print(f"{path} exists with the same configuration: it will be rewritten from the shards")


def run(config: TablesConfig, out: Path, *, data_dir: str | None = None, source: str = "auto",
        checkpoints: str | None = None, train_missing: bool = False, command: str = "",
        dataset: data.Dataset | None = None, eval_batch: int = 500, partial: bool = False,
        worker: tuple[int, int] = (0, 1), overwrite: bool = False, cache_dir: str | Path | None = None,
        wait_seconds: float = 0.0, craft: bool = True) -> dict[str, Any]:
    """Runs the protocol and writes every output into ``out``; returns the JSON result.

    Crafts the missing shards (with ``worker=(i, n)`` only every n-th, from the i-th), then writes the table
    if every shard exists, or with ``partial`` a labelled table from the shards present; otherwise returns
    ``{"complete": False, ...}`` and writes no table. Shards live in ``cache_dir`` (default ``out/cache``);
    runs that share it share every shard they have in common (same settings, images and classifier).
    With ``wait_seconds`` > 0 a run whose own share is done waits up to that long for the other workers'
    shards to appear in the cache, then assembles the table. ``craft=False`` crafts nothing (with ``partial``:
    a labelled table of the shards present, to watch a campaign that another process is computing).
    """
    start = time.time()
    commit = git_commit()                # the code this process runs, whatever HEAD becomes while it runs
    out = Path(out)
    check_overwrite(out, config, overwrite)
    ds = dataset if dataset is not None else data.load_dataset(config.dataset, data_dir=data_dir, source=source)
    applies, params, cards = load_networks(config.dataset, checkpoints, train_missing, data_dir)
    check_cards_against_data(cards, ds)

    magnet = datasets.get(config.dataset).magnet
    spec = datasets.get(config.dataset).mi_magnet(reading=config.mi_reading, temperature=config.mi_temperature)
    forward = make_defense_fn(spec, applies)
    run_defense = lambda x: forward(params, x)  # noqa: E731

    # The attacked images: correctly classified by the bare classifier (its forward pass alone takes seconds),
    # so that every shard on disk is checked, and the missing ones crafted, before the defense's calibration.
    classify = jax.jit(applies["classifier"])
    test_pred = map_batches(lambda x: classify(params["classifier"], x), ds.test_x, eval_batch).argmax(-1)
    indices = data.select_attack_indices(ds.test_y, test_pred, config.n_images, config.seed)
    x_att, y_att = ds.test_x[indices], ds.test_y[indices]
    context = cache_context(config.dataset, ds, indices, params["classifier"])

    # Every shard on disk is checked here, before any long computation.
    cache_dir = out / "cache" if cache_dir is None else Path(cache_dir)
    shards = plan_shards(config)
    paths = {shard: shard_path(cache_dir, config, shard, context, indices) for shard in shards}
    crafted = {shard: load_shard(paths[shard], shard, ds.image_shape) for shard in shards}
    missing = [shard for shard in shards if crafted[shard] is None]
    worker_index, workers = worker
    mine = [shard for i, shard in enumerate(shards)
            if craft and crafted[shard] is None and i % workers == worker_index]
    jobs = plan_jobs(config, mine)
    print(f"{len(shards) - len(missing)} of {len(shards)} shards present in {cache_dir}; "
          f"crafting {len(mine)} in {len(jobs)} calls" + (f" (worker {worker_index}/{workers})" if workers > 1 else ""))
    made: set[Shard] = set()
    seconds: dict[str, list[float]] = {}
    for n, job in enumerate(jobs):
        t0 = time.time()
        new = run_job(job, applies["classifier"], params["classifier"], x_att, y_att, config)
        took = time.time() - t0
        for kappa, cells in new.items():
            shard = Shard(job.family, kappa, job.index, job.start, job.stop)
            save_shard(paths[shard], cells)
            crafted[shard] = cells
            made.add(shard)
        seconds.setdefault(job.family, []).append(took / len(job.kappas))
        _log_timing(cache_dir, job, took, config, commit)
        left = jobs[n + 1:]
        per_shard = {f: float(np.mean(v)) for f, v in seconds.items()}
        fallback = float(np.mean([t for v in seconds.values() for t in v]))
        eta = sum(per_shard.get(j.family, fallback) * len(j.kappas) for j in left)
        done = sum(c is not None for c in crafted.values())
        print(f"[{done}/{len(shards)} shards] {job.family} kappa {','.join(f'{k:g}' for k in job.kappas)} "
              f"images {job.start}-{job.stop}: {took:.0f} s; this run's remaining {len(left)} calls: "
              f"ETA {eta / 3600:.2f} h", flush=True)

    absent = [shard for shard in shards if crafted[shard] is None]
    deadline = time.time() + wait_seconds
    while absent and time.time() < deadline:          # the other workers' shards, as they land
        time.sleep(min(5.0, max(deadline - time.time(), 0.0)))
        for shard in absent:
            crafted[shard] = load_shard(paths[shard], shard, ds.image_shape)
        absent = [shard for shard in shards if crafted[shard] is None]
    if absent and not partial:
        print(f"{len(absent)} of {len(shards)} shards are still missing (other workers' share, or an interrupted "
              "run): rerun the same command to finish them, or add --partial for a labelled partial table")
        return {"complete": False, "shards_done": len(shards) - len(absent), "shards_total": len(shards)}

    # Natural images: thresholds on validation, clean accuracy on test.
    print(f"calibrating on {len(ds.val_x)} validation images and measuring {len(ds.test_x)} test images")
    val = map_batches(run_defense, ds.val_x, eval_batch)
    thresholds = calibrate(spec, val.scores, allow_fewer=len(ds.val_x) < ds.config.validation_size)
    test = map_batches(run_defense, ds.test_x, eval_batch)
    clean = {**clean_row(magnet, spec, test, ds.test_y, thresholds), "paper": paper_clean(config.dataset)}

    natural_scores = {n: test.scores[n][indices] for n in spec.detector_names}

    # Evaluate both defenses on every cell (with --partial: on the images whose shards exist).
    paper = paper_tables(config.dataset)
    cells: dict[str, Any] = {}
    keys = [(a, k) for a in config.attacks for k in config.kappas]
    bar = tqdm(keys, desc="defenses on cells", dynamic_ncols=True)
    for attack, kappa in bar:
        present = [s for s in shards if s.family == registry.run_of(attack).name and s.kappa == kappa
                   and crafted[s] is not None]
        if not present:
            continue
        rows_idx = np.concatenate([np.arange(s.start, s.stop) for s in present])
        cell = assemble_cell([crafted[s] for s in present], attack)
        outputs = map_batches(run_defense, cell["adv"], eval_batch)
        row = evaluate_cell(outputs, thresholds, magnet, spec, y_att[rows_idx], cell,
                            {n: v[rows_idx] for n, v in natural_scores.items()})
        row.update(attack=attack, kappa=kappa, shards=[paths[s].name for s in present],
                   cached=not any(s in made for s in present),
                   paper={d: paper.get((d, attack, kappa)) for d in DEFENSES})
        cells[f"{attack}/{kappa:g}"] = row
        bar.set_postfix(magnet=row["magnet"]["accuracy"], mi=row["mi_magnet"]["accuracy"],
                        success=row["attack_success_rate"])
    bar.close()

    result = {
        "dataset": config.dataset, "quick": config.quick, "complete": not absent,
        "shards_done": len(shards) - len(absent), "shards_total": len(shards),
        "deviations_from_paper": {k: list(v) for k, v in config.deviations().items()},
        "cache": os.path.relpath(cache_dir.resolve(), out.resolve()),
        "config": dataclasses.asdict(config), "seed": config.seed,
        "indices_hash": context["indices"], "indices": indices.tolist(), "data_md5": ds.md5,
        "data_source": ds.source, "git_commit": commit, "device": device_description(),
        "command": command, "wall_seconds": round(time.time() - start, 1), "thresholds": thresholds,
        "clean_accuracy": clean, "cells": cells,
        "models": {k: card_summary(c) for k, c in cards.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (out / "table.md").write_text(render_markdown(result))
    (out / "table.csv").write_text(render_csv(result))
    plot(result, out / "accuracy_vs_kappa.png")
    return result


def distributed_worker(coordinator: str | None = None, num_processes: int | None = None,
                       process_id: int | None = None) -> tuple[int, int]:
    """Joins the ``jax.distributed`` job and returns this process's ``(index, count)`` as a worker.

    Each process crafts its share of the shards on its own local devices (the attacks shard a batch over
    ``jax.local_devices()``) into the shared cache folder; nothing else is exchanged between processes.
    """
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return jax.process_index(), jax.process_count()


def build_config(args: argparse.Namespace) -> TablesConfig:
    try:
        config = protocol(args.dataset, quick=args.quick)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    changes: dict[str, Any] = {}
    for name in ("n_images", "iterations", "cw_iterations", "search_steps", "seed", "shard_size", "kappas_per_call",
                 "ead_momentum", "mi_reading", "mi_temperature"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.cw_abort_early is not None:
        changes["cw_abort_early"] = args.cw_abort_early == "on"
    if args.kappas is not None:
        try:
            changes["kappas"] = tuple(float(k) for k in args.kappas.split(","))
        except ValueError:
            raise SystemExit(f"error: --kappas takes comma-separated numbers, e.g. 0,10,20; got {args.kappas!r}") from None
    if args.attacks is not None:
        unknown = set(args.attacks.split(",")) - set(registry.cell_names())
        if unknown:
            raise SystemExit(f"error: unknown attacks {sorted(unknown)}; choose from {registry.cell_names()}")
        changes["attacks"] = tuple(args.attacks.split(","))
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=datasets.names(), required=True)
    parser.add_argument("--quick", action="store_true", help="the reduced CPU preset (labelled in every output)")
    parser.add_argument("--out", default=None, help="output folder (default results/<dataset>[-quick]/)")
    parser.add_argument("--data-dir", default=None, help=f"official dataset files (default ${data.DATA_DIR_ENV})")
    parser.add_argument("--source", default="auto", choices=data.SOURCES,
                        help="auto: --data-dir if given, else the official files downloaded once into "
                             "$MAGNET_MI_CACHE (default ~/.cache/magnet_mi_jax) and checked by md5")
    parser.add_argument("--checkpoints", default=None, help="trained weights (default: the repository's checkpoints/)")
    parser.add_argument("--train-missing", action="store_true", help="train models that have no checkpoint")
    parser.add_argument("--n-images", dest="n_images", type=int, default=None,
                        help="attacked images (default 1,000; --quick: MNIST 100, CIFAR-10 50)")
    parser.add_argument("--kappas", default=None,
                        help="comma-separated kappa grid, e.g. 0,10,20 (default MNIST 0,5,...,40, CIFAR-10 "
                             "0,10,...,80; --quick: MNIST 0,10,...,40, CIFAR-10 0,20,40,80)")
    parser.add_argument("--attacks", default=None, help=f"comma-separated subset of {','.join(registry.cell_names())}")
    parser.add_argument("--iterations", type=int, default=None,
                        help="iterations per search step (default 1,000; --quick: MNIST 100, CIFAR-10 50)")
    parser.add_argument("--cw-iterations", dest="cw_iterations", type=int, default=None,
                        help="C&W's iterations per search step, if not --iterations (--quick MNIST: 1,000)")
    parser.add_argument("--search-steps", dest="search_steps", type=int, default=None,
                        help="binary-search steps over c (default 9; --quick CIFAR-10: 6)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the attacked-image selection (default 0)")
    parser.add_argument("--shard-size", dest="shard_size", type=int, default=None,
                        help="attacked images per shard, the unit of work and caching (default 100; "
                             "another size makes other shards)")
    parser.add_argument("--kappas-per-call", dest="kappas_per_call", type=int, default=None,
                        help="kappas folded into one attack call (0: the whole grid; default 1). More uses a GPU "
                             "better; an interrupted run loses at most one call")
    parser.add_argument("--cw-abort-early", dest="cw_abort_early", choices=("on", "off"), default=None,
                        help="C&W's abort-early (default on, as the C&W reference code)")
    parser.add_argument("--ead-momentum", dest="ead_momentum", choices=EAD_MOMENTA, default=None,
                        help="FISTA momentum of EAD (default reference: (k+1)/(k+4), as the EAD code computes it)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a table of another configuration in --out (default: refuse)")
    parser.add_argument("--cache", default=None,
                        help="folder of the attack shards (default <out>/cache); runs sharing it reuse each "
                             "other's shards where settings, images and classifier agree")
    parser.add_argument("--partial", action="store_true",
                        help="write a labelled table from the shards present even if some are missing")
    parser.add_argument("--no-craft", dest="craft", action="store_false",
                        help="craft no shard: with --partial, a labelled table of the shards present (to watch a "
                             "campaign another process computes)")
    parser.add_argument("--worker", default="0/1",
                        help="I/N: craft only every N-th missing shard, from the I-th (N processes, one cache)")
    parser.add_argument("--distributed", action="store_true",
                        help="run as one process of a jax.distributed job (coordinator and process count from "
                             "--coordinator/--num-processes/--process-id or the cluster's environment): process "
                             "i of n crafts its share of the shards, process 0 waits for the rest and writes the "
                             "table")
    parser.add_argument("--coordinator", default=None, help="with --distributed: host:port of process 0")
    parser.add_argument("--num-processes", dest="num_processes", type=int, default=None)
    parser.add_argument("--process-id", dest="process_id", type=int, default=None)
    parser.add_argument("--wait-hours", dest="wait_hours", type=float, default=48.0,
                        help="with --distributed: how long process 0 waits for the other processes' shards")
    parser.add_argument("--mi-reading", dest="mi_reading", choices=("literal", "consistent"), default=None)
    parser.add_argument("--mi-temperature", dest="mi_temperature", type=float, default=None)
    args = parser.parse_args(argv)
    config = build_config(args)
    try:
        worker = parse_worker(args.worker)
    except ValueError as err:
        parser.error(str(err))
    wait = 0.0
    if args.distributed:
        worker = distributed_worker(args.coordinator, args.num_processes, args.process_id)
        wait = 3600.0 * args.wait_hours if worker[0] == 0 else 0.0
    out = Path(args.out) if args.out else Path("results") / (args.dataset + ("-quick" if config.quick else ""))
    command = " ".join(["python", "-m", "eval.tables", *(sys.argv[1:] if argv is None else argv)])
    try:
        result = run(config, out, data_dir=args.data_dir, source=args.source, checkpoints=args.checkpoints,
                     train_missing=args.train_missing, command=command, partial=args.partial, worker=worker,
                     overwrite=args.overwrite, cache_dir=args.cache, wait_seconds=wait, craft=args.craft)
    except (checkpoint.CheckpointError, data.DataError, OverwriteError) as err:   # one line, exit status 2
        parser.exit(2, f"error: {err}\n")
    if not result["complete"] and "cells" not in result:
        return result
    print(render_markdown(result))
    print(f"wrote {out}/table.md, table.csv, table.json, accuracy_vs_kappa.png")
    return result


if __name__ == "__main__":
    main()
