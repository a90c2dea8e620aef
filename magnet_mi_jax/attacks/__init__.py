"""Jitted, batched, sharded EAD and C&W-L2 attacks on any logits function.

* :func:`ead` - elastic-net attack (FISTA/ISTA, decision rules "en" and "l1").
* :func:`cw_l2` - Carlini & Wagner's L2 attack.
* :class:`AttackResult` - adversarial images, success mask, L0/L1/L2/Linf distortions, final const.
* :func:`adaptive_ead`, :func:`adaptive_cw_l2` - the same attacks on a whole defense (through the reformer,
  against every detector): :mod:`~magnet_mi_jax.attacks.adaptive`.
* :class:`Objective` - what an attack minimises besides the distortion; :class:`MarginObjective` is the
  oblivious one, :class:`~magnet_mi_jax.attacks.adaptive.DefenseObjective` the adaptive one.
* :func:`fast_vjp` - wraps a logits function so that its convolutions and max pools get cheap gradients on
  XLA:CPU (used by both attacks by default).

Both attacks run as one ``jax.jit`` computation: the binary search over c and the iterations are ``lax``
loops, a kappa grid is folded into the batch, and the batch is sharded over all devices.
"""

from magnet_mi_jax.attacks.common import (ATTACK_VERSION, AttackResult, Loss, MarginObjective, Objective, margin_loss,
                                          update_const)
from magnet_mi_jax.attacks._cw import cw_l2
from magnet_mi_jax.attacks._ead import MOMENTA as EAD_MOMENTA, ead, shrinkage
from magnet_mi_jax.attacks.fastvjp import fast_vjp
from magnet_mi_jax.attacks.adaptive import DefenseObjective, adaptive_cw_l2, adaptive_ead, attacker_thresholds

__all__ = ["ATTACK_VERSION", "AttackResult", "EAD_MOMENTA", "DefenseObjective", "Loss", "MarginObjective", "Objective",
           "adaptive_cw_l2", "adaptive_ead", "attacker_thresholds", "cw_l2", "ead", "fast_vjp", "margin_loss",
           "shrinkage", "update_const"]
