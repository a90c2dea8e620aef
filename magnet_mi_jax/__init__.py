"""magnet-mi-jax: MagNet with a conditional-generation mutual-information detector, EAD and C&W-L2 in JAX.

Modules: :mod:`~magnet_mi_jax.data` (MNIST, CIFAR-10, splits), :mod:`~magnet_mi_jax.models` (Flax networks),
:mod:`~magnet_mi_jax.attacks` (EAD, C&W-L2), :mod:`~magnet_mi_jax.detectors` (MagNet and MI detectors),
:mod:`~magnet_mi_jax.checkpoint` (shipped weights).
"""

__version__ = "0.1.0"
