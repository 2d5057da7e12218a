"""Autoregressive generation with the reference decoder (KV cache, incremental Engram hashing)."""

from engram.inference.generate import generate
from engram.model.lm import DecodeState

__all__ = ["DecodeState", "generate"]
