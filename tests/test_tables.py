"""eval.tables end to end on a tiny run: outputs, JSON schema, table assembly, cache and resume."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from eval import tables
from magnet_mi_jax import checkpoint
from magnet_mi_jax.models import alpha_gan, mnist_ae_i, mnist_ae_ii

TINY = dataclasses.replace(tables.FULL["mnist"], n_images=6, kappas=(0.0, 5.0), iterations=8, search_steps=2,
                           attack_batch=6, quick=True)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, mnist, tiny_mnist_classifier):
    """Checkpoints of a tiny trained classifier and untrained AEs/GAN, and a 400-image slice of MNIST."""
    root = tmp_path_factory.mktemp("tables")
    ckpt = root / "checkpoints"
    module, params, _ = tiny_mnist_classifier
    checkpoint.save_params(ckpt / "mnist" / "classifier", params, {"command": "fixture"})
    for name, build in (("ae_i", mnist_ae_i), ("ae_ii", mnist_ae_ii)):
        checkpoint.save_params(ckpt / "mnist" / name, checkpoint.init_params(build(), "mnist", jax.random.key(1)),
                               {"command": "untrained"})
    gan = alpha_gan.mnist_alpha_gan()
    checkpoint.save_params(ckpt / "mnist" / "generator", alpha_gan.init_params(gan, jax.random.key(2)),
                           {"command": "untrained"})
    small = dataclasses.replace(mnist, val_x=mnist.val_x[:400], val_y=mnist.val_y[:400],
                                test_x=mnist.test_x[:400], test_y=mnist.test_y[:400])
    return ckpt, small


def _run(tiny_setup, out, config=TINY):
    ckpt, small = tiny_setup
    return tables.run(config, out, checkpoints=str(ckpt), dataset=small, command="test", eval_batch=200)


def test_outputs_schema_and_resume(tiny_setup, tmp_path):
    out = tmp_path / "out"
    first = _run(tiny_setup, out)
    for name in ("table.md", "table.csv", "table.json", "accuracy_vs_kappa.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    saved = json.loads((out / "table.json").read_text())
    for key in ("config", "seed", "indices_hash", "data_md5", "git_commit", "device", "wall_seconds",
                "clean_accuracy", "cells", "thresholds", "quick"):
        assert key in saved
    assert set(saved["clean_accuracy"]) >= {"no_defense", "magnet", "mi_magnet", "paper"}
    assert set(saved["cells"]) == {f"{a}/{k:g}" for a in tables.ATTACKS for k in TINY.kappas}
    for cell in saved["cells"].values():
        for defense in ("magnet", "mi_magnet"):
            d = cell[defense]
            assert {"accuracy", "detector_only", "reformer_only"} <= set(d)
            # MagNet accuracy = detected OR reformed correctly >= either alone; MI-MagNet flags a superset.
            assert d["accuracy"] >= max(d["reformer_only"], d["detected"]) - 1e-9
        assert cell["mi_magnet"]["accuracy"] >= cell["magnet"]["accuracy"]
        assert 0 <= cell["attack_success_rate"] <= 100 and cell["cached"] is False
    assert saved["cells"]["cw_l2/0"]["paper"] == {"magnet": 98.7, "mi_magnet": 98.7}
    assert saved["clean_accuracy"]["paper"] == {"no_defense": 99.42, "magnet": 99.13, "mi_magnet": 98.63}
    # The selected images are correctly classified test images.
    assert len(saved["indices"]) == TINY.n_images

    md = (out / "table.md").read_text()
    assert "QUICK PRESET" in md and "| 5 |" in md and "(94.6, " in md  # paper's MagNet C&W at kappa 5
    csv_lines = (out / "table.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 2 * len(tables.ATTACKS) * len(TINY.kappas)

    # A rerun recomputes nothing and reproduces the numbers.
    second = _run(tiny_setup, out)
    assert all(c["cached"] for c in second["cells"].values())
    for key, cell in first["cells"].items():
        assert second["cells"][key]["magnet"] == cell["magnet"]
        assert second["cells"][key]["mi_magnet"] == cell["mi_magnet"]

    # A corrupt cache file is an error naming it, raised before any attack runs (the missing cell stays missing).
    victim = out / "cache" / first["cells"]["cw_l2/5"]["cache"]
    victim.unlink()
    corrupt = out / "cache" / first["cells"]["ead_en/5"]["cache"]
    corrupt.write_bytes(b"not an npz")
    with pytest.raises(RuntimeError, match="corrupt attack cache .*ead_en_kappa5_"):
        _run(tiny_setup, out)
    assert not victim.exists()
    # An interrupted run (cells missing) recomputes exactly those cells, with the same results; the EAD-L1 cell
    # of kappa 5 is not rewritten although its rule comes out of the same EAD run.
    corrupt.unlink()
    kept = out / "cache" / first["cells"]["ead_l1/5"]["cache"]
    kept_mtime = kept.stat().st_mtime_ns
    third = _run(tiny_setup, out)
    assert {k for k, c in third["cells"].items() if not c["cached"]} == {"cw_l2/5", "ead_en/5"}
    assert third["cells"]["ead_en/5"]["attack_call"]["attacks"] == ["ead_en"]
    assert kept.stat().st_mtime_ns == kept_mtime
    for key in ("cw_l2/5", "ead_en/5"):
        assert third["cells"][key]["attack_success_rate"] == first["cells"][key]["attack_success_rate"]
        ours, before = third["cells"][key]["mean_l2"], first["cells"][key]["mean_l2"]
        assert ours == before if before is None else ours == pytest.approx(before, rel=1e-5)
        assert third["cells"][key]["magnet"] == first["cells"][key]["magnet"]

    # Another setting is another cache key.
    other = tables.cache_path(out / "cache", dataclasses.replace(TINY, iterations=9), "cw_l2", 5.0, {"x": "y"})
    assert other.name != victim.name


def test_plan_jobs_groups_ead_rules_and_kappas():
    config = dataclasses.replace(TINY, kappas=(0.0, 5.0, 10.0))
    missing = [("cw_l2", 0.0), ("cw_l2", 10.0), ("ead_en", 0.0), ("ead_l1", 5.0), ("ead_en", 5.0), ("ead_l1", 10.0)]
    assert tables.plan_jobs(config, missing) == [
        tables.AttackJob(("cw_l2",), (0.0,)), tables.AttackJob(("cw_l2",), (10.0,)),
        tables.AttackJob(("ead_en",), (0.0,)), tables.AttackJob(("ead_l1", "ead_en"), (5.0,)),
        tables.AttackJob(("ead_l1",), (10.0,))]
    grid = dataclasses.replace(config, kappas_per_call=2)
    assert tables.plan_jobs(grid, missing) == [
        tables.AttackJob(("cw_l2",), (0.0, 10.0)), tables.AttackJob(("ead_l1", "ead_en"), (0.0, 5.0)),
        tables.AttackJob(("ead_l1",), (10.0,))]
    assert tables.plan_jobs(dataclasses.replace(config, kappas_per_call=0), missing)[1].kappas == (0.0, 5.0, 10.0)
    assert tables.plan_jobs(config, []) == []


def test_run_job_matches_separate_attack_calls(mnist, tiny_mnist_classifier):
    """A job (both EAD rules, a 2-kappa grid, 5 images in padded batches of 3) gives what one call per rule and
    kappa on all images gives: the grid, the padding and the unpacking lose or mix up nothing."""
    from magnet_mi_jax import attacks
    module, params, _ = tiny_mnist_classifier
    x, y = mnist.test_x[:5], mnist.test_y[:5]
    config = dataclasses.replace(TINY, iterations=6, search_steps=2, attack_batch=3, initial_const=1.0)
    job = tables.AttackJob(("ead_l1", "ead_en"), (0.0, 3.0))
    cells = tables.run_job(job, module.apply, params, x, y, config)
    assert set(cells) == {(a, k) for a in job.attacks for k in job.kappas}
    for (attack, kappa), cell in cells.items():
        ref = attacks.ead(module.apply, x, y, params=params, kappa=kappa, const=1.0, beta=config.beta,
                          rule=attack[-2:], iterations=6, search_steps=2)
        assert cell["adv"].shape == (5, 28, 28, 1)
        np.testing.assert_array_equal(cell["success"], np.asarray(ref.success))
        np.testing.assert_allclose(cell["adv"], np.asarray(ref.adv), atol=1e-5)
        np.testing.assert_allclose(cell["l2"], np.asarray(ref.l2), atol=1e-4)
    # The two rules came out of one run but keep different iterates somewhere (else the test proves nothing).
    assert any(not np.array_equal(cells[("ead_l1", k)]["l1"], cells[("ead_en", k)]["l1"]) for k in job.kappas)
    with pytest.raises(ValueError, match="cw_l2 alone"):
        tables.run_job(tables.AttackJob(("cw_l2", "ead_en"), (0.0,)), module.apply, params, x, y, config)


def test_config_rejects_bad_values():
    for bad in (dict(kappas_per_call=-1), dict(attack_batch=0), dict(cw_iterations=0), dict(kappas=()),
                dict(kappas=(-1.0,)), dict(attacks=("fgsm",)), dict(n_images=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            dataclasses.replace(TINY, **bad)
    with pytest.raises(SystemExit, match="kappas_per_call"):
        tables.main(["--dataset", "mnist", "--quick", "--kappas-per-call", "-2"])


def test_cache_never_unpickles(tmp_path):
    path = tmp_path / "cell.npz"
    np.savez(path, adv=np.array([object()], dtype=object), success=np.zeros(1, bool), l0=np.zeros(1),
             l1=np.zeros(1), l2=np.zeros(1), linf=np.zeros(1), const=np.zeros(1))
    with pytest.raises(RuntimeError, match="corrupt attack cache"):
        tables.load_cell(path, 1, (28, 28, 1))


def test_missing_checkpoint_names_the_training_command(tmp_path, mnist):
    with pytest.raises(checkpoint.CheckpointError, match="python -m train.classifier --dataset mnist"):
        tables.run(TINY, tmp_path / "o", checkpoints=str(tmp_path / "empty"), dataset=mnist)


def test_paper_numbers_are_complete():
    for dataset, n_kappa in (("mnist", 9), ("cifar10", 9)):
        paper = tables.paper_tables(dataset)
        assert len(paper) == 2 * 3 * n_kappa
    assert tables.paper_tables("mnist")[("mi_magnet", "ead_en", 10.0)] == 44.0
    assert tables.paper_clean("cifar10")["mi_magnet"] == 83.18
