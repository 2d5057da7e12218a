"""Engram models in Hugging Face ``transformers``: ``EngramHFConfig`` and ``EngramForCausalLM``.

Importing this module registers ``model_type="engram"`` with ``AutoConfig`` and
``AutoModelForCausalLM`` (``register()`` does it again, harmlessly). It needs the optional
``transformers`` dependency: ``pip install 'engram[hf]'``; the rest of engram does not.

    from engram.hf import EngramForCausalLM
    hf_model = EngramForCausalLM.from_engram(lm)        # wraps an EngramLM, shares its weights
    hf_model.save_pretrained("out")                     # config.json + model.safetensors (+ tables/ for disk tables)
    hf_model.save_tokenizer(tokenizer, "out")           # for AutoTokenizer and pipeline("text-generation")
    model = AutoModelForCausalLM.from_pretrained("out") # after `import engram.hf` (storage=: another tier)

docs/transformers.md describes the saved folder per table tier and what loading does with it.

``retrofit(model, tokenizer, layers=[...])`` adds Engram to an existing transformers Llama, Qwen2, Qwen3
or GPT-2 model instead (``engram.hf.retrofit``; ``load_retrofitted`` reads it back).
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as exc:
    raise ImportError(
        "engram.hf needs the optional 'transformers' package (>= 5.24): pip install 'engram[hf]'"
    ) from exc

from engram.hf.config import EngramHFConfig, describe_compression
from engram.hf.modeling import EngramCache, EngramForCausalLM
from engram.hf.retrofit import RetrofitOptimizer, load_retrofitted, retrofit


def register() -> None:
    """Make ``AutoConfig`` and ``AutoModelForCausalLM`` resolve ``model_type="engram"`` to these classes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(EngramHFConfig.model_type, EngramHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(EngramHFConfig, EngramForCausalLM, exist_ok=True)


register()

__all__ = [
    "EngramCache",
    "EngramForCausalLM",
    "EngramHFConfig",
    "RetrofitOptimizer",
    "describe_compression",
    "load_retrofitted",
    "register",
    "retrofit",
]
