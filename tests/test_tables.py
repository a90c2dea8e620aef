"""eval.tables end to end on a tiny run: outputs, JSON schema, table assembly, cache and resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from eval import protocol, report, tables
from magnet_mi_jax import checkpoint, cli

TINY = dataclasses.replace(protocol.protocol("mnist"), n_images=6, kappas=(0.0, 5.0), iterations=8, search_steps=2,
                           shard_size=3, quick=True)


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
    assert set(saved["cells"]) == {f"{a}/{k:g}" for a in protocol.ATTACKS for k in TINY.kappas}
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
    agree = report.agreement(saved)
    assert agree["compared"] == 2 * len(saved["cells"])
    assert f"{agree['within_tolerance']} of {agree['compared']} cells lie within 3 points" in md
    csv_lines = (out / "table.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 2 * len(protocol.ATTACKS) * len(TINY.kappas)

    # A rerun recomputes nothing and reproduces the numbers.
    second = _run(tiny_setup, out)
    assert all(c["cached"] for c in second["cells"].values())
    for key, cell in first["cells"].items():
        assert second["cells"][key]["magnet"] == cell["magnet"]
        assert second["cells"][key]["mi_magnet"] == cell["mi_magnet"]

    # A corrupt shard is an error naming it, raised before any attack runs (the missing shard stays missing).
    cw5 = [out / "cache" / n for n in first["cells"]["cw_l2/5"]["shards"]]
    ead5 = [out / "cache" / n for n in first["cells"]["ead_en/5"]["shards"]]
    assert len(cw5) == len(ead5) == 2 and first["cells"]["ead_l1/5"]["shards"] == first["cells"]["ead_en/5"]["shards"]
    cw5[1].unlink()
    ead5[0].write_bytes(b"not an npz")
    with pytest.raises(RuntimeError, match="corrupt attack shard .*ead_kappa5_s000_"):
        _run(tiny_setup, out)
    assert not cw5[1].exists()
    # An interrupted run (shards missing) recomputes exactly those shards, with the same results.
    ead5[0].unlink()
    kept = ead5[1]
    kept_mtime = kept.stat().st_mtime_ns
    third = _run(tiny_setup, out)
    assert {k for k, c in third["cells"].items() if not c["cached"]} == {"cw_l2/5", "ead_en/5", "ead_l1/5"}
    assert kept.stat().st_mtime_ns == kept_mtime
    for key in ("cw_l2/5", "ead_en/5", "ead_l1/5"):
        assert third["cells"][key]["attack_success_rate"] == first["cells"][key]["attack_success_rate"]
        ours, before = third["cells"][key]["mean_l2"], first["cells"][key]["mean_l2"]
        assert ours == before if before is None else ours == pytest.approx(before, rel=1e-5)
        assert third["cells"][key]["magnet"] == first["cells"][key]["magnet"]
    timings = (out / "cache" / "timings.jsonl").read_text().splitlines()
    assert len(timings) == 8 + 2 and json.loads(timings[-1])["seconds"] > 0     # one line per attack call


def test_runs_sharing_a_cache_share_their_common_shards(tiny_setup, tmp_path):
    cache = tmp_path / "shared-cache"
    ckpt, small = tiny_setup
    small_config = dataclasses.replace(TINY, attacks=("cw_l2",), kappas=(0.0,), n_images=3)
    first = tables.run(small_config, tmp_path / "a", checkpoints=str(ckpt), dataset=small, eval_batch=200,
                       cache_dir=cache)
    shard0 = cache / first["cells"]["cw_l2/0"]["shards"][0]
    mtime = shard0.stat().st_mtime_ns
    second = tables.run(dataclasses.replace(small_config, n_images=6), tmp_path / "b", checkpoints=str(ckpt),
                        dataset=small, eval_batch=200, cache_dir=cache)
    assert second["cells"]["cw_l2/0"]["shards"][0] == shard0.name and shard0.stat().st_mtime_ns == mtime
    assert len(list(cache.glob("cw_*.npz"))) == 2 and second["cache"] == "../shared-cache"
    assert not (tmp_path / "b" / "cache").exists()


def test_a_table_of_another_configuration_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "table.json").write_text(json.dumps({"config": json.loads(json.dumps(dataclasses.asdict(TINY)))}))
    tables.check_overwrite(out, TINY, overwrite=False)                                  # same configuration
    tables.check_overwrite(out, dataclasses.replace(TINY, shard_size=2, kappas_per_call=0), overwrite=False)
    with pytest.raises(cli.OverwriteError, match=r"(?s)another configuration.*n_images: 6 there, 2 now"):
        tables.check_overwrite(out, dataclasses.replace(TINY, n_images=2), overwrite=False)
    tables.check_overwrite(out, dataclasses.replace(TINY, n_images=2), overwrite=True)
    with pytest.raises(SystemExit) as exc:
        tables.main(["--dataset", "mnist", "--quick", "--n-images", "2", "--out", str(out)])
    assert exc.value.code == 2


def test_plan_shards_and_jobs():
    config = dataclasses.replace(TINY, n_images=7, kappas=(0.0, 5.0, 10.0), attacks=("ead_l1", "cw_l2"))
    shards = protocol.plan_shards(config)
    assert config.families() == ("ead", "cw")
    assert len(shards) == 2 * 3 * 3 and shards[0] == protocol.Shard("ead", 0.0, 0, 0, 3)
    assert [(s.start, s.stop) for s in shards[:3]] == [(0, 3), (3, 6), (6, 7)]
    missing = [s for s in shards if s.index != 1 and s.kappa != 5.0]
    jobs = protocol.plan_jobs(config, missing)
    assert jobs == [protocol.AttackJob("ead", (0.0,), 0, 0, 3), protocol.AttackJob("ead", (0.0,), 2, 6, 7),
                    protocol.AttackJob("ead", (10.0,), 0, 0, 3), protocol.AttackJob("ead", (10.0,), 2, 6, 7),
                    protocol.AttackJob("cw", (0.0,), 0, 0, 3), protocol.AttackJob("cw", (0.0,), 2, 6, 7),
                    protocol.AttackJob("cw", (10.0,), 0, 0, 3), protocol.AttackJob("cw", (10.0,), 2, 6, 7)]
    folded = protocol.plan_jobs(dataclasses.replace(config, kappas_per_call=0), missing)
    assert folded[0] == protocol.AttackJob("ead", (0.0, 10.0), 0, 0, 3) and len(folded) == 4
    assert protocol.plan_jobs(config, []) == []
    assert protocol.parse_worker("1/3") == (1, 3) and protocol.parse_worker("0/1") == (0, 1)
    for bad in ("3/3", "a/b", "1", "-1/2", "0/0"):
        with pytest.raises(ValueError, match="--worker"):
            protocol.parse_worker(bad)


def test_shard_keys_change_with_every_setting_and_nothing_else(tmp_path):
    indices = np.arange(10, 16)
    context = {"dataset": "mnist", "classifier": "c" * 16, "data": "d" * 16, "indices": "i" * 16}
    shard = protocol.Shard("ead", 5.0, 0, 0, 3)
    base = protocol.shard_path(tmp_path, TINY, shard, context, indices).name
    for change in (dict(iterations=9), dict(search_steps=3), dict(initial_const=1e-2), dict(beta=0.02),
                   dict(learning_rate=0.02), dict(ead_momentum="textbook")):
        assert protocol.shard_path(tmp_path, dataclasses.replace(TINY, **change), shard, context, indices).name != base
    cw = protocol.Shard("cw", 5.0, 0, 0, 3)
    cw_base = protocol.shard_path(tmp_path, TINY, cw, context, indices).name
    for change in (dict(cw_iterations=20), dict(cw_abort_early=False)):
        assert protocol.shard_path(tmp_path, dataclasses.replace(TINY, **change), cw, context, indices).name != cw_base
    for part in ("dataset", "classifier", "data"):                    # each part of the context alone
        other = {**context, part: "x" * 16}
        assert protocol.shard_path(tmp_path, TINY, shard, other, indices).name != base
    # The hash of the whole index set is replaced by the shard's own: a shard keeps its name when other
    # shards' images change.
    assert protocol.shard_path(tmp_path, TINY, shard, {**context, "indices": "x" * 16}, indices).name == base
    assert protocol.shard_path(tmp_path, TINY, dataclasses.replace(shard, kappa=10.0), context, indices).name != base
    assert protocol.shard_path(tmp_path, TINY, shard, context, indices + 1).name != base        # its own images
    assert protocol.shard_path(tmp_path, TINY, shard, context, np.r_[indices[:3], [0, 0, 0]]).name == base
    # How the work is split, and EAD-only settings for a C&W shard, change nothing.
    for change in (dict(kappas_per_call=0), dict(shard_size=50), dict(n_images=3), dict(attacks=("ead_en",)),
                   dict(quick=False), dict(mi_temperature=10.0)):
        assert protocol.shard_path(tmp_path, dataclasses.replace(TINY, **change), shard, context, indices).name == base
    assert protocol.shard_path(tmp_path, dataclasses.replace(TINY, beta=0.5), cw, context, indices).name == cw_base


def test_shard_names_are_pinned_so_committed_shards_stay_valid():
    """The names (content keys) of the paper-protocol and quick shards, pinned: a refactor that changed them
    would silently orphan the committed campaign's shards. Change these values only with a migration (or an
    ATTACK_VERSION bump that is meant to invalidate every shard)."""
    ctx = {"dataset": "mnist", "indices": "0123456789abcdef", "classifier": "fedcba9876543210", "data": "a" * 16}
    idx = np.arange(1000)
    name = lambda config, family, kappa, i: protocol.shard_path(  # noqa: E731
        Path("c"), config, protocol.Shard(family, kappa, i, 100 * i, 100 * i + 100), ctx, idx).name
    assert name(protocol.protocol("mnist"), "ead", 10.0, 3) == "ead_kappa10_s003_2abad7f68b3c.npz"
    assert name(protocol.protocol("mnist"), "cw", 10.0, 3) == "cw_kappa10_s003_c415696feb79.npz"
    assert name(protocol.protocol("mnist", quick=True), "cw", 0.0, 0) == "cw_kappa0_s000_08645f497f59.npz"


def test_run_job_matches_separate_attack_calls(mnist, tiny_mnist_classifier):
    """A job (both EAD rules, a 2-kappa grid, images 2-6 padded to a shard of 6) gives what one call per rule
    and kappa on those images gives: the grid, the padding and the unpacking lose or mix up nothing."""
    from magnet_mi_jax import attacks
    module, params, _ = tiny_mnist_classifier
    x, y = mnist.test_x[:7], mnist.test_y[:7]
    config = dataclasses.replace(TINY, iterations=6, search_steps=2, shard_size=6, initial_const=1.0)
    job = protocol.AttackJob("ead", (0.0, 3.0), 0, 2, 7)
    shards = protocol.run_job(job, module.apply, params, x, y, config)
    assert set(shards) == set(job.kappas) and all(set(c) == {"ead_l1", "ead_en"} for c in shards.values())
    for kappa, cells in shards.items():
        for attack, cell in cells.items():
            ref = attacks.ead(module.apply, x[2:7], y[2:7], params=params, kappa=kappa, const=1.0, beta=config.beta,
                              rule=attack[-2:], iterations=6, search_steps=2)
            assert cell["adv"].shape == (5, 28, 28, 1)
            np.testing.assert_array_equal(cell["success"], np.asarray(ref.success))
            np.testing.assert_allclose(cell["adv"], np.asarray(ref.adv), atol=1e-5)
            np.testing.assert_allclose(cell["l2"], np.asarray(ref.l2), atol=1e-4)
    # The two rules came out of one run but keep different iterates somewhere (else the test proves nothing).
    assert any(not np.array_equal(c["ead_l1"]["l1"], c["ead_en"]["l1"]) for c in shards.values())
    with pytest.raises(ValueError, match="unknown attack run"):
        protocol.run_job(protocol.AttackJob("pgd", (0.0,), 0, 0, 3), module.apply, params, x, y, config)


def test_workers_share_a_campaign_and_partial_tables_are_labelled(tiny_setup, tmp_path):
    config = dataclasses.replace(TINY, attacks=("cw_l2",), kappas=(0.0,))
    whole = _run(tiny_setup, tmp_path / "one", config)
    out = tmp_path / "two"
    ckpt, small = tiny_setup
    mine = tables.run(config, out, checkpoints=str(ckpt), dataset=small, command="test", eval_batch=200,
                      worker=(1, 2))
    assert mine == {"complete": False, "shards_done": 1, "shards_total": 2} and not (out / "table.json").exists()
    # watching the campaign: a partial table from the shards present, crafting none (worker 0's is missing)
    partial = tables.run(config, out, checkpoints=str(ckpt), dataset=small, command="test", eval_batch=200,
                         partial=True, craft=False)
    assert partial["complete"] is False and partial["cells"]["cw_l2/0"]["n_images"] == 3
    assert len(list((out / "cache").glob("cw_*.npz"))) == 1
    assert "PARTIAL" in (out / "table.md").read_text() and ",partial quick,3," in (out / "table.csv").read_text()
    done = tables.run(config, out, checkpoints=str(ckpt), dataset=small, command="test", eval_batch=200,
                      worker=(0, 2))
    assert done["complete"] is True and "PARTIAL" not in (out / "table.md").read_text()
    assert done["cells"] == {k: {**c, "cached": False} for k, c in whole["cells"].items()} or all(
        done["cells"][k][d] == whole["cells"][k][d] for k in whole["cells"] for d in ("magnet", "mi_magnet"))
    for key in whole["cells"]:
        assert done["cells"][key]["shards"] == whole["cells"][key]["shards"]
        assert done["cells"][key]["magnet"] == whole["cells"][key]["magnet"]


def test_config_rejects_bad_values():
    for bad in (dict(kappas_per_call=-1), dict(shard_size=0), dict(cw_iterations=0), dict(kappas=()),
                dict(kappas=(-1.0,)), dict(attacks=("fgsm",)), dict(n_images=0), dict(ead_momentum="x"),
                dict(kappas=(float("nan"),)), dict(kappas=(0.0, 10.0, 0.0)), dict(n_images=20000), dict(seed=-1),
                dict(mi_temperature=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            dataclasses.replace(TINY, **bad)


@pytest.mark.parametrize("flags,message", [
    (["--kappas-per-call", "-2"], "kappas_per_call"), (["--n-images", "20000"], "n_images must be at most"),
    (["--kappas", "nan"], "finite"), (["--kappas", "0,abc"], "comma-separated numbers"),
    (["--kappas", "0,10,0.0"], "repeat"), (["--seed", "-1"], "seed"), (["--mi-temperature", "0"], "mi_temperature"),
])
def test_bad_flags_fail_at_once_with_one_line_and_create_nothing(tmp_path, flags, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=message):
        tables.main(["--dataset", "mnist", "--quick", "--out", str(out), *flags])
    assert not out.exists()


def test_shards_never_unpickle_and_bad_files_name_themselves(tmp_path):
    shard = protocol.Shard("cw", 0.0, 0, 0, 1)
    path = tmp_path / "cw_kappa0_s000_x.npz"
    fields = {f"cw_l2.{k}": np.zeros(1) for k in protocol.ATTACK_FIELDS}
    np.savez(path, **{**fields, "cw_l2.adv": np.array([object()], dtype=object)})
    with pytest.raises(RuntimeError, match="corrupt attack shard .*cw_kappa0_s000_x.npz"):
        protocol.load_shard(path, shard, (28, 28, 1))
    good = {"cw_l2": {"adv": np.zeros((1, 28, 28, 1), np.float32), "success": np.ones(1, bool),
                      **{k: np.zeros(1, np.float32) for k in ("l0", "l1", "l2", "linf", "const")}}}
    protocol.save_shard(path, good)
    assert not list(tmp_path.glob("*.tmp.npz"))
    np.testing.assert_array_equal(protocol.load_shard(path, shard, (28, 28, 1))["cw_l2"]["success"], [True])
    raw = path.read_bytes()
    for broken in (b"", raw[: len(raw) // 2], raw[:-30] + bytes(30)):      # empty, truncated, bad CRC/directory
        path.write_bytes(broken)
        with pytest.raises(RuntimeError, match="corrupt attack shard .*delete it"):
            protocol.load_shard(path, shard, (28, 28, 1))
    protocol.save_shard(path, good)
    with pytest.raises(RuntimeError, match="expected"):
        protocol.load_shard(path, protocol.Shard("cw", 0.0, 0, 0, 2), (28, 28, 1))


def test_missing_checkpoint_names_the_training_command(tmp_path, mnist):
    with pytest.raises(checkpoint.CheckpointError, match="python -m train.classifier --dataset mnist"):
        tables.run(TINY, tmp_path / "o", checkpoints=str(tmp_path / "empty"), dataset=mnist)


def test_a_missing_network_is_made_by_on_missing_then_loaded_from_the_same_root(tmp_path):
    import shutil
    root = tmp_path / "root"
    called = []

    def on_missing(dataset, name):             # stands in for training: puts the shipped weights in place
        called.append((dataset, name))
        shutil.copytree(checkpoint.DEFAULT_CHECKPOINTS / dataset / name, root / dataset / name)
    applies, params, cards = protocol.load_networks("mnist", str(root), names=("ae_ii",), on_missing=on_missing)
    assert called == [("mnist", "ae_ii")] and set(applies) == set(params) == set(cards) == {"ae_ii"}
    shipped = checkpoint.load_model("mnist", "ae_ii")[2]
    assert cards["ae_ii"]["params_sha256"] == shipped["params_sha256"]
    # present now: loaded without calling it again
    protocol.load_networks("mnist", str(root), names=("ae_ii",), on_missing=on_missing)
    assert len(called) == 1
    # an on_missing that makes nothing: the second load's error reaches the caller
    with pytest.raises(checkpoint.CheckpointError):
        protocol.load_networks("mnist", str(root), names=("ae_i",), on_missing=lambda d, n: None)


def test_paper_numbers_are_complete():
    for dataset, n_kappa in (("mnist", 9), ("cifar10", 9)):
        paper = report.paper_tables(dataset)
        assert len(paper) == 2 * 3 * n_kappa
    assert report.paper_tables("mnist")[("mi_magnet", "ead_en", 10.0)] == 44.0
    assert report.paper_clean("cifar10")["mi_magnet"] == 83.18


def test_agreement_counts_cells_near_the_papers_number():
    lo, hi = report.wilson_interval(50, 100)                    # (p + z^2/2n -+ z sqrt(...)) / (1 + z^2/n)
    assert lo == pytest.approx(0.40383, abs=1e-5) and hi == pytest.approx(0.59617, abs=1e-5)
    assert report.wilson_interval(0, 10)[0] == 0.0 and report.wilson_interval(10, 10)[1] == pytest.approx(1.0)
    cell = lambda n, magnet, mi, paper: {"n_images": n, "magnet": {"accuracy": magnet},  # noqa: E731
                                         "mi_magnet": {"accuracy": mi}, "paper": paper}
    result = {"cells": {
        "a": cell(100, 50.0, 50.0, {"magnet": 52.0, "mi_magnet": 60.0}),    # within 3 and inside; neither
        "b": cell(1000, 90.0, 90.0, {"magnet": 93.5, "mi_magnet": None}),  # 3.5 off, outside [88.0, 91.7]
        "c": cell(0, 0.0, 0.0, {"magnet": 1.0, "mi_magnet": 1.0}),          # no images yet (a partial table)
        "d": cell(20, 80.0, 80.0, {"magnet": 90.0, "mi_magnet": 77.0}),     # 10 off but inside [58.4, 91.9]
    }}
    assert report.agreement(result) == {"compared": 5, "within_tolerance": 2, "inside_interval": 3}
    assert report.agreement(result, tolerance=3.5) == {"compared": 5, "within_tolerance": 3, "inside_interval": 3}
    with pytest.raises(ValueError, match="n must be positive"):
        report.wilson_interval(0, 0)


KILL_SCRIPT = """
import dataclasses, sys
from eval import protocol, tables
from magnet_mi_jax import data
ds = data.load_dataset("mnist", data_dir=sys.argv[3])
small = dataclasses.replace(ds, val_x=ds.val_x[:400], val_y=ds.val_y[:400], test_x=ds.test_x[:400],
                            test_y=ds.test_y[:400])
