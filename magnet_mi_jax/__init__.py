"""magnet-mi-jax: MagNet with a conditional-generation mutual-information detector, EAD and C&W-L2 in JAX.

Modules: :mod:`~magnet_mi_jax.datasets` (one config per dataset), :mod:`~magnet_mi_jax.data` (loading, splits),
:mod:`~magnet_mi_jax.models` (Flax networks), :mod:`~magnet_mi_jax.attacks` (EAD, C&W-L2, the attack registry),
:mod:`~magnet_mi_jax.detectors` (MagNet and MI detectors), :mod:`~magnet_mi_jax.checkpoint` (shipped weights),
:mod:`~magnet_mi_jax.cli` (what the entry points share).
"""

__version__ = "0.1.0"
