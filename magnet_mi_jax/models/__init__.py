"""Flax networks. Every module is used purely: ``module.apply(params, x)``."""

from magnet_mi_jax.models.autoencoder import DenoisingAutoEncoder, cifar_ae, mnist_ae_i, mnist_ae_ii
from magnet_mi_jax.models.classifier import CifarClassifier, MnistClassifier

__all__ = ["CifarClassifier", "DenoisingAutoEncoder", "MnistClassifier", "cifar_ae", "mnist_ae_i", "mnist_ae_ii"]
