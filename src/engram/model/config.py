"""Configuration of the reference decoder: one dataclass, round-tripping to JSON.

Dense, MoE and Engram+MoE models are one field away from each other: ``moe=None`` gives dense
SwiGLU FFNs, a ``MoEConfig`` gives DeepSeek-style MoE FFNs (after ``n_dense_layers`` dense ones),
and an ``EngramConfig`` adds Engram modules at its ``layer_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engram._json_config import ConfigError, JsonConfig, require
from engram.config import EngramConfig


@dataclass
class MoEConfig(JsonConfig):
    """DeepSeek-style mixture of experts: shared experts plus fine-grained routed experts.

    Attributes:
        n_routed_experts: routed experts per MoE layer.
        n_shared_experts: experts every token passes through.
        top_k: routed experts per token.
        expert_hidden: hidden width of each expert's SwiGLU.
        score_func: router scores; ``"sigmoid"`` (DeepSeek-V3, weights renormalised over the top-k)
            or ``"softmax"``. With sigmoid and ``top_k=1`` the renormalised weight is always 1, so
            the router learns only through the auxiliary loss.
        bias_update_rate: step of the loss-free balancing bias (gamma): after each optimizer step an
            expert's selection bias moves by ``+gamma`` if it got fewer tokens than the average,
            ``-gamma`` if more, and stays at exactly the average.
        aux_loss_weight: weight of the optional auxiliary balance loss (0 disables it), computed over
            all tokens of the batch.
        route_scale: factor on the routed experts' combined output.
    """

    n_routed_experts: int = 8
    n_shared_experts: int = 1
    top_k: int = 2
    expert_hidden: int = 256
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    bias_update_rate: float = 1e-3
    aux_loss_weight: float = 0.0
    route_scale: float = 1.0

    def validate(self) -> None:
        require(self, "n_routed_experts", ge=1)
        require(self, "top_k", ge=1, le="n_routed_experts")
        require(self, "n_shared_experts", ge=0)
        require(self, "expert_hidden", ge=1)
        require(self, "bias_update_rate", ge=0)
        require(self, "aux_loss_weight", ge=0)
        require(self, "route_scale", gt=0)


@dataclass
class ModelConfig(JsonConfig):
    """The reference decoder.

    Attributes:
        vocab_size: output (and input embedding) vocabulary.
        input_vocab_size: tokenizer ids the model accepts when its vocabulary is trimmed (model id 0
            stands for every id outside the trimmed set); ``None``: model ids are tokenizer ids.
        d_model: hidden size d.
        n_layers: Transformer blocks.
        n_heads: attention heads (``d_model`` must divide by it; head size even for RoPE).
        ffn_hidden: hidden width of the dense SwiGLU FFNs.
        moe: MoE FFNs if set, dense otherwise.
        n_dense_layers: with ``moe``, the first blocks keep a dense FFN (DeepSeek keeps one).
        n_branches: residual branches M; 1 is a plain residual stream, M > 1 uses
            hyper-connections.
        engram: Engram modules at ``engram.layer_ids`` (0-based block indices) if set; its
            OverEncoding variant needs ``layer_ids == [0]`` and ``n_embed_per_ngram == d_model``.
        max_seq_len: longest sequence (RoPE table size).
        rope_theta: RoPE base.
        tie_embeddings: share the input embedding and the LM head.
        norm_eps: RMSNorm epsilon of the backbone.
        init_std: standard deviation of the linear and embedding initialisation.
    """

    vocab_size: int
    input_vocab_size: int | None = None
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int = 688
    moe: MoEConfig | None = None
    n_dense_layers: int = 0
    n_branches: int = 1
    engram: EngramConfig | None = None
    max_seq_len: int = 1024
    rope_theta: float = 10_000.0
    tie_embeddings: bool = False
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_hidden", "n_branches", "max_seq_len"):
            require(self, name, ge=1)
        if self.input_vocab_size is not None and self.input_vocab_size < self.vocab_size - 1:
            raise ConfigError(
                "input_vocab_size",
                f"must be >= vocab_size - 1 ({self.vocab_size - 1}), got {self.input_vocab_size}: smaller than the "
                f"trimmed vocabulary it maps into ({self.vocab_size - 1} ids plus the unknown id)",
            )
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                "d_model", f"must split into n_heads ({self.n_heads}) heads of even size for RoPE, got {self.d_model}"
            )
        require(self, "n_dense_layers", ge=0, le="n_layers")
        require(self, "rope_theta", gt=0)
        require(self, "norm_eps", gt=0)
        require(self, "init_std", ge=0)
        if self.engram is not None:
            outside = [i for i in self.engram.layer_ids if i >= self.n_layers]
            if outside:
                raise ConfigError(
                    "engram.layer_ids",
                    f"layers {outside} do not exist in a {self.n_layers}-layer model (ids are 0-based)",
                )
            if self.engram.variant == "overencoding":  # docs/definition.md, "Ablation switches and controls"
                if self.engram.layer_ids != [0]:
                    raise ConfigError(
                        "engram.layer_ids",
                        f"OverEncoding averages n-gram embeddings into the token embedding, so it lives in block 0 "
                        f"alone: set layer_ids to [0], got {self.engram.layer_ids}",
                    )
                if self.engram.n_embed_per_ngram != self.d_model:
                    raise ConfigError(
                        "engram.n_embed_per_ngram",
                        f"OverEncoding adds each order's retrieved vector to the embedding: set it to d_model "
                        f"({self.d_model}), got {self.engram.n_embed_per_ngram}",
                    )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def uses_moe(self, layer: int) -> bool:
        """Whether block ``layer`` has an MoE FFN."""
        return self.moe is not None and layer >= self.n_dense_layers
