"""The Engram memory layer and its short causal convolution."""

from engram.memory.conv import BranchRMSNorm, ShortConv
from engram.memory.layer import Engram

__all__ = ["BranchRMSNorm", "Engram", "ShortConv"]
