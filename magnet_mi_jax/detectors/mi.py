"""The mutual-information detector of Hsu et al. (arXiv:1809.08986, Section 3), in JAX.

For an input x, K classes, classifier logits Z, reformer R (MagNet's auto-encoder, R(x) = clip(AE(x), 0, 1)),
encoder E and class-conditional generator G of the alpha-GAN, and a softmax temperature T:

    p_X      = softmax(Z(x) / T)                                   (B, K)   X: the class of x
    p_Y      = softmax(Z(R(x)) / T)                                (B, K)   Y: the class of R(x)
    P[j, i]  = softmax(Z(G(E(x), e_j)) / T)_i = p(X = i | Y = j)    (B, K, K) for all K conditions e_j

    H(X)     = -sum_i p_X(i) log p_X(i)                 (natural log, 0 log 0 = 0)
    H(X|Y)   =  sum_j p_Y(j) H(P[j, :])
    I(X;Y)   =  H(X) - H(X|Y)
    H(X,Y)   =  H(Y) + H(X|Y)
    d_J      =  1 - I(X;Y) / H(X,Y)                     (Jaccard distance; x is adversarial if d_J > theta)

The paper's equations are not fully recoverable, so two readings are offered (docs/design.md, section 5):

* ``"literal"`` (default): the formulas above, H(X) from the classifier's distribution on x itself. X and Y
  then need not form one joint distribution, so I(X;Y) can be negative and d_J can leave [0, 1].
* ``"consistent"``: the joint q(i, j) = p_Y(j) P[j, i]; H(X) is the entropy of its marginal
  q_X(i) = sum_j p_Y(j) P[j, i] and H(X,Y) the entropy of q itself. Then H(X|Y) <= H(X),
  0 <= I(X;Y) <= min(H(X), H(Y)) and d_J is in [0, 1] (up to float rounding).

Guards: 0 log 0 = 0 (value and gradient finite at zero probabilities), and d_J = 0 where H(X,Y) = 0 (two
deterministic variables; in the consistent reading I = 0 there too). Under the literal reading d_J is
unbounded when H(X,Y) is tiny and H(X) is not; it stays finite.

Two layers:

* pure math on probability arrays: :func:`entropy`, :func:`conditional_entropy`, :func:`joint_entropy`,
  :func:`mutual_information`, :func:`jaccard_distance`, :func:`mi_quantities`;
* networks: :func:`conditional_table` evaluates G and Z for all K conditions in one batched call (the batch
  is tiled to (K * B) rows, no Python loop over classes) and :func:`mi_score` returns every quantity;
  :func:`make_mi_score_fn` jits it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

from magnet_mi_jax.detectors import _checks
from magnet_mi_jax.detectors.magnet import softmax_t
from magnet_mi_jax.utils import all_conditions

__all__ = [
    "READINGS", "entropy", "conditional_entropy", "joint_entropy", "mutual_information", "jaccard_distance",
    "MIQuantities", "mi_quantities", "conditional_table", "MIParams", "MIOutputs", "mi_score",
    "make_mi_score_fn",
]

READINGS = ("literal", "consistent")


# --------------------------------------------------------------------------------------------------
# Pure math on probabilities (unchecked cores, then checked public wrappers).
# --------------------------------------------------------------------------------------------------


def _entropy(p, axis=-1):
    pos = p > 0
    safe = jnp.where(pos, p, 1.0)
    return 0.0 - jnp.sum(jnp.where(pos, p * jnp.log(safe), 0.0), axis=axis)  # 0 - 0 = +0, not -0


def _jaccard(mi, h_xy):
    """d_J = 1 - I / H(X,Y) where H(X,Y) > 0, else 0; finite value and gradient everywhere."""
    pos = h_xy > 0
    return jnp.where(pos, 1.0 - mi / jnp.where(pos, h_xy, 1.0), 0.0)


class MIQuantities(NamedTuple):
    """Per-example information quantities (natural log, nats), each of shape (B,).

    Attributes:
      h_x: H(X).
      h_y: H(Y).
      h_x_given_y: H(X|Y).
      mutual_information: I(X;Y) = H(X) - H(X|Y).
      h_xy: H(X,Y).
      jaccard: d_J = 1 - I(X;Y) / H(X,Y) (0 where H(X,Y) = 0).
    """

    h_x: jnp.ndarray
    h_y: jnp.ndarray
    h_x_given_y: jnp.ndarray
    mutual_information: jnp.ndarray
    h_xy: jnp.ndarray
    jaccard: jnp.ndarray


def _conditional_entropy(p_y, table):
    return jnp.sum(p_y * _entropy(table), axis=-1)                        # sum_j p_Y(j) H(P[j, :])


def _mi_quantities(p_x, p_y, table, reading):
    h_y = _entropy(p_y)
    h_x_given_y = _conditional_entropy(p_y, table)
    if reading == "literal":
        h_x = _entropy(p_x)
        h_xy = h_y + h_x_given_y
    else:
        joint = p_y[:, :, None] * table                                     # q[b, j, i] = p_Y(j) P[j, i]
        h_x = _entropy(jnp.sum(joint, axis=1))                              # marginal q_X(i)
        h_xy = _entropy(joint.reshape(joint.shape[0], -1))
    mi = h_x - h_x_given_y
    return MIQuantities(h_x=h_x, h_y=h_y, h_x_given_y=h_x_given_y, mutual_information=mi, h_xy=h_xy,
                        jaccard=_jaccard(mi, h_xy))


# Jitted cores of the public checked functions: one compilation per shape, dtype and reading.
_entropy_jit = jax.jit(_entropy)
_conditional_entropy_jit = jax.jit(_conditional_entropy)
_mi_quantities_jit = jax.jit(_mi_quantities, static_argnums=3)


def _check_reading(reading):
    if reading not in READINGS:
        raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")


def _check_inputs(p_x, p_y, table):
    p_x = _checks.check_probabilities(p_x, "p_x", 2) if p_x is not None else None
    p_y = _checks.check_probabilities(p_y, "p_y", 2)
    table = _checks.check_probabilities(table, "table", 3)
    b, k = p_y.shape
    chex.assert_shape(table, (b, k, k))
    if p_x is not None:
        chex.assert_equal_shape([p_x, p_y])
        chex.assert_type([p_x, p_y, table], p_y.dtype)
    else:
        chex.assert_type([p_y, table], p_y.dtype)
    return p_x, p_y, table


def entropy(p) -> jnp.ndarray:
    """Shannon entropy H(p) = -sum_i p_i log p_i (nats, 0 log 0 = 0) of each row.

    Args:
      p: (B, K) probabilities (rows sum to one).

    Returns:
      (B,) entropies in [0, log K].
    """
    p = _checks.check_probabilities(p, "p", 2)
    out = _entropy_jit(p)
    chex.assert_shape(out, p.shape[:1])
    return out


def conditional_entropy(p_y, table) -> jnp.ndarray:
    """H(X|Y) = sum_j p_Y(j) H(P[j, :]) with P[j, i] = p(X = i | Y = j).

    Args:
      p_y: (B, K) distribution of Y.
      table: (B, K, K) conditional table, ``table[b, j, i]`` = p(X = i | Y = j); rows (last axis) sum to one.

    Returns:
      (B,) conditional entropies in [0, log K].
    """
    _, p_y, table = _check_inputs(None, p_y, table)
    out = _conditional_entropy_jit(p_y, table)
    chex.assert_shape(out, p_y.shape[:1])
    return out


def joint_entropy(p_x, p_y, table, reading: str = "literal") -> jnp.ndarray:
    """H(X,Y): ``"literal"`` H(Y) + H(X|Y); ``"consistent"`` the entropy of q(i, j) = p_Y(j) P[j, i].

    The two agree mathematically (chain rule); ``p_x`` is unused and accepted for a uniform signature.

    Args:
      p_x: (B, K) distribution of X (unused).
      p_y: (B, K) distribution of Y.
      table: (B, K, K) conditional table.
      reading: ``"literal"`` or ``"consistent"``.

    Returns:
      (B,) joint entropies in [0, 2 log K].
    """
    return mi_quantities(p_x, p_y, table, reading).h_xy


def mutual_information(p_x, p_y, table, reading: str = "literal") -> jnp.ndarray:
    """I(X;Y) = H(X) - H(X|Y), H(X) from ``p_x`` (literal) or from the joint's marginal (consistent).

    Args:
      p_x: (B, K) distribution of X (used by the literal reading).
      p_y: (B, K) distribution of Y.
      table: (B, K, K) conditional table, ``table[b, j, i]`` = p(X = i | Y = j).
      reading: ``"literal"`` or ``"consistent"``.

    Returns:
      (B,) mutual information (nats); in [0, min(H(X), H(Y))] under the consistent reading.
    """
    return mi_quantities(p_x, p_y, table, reading).mutual_information


def jaccard_distance(p_x, p_y, table, reading: str = "literal") -> jnp.ndarray:
    """The paper's detector score d_J = 1 - I(X;Y) / H(X,Y) (0 where H(X,Y) = 0).

    Args:
      p_x: (B, K) distribution of X.
      p_y: (B, K) distribution of Y.
      table: (B, K, K) conditional table.
      reading: ``"literal"`` or ``"consistent"`` (then d_J is in [0, 1]).

    Returns:
      (B,) Jaccard distances.
    """
    return mi_quantities(p_x, p_y, table, reading).jaccard


def mi_quantities(p_x, p_y, table, reading: str = "literal") -> MIQuantities:
    """All information quantities of the MI detector from probabilities.

    Args:
      p_x: (B, K) p_X = softmax(Z(x)/T).
      p_y: (B, K) p_Y = softmax(Z(R(x))/T).
      table: (B, K, K) P[j, i] = p(X = i | Y = j) = softmax(Z(G(E(x), e_j))/T)_i.
      reading: ``"literal"`` (the default, docs/design.md section 5) or ``"consistent"`` (joint q(i, j) = p_Y(j) P[j, i]).

    Returns:
      :class:`MIQuantities` of (B,) arrays in the inputs' dtype.

    Raises:
      ValueError: unknown reading, wrong shapes, or (concrete inputs) entries that are not probabilities.
      TypeError: non-floating or mixed dtypes.
    """
    _check_reading(reading)
    p_x, p_y, table = _check_inputs(p_x, p_y, table)
    out = _mi_quantities_jit(p_x, p_y, table, reading)
    chex.assert_shape(list(out), p_y.shape[:1])
    chex.assert_type(list(out), p_y.dtype)
    return out


# --------------------------------------------------------------------------------------------------
# Networks.
# --------------------------------------------------------------------------------------------------

Apply = Callable[..., jnp.ndarray]


class MIParams(NamedTuple):
    """The parameters of the four networks the MI detector evaluates (any pytrees; may share leaves)."""

    classifier: Any
    reformer: Any
    encoder: Any
    generator: Any


class MIOutputs(NamedTuple):
    """The MI detector's result for a batch of B images.

    Attributes:
      quantities: :class:`MIQuantities` (H(X), H(Y), H(X|Y), I(X;Y), H(X,Y), d_J), each (B,).
      p_x: (B, K) softmax(Z(x)/T).
      p_y: (B, K) softmax(Z(R(x))/T).
      table: (B, K, K) P[j, i] = softmax(Z(G(E(x), e_j))/T)_i.
    """

    quantities: MIQuantities
    p_x: jnp.ndarray
    p_y: jnp.ndarray
    table: jnp.ndarray


def conditional_logits(classifier: Apply, classifier_params: Any, encoder: Apply, encoder_params: Any,
                       generator: Apply, generator_params: Any, x, num_classes: int) -> jnp.ndarray:
    """L[b, j, :] = Z(G(E(x_b), e_j)) for every condition j, in one batched pass.

    The latent codes z = E(x) (B, Dz) are tiled against the K one-hot conditions by
    :func:`magnet_mi_jax.utils.all_conditions` (row b * K + j holds (z_b, e_j), as the alpha-GAN's
    ``generate_all_conditions``), so the generator and the classifier each run once on B * K rows.

    Args:
      classifier: ``Z(params, images) -> logits (N, K)``.
      classifier_params: its parameters.
      encoder: ``E(params, x) -> z (B, Dz)``.
      encoder_params: its parameters.
      generator: ``G(params, z (N, Dz), y_onehot (N, K)) -> images (N, H, W, C)``.
      generator_params: its parameters.
      x: (B, H, W, C) float images.
      num_classes: K (static).

    Returns:
      (B, K, K) logits, ``[b, j, i]`` = Z(G(E(x_b), e_j))_i.
    """
    x = _checks.check_images(x)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    b, k = x.shape[0], num_classes
    z = encoder(encoder_params, x)
    chex.assert_rank(z, 2)
    chex.assert_axis_dimension(z, 0, b)
    z_all, y_all = all_conditions(z, k)                                                     # (B*K, Dz), (B*K, K)
    images = generator(generator_params, z_all, y_all)                                      # (B*K, H, W, C)
    chex.assert_rank(images, 4)
    chex.assert_axis_dimension(images, 0, k * b)
    logits = classifier(classifier_params, images)                                          # (B*K, K)
    chex.assert_shape(logits, (k * b, k))
    return logits.reshape(b, k, k)                                                          # [b, j, i]


def conditional_table(classifier: Apply, classifier_params: Any, encoder: Apply, encoder_params: Any,
                      generator: Apply, generator_params: Any, x, num_classes: int,
                      temperature: float = 1.0) -> jnp.ndarray:
    """P[b, j, i] = softmax(Z(G(E(x_b), e_j)) / T)_i for every condition j, in one batched pass.

    The softmax at temperature T of :func:`conditional_logits` (same arguments, same one pass).

    Returns:
      (B, K, K) conditional table, rows on the last axis summing to one.
    """
    logits = conditional_logits(classifier, classifier_params, encoder, encoder_params, generator,
                                generator_params, x, num_classes)
    return softmax_t(logits, temperature)


def mi_score(params: MIParams, x, *, classifier: Apply, reformer: Apply, encoder: Apply, generator: Apply,
             temperature: float = 1.0, reading: str = "literal") -> MIOutputs:
    """The MI detector on a batch: p_X, p_Y, the (B, K, K) table and every information quantity.

    Pure and jittable (the networks, T and the reading are static; see :func:`make_mi_score_fn`).

    Args:
      params: :class:`MIParams` of the four networks.
      x: (B, H, W, C) float images in [0, 1].
      classifier: ``Z(params, images) -> logits (N, K)``.
      reformer: ``R(params, x) -> x'`` (B, H, W, C), e.g. MagNet's clip(AE(x), 0, 1); its output is clipped to
        [0, 1] (a no-op for a reformer that clips).
      encoder: ``E(params, x) -> z (B, Dz)``.
      generator: ``G(params, z (N, Dz), y_onehot (N, K)) -> images (N, H, W, C)``.
      temperature: T > 0 of every softmax.
      reading: ``"literal"`` or ``"consistent"`` (module docstring).

    Returns:
      :class:`MIOutputs`; ``quantities.jaccard`` is the score d_J.
    """
    _check_reading(reading)
    from magnet_mi_jax.detectors.defense import MIDetector          # the one MI pipeline (defense imports this)
    from magnet_mi_jax.detectors.forward import SharedForward
    # R enters as a network whose output the shared pass clips to [0, 1]; a reformer that already clips (as
    # MagNet's does) is unchanged by that, since clipping is idempotent.
    forward = SharedForward({"classifier": classifier, "reformer": reformer, "encoder": encoder,
                             "generator": generator}, params._asdict(), x, reformer="reformer")
    chex.assert_rank(forward.logits, 2)
    out = MIDetector(temperature=temperature, reading=reading).outputs(forward)
    chex.assert_type([out.p_x, out.p_y, out.table], forward.logits.dtype)
    return out


def make_mi_score_fn(classifier: Apply, reformer: Apply, encoder: Apply, generator: Apply, *,
                     temperature: float = 1.0, reading: str = "literal") -> Callable[[MIParams, Any], MIOutputs]:
    """``jax.jit`` of :func:`mi_score` with the networks, T and the reading fixed: ``f(params, x)``.

    It compiles once per input shape and dtype; new images of the same shape reuse the compiled function.
    """
    _check_reading(reading)
    _checks.check_temperature(temperature)
    return jax.jit(functools.partial(mi_score, classifier=classifier, reformer=reformer, encoder=encoder,
                                     generator=generator, temperature=temperature, reading=reading))
