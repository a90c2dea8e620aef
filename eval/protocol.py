"""The table protocol: its config, the attacked images' shards and their cache, and what a cell measures.

The protocol (Hsu et al. 2018, Section 4; ``docs/design.md``): ``n_images`` correctly classified test images
chosen by a seeded shuffle; for every attack (C&W-L2, EAD with the L1 rule, EAD with the EN rule) and every kappa
of the grid, untargeted adversarial examples crafted on the bare classifier (oblivious setting); each defense
scored on them: an example counts as correct if any detector flags it or the reformed input is classified
correctly. :func:`protocol` gives a dataset's full or quick protocol from its config
(:mod:`magnet_mi_jax.datasets`).

Adversarial examples are computed and cached as **shards**: one attack run (C&W-L2, or EAD, whose one run
gives both decision rules) x one kappa x one slice of ``shard_size`` attacked images, written atomically as
compressed ``.npz`` files (read with ``allow_pickle=False``), named by a hash of everything that determines
them (every attack setting, the attack-code version, the data files, the shard's image indices, the
classifier's weights) and by nothing else, so a fresh clone finds committed shards.

``eval.tables`` runs this protocol and ``eval.report`` writes it; the other studies (``eval.detector_auc``,
``eval.mi_generators``, ``eval.adaptive``, ``eval.magnet_clean``) read the same shards, networks and cell metric
from here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from magnet_mi_jax import checkpoint, data, datasets
from magnet_mi_jax.attacks import EAD_MOMENTA, registry
from magnet_mi_jax.detectors import attack_accuracy, clean_accuracy, decide, map_batches, roc_auc
from magnet_mi_jax.models import alpha_gan

ATTACKS = ("cw_l2", "ead_l1", "ead_en")   # the paper's attacks; any cell of magnet_mi_jax.attacks.registry runs
DEFENSES = ("magnet", "mi_magnet")
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


def load_networks(dataset: str, checkpoints: str | None, names: tuple[str, ...] | None = None,
                  on_missing: Callable[[str, str], None] | None = None):
    """``(applies, params, cards)`` for the networks ``names`` (default: the classifier, the MagNet
    auto-encoders and the alpha-GAN, whose ``"generator"`` checkpoint gives ``"encoder"`` and ``"generator"``).

    ``on_missing(dataset, name)``, if given, is called for a network without trained weights (e.g. to train
    it) before loading it again; otherwise that is a :class:`~magnet_mi_jax.checkpoint.CheckpointError` naming
    the training command."""
    config = datasets.get(dataset)
    names = list(config.magnet.network_keys) + [config.generator] if names is None else list(names)
    applies, params, cards = {}, {}, {}
    for name in names:
        try:
            module, p, card = checkpoint.load_model(dataset, name, checkpoints)
        except checkpoint.CheckpointError as err:
            if on_missing is None or "no trained" not in str(err):
                raise
            on_missing(dataset, name)
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


def percent(v: float) -> float:
    """A fraction as a percentage rounded to 0.01."""
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
    return {"n_test": int(len(labels)), "no_defense": percent(np.mean(plain_correct)),
            **{d: percent(clean_accuracy(flagged[d], reformed_correct, plain_correct).both) for d in DEFENSES},
            "test_false_positive_rate": {n: percent(f.mean()) for n, f in flags.items()}}


def evaluate_cell(outputs, thresholds: Mapping[str, float], magnet, spec, labels: np.ndarray,
                  cell: Mapping[str, np.ndarray], natural_scores: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Both defenses' accuracy on one cell's adversarial examples, plus attack statistics and detector AUCs.

    ``magnet`` is the MagNet preset and ``spec`` its MI-strengthened version (:func:`mi_magnet`)."""
    flags, flagged = defense_flags(magnet, spec, outputs, thresholds)
    reformed_correct = outputs.reformed_logits.argmax(-1) == labels
    original_correct = outputs.logits.argmax(-1) == labels
    success = cell["success"].astype(bool)
    row: dict[str, Any] = {
        "attack_success_rate": percent(success.mean()),
        "mean_l1": float(cell["l1"][success].mean()) if success.any() else None,
        "mean_l2": float(cell["l2"][success].mean()) if success.any() else None,
        "mean_linf": float(cell["linf"][success].mean()) if success.any() else None,
        "n_images": int(len(labels)), "n_success": int(success.sum()),
    }
    for defense in DEFENSES:
        acc = attack_accuracy(flagged[defense], reformed_correct, original_correct)
        on_success = attack_accuracy(flagged[defense], reformed_correct, original_correct, where=success)
        row[defense] = {"accuracy": percent(acc.both), "detector_only": percent(acc.detector_only),
                        "reformer_only": percent(acc.reformer_only),
                        "accuracy_successful_only": percent(on_success.both) if on_success.count else None,
                        "detected": percent(flagged[defense].mean())}
    row["detector_flag_rate"] = {n: percent(flags[n].mean()) for n in flags}
    if success.any():
        row["detector_auc_successful"] = {n: round(roc_auc(natural_scores[n], outputs.scores[n][success]), 4)
                                          for n in thresholds}
    return row
