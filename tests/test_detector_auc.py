"""eval.detector_auc on a synthetic eval.tables run whose AUCs are known in advance.

The auto-encoders have all-zero weights, so AE(x) = sigmoid(0) = 1/2 everywhere and MagNet's scores are
closed-form: I(x) = mean (x - 1/2)^2, II(x) = mean |x - 1/2|. "Adversarial" cells are built so the answers
follow from that: all-ones images (I = 1/4, II = 1/2, above every digit: AUC 1), uniform noise (I ~ 1/12, below
every digit: AUC 0), and the natural images themselves (identical scores: AUC exactly 1/2 for every score).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import detector_auc, protocol, scoring
from magnet_mi_jax import checkpoint, data
from magnet_mi_jax.attacks import registry
from magnet_mi_jax.detectors import MNIST_MAGNET, magnet_forward, roc_auc, softmax_t
from magnet_mi_jax.detectors.mi import READINGS, conditional_logits, conditional_table, mi_quantities
from magnet_mi_jax.models import MnistClassifier, alpha_gan, mnist_ae_i, mnist_ae_ii

N_NAT = 40          # natural validation images
N_ATT = 40          # "attacked" images per cell
N_ONES = 30         # successful all-ones examples in cw_l2/0 (the other 10 failed and must be ignored)
FPR = 0.05          # n = floor(40 * 0.05) = 2 natural scores above the threshold
FPR2 = 0.1          # a second rate: n = 4
TEMPS = (1.0, 10.0, 40.0)
CONFIG = dataclasses.replace(protocol.protocol("mnist"), n_images=N_ATT, kappas=(0.0, 10.0), attacks=("cw_l2", "ead_l1"),
                             iterations=5, search_steps=1, shard_size=N_ATT, quick=True)


def _save_checkpoints(root):
    ckpt = root / "checkpoints"
    clf = checkpoint.init_params(MnistClassifier(), "mnist", jax.random.key(0))
    # Untrained logits are ~0.1 and every softmax nearly uniform; a 30x output layer spreads the MI scores.
    clf["params"]["logits"]["kernel"] = 30.0 * clf["params"]["logits"]["kernel"]
    checkpoint.save_params(ckpt / "mnist" / "classifier", clf, {"command": "untrained"})
    for name, build in (("ae_i", mnist_ae_i), ("ae_ii", mnist_ae_ii)):
        zero = jax.tree.map(jnp.zeros_like, checkpoint.init_params(build(), "mnist", jax.random.key(1)))
        checkpoint.save_params(ckpt / "mnist" / name, zero, {"command": "zero weights"})
    gan = alpha_gan.mnist_alpha_gan()
    checkpoint.save_params(ckpt / "mnist" / "generator", alpha_gan.init_params(gan, jax.random.key(2)),
                           {"command": "untrained"})
    return ckpt, clf


def _write_run(results, ckpt, clf_params, ds):
    """A table.json and cache files exactly as eval.tables names them (cache keys match the classifier)."""
    indices = np.arange(N_ATT, dtype=np.int64)
    context = {"dataset": "mnist", "indices": data.indices_hash(indices), "classifier": protocol.params_hash(clf_params),
               "data": hashlib.sha256(json.dumps(ds.md5, sort_keys=True).encode()).hexdigest()[:16]}
    nat = ds.val_x[:N_NAT]
    ones = np.ones_like(nat)
    noise = np.random.default_rng(0).uniform(size=nat.shape).astype(np.float32)
    half = np.full_like(nat, 0.5)
    cells = {  # (attack, kappa) -> (adv, success)
        ("cw_l2", 0.0): (np.concatenate([ones[:N_ONES], half[N_ONES:]]), np.arange(N_ATT) < N_ONES),
        ("cw_l2", 10.0): (nat, np.ones(N_ATT, bool)),
        ("ead_l1", 0.0): (noise, np.zeros(N_ATT, bool)),
        ("ead_l1", 10.0): (noise, np.ones(N_ATT, bool)),
    }
    rows = {}
    for (attack, kappa), (adv, success) in cells.items():
        family = registry.run_of(attack).name
        shard = protocol.Shard(family, kappa, 0, 0, N_ATT)
        path = protocol.shard_path(results / "cache", CONFIG, shard, context, indices)
        zeros = np.zeros(N_ATT, np.float32)
        cell = dict(adv=adv, success=success, l0=zeros, l1=zeros, l2=zeros, linf=zeros, const=zeros)
        protocol.save_shard(path, {a: cell for a in registry.get(family).cells})
        rows[f"{attack}/{kappa:g}"] = {"attack": attack, "kappa": kappa, "shards": [path.name]}
    table = {"config": dataclasses.asdict(CONFIG), "indices": indices.tolist(), "cells": rows,
             "command": f"python -m eval.tables --dataset mnist --quick --checkpoints {ckpt}",
             "models": {"classifier": {"command": "untrained", "git_commit": None, "metrics": None, "seed": None},
                        "ae_ii": {"command": "retrained", "git_commit": None, "metrics": None, "seed": None}}}
    (results / "table.json").write_text(json.dumps(table))
    return table


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, mnist, data_dir):
    root = tmp_path_factory.mktemp("detector_auc")
    ckpt, clf = _save_checkpoints(root)
    results = root / "results"
    table = _write_run(results, ckpt, clf, mnist)
    out = detector_auc.main(["--dataset", "mnist", "--results", str(results), "--n-natural", str(N_NAT),
                             "--fpr", f"{FPR},{FPR2}", "--batch-size", "20", "--source", "files", "--data-dir", str(data_dir),
                             "--json", str(root / "auc.json")])
    return root, results, ckpt, table, out


def test_schema_and_files(synthetic):
    root, results, ckpt, _, out = synthetic
    saved = json.loads((root / "auc.json").read_text())   # strict JSON round trip (no NaN/Infinity needed)
    assert saved["cells"] == json.loads(json.dumps(out["cells"]))
    md = (results / "detector_auc.md").read_text()
    assert "## Successful examples, pooled over kappa" in md and "| dJ_literal_T1 |" in md and "| HXgY_T40 |" in md
    assert saved["checkpoints"] == str(ckpt)   # taken from the run's recorded command
    # Cards that differ from those the run recorded are reported (the cache key pins only the classifier).
    assert len(saved["warnings"]) == 1 and "model ae_ii" in saved["warnings"][0]
    assert "> warning: model ae_ii" in md
    names = {"I", "II"} | {f"{q}_{r}_T{t:g}" for q in ("dJ", "MI") for r in READINGS for t in TEMPS} | {
        f"HXgY_T{t:g}" for t in TEMPS}
    assert set(saved["scores"]) == names and len(names) == 17
    assert set(saved["cells"]) == {"cw_l2/0", "cw_l2/10", "ead_l1/0", "ead_l1/10"}
    assert set(saved["pooled"]) == {"cw_l2", "ead_l1"}
    for group in list(saved["cells"].values()) + list(saved["pooled"].values()):
        assert set(group["scores"]) == names
        for m in group["scores"].values():
            assert set(m) == {"auc", "tpr", "threshold", "tpr_reversed", "threshold_reversed", "n_adversarial",
                              "at_fpr"}
            assert set(m["at_fpr"]) == {"0.05", "0.1"}
            assert all(m[k] == m["at_fpr"]["0.05"][k] for k in m["at_fpr"]["0.05"])   # the first rate's, on top
            if group["n_adversarial"]:
                assert 0.0 <= m["auc"] <= 1.0 and 0.0 <= m["tpr"] <= 1.0 and 0.0 <= m["tpr_reversed"] <= 1.0
                # a higher rate flags at least as much, with a threshold at most as high
                assert m["at_fpr"]["0.1"]["tpr"] >= m["tpr"] and m["at_fpr"]["0.1"]["threshold"] <= m["threshold"]
    # Only successful examples count; a cell without successes has no metrics.
    assert saved["cells"]["cw_l2/0"]["n_adversarial"] == N_ONES
    assert saved["cells"]["ead_l1/0"]["n_adversarial"] == 0
    assert all(m["auc"] is None for m in saved["cells"]["ead_l1/0"]["scores"].values())
    assert saved["pooled"]["cw_l2"]["n_adversarial"] == N_ONES + N_ATT
    assert saved["fprs"] == [FPR, FPR2] and saved["fpr"] == FPR
    # All examples: every output of every cell, failed attacks included.
    every = saved["all_examples"]
    assert set(every["cells"]) == set(saved["cells"]) and set(every["pooled"]) == {"cw_l2", "ead_l1"}
    assert all(c["n_adversarial"] == N_ATT for c in every["cells"].values())
    assert every["pooled"]["cw_l2"]["n_adversarial"] == 2 * N_ATT
    # The ROC figure is drawn and named in the report.
    roc = results / "detector_roc.png"
    assert roc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and saved["roc_figure"] == str(roc)
    assert "## All examples" in md and str(roc) in md


def test_known_aucs(synthetic):
    out = synthetic[-1]
    cells, pooled = out["cells"], out["pooled"]
    for name in ("I", "II"):
        ones, noise = cells["cw_l2/0"]["scores"][name], cells["ead_l1/10"]["scores"][name]
        assert ones["auc"] == 1.0 and ones["tpr"] == 1.0 and ones["tpr_reversed"] == 0.0
        assert noise["auc"] == 0.0 and noise["tpr"] == 0.0 and noise["tpr_reversed"] == 1.0
    assert cells["cw_l2/0"]["scores"]["I"]["threshold"] < 0.25  # below the all-ones score 1/4
    # Natural images as "adversarial": identical scores, AUC exactly 1/2 for every score.
    for name, m in cells["cw_l2/10"]["scores"].items():
        assert m["auc"] == 0.5, name
    # Pooling over kappa (same negatives): the AUC is the successes-weighted mean of the cells' AUCs.
    for name, m in pooled["cw_l2"]["scores"].items():
        expect = (N_ONES * cells["cw_l2/0"]["scores"][name]["auc"] + N_ATT * 0.5) / (N_ONES + N_ATT)
        assert m["auc"] == pytest.approx(expect, abs=1e-12), name
    assert pooled["ead_l1"]["scores"] == cells["ead_l1/10"]["scores"]
    # At the second rate too: n = floor(40 * 0.1) = 4 natural scores at or above the threshold.
    for name in ("I", "II"):
        ones = cells["cw_l2/0"]["scores"][name]["at_fpr"]["0.1"]
        noise = cells["ead_l1/10"]["scores"][name]["at_fpr"]["0.1"]
        assert ones["tpr"] == 1.0 and noise["tpr"] == 0.0 and noise["tpr_reversed"] == 1.0
    # All examples: the 10 failed outputs of cw_l2/0 are the half-grey images, whose MagNet scores are exactly
    # 0 (AE(x) = x), below every digit; the 30 all-ones above every digit: AUC 30/40, TPR 30/40 at both rates.
    every = out["all_examples"]["cells"]
    for name in ("I", "II"):
        m = every["cw_l2/0"]["scores"][name]
        assert m["auc"] == N_ONES / N_ATT and m["tpr"] == m["at_fpr"]["0.1"]["tpr"] == N_ONES / N_ATT
        # ead_l1/0 had no success, but all its 40 outputs (noise) are scored: below every digit
        assert every["ead_l1/0"]["scores"][name]["auc"] == 0.0
    assert every["cw_l2/10"]["scores"] == cells["cw_l2/10"]["scores"]         # every attack succeeded there


def test_scores_equal_per_t_library_calls_and_pin_the_aucs(synthetic, mnist):
    """One shared pass over all T (the analysis detectors) equals separate per-T library calls (magnet_forward,
    conditional_table, mi_quantities); those independent scores, ranked by brute force, reproduce the report's
    AUCs on cw_l2/0."""
    _, _, ckpt, _, out = synthetic
    applies, params, _ = protocol.load_networks("mnist", str(ckpt))
    x = jnp.asarray(np.concatenate([mnist.val_x[:N_NAT], np.ones((1, 28, 28, 1), np.float32)]))  # naturals, ones
    got = scoring.make_score_fn(MNIST_MAGNET, applies, TEMPS)(params, x)
    fwd = magnet_forward(MNIST_MAGNET, applies, params, x)
    logits = conditional_logits(applies["classifier"], params["classifier"], applies["encoder"],
                                             params["encoder"], applies["generator"], params["generator"], x, 10)
    assert logits.shape == (N_NAT + 1, 10, 10)
    for name in ("I", "II"):
        np.testing.assert_allclose(got[name], fwd.scores[name], rtol=1e-6)
    reference = {}
    for t in TEMPS:
        table = conditional_table(applies["classifier"], params["classifier"], applies["encoder"], params["encoder"],
                                  applies["generator"], params["generator"], x, 10, t)
        np.testing.assert_allclose(jax.nn.softmax(logits / t, axis=-1), table, rtol=1e-5, atol=1e-7)
        for r in READINGS:
            want = mi_quantities(softmax_t(fwd.logits, t), softmax_t(fwd.reformed_logits, t), table, r)
            reference[f"dJ_{r}_T{t:g}"] = want.jaccard
            reference[f"MI_{r}_T{t:g}"] = want.mutual_information
            reference[f"HXgY_T{t:g}"] = want.h_x_given_y
            for name in (f"dJ_{r}_T{t:g}", f"MI_{r}_T{t:g}", f"HXgY_T{t:g}"):
                np.testing.assert_allclose(got[name], reference[name], rtol=1e-5, atol=1e-6, err_msg=name)
    flat = scoring.flatten_scores(jax.device_get(got), TEMPS)
    assert list(flat) == list(scoring.score_names(MNIST_MAGNET, TEMPS)) and set(flat) == set(got)
    np.testing.assert_array_equal(flat["dJ_consistent_T10"], np.asarray(got["dJ_consistent_T10"]))

    # The report scored the 40 naturals and 30 identical all-ones images in other batches. Pairs closer than
    # float32 rounding may order either way between two computations, so the reported AUC must lie between
    # the brute-force counts with those pairs lost and won.
    resolved_counts = {}
    for name, values in reference.items():
        values = np.asarray(values, np.float64)
        n, a = values[:N_NAT], values[N_NAT]
        resolved = np.abs(a - n) > 1e-5 * max(1.0, abs(a))
        low = float(np.mean(resolved & (a > n)))
        high = low + float(np.mean(~resolved))
        auc = out["cells"]["cw_l2/0"]["scores"][name]["auc"]
        assert low - 1e-12 <= auc <= high + 1e-12, (name, auc, low, high)
        assert roc_auc(n, np.full(N_ONES, a)) == pytest.approx(float(np.mean((a > n) + 0.5 * (a == n))), abs=1e-12)
        resolved_counts[name] = int(resolved.sum())
    # The check has teeth: at T = 1 every pair of the MI scores is resolved, so those AUCs are pinned exactly.
    for name in ("dJ_literal_T1", "MI_literal_T1", "dJ_consistent_T1", "MI_consistent_T1", "HXgY_T1"):
        assert resolved_counts[name] == N_NAT, (name, resolved_counts[name])


def test_clear_errors(synthetic, tmp_path, mnist):
    root, results, ckpt, table, _ = synthetic
    kwargs = dict(dataset_name="mnist", dataset=mnist, n_natural=N_NAT, fprs=FPR, batch_size=20)
    with pytest.raises(scoring.AnalysisError, match="results folder .*nowhere does not exist"):
        detector_auc.run(tmp_path / "nowhere", **kwargs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(scoring.AnalysisError, match="table.json is missing"):
        detector_auc.run(tmp_path / "empty", **kwargs)
    with pytest.raises(scoring.AnalysisError, match="is a mnist run, not cifar10"):
        detector_auc.run(results, **{**kwargs, "dataset_name": "cifar10"})
    # A missing shard names the cell and the file.
    broken = tmp_path / "broken"
    (broken / "cache").mkdir(parents=True)
    (broken / "table.json").write_text(json.dumps(table))
    with pytest.raises(scoring.AnalysisError, match=r"cell cw_l2/0: attack shard .*cw_kappa0_s000_.*missing"):
        detector_auc.run(broken, **kwargs)
    # Other attacked indices (or another classifier) -> another cache key: refused unless asked.
    moved = dict(table, indices=[i + 1 for i in table["indices"]])
    (broken / "table.json").write_text(json.dumps(moved))
    with pytest.raises(scoring.AnalysisError, match="made for other classifier weights"):
        detector_auc.run(broken, **kwargs)
    for bad in ("0.05,0.05", "0.5,1", "five"):
        with pytest.raises(SystemExit, match="2"):
            detector_auc.main(["--dataset", "mnist", "--results", str(results), "--fpr", bad])
    with pytest.raises(ValueError, match="distinct rates"):
        scoring.score_metrics(np.arange(5.0), np.arange(3.0), (0.1, 0.1))
    # The CLI turns these into a one-line error and exit status 2.
    with pytest.raises(SystemExit) as exc:
        detector_auc.main(["--dataset", "mnist", "--results", str(tmp_path / "nowhere")])
    assert exc.value.code == 2
