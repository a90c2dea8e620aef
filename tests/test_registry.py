"""The attack registry: every registered run honours the interface (parameterised, so a new attack inherits
these tests), and a new attack is one AttackRun plus a register call: eval.tables then crafts, caches and
reports it with no other change (a tiny table with a test-local attack)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import protocol, tables
from magnet_mi_jax.attacks import common, registry


def linear_logits(params, x):
    return x.reshape(x.shape[0], -1) @ params


@pytest.mark.parametrize("name", sorted(registry.REGISTRY))
def test_every_registered_run_follows_the_interface(name):
    run = registry.get(name)
    config = dataclasses.replace(protocol.protocol("mnist", quick=True), iterations=5, cw_iterations=5, search_steps=2)
    settings = run.settings(config)
    json.dumps(settings)                                         # a shard key must serialise
    key = run.key_settings(config, 5.0)
    assert key["family"] == name and key["kappa"] == 5.0 and "attack_version" in key
    # what only splits the work never enters the key
    assert run.settings(dataclasses.replace(config, shard_size=7, kappas_per_call=0, n_images=3)) == settings
    w = jax.random.normal(jax.random.key(0), (16, 3))
    x = jax.random.uniform(jax.random.key(1), (4, 4, 4, 1))
    y = jnp.argmax(linear_logits(w, x), -1)
    out = run.craft(linear_logits, w, x, y, jnp.array([[0.0], [1.0]]), config)
    assert tuple(out) == run.cells
    for res in out.values():
        assert isinstance(res, common.AttackResult)
        assert res.adv.shape == (2, 4, 4, 4, 1) and res.success.shape == (2, 4)
    for cell in run.cells:
        assert registry.run_of(cell) is run and registry.title(cell) == run.titles[cell]


def test_registry_refuses_clashes_and_names_unknown_attacks():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(dataclasses.replace(registry.get("ead"), cells=("other",), titles={"other": "O"}))
    with pytest.raises(ValueError, match="already given"):
        registry.register(dataclasses.replace(registry.get("ead"), name="ead2"))
    with pytest.raises(ValueError, match="unknown attack run 'pgd'"):
        registry.get("pgd")
    with pytest.raises(ValueError, match="unknown attack 'pgd_l2'"):
        registry.run_of("pgd_l2")
    with pytest.raises(ValueError, match="one title per cell"):
        registry.AttackRun("x", ("a",), {}, lambda p: {}, lambda *a: {})


# A new attack, as a user would add one: brighten every pixel by eps (clipped to the box), at every kappa.

def _brighten_settings(protocol) -> dict:
    return {"eps": getattr(protocol, "brighten_eps", 0.3)}


def _brighten_craft(logits_fn, params, x, y, kappa, protocol):
    eps = getattr(protocol, "brighten_eps", 0.3)
    adv = jnp.clip(x + eps, 0.0, 1.0)
    z = logits_fn(params, adv)
    success = jax.vmap(lambda k: common.margin_loss(z, y, k)[1])(kappa[:, 0])             # (G, B)
    res = jax.vmap(lambda ok: common.finish(x, adv, ok))(success)       # no constant: const is NaN
    return {"brighten": res}


BRIGHTEN = registry.AttackRun(name="brighten", cells=("brighten",), titles={"brighten": "Brighten"},
                              settings=_brighten_settings, craft=_brighten_craft)


@pytest.fixture
def brighten():
    registry.register(BRIGHTEN)
    yield BRIGHTEN
    registry.unregister(BRIGHTEN.name)


def test_a_new_attack_runs_through_the_tables_with_one_registration(brighten, tiny_setup, tmp_path):
    ckpt, small = tiny_setup
    config = dataclasses.replace(protocol.protocol("mnist", quick=True), attacks=("brighten", "ead_en"), n_images=4, kappas=(0.0, 2.0),
                                 iterations=4, search_steps=1, shard_size=4)
    result = tables.run(config, tmp_path / "out", checkpoints=str(ckpt), dataset=small, command="test",
                        eval_batch=200)
    assert set(result["cells"]) == {"brighten/0", "brighten/2", "ead_en/0", "ead_en/2"}
    cell = result["cells"]["brighten/0"]
    assert cell["paper"] == {"magnet": None, "mi_magnet": None}
    assert cell["mean_linf"] is None or cell["mean_linf"] <= 0.3 + 1e-6
    shards = sorted(p.name for p in (tmp_path / "out" / "cache").glob("brighten_*.npz"))
    assert len(shards) == 2 and shards[0].startswith("brighten_kappa0_s000_")
    with np.load(tmp_path / "out" / "cache" / shards[0]) as f:
        assert np.isnan(f["brighten.const"]).all() and f["brighten.success"].dtype == bool
    assert "Brighten" in (tmp_path / "out" / "table.md").read_text()
    # the attack's own setting keys its shards (same context and images: only the setting differs)
    changed = dataclasses.replace(config, attacks=("brighten",))
    key = lambda c: protocol.shard_path(tmp_path, c, protocol.Shard("brighten", 0.0, 0, 0, 4),  # noqa: E731
                                      {"dataset": "mnist"}, np.arange(4)).name
    assert key(changed) == key(dataclasses.replace(changed, shard_size=2, n_images=8))

    class Brighter(type(config)):
        brighten_eps = 0.5
    assert key(Brighter(**dataclasses.asdict(changed))) != key(changed)
    assert tables.build_config(_args(attacks="brighten,cw_l2")).attacks == ("brighten", "cw_l2")


def _args(**over):
    import argparse
    base = dict(dataset="mnist", quick=True, n_images=None, iterations=None, cw_iterations=None, search_steps=None,
                seed=None, shard_size=None, kappas_per_call=None, ead_momentum=None, mi_reading=None,
                mi_temperature=None, cw_abort_early=None, kappas=None, attacks=None)
    base.update(over)
    return argparse.Namespace(**base)
