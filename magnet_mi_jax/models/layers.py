"""Layers shared by the networks.

``Conv`` is ``flax.linen.Conv`` with this package's convolution primitive plugged in, so that every network
of the package can switch convolution implementation in one place without changing its parameter tree
(``{"kernel": (kh, kw, c_in, c_out), "bias": (c_out,)}``, exactly as ``nn.Conv``).
"""

from __future__ import annotations

import functools

import flax.linen as nn
from jax import lax

conv_general_dilated = lax.conv_general_dilated

Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
