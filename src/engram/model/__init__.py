"""The reference decoder (dense, MoE, Engram+MoE) and its parameter accounting."""

from engram.model.config import ModelConfig, MoEConfig
from engram.model.lm import EngramLM, LMOutput

__all__ = ["EngramLM", "LMOutput", "MoEConfig", "ModelConfig"]
