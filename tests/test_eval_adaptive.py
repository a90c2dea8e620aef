"""eval.adaptive end to end on the shipped MNIST weights, 2,000 validation and 400 test images and a tiny attack budget: every
output, the accounting between an attack's success and the defenses' verdicts, resuming from the cache, and
the refusal to overwrite another configuration's table."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest

from eval import adaptive
from magnet_mi_jax import cli

TINY = adaptive.AdaptiveConfig(n_images=4, kappas=(0.0, 5.0), attacks=("ead_en", "ead_l1"), iterations=10,
                               search_steps=2, const=0.1)


@pytest.fixture(scope="module")
def small(mnist):
    # 2,000 validation images: floor(2000 x 0.001) = 2 images calibrate each MagNet detector (finite thresholds)
    return dataclasses.replace(mnist, val_x=mnist.val_x[:2000], val_y=mnist.val_y[:2000],
                               test_x=mnist.test_x[:400], test_y=mnist.test_y[:400])


def test_outputs_accounting_resume_and_overwrite(small, tmp_path):
    out = tmp_path / "adaptive"
    first = adaptive.run(TINY, out, dataset=small, command="test", eval_batch=200)
    for name in ("table.md", "table.json", "roc.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    saved = json.loads((out / "table.json").read_text())
    assert set(saved["attack_seconds"]) == {"ead/oblivious", "ead/magnet", "ead/mi_magnet"}
    assert set(saved["cells"]) == {f"{a}/{t}/{k:g}" for a in TINY.attacks for t in adaptive.TARGETS
                                   for k in TINY.kappas}
    for strict, theta in zip(saved["attacker_thresholds"].values(), saved["thresholds"].values()):
        assert strict <= theta
    per_image = 100.0 / TINY.n_images
    for row in saved["cells"].values():
        # MI-MagNet flags a superset of MagNet's inputs with the same reformer
        assert row["mi_magnet"]["accuracy"] >= row["magnet"]["accuracy"]
        for d in ("magnet", "mi_magnet"):
            assert row[d]["accuracy"] >= max(row[d]["detected"], row[d]["reformer_only"])
        if row["target"] != "oblivious":
            # a success evades every detector of its target and is misclassified after the reformer, so the
            # target defends at most the other images (one image of float-rounding slack at a threshold)
            assert row[row["target"]]["accuracy"] <= 100.0 - row["attack_success_rate"] + per_image + 1e-9
        assert set(row["detectors"]) == {"I", "II", "MI"}
    assert "MagNet and MI-MagNet against adaptive attacks" in (out / "table.md").read_text()

    again = adaptive.run(TINY, out, dataset=small, command="test", eval_batch=200)   # every call from the cache
    assert again["attack_seconds"] == {}
    assert again["cells"] == first["cells"]

    with pytest.raises(cli.OverwriteError, match="another configuration"):
        adaptive.run(dataclasses.replace(TINY, penalty=2.0), out, dataset=small, command="test")


def test_cache_key_changes_with_every_setting_and_not_with_the_report():
    ctx = {"indices": "a", "classifier": "b"}
    base = adaptive.call_key(TINY, "ead", "magnet", ctx)
    for field, value in (("n_images", 5), ("kappas", (0.0,)), ("iterations", 11), ("search_steps", 3),
                         ("const", 0.2), ("beta", 0.02), ("penalty", 2.0), ("fpr_factor", 2.0),
                         ("normalize", False), ("seed", 1)):
        assert adaptive.call_key(dataclasses.replace(TINY, **{field: value}), "ead", "magnet", ctx) != base, field
    assert adaptive.call_key(TINY, "ead", "mi_magnet", ctx) != base
    assert adaptive.call_key(TINY, "ead", "magnet", dict(ctx, classifier="c")) != base
    assert adaptive.call_key(dataclasses.replace(TINY, attacks=("ead_l1",), targets=("magnet",)), "ead", "magnet",
                             ctx) == base


def test_config_checks():
    with pytest.raises(ValueError, match="attacks"):
        adaptive.AdaptiveConfig(attacks=("pgd",))
    with pytest.raises(ValueError, match="targets"):
        adaptive.AdaptiveConfig(targets=("everyone",))
    with pytest.raises(ValueError, match="kappas"):
        adaptive.AdaptiveConfig(kappas=(-1.0,))


def test_results_made_under_the_legacy_cw_name_read_and_resume_under_the_registry_name():
    """results/mnist-adaptive/ predates the registry's cell names ("cw" for C&W): its recorded command gives
    the current default configuration, which matches its table (no overwrite refusal), and its cached
    examples load under "cw_l2"."""
    committed = Path(__file__).resolve().parents[1] / "results" / "mnist-adaptive"
    table = json.loads((committed / "table.json").read_text())
    assert "cw" in table["config"]["attacks"]                         # the legacy name, as committed
    argv = shlex.split(table["command"])[3:]                          # after "python -m eval.adaptive"
    config = adaptive.build_config(adaptive.parse_args(argv))
    assert config == adaptive.AdaptiveConfig(dataset="mnist") and "cw_l2" in config.attacks
    adaptive.check_overwrite(config, committed)
    with pytest.raises(cli.OverwriteError, match="another configuration"):
        adaptive.check_overwrite(dataclasses.replace(config, seed=1), committed)
    (path,) = (committed / "cache").glob("cw-oblivious-*.npz")
    cells = adaptive.load_call(path)
    assert set(cells) == {"cw_l2"} and cells["cw_l2"]["adv"].shape[:2] == (3, 100)
    assert "## C&W-L2" in adaptive.render_markdown(table)
