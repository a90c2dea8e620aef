"""Flax networks. Every module is used purely: ``module.apply(params, x)``."""

from magnet_mi_jax.models.alpha_gan import ConditionalAlphaGAN, cifar_alpha_gan, mnist_alpha_gan
from magnet_mi_jax.models.autoencoder import DenoisingAutoEncoder, cifar_ae, mnist_ae_i, mnist_ae_ii
from magnet_mi_jax.models.classifier import CifarClassifier, MnistClassifier

__all__ = ["CifarClassifier", "ConditionalAlphaGAN", "DenoisingAutoEncoder", "MnistClassifier", "cifar_ae",
           "cifar_alpha_gan", "mnist_ae_i", "mnist_ae_ii", "mnist_alpha_gan"]