config = dataclasses.replace(protocol.protocol("mnist"), n_images=6, kappas=(0.0,), iterations=8, search_steps=2,
                             shard_size=3, attacks=("cw_l2", "ead_en"), quick=True)
tables.run(config, sys.argv[1], checkpoints=sys.argv[2], dataset=small, command="test", eval_batch=200)
"""


@pytest.mark.slow
@pytest.mark.spawns_processes
def test_sigkill_mid_campaign_loses_at_most_the_shard_in_progress(tiny_setup, tmp_path, data_dir):
    import os
    import signal
    import subprocess
    import sys
    import time
    ckpt, small = tiny_setup
    config = dataclasses.replace(TINY, kappas=(0.0,), attacks=("cw_l2", "ead_en"))
    reference = _run(tiny_setup, tmp_path / "reference", config)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out), str(ckpt), str(data_dir)],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(tables.__file__))),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not list((out / "cache").glob("*_s000_*[!p].npz")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survivors = {p.name: p.stat().st_mtime_ns for p in (out / "cache").glob("*.npz") if ".tmp" not in p.name}
    assert 1 <= len(survivors) < 4 and not (out / "table.json").exists()
    resumed = _run(tiny_setup, out, config)
    for name, mtime in survivors.items():                    # nothing finished is recomputed
        assert (out / "cache" / name).stat().st_mtime_ns == mtime
    assert len(set().union(*(c["shards"] for c in resumed["cells"].values()))) == 4
    for key, cell in reference["cells"].items():
        for field in ("shards", "magnet", "mi_magnet", "attack_success_rate", "mean_l1", "mean_l2"):
            assert resumed["cells"][key][field] == cell[field], (key, field)


def _constructed_case():
    """Eight examples with known detector scores (I, II, MI; flag iff score >= 1), argmax of Z(R(x)) and of Z(x),
    and label 0: (outputs, labels, thresholds, MagNet's preset, its MI-strengthened spec)."""
    from magnet_mi_jax.detectors import MNIST_MAGNET, DefenseOutputs, mi_magnet
    rows = [(2, 0, 0, 1, 1), (0, 0, 2, 1, 1), (0, 0, 0, 0, 1), (0, 0, 0, 1, 1),
            (0, 2, 2, 0, 0), (0, 0, 2, 0, 1), (0, 0, 0, 1, 0), (1, 0, 0, 1, 1)]
    s_i, s_ii, s_mi, reformed, original = (np.array(c, np.float32) for c in zip(*rows))
    onehot = lambda c: np.eye(3, dtype=np.float32)[c.astype(int)]        # noqa: E731
    outputs = DefenseOutputs(scores={"I": s_i, "II": s_ii, "MI": s_mi}, logits=onehot(original),
                             reformed=None, reformed_logits=onehot(reformed), mi=None)
    return outputs, np.zeros(8, np.int64), {"I": 1.0, "II": 1.0, "MI": 1.0}, MNIST_MAGNET, mi_magnet(MNIST_MAGNET)


def test_cell_metric_on_a_constructed_case():
    """Known flags and predictions -> the exact accuracies of both defenses (MagNet's counting rule)."""
    outputs, labels, thresholds, magnet, spec = _constructed_case()
    success = np.array([1, 1, 0, 1, 1, 1, 1, 1], bool)
    cell = {"success": success, "l1": np.arange(8, dtype=np.float32), "l2": np.full(8, 2.0, np.float32),
            "linf": np.full(8, 0.5, np.float32)}
    natural = {n: np.full(8, 0.5, np.float32) for n in ("I", "II", "MI")}
    row = protocol.evaluate_cell(outputs, thresholds, magnet, spec, labels, cell, natural)
    assert row["magnet"] == {"accuracy": 62.5, "detector_only": 50.0, "reformer_only": 37.5,
                             "accuracy_successful_only": 57.14, "detected": 37.5}
    assert row["mi_magnet"] == {"accuracy": 75.0, "detector_only": 75.0, "reformer_only": 37.5,
                                "accuracy_successful_only": 71.43, "detected": 62.5}
    assert row["detector_flag_rate"] == {"I": 25.0, "II": 12.5, "MI": 37.5}
    assert row["attack_success_rate"] == 87.5 and row["n_success"] == 7 and row["n_images"] == 8
    # distortions average over the successful examples only (example 2, L1 = 2, failed)
    assert row["mean_l1"] == pytest.approx(26.0 / 7) and row["mean_l2"] == 2.0 and row["mean_linf"] == 0.5
    # natural scores all 0.5: a detector's AUC on the successful examples is the share scoring above it
    assert row["detector_auc_successful"] == {"I": round(2 / 7, 4), "II": round(1 / 7, 4), "MI": round(3 / 7, 4)}
    failed = protocol.evaluate_cell(outputs, thresholds, magnet, spec, labels, {**cell, "success": np.zeros(8, bool)},
                                    natural)
    assert failed["mean_l1"] is None and failed["n_success"] == 0 and "detector_auc_successful" not in failed
    assert failed["magnet"]["accuracy_successful_only"] is None and failed["magnet"]["accuracy"] == 62.5


def test_clean_row_on_a_constructed_case():
    """The clean-accuracy row on known flags: correct iff no detector flags the input and R(x) is classified
    right; the no-defense column counts Z(x); each detector's false-positive rate on its own."""
    outputs, labels, thresholds, magnet, spec = _constructed_case()
    row = protocol.clean_row(magnet, spec, outputs, labels, thresholds)
    # Z(x) right on examples 5 and 7; R(x) right on 3, 5, 6; MagNet (I, II) flags 1, 5, 8; MI-MagNet also 2, 6
    assert row == {"n_test": 8, "no_defense": 25.0, "magnet": 25.0, "mi_magnet": 12.5,
                   "test_false_positive_rate": {"I": 25.0, "II": 12.5, "MI": 37.5}}


def test_deviations_list_each_changed_attack_setting_with_the_papers_value():
    paper = protocol.protocol("mnist")
    assert paper.deviations() == {}
    changed = dataclasses.replace(paper, n_images=3, iterations=5, cw_iterations=7, search_steps=2,
                                  initial_const=0.1, beta=0.5, learning_rate=0.5, cw_abort_early=False,
                                  ead_momentum="textbook", kappas=(0.0,))
    assert changed.deviations() == {
        "n_images": (3, 1000), "kappas": ((0.0,), paper.kappas), "iterations": (5, 1000), "cw_iterations": (7, None),
        "search_steps": (2, 9), "initial_const": (0.1, 1e-3), "beta": (0.5, 1e-2), "learning_rate": (0.5, 1e-2),
        "cw_abort_early": (False, True), "ead_momentum": ("textbook", "reference")}
    # how the work is split, the seed and the MI reading are not attack-protocol settings
    assert dataclasses.replace(paper, shard_size=7, kappas_per_call=0, seed=3, mi_temperature=10.0,
                               quick=True).deviations() == {}


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_the_quick_protocol_is_the_full_one_with_the_configs_preset_on_top(name):
    from magnet_mi_jax import datasets
    preset = datasets.get(name).protocols["quick"]
    full, quick = protocol.protocol(name), protocol.protocol(name, quick=True)
    assert quick.quick and not full.quick
    for field, value in preset.items():
        assert getattr(quick, field) == (tuple(value) if isinstance(value, (list, tuple)) else value), field
    assert any(getattr(full, field) != getattr(quick, field) for field in preset)   # a preset that reduces
    untouched = {f.name for f in dataclasses.fields(full)} - set(preset) - {"quick"}
    assert {f: getattr(quick, f) for f in untouched} == {f: getattr(full, f) for f in untouched}
    # the presets the README's quick tables were made with
    assert (quick.n_images, quick.iterations, quick.search_steps) == {"mnist": (100, 100, 9), "cifar10": (50, 50, 6)}[name]


def test_cache_context_and_shard_assembly(mnist):
    from magnet_mi_jax import data
    indices = np.array([3, 1, 4])
    params = {"w": np.ones(3, np.float32)}
    context = protocol.cache_context("mnist", mnist, indices, params)
    assert context["dataset"] == "mnist" and context["indices"] == data.indices_hash(indices)
    assert context["classifier"] == protocol.params_hash(params) == checkpoint.params_digest(params)[:16]
    assert len(context["data"]) == 16 and int(context["data"], 16) >= 0
    assert protocol.cache_context("mnist", dataclasses.replace(mnist, md5={**mnist.md5, "x": "0"}), indices,
                                  params)["data"] != context["data"]
    # the files' md5s key the cache whatever order they were read in (a shard found on another machine)
    reordered = dict(reversed(list(mnist.md5.items())))
    assert list(reordered) != list(mnist.md5)
    assert protocol.cache_context("mnist", dataclasses.replace(mnist, md5=reordered), indices,
                                  params)["data"] == context["data"]
    assert protocol.cache_context("mnist", dataclasses.replace(mnist, md5={}, source="tfds"), indices,
                                  params)["data"] == "tfds"
    assert protocol.cache_context("mnist", mnist, indices, {"w": np.zeros(3, np.float32)})["classifier"] != \
        context["classifier"]
    assert protocol.card_summary({"seed": 3, "command": "c", "other": 1}) == {
        "command": "c", "git_commit": None, "metrics": None, "seed": 3}
    shards = [{"cw_l2": {k: np.full(n, i, np.float32) for k in protocol.ATTACK_FIELDS}} for i, n in ((0, 2), (1, 3))]
    cell = protocol.assemble_cell(shards, "cw_l2")
    assert set(cell) == set(protocol.ATTACK_FIELDS)
    np.testing.assert_array_equal(cell["l1"], [0, 0, 1, 1, 1])


DISTRIBUTED_SCRIPT = """
import dataclasses, sys
import jax
from eval import protocol, tables
from magnet_mi_jax import data
out, ckpt, data_dir, coordinator, pid = sys.argv[1:6]
worker = tables.distributed_worker(coordinator, 2, int(pid))
ds = data.load_dataset("mnist", data_dir=data_dir)
small = dataclasses.replace(ds, val_x=ds.val_x[:400], val_y=ds.val_y[:400], test_x=ds.test_x[:400],
                            test_y=ds.test_y[:400])
config = dataclasses.replace(protocol.protocol("mnist"), n_images=6, kappas=(0.0,), iterations=8, search_steps=2,
                             shard_size=3, attacks=("cw_l2",), quick=True)
result = tables.run(config, out, checkpoints=ckpt, dataset=small, command="test", eval_batch=200, worker=worker,
                    wait_seconds=600.0 if worker[0] == 0 else 0.0)
print("worker", worker, "complete", result["complete"], flush=True)
"""


@pytest.mark.slow
@pytest.mark.spawns_processes
def test_two_jax_distributed_processes_make_the_table_one_process_makes(tiny_setup, tmp_path, data_dir):
    import os
    import socket
    import subprocess
    import sys
    ckpt, small = tiny_setup
    config = dataclasses.replace(TINY, attacks=("cw_l2",), kappas=(0.0,))
    reference = _run(tiny_setup, tmp_path / "one", config)
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "two"
    root = os.path.dirname(os.path.dirname(os.path.abspath(tables.__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", DISTRIBUTED_SCRIPT, str(out), str(ckpt), str(data_dir),
                               f"localhost:{port}", str(i)], cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "worker (0, 2) complete True" in logs[0] and "worker (1, 2) complete False" in logs[1]
    assert "crafting 1 in 1 calls (worker 0/2)" in logs[0] and "crafting 1 in 1 calls (worker 1/2)" in logs[1]
    table = json.loads((out / "table.json").read_text())
    for key, cell in reference["cells"].items():
        for field in ("shards", "magnet", "mi_magnet", "attack_success_rate", "mean_l1", "mean_l2"):
            assert table["cells"][key][field] == cell[field], (key, field)


def test_a_corrupt_shard_is_reported_before_the_defense_is_calibrated(tiny_setup, tmp_path, monkeypatch):
    ckpt, small = tiny_setup
    config = dataclasses.replace(TINY, attacks=("cw_l2",), kappas=(0.0,))
    first = _run(tiny_setup, tmp_path / "out", config)
    (tmp_path / "out" / "cache" / first["cells"]["cw_l2/0"]["shards"][1]).write_bytes(b"")
    calibrated = []
    monkeypatch.setattr(tables, "calibrate", lambda *a, **k: calibrated.append(1))
    with pytest.raises(RuntimeError, match="corrupt attack shard .*cw_kappa0_s001_"):
        _run(tiny_setup, tmp_path / "out", config)
    assert not calibrated
