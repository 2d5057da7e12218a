"""Evaluation: validation loss, bits per byte, Engram on/off; analyses of why Engram helps."""

from engram.eval.analysis import (
    GATE_CLASSES,
    SENSITIVITY_CLASSES,
    NgramCounts,
    cka_matrix,
    gate_classes,
    gate_statistics,
    linear_cka,
    logit_lens_kl,
    sensitivity_by_class,
    target_classes,
)
from engram.eval.evaluate import EvalResult, evaluate, evaluate_with_and_without_engram, token_byte_lengths

__all__ = [
    "GATE_CLASSES",
    "SENSITIVITY_CLASSES",
    "EvalResult",
    "NgramCounts",
    "cka_matrix",
    "evaluate",
    "evaluate_with_and_without_engram",
    "gate_classes",
    "gate_statistics",
    "linear_cka",
    "logit_lens_kl",
    "sensitivity_by_class",
    "target_classes",
    "token_byte_lengths",
]
