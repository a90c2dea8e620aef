"""Detectors: MagNet's reconstruction-error and JSD detectors and reformer, the conditional-generation MI
detector, thresholds at a false-positive rate, defense metrics, and MI-strengthened MagNet.

* :mod:`~magnet_mi_jax.detectors.forward`: the detector interface and :class:`SharedForward`, the network
  outputs of one batch that every detector reads (each network evaluated once).
* :mod:`~magnet_mi_jax.detectors.magnet`: scores, reformer, the :class:`MagNet` description and presets.
* :mod:`~magnet_mi_jax.detectors.mi`: entropy, H(X|Y), I(X;Y), H(X,Y), d_J; the MI score over all K conditions.
* :mod:`~magnet_mi_jax.detectors.thresholds`: n = floor(N r), threshold = n-th largest, pass iff score < it.
* :mod:`~magnet_mi_jax.detectors.metrics`: MagNet accuracy breakdown, ROC AUC and curve, TPR at fixed FPR.
* :mod:`~magnet_mi_jax.detectors.defense`: MagNet OR the MI detector, then the reformer.
"""

from magnet_mi_jax.detectors.forward import SharedForward, check_detector
from magnet_mi_jax.detectors.defense import (Decision, DefenseOutputs, MIDetector, MIMagNet, calibrate, decide,
                                             defense_forward, make_defense_fn, make_mi_strengthened_magnet,
                                             mi_magnet, mi_strengthened_magnet)
from magnet_mi_jax.detectors.magnet import (CIFAR10_MAGNET, MNIST_MAGNET, JSDDetector, MagNet,
                                            MagNetOutputs, ReconstructionDetector, jensen_shannon,
                                            jensen_shannon_logits, jsd_score,
                                            magnet_forward, make_magnet_fn, map_batches, reconstruction_error,
                                            reconstruction_score, reform, softmax_t)
from magnet_mi_jax.detectors.metrics import (DefenseAccuracy, DetectionRate, attack_accuracy, clean_accuracy,
                                             detection_rates, false_positive_rate, roc_auc, roc_curve, tpr_at_fpr)
from magnet_mi_jax.detectors.mi import (MIOutputs, MIParams, MIQuantities, conditional_entropy, conditional_logits,
                                        conditional_table,
                                        entropy, jaccard_distance, joint_entropy, make_mi_score_fn, mi_quantities,
                                        mi_score, mutual_information)
from magnet_mi_jax.detectors.thresholds import flags, num_rejected, passes, threshold_at_fpr

__all__ = [
    "CIFAR10_MAGNET", "MNIST_MAGNET", "Decision", "DefenseAccuracy", "DefenseOutputs",
    "DetectionRate", "JSDDetector", "MIDetector", "MIMagNet", "MIOutputs", "MIParams", "MIQuantities", "MagNet",
    "MagNetOutputs", "ReconstructionDetector", "attack_accuracy", "calibrate", "clean_accuracy",
    "conditional_entropy", "conditional_logits", "conditional_table", "decide", "defense_forward", "detection_rates", "entropy",
    "false_positive_rate", "flags", "jaccard_distance", "jensen_shannon", "jensen_shannon_logits", "joint_entropy", "jsd_score",
    "magnet_forward", "make_defense_fn", "make_magnet_fn", "make_mi_score_fn", "make_mi_strengthened_magnet",
    "map_batches", "mi_magnet", "mi_quantities", "mi_score", "mi_strengthened_magnet", "mutual_information",
    "num_rejected", "passes", "reconstruction_error", "reconstruction_score", "reform", "roc_auc", "roc_curve",
    "softmax_t", "threshold_at_fpr", "tpr_at_fpr", "SharedForward", "check_detector",
]
