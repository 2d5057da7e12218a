"""Evaluation: validation loss, bits per byte, Engram on/off."""

from engram.eval.evaluate import EvalResult, evaluate, token_byte_lengths

__all__ = ["EvalResult", "evaluate", "token_byte_lengths"]
