"""The attack registry: every attack an evaluation can run, by name, behind one interface.

An *attack run* is one call of an attack; it may give several table *cells* (one EAD run gives both decision
rules, "ead_l1" and "ead_en"). Each run is an :class:`AttackRun`:

* ``settings(protocol) -> dict``: everything its adversarial examples depend on, read from the evaluation's
  protocol (any object with ``iterations``, ``search_steps``, ``initial_const`` and ``learning_rate``;
  run-specific options are read with ``getattr`` and a default). These settings key the cached shards;
  fields that only split the work must stay out.
* ``craft(logits_fn, params, x, y, kappa, protocol) -> {cell: AttackResult}``: untargeted examples for images
  ``x`` (B, ...) with labels ``y`` (B,) at every kappa of the grid ``kappa`` (G, 1); results (G, B, ...).

Adding an attack is one module defining its function and an :class:`AttackRun`, plus a :func:`register` call;
``eval.tables`` (cells, shards, jobs, titles, the CLI's ``--attacks``) and the tests parameterised over
:data:`REGISTRY` pick it up. Example::

    >>> from magnet_mi_jax.attacks import registry
    >>> registry.cell_names()
    ('cw_l2', 'ead_l1', 'ead_en')
    >>> registry.run_of("ead_en").name, registry.get("ead").cells
    ('ead', ('ead_l1', 'ead_en'))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from magnet_mi_jax.attacks.common import ATTACK_VERSION, AttackResult
from magnet_mi_jax.attacks._cw import cw_l2
from magnet_mi_jax.attacks._ead import ead

__all__ = ["AttackRun", "REGISTRY", "register", "unregister", "get", "run_of", "cell_names", "title"]


@dataclasses.dataclass(frozen=True)
class AttackRun:
    """One registered attack run (module docstring).

    Attributes:
      name: the run's name (a shard's family, e.g. ``"ead"``).
      cells: the table cells one run gives, in table order.
      titles: cell -> the title printed in tables and plots.
      settings: ``protocol -> dict`` of everything the examples depend on (without the kappa).
      craft: ``(logits_fn, params, x, y, kappa (G, 1), protocol) -> {cell: AttackResult}``.
    """

    name: str
    cells: tuple[str, ...]
    titles: Mapping[str, str]
    settings: Callable[[Any], dict]
    craft: Callable[..., dict[str, AttackResult]]

    def __post_init__(self):
        if not self.name or not self.cells or set(self.titles) != set(self.cells):
            raise ValueError(f"attack run {self.name!r}: needs a name, cells and one title per cell")

    def key_settings(self, protocol: Any, kappa: float) -> dict:
        """The shard key's settings: the run's, its kappa and the attack-code version."""
        return {"family": self.name, "kappa": float(kappa), **self.settings(protocol),
                "attack_version": ATTACK_VERSION}


REGISTRY: dict[str, AttackRun] = {}


def register(run: AttackRun) -> AttackRun:
    """Adds ``run``; its name and cells must be new."""
    if run.name in REGISTRY:
        raise ValueError(f"an attack run named {run.name!r} is already registered")
    clash = set(run.cells) & set(cell_names())
    if clash:
        raise ValueError(f"cells {sorted(clash)} are already given by another attack run")
    REGISTRY[run.name] = run
    return run


def unregister(name: str) -> None:
    """Removes a registered run (tests that register a temporary attack)."""
    REGISTRY.pop(name, None)


def get(name: str) -> AttackRun:
    if name not in REGISTRY:
        raise ValueError(f"unknown attack run {name!r}; registered: {tuple(REGISTRY)}")
    return REGISTRY[name]


def cell_names() -> tuple[str, ...]:
    """Every registered cell, in registration order."""
    return tuple(c for run in REGISTRY.values() for c in run.cells)


def run_of(cell: str) -> AttackRun:
    """The run that gives ``cell``."""
    for run in REGISTRY.values():
        if cell in run.cells:
            return run
    raise ValueError(f"unknown attack {cell!r}; registered: {cell_names()}")


def title(cell: str) -> str:
    return run_of(cell).titles[cell] if cell in cell_names() else cell


# ------------------------------------------------------------------------------------------------ C&W-L2 and EAD

def _common(protocol: Any) -> dict:
    return {"search_steps": protocol.search_steps, "initial_const": protocol.initial_const,
            "learning_rate": protocol.learning_rate}


def _cw_iterations(protocol: Any) -> int:
    return getattr(protocol, "cw_iterations", None) or protocol.iterations


def _cw_settings(protocol: Any) -> dict:
    return {"iterations": _cw_iterations(protocol), **_common(protocol),
            "abort_early": getattr(protocol, "cw_abort_early", True)}


def _cw_craft(logits_fn, params, x, y, kappa, protocol) -> dict[str, AttackResult]:
    return {"cw_l2": cw_l2(logits_fn, x, y, params=params, kappa=kappa, const=protocol.initial_const,
                           learning_rate=protocol.learning_rate, search_steps=protocol.search_steps,
                           iterations=_cw_iterations(protocol),
                           abort_early=getattr(protocol, "cw_abort_early", True))}


EAD_RULES = {"ead_l1": "l1", "ead_en": "en"}


def _ead_settings(protocol: Any) -> dict:
    return {"iterations": protocol.iterations, **_common(protocol), "beta": protocol.beta,
            "momentum": getattr(protocol, "ead_momentum", "reference"), "method": "fista", "abort_early": False,
            "rules": list(EAD_RULES.values())}


def _ead_craft(logits_fn, params, x, y, kappa, protocol) -> dict[str, AttackResult]:
    out = ead(logits_fn, x, y, params=params, kappa=kappa, const=protocol.initial_const,
              learning_rate=protocol.learning_rate, search_steps=protocol.search_steps,
              iterations=protocol.iterations, beta=protocol.beta, rule=tuple(EAD_RULES.values()),
              momentum=getattr(protocol, "ead_momentum", "reference"), abort_early=False)
    return {cell: out[rule] for cell, rule in EAD_RULES.items()}


register(AttackRun(name="cw", cells=("cw_l2",), titles={"cw_l2": "C&W-L2"}, settings=_cw_settings,
                   craft=_cw_craft))
register(AttackRun(name="ead", cells=("ead_l1", "ead_en"), titles={"ead_l1": "EAD-L1", "ead_en": "EAD-EN"},
                   settings=_ead_settings, craft=_ead_craft))
