"""What the detector studies share (``eval.detector_auc``, ``eval.mi_generators``): the detectors they score, one
shared pass per batch, the ROC metrics, and reading the cells of a finished ``eval.tables`` run.

Scores (larger = more suspicious), for a batch x (B, H, W, C), K classes and temperatures T_1..T_n:

* MagNet's detectors from the dataset's preset: MNIST ``I`` = mean (x - AE_I(x))^2, ``II`` = mean |x - AE_II(x)|;
  CIFAR-10 ``AE`` = mean |x - AE(x)|, ``JSD-T10`` / ``JSD-T40`` = JSD(softmax(Z(x)/T), softmax(Z(R(x))/T));
* the MI detector at each T (the defense's own ``MIDetector``, read with other quantities and readings), from
  logits computed once per batch: Z(x) (B, K), Z(R(x)) (B, K) and the conditional logits
  L[b, j, :] = Z(G(E(x_b), e_j)) (B, K, K), then for each T
      p_X = softmax(Z(x)/T),  p_Y = softmax(Z(R(x))/T),  P[j, i] = softmax(L[j, :]/T)_i;
  reported as ``dJ_<reading>_T<T>`` (Jaccard distance d_J = 1 - I(X;Y)/H(X,Y)) and ``MI_<reading>_T<T>``
  (I(X;Y)) for both readings (``literal``, ``consistent``; :mod:`magnet_mi_jax.detectors.mi`) and
  ``HXgY_T<T>`` (H(X|Y) = sum_j p_Y(j) H(P[j, :]), the same under both readings).

Metrics per score: ROC AUC (Mann-Whitney, ties count 1/2; AUC < 0.5 means the score is *lower* on adversarial
inputs and 1 - AUC is the AUC of the reversed score) and the TPR at each false-positive rate r (default 0.5%,
MagNet's rate, and 5%) with the threshold calibrated on the natural scores (MagNet's rule), in both directions.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shlex
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eval import protocol
from magnet_mi_jax import data
from magnet_mi_jax.detectors import (JSDDetector, MagNet, MIDetector, ReconstructionDetector, roc_auc,
                                     tpr_at_fpr)
from magnet_mi_jax.detectors import _checks
from magnet_mi_jax.detectors.forward import SharedForward
from magnet_mi_jax.detectors.mi import READINGS

__all__ = ["DEFAULT_TEMPERATURES", "DEFAULT_FPR", "DEFAULT_FPRS", "DEFAULT_N_NATURAL", "AnalysisError", "mi_detectors",
           "analysis_detectors", "detector_scores", "make_score_fn", "score_names", "flatten_scores", "rate_key", "rates_of",
           "score_metrics", "analyse", "pool_over_kappa", "read_table", "run_checkpoints", "tables_config",
           "shard_from_name", "load_cells"]

DEFAULT_TEMPERATURES = (1.0, 10.0, 40.0)
DEFAULT_FPR = 0.005
DEFAULT_FPRS = (DEFAULT_FPR, 0.05)        # MagNet's rate first: the one the reports' tables show
DEFAULT_N_NATURAL = 1000
MI_QUANTITIES = ("jaccard", "mutual_information")          # per reading
MI_PREFIX = {"jaccard": "dJ", "mutual_information": "MI"}


class AnalysisError(RuntimeError):
    """A missing or inconsistent input of the analysis (results folder, table.json, cache file, networks)."""


# --------------------------------------------------------------------------------------------------
# Scores: one jitted pass per batch.
# --------------------------------------------------------------------------------------------------


def mi_detectors(temperatures: Sequence[float] = DEFAULT_TEMPERATURES) -> tuple:
    """At each T the MI detector's d_J and I(X;Y) under both readings and H(X|Y) (the same under both):
    :class:`~magnet_mi_jax.detectors.MIDetector` instances that differ only in ``quantity``, ``reading`` and
    ``temperature``, so they share one conditional pass (the defense's own MI detector, read other ways)."""
    dets = []
    for t in temperatures:
        for reading in READINGS:
            for quantity in MI_QUANTITIES:
                dets.append(MIDetector(name=f"{MI_PREFIX[quantity]}_{reading}_{_t_label(t)}", temperature=t,
                                       reading=reading, quantity=quantity))
        dets.append(MIDetector(name=f"HXgY_{_t_label(t)}", temperature=t, quantity="h_x_given_y"))
    return tuple(dets)


def analysis_detectors(magnet: MagNet, temperatures: Sequence[float] = DEFAULT_TEMPERATURES) -> tuple:
    """The detectors the analysis scores, in report order: MagNet's, then :func:`mi_detectors`."""
    return tuple(magnet.detectors) + mi_detectors(temperatures)


def detector_scores(magnet: MagNet, applies: Mapping[str, Callable], params: Mapping[str, Any], x,
                    temperatures: Sequence[float] = DEFAULT_TEMPERATURES) -> dict[str, jnp.ndarray]:
    """Every score of :func:`analysis_detectors` on a batch, from one shared forward pass.

    Network evaluations: Z(x), the auto-encoders, Z(R(x)) and the (B, K, K) conditional logits, once each
    (:class:`~magnet_mi_jax.detectors.forward.SharedForward`); each (T, reading) pair computes its softmaxes
    and information quantities once. R is the preset's reformer, as in the MI-strengthened defense. Pure and
    jittable with ``magnet``, ``applies``, ``temperatures`` static.

    Args:
      magnet: the dataset's MagNet preset.
      applies: key -> apply function (MagNet's keys plus ``encoder`` and ``generator``).
      params: key -> parameters.
      x: (B, H, W, C) float images in [0, 1].
      temperatures: the n temperatures T > 0.

    Returns:
      score name -> (B,) score.
    """
    temps = tuple(_checks.check_temperature(t) for t in temperatures)
    if not temps:
        raise ValueError("temperatures must not be empty")
    forward = SharedForward(applies, params, x, classifier=magnet.classifier, reformer=magnet.reformer)
    return {det.name: det.score(forward) for det in analysis_detectors(magnet, temps)}


def make_score_fn(magnet: MagNet, applies: Mapping[str, Callable],
                  temperatures: Sequence[float] = DEFAULT_TEMPERATURES
                  ) -> Callable[[Mapping[str, Any], Any], dict[str, jnp.ndarray]]:
    """``jax.jit`` of :func:`detector_scores` with the preset, networks and temperatures fixed: ``f(params, x)``."""
    temps = tuple(float(_checks.check_temperature(t)) for t in temperatures)
    return jax.jit(functools.partial(detector_scores, magnet, dict(applies), temperatures=temps))


def _t_label(t: float) -> str:
    return f"T{t:g}"


def score_names(magnet: MagNet, temperatures: Sequence[float] = DEFAULT_TEMPERATURES) -> dict[str, str]:
    """Score name -> description, in report order: MagNet's detectors, then the MI scores by temperature."""
    names = {}
    for det in analysis_detectors(magnet, temperatures):
        if isinstance(det, ReconstructionDetector):
            names[det.name] = f"MagNet reconstruction error of {det.autoencoder}, p = {det.p:g}"
        elif isinstance(det, JSDDetector):
            names[det.name] = f"MagNet JSD at T = {det.temperature:g} ({det.autoencoder})"
        elif det.quantity == "h_x_given_y":
            names[det.name] = f"MI H(X|Y) (both readings), T = {det.temperature:g}"
        else:
            what = {"jaccard": "Jaccard distance d_J", "mutual_information": "I(X;Y)"}[det.quantity]
            names[det.name] = f"MI {what}, {det.reading} reading, T = {det.temperature:g}"
    return names


def flatten_scores(scores: Mapping[str, Any], temperatures: Sequence[float] = DEFAULT_TEMPERATURES
                   ) -> dict[str, np.ndarray]:
    """:func:`detector_scores`' result (host arrays; a jitted function returns its dict in sorted key order) ->
    score name -> (N,) float64 in report order: MagNet's scores, then the MI scores as :func:`score_names`."""
    mi_names = [d.name for d in mi_detectors(temperatures)]
    names = sorted(set(scores) - set(mi_names)) + mi_names
    return {name: np.asarray(scores[name], np.float64) for name in names}


# --------------------------------------------------------------------------------------------------
# Metrics.
# --------------------------------------------------------------------------------------------------


def rates_of(fprs: float | Sequence[float]) -> tuple[float, ...]:
    """One false-positive rate or several, as a tuple of distinct floats (the first is the primary one)."""
    rates = (float(fprs),) if np.ndim(fprs) == 0 else tuple(float(r) for r in fprs)
    if not rates or len(set(rates)) != len(rates):
        raise ValueError(f"fprs must be one or more distinct rates, got {fprs!r}")
    return rates


def rate_key(fpr: float) -> str:
    """The JSON key of a false-positive rate: ``"0.005"`` for 0.5%."""
    return f"{float(fpr):g}"


def score_metrics(natural: np.ndarray, adversarial: np.ndarray,
                  fprs: float | Sequence[float] = DEFAULT_FPRS) -> dict[str, Any]:
    """ROC AUC and the TPR at each rate of ``fprs`` of one score, natural (negatives) vs adversarial (positives).

    Args:
      natural: (N,) natural scores (they calibrate each threshold: n = floor(N r), the n-th largest).
      adversarial: (M,) adversarial scores; M = 0 gives ``None`` metrics.
      fprs: one rate r in (0, 1) or several; the first is the primary one.

    Returns:
      ``{"auc", "n_adversarial", "at_fpr": {rate_key(r): {"tpr", "threshold", "tpr_reversed",
      "threshold_reversed"}}}`` with the primary rate's four entries also at the top level: ``tpr`` flags
      score >= threshold; ``tpr_reversed`` applies the same rule to the negated score (smaller = adversarial);
      a threshold is None where n = floor(N r) = 0 (nothing can be flagged).
    """
    rates = rates_of(fprs)
    natural = np.asarray(natural, np.float64)
    adversarial = np.asarray(adversarial, np.float64)
    if len(adversarial) == 0:
        empty = {"tpr": None, "threshold": None, "tpr_reversed": None, "threshold_reversed": None}
        return {"auc": None, **empty, "n_adversarial": 0, "at_fpr": {rate_key(r): dict(empty) for r in rates}}
    finite = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731  (n = floor(N r) = 0: no threshold)
    at_fpr = {}
    for r in rates:
        high = tpr_at_fpr(natural, adversarial, r)
        low = tpr_at_fpr(-natural, -adversarial, r)
        at_fpr[rate_key(r)] = {"tpr": high.tpr, "threshold": finite(high.threshold), "tpr_reversed": low.tpr,
                               "threshold_reversed": finite(-low.threshold)}
    return {"auc": roc_auc(natural, adversarial), **at_fpr[rate_key(rates[0])],
            "n_adversarial": int(len(adversarial)), "at_fpr": at_fpr}


def analyse(natural: Mapping[str, np.ndarray], adversarial: Mapping[tuple[str, float], Mapping[str, np.ndarray]],
            fprs: float | Sequence[float] = DEFAULT_FPRS) -> dict[str, Any]:
    """Metrics of every score per (attack, kappa) cell and pooled over the kappas of each attack.

    Args:
      natural: score name -> (N,) natural scores.
      adversarial: (attack, kappa) -> score name -> (M_cell,) scores of the cell's adversarial examples.
      fprs: the false-positive rates of the TPRs (:func:`score_metrics`).

    Returns:
      ``{"cells": {"<attack>/<kappa>": {"attack", "kappa", "n_adversarial", "scores": {name: metrics}}},
      "pooled": {attack: {"kappas", "n_adversarial", "scores": {name: metrics}}}}``.
    """
    cells, pooled = {}, {}
    for (attack, kappa), adv in adversarial.items():
        missing = set(natural) - set(adv)
        if missing:
            raise ValueError(f"cell {attack}/{kappa:g} lacks scores {sorted(missing)}")
        cells[f"{attack}/{kappa:g}"] = {
            "attack": attack, "kappa": float(kappa), "n_adversarial": int(len(next(iter(adv.values())))),
            "scores": {name: score_metrics(natural[name], adv[name], fprs) for name in natural}}
    for attack, joined in pool_over_kappa(adversarial).items():
        pooled[attack] = {"kappas": [float(k) for a, k in adversarial if a == attack],
                          "n_adversarial": int(len(next(iter(joined.values())))),
                          "scores": {name: score_metrics(natural[name], joined[name], fprs) for name in natural}}
    return {"cells": cells, "pooled": pooled}


def pool_over_kappa(adversarial: Mapping[tuple[str, float], Mapping[str, np.ndarray]]
                    ) -> dict[str, dict[str, np.ndarray]]:
    """attack -> score name -> the scores of all its cells, concatenated in the cells' order."""
    attacks = dict.fromkeys(a for a, _ in adversarial)
    return {attack: {name: np.concatenate([adv[name] for (a, _), adv in adversarial.items() if a == attack])
                     for name in next(iter(adversarial.values()))} for attack in attacks}


# --------------------------------------------------------------------------------------------------
# A finished eval.tables run: its table and its cells.
# --------------------------------------------------------------------------------------------------


def read_table(results: Path) -> dict[str, Any]:
    """``<results>/table.json``; an :class:`AnalysisError` names what is missing."""
    if not results.is_dir():
        raise AnalysisError(f"results folder {results} does not exist; produce it with "
                            "`python -m eval.tables --dataset <dataset> [--quick] --out <folder>`")
    path = results / "table.json"
    if not path.is_file():
        raise AnalysisError(f"{path} is missing: {results} is not a finished eval.tables run "
                            "(the table is written after the last attack cell)")
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AnalysisError(f"{path} is not valid JSON: {err}") from err
    for key in ("config", "cells", "indices"):
        if key not in table:
            raise AnalysisError(f"{path} has no {key!r}; it was not written by eval.tables")
    return table


def run_checkpoints(table: Mapping[str, Any]) -> str | None:
    """The ``--checkpoints`` of the recorded ``eval.tables`` command, or None (the default folder)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--checkpoints", default=None)
    try:
        args, _ = parser.parse_known_args(shlex.split(table.get("command") or ""))
    except (ValueError, SystemExit):
        return None
    return args.checkpoints


def tables_config(table: Mapping[str, Any]) -> protocol.TablesConfig:
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in table["config"].items()}
    fields = {f.name for f in dataclasses.fields(protocol.TablesConfig)}
    return protocol.TablesConfig(**{k: v for k, v in cfg.items() if k in fields})


def shard_from_name(name: str, config: protocol.TablesConfig) -> protocol.Shard:
    """The :class:`~eval.protocol.Shard` a file name ``<family>_kappa<k>_s<index>_<hash>.npz`` stands for."""
    family, kappa, index, _ = name[:-len(".npz")].split("_")
    i = int(index[1:])
    start = i * config.shard_size
    return protocol.Shard(family, float(kappa[len("kappa"):]), i, start, min(start + config.shard_size, config.n_images))


def load_cells(results: Path, table: Mapping[str, Any], ds: data.Dataset, classifier_params: Any,
               check_cache_key: bool = True) -> dict[tuple[str, float], dict[str, np.ndarray]]:
    """(attack, kappa) -> the cell's cached arrays (``adv``, ``success``, ...), in table.json's order.

    With ``check_cache_key`` the cache name is recomputed from the run's config, the attacked indices, the
    loaded classifier's weights and the data; a different name means the examples were crafted for other
    weights or data, an :class:`AnalysisError`.
    """
    config = tables_config(table)
    indices = np.asarray(table["indices"], np.int64)
    context = protocol.cache_context(config.dataset, ds, indices, classifier_params)
    cache_dir = results / table.get("cache", "cache")          # the run's shard folder, relative to its results
    by_name = {protocol.shard_path(cache_dir, config, shard, context, indices).name: shard
               for shard in protocol.plan_shards(config)}
    cells = {}
    for key, row in table["cells"].items():
        attack, kappa = row["attack"], float(row["kappa"])
        if "shards" not in row:
            raise AnalysisError(f"cell {key}: {results / 'table.json'} was written by an older eval.tables (one cache "
                                "file per cell, no shards); rerun that eval.tables command to rebuild it")
        if check_cache_key:
            unknown = [name for name in row["shards"] if name not in by_name]
            if unknown:
                raise AnalysisError(
                    f"cell {key}: its shards {unknown} were made for other classifier weights, data or settings "
                    "than those loaded; pass the run's --checkpoints (or --no-check-cache-key to score anyway)")
        shards = []
        for name in row["shards"]:
            path = cache_dir / name
            shard = by_name.get(name) or shard_from_name(name, config)
            try:
                loaded = protocol.load_shard(path, shard, ds.image_shape)
            except RuntimeError as err:
                raise AnalysisError(f"cell {key}: {err}") from err
            if loaded is None:
                raise AnalysisError(f"cell {key}: attack shard {path} is missing; rerun the same eval.tables "
                                    "command to recreate it")
            shards.append(loaded)
        cells[(attack, kappa)] = protocol.assemble_cell(shards, attack)
    if not cells:
        raise AnalysisError(f"{results / 'table.json'} lists no attack cells")
    return cells
