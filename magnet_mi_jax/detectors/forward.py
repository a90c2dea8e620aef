"""The one forward pass every detector of a defense reads: network outputs computed once per batch.

A detector is anything with the fields ``name``, ``fpr`` (its false-positive rate r) and ``calibration_size``, a
``networks`` property (the network keys it reads besides the classifier) and ``score(forward) -> (B,)``: a
score where larger means more suspicious, flagged iff ``score >= theta`` (``theta`` calibrated at rate r on
natural validation scores, :func:`~magnet_mi_jax.detectors.calibrate`). MagNet's reconstruction-error and JSD
detectors and the MI detector are three such classes; a new detector is one more, and the defense, the
tables and the adaptive attacks use it unchanged.

:class:`SharedForward` is what ``score`` reads. Its outputs are computed on first use and kept for the rest of
the trace, so a network runs once per batch however many detectors read it:

    x                       (B, H, W, C) the images
    logits                  (B, K)       Z(x)
    reconstruction(ae)      (B, H, W, C) AE(x)
    reformed(ae)            (B, H, W, C) R(x) = clip(AE(x), 0, 1)
    reformed_logits(ae)     (B, K)       Z(R(x))
    conditional_logits(E, G)(B, K, K)    [b, j, i] = Z(G(E(x_b), e_j))_i, all K conditions in one pass
    memo(key, compute)                   any further shared quantity (e.g. the MI detector's tables)

It lives inside one ``jax.jit`` trace (the defense's forward): memoisation happens at trace time, so the
compiled computation holds each network evaluation once.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Mapping

import chex
import jax.numpy as jnp

from magnet_mi_jax.detectors import _checks

Apply = Callable[..., jnp.ndarray]


class SharedForward:
    """Lazily computed, memoised network outputs for one batch ``x`` (see the module docstring).

    Args:
      applies: network key -> apply function (``Z(params, x)``, ``AE(params, x)``, ``E(params, x)``,
        ``G(params, z, y_onehot)``).
      params: network key -> parameters.
      x: (B, H, W, C) float images in [0, 1].
      classifier: key of the classifier Z.
      reformer: key of the defense's reformer auto-encoder (detectors that name none use it).
    """

    def __init__(self, applies: Mapping[str, Apply], params: Mapping[str, Any], x, *,
                 classifier: str = "classifier", reformer: str | None = None):
        self.applies, self.params = applies, params
        self.x = _checks.check_images(x)
        self.classifier, self.reformer = classifier, reformer
        self._memo: dict[Hashable, Any] = {}

    def memo(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()`` the first time ``key`` is asked for, the stored value afterwards."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def classify(self, images) -> jnp.ndarray:
        """Z(images) (N, K) (not memoised: for images this object does not hold)."""
        return self.applies[self.classifier](self.params[self.classifier], images)

    @property
    def logits(self) -> jnp.ndarray:
        """(B, K) Z(x)."""
        def compute():
            z = self.classify(self.x)
            chex.assert_rank(z, 2)
            chex.assert_axis_dimension(z, 0, self.x.shape[0])
            return z
        return self.memo("logits", compute)

    def reconstruction(self, autoencoder: str) -> jnp.ndarray:
        """(B, H, W, C) AE(x), the raw auto-encoder output."""
        def compute():
            out = self.applies[autoencoder](self.params[autoencoder], self.x)
            chex.assert_equal_shape([out, self.x])
            return out
        return self.memo(("reconstruction", autoencoder), compute)

    def reformed(self, autoencoder: str | None = None) -> jnp.ndarray:
        """(B, H, W, C) R(x) = clip(AE(x), 0, 1); ``None``: the defense's reformer."""
        autoencoder = autoencoder or self.reformer
        return self.memo(("reformed", autoencoder), lambda: jnp.clip(self.reconstruction(autoencoder), 0.0, 1.0))

    def reformed_logits(self, autoencoder: str | None = None) -> jnp.ndarray:
        """(B, K) Z(R(x)); ``None``: the defense's reformer."""
        autoencoder = autoencoder or self.reformer
        return self.memo(("reformed_logits", autoencoder), lambda: self.classify(self.reformed(autoencoder)))

    def conditional_logits(self, encoder: str, generator: str) -> jnp.ndarray:
        """(B, K, K) Z(G(E(x_b), e_j)) for every condition j
        (:func:`~magnet_mi_jax.detectors.mi.conditional_logits`: one tiled pass, no loop over classes)."""
        from magnet_mi_jax.detectors.mi import conditional_logits

        def compute():
            return conditional_logits(self.applies[self.classifier], self.params[self.classifier],
                                      self.applies[encoder], self.params[encoder], self.applies[generator],
                                      self.params[generator], self.x, self.logits.shape[1])
        return self.memo(("conditional_logits", encoder, generator), compute)


def check_detector(det) -> None:
    """Raises TypeError unless ``det`` has the detector interface (module docstring)."""
    missing = [a for a in ("name", "fpr", "calibration_size", "networks", "score") if not hasattr(det, a)]
    if missing or not callable(getattr(det, "score", None)):
        raise TypeError(f"unknown detector {det!r}: it lacks {missing or ['a callable score']} (a detector has "
                        "name, fpr, calibration_size, networks and score(forward) -> (B,))")
