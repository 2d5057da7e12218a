"""Evaluation: validation loss, bits per byte, Engram on/off."""

from engram.eval.evaluate import EvalResult, evaluate, evaluate_with_and_without_engram, token_byte_lengths

__all__ = ["EvalResult", "evaluate", "evaluate_with_and_without_engram", "token_byte_lengths"]
