"""CIFAR-10's table through eval.tables on untrained networks and tiny data: MagNet's CIFAR-10 defense (its
detectors and their thresholds), the MI detector beside it, the quick preset, the paper's Table 2 figures, and
eval.detector_auc on the result. In a file of its own so that pytest-xdist can run it beside the MNIST table
tests."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from eval import protocol, tables
from magnet_mi_jax import checkpoint


@pytest.fixture(scope="module")
def tiny_cifar_setup(tmp_path_factory, cifar10):
    """Untrained CIFAR-10 networks saved as checkpoints, 100 validation and 50 test images (MI-MagNet runs the
    generator and the classifier for all ten conditions of every image it sees: the cost of this test)."""
    from magnet_mi_jax import datasets
    ckpt = tmp_path_factory.mktemp("cifar_tables") / "checkpoints"
    for i, (name, spec) in enumerate(datasets.get("cifar10").networks.items()):
        module = spec.build()
        init = checkpoint.network_init("cifar10", name)
        params = jax.jit(init, static_argnums=0)(module, jax.random.key(i))        # eager inits take a minute
        checkpoint.save_params(ckpt / "cifar10" / name, params, {"command": "untrained"})
    small = dataclasses.replace(cifar10, val_x=cifar10.val_x[:100], val_y=cifar10.val_y[:100],
                                test_x=cifar10.test_x[:50], test_y=cifar10.test_y[:50])
    return ckpt, small


@pytest.fixture(scope="module")
def tiny_cifar_table(tiny_cifar_setup, tmp_path_factory):
    """The quick preset cut to one attack, one kappa, 2 images, 3 iterations: (its folder, its table.json). One
    attack: the attacks are the same code for every dataset (tested on MNIST); the defense is what differs."""
    ckpt, small = tiny_cifar_setup
    config = dataclasses.replace(protocol.protocol("cifar10", quick=True), n_images=2, kappas=(0.0,), iterations=3,
                                 search_steps=1, shard_size=2, attacks=("cw_l2",))
    out = tmp_path_factory.mktemp("cifar_table") / "out"
    return out, tables.run(config, out, checkpoints=str(ckpt), dataset=small, command="test", eval_batch=100)


def test_cifar10_quick_preset_runs_magnets_cifar_defense_end_to_end(tiny_cifar_table):
    """CIFAR-10's table through the same code: MagNet's CIFAR detectors (AE with p = 1, JSD at T = 10 and 40),
    their thresholds from the validation images, the MI detector beside them, the paper's Table 2 figures."""
    quick = protocol.protocol("cifar10", quick=True)
    assert (quick.n_images, quick.kappas, quick.iterations, quick.search_steps) == (50, (0.0, 20.0, 40.0, 80.0), 50, 6)
    out, saved = tiny_cifar_table
    for name in ("table.md", "table.csv", "table.json", "accuracy_vs_kappa.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert set(saved["thresholds"]) == {"AE", "JSD-T10", "JSD-T40", "MI"}
    # 100 validation images: floor(100 r) of them rejected, none at r = 0.005 (AE, MI: threshold +inf), one at
    # MagNet's JSD rate r = 0.01 (a finite threshold).
    finite = {name: bool(np.isfinite(t)) for name, t in saved["thresholds"].items()}
    assert finite == {"AE": False, "JSD-T10": True, "JSD-T40": True, "MI": False}
    assert saved["clean_accuracy"]["paper"] == {"no_defense": 86.91, "magnet": 83.33, "mi_magnet": 83.18}
    assert saved["cells"]["cw_l2/0"]["paper"] == {"magnet": 80.1, "mi_magnet": 80.1}
    assert set(saved["cells"]) == {"cw_l2/0"}
    cell = saved["cells"]["cw_l2/0"]
    assert cell["mi_magnet"]["accuracy"] >= cell["magnet"]["accuracy"] and cell["n_images"] == 2
    md = (out / "table.md").read_text()
    assert "QUICK PRESET" in md and "CIFAR-10" in md


def test_cifar10_detector_auc_scores_magnets_cifar_detectors(tiny_cifar_setup, tiny_cifar_table):
    """eval.detector_auc on a CIFAR-10 table: MagNet's CIFAR scores (AE reconstruction error with p = 1, JSD at
    T = 10 and 40) beside the MI scores; the natural scores against a NumPy computation of MagNet's formulas."""
    from scipy.special import softmax
    from scipy.stats import entropy

    from eval import detector_auc
    ckpt, small = tiny_cifar_setup
    out, saved = tiny_cifar_table
    n = 8
    result = detector_auc.run(out, dataset_name="cifar10", checkpoints=str(ckpt), dataset=small, n_natural=n,
                              temperatures=(1.0,), batch_size=n)
    assert {"AE", "JSD-T10", "JSD-T40", "dJ_literal_T1", "MI_consistent_T1", "HXgY_T1"} <= set(result["scores"])
    assert list(result["cells"]) == ["cw_l2/0"]
    assert result["cells"]["cw_l2/0"]["n_adversarial"] == saved["cells"]["cw_l2/0"]["n_success"]
    x = small.val_x[:n]
    ae_module, ae_params, _ = checkpoint.load_model("cifar10", "ae", ckpt)
    clf_module, clf_params, _ = checkpoint.load_model("cifar10", "classifier", ckpt)
    reformed = np.asarray(ae_module.apply(ae_params, x), np.float64)
    ae_error = np.abs(x - reformed).mean(axis=(1, 2, 3))
    assert result["natural_summary"]["AE"]["mean"] == pytest.approx(ae_error.mean(), rel=1e-4)
    logits, logits_reformed = (np.asarray(clf_module.apply(clf_params, v), np.float64) for v in (x, reformed))
    for t in (10, 40):
        p, q = softmax(logits / t, axis=1), softmax(logits_reformed / t, axis=1)
        m = (p + q) / 2
        jsd = 0.5 * entropy(p, m, axis=1) + 0.5 * entropy(q, m, axis=1)
        assert result["natural_summary"][f"JSD-T{t}"]["median"] == pytest.approx(np.median(jsd), rel=1e-3)
