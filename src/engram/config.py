"""Configuration of the Engram memory (hashing and layer), round-tripping to JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from engram._checks import check_hashing_params
from engram._json_config import ConfigError, JsonConfig, require

GateActivation = Literal["signed_sqrt", "plain"]
Addressing = Literal["ngram", "token", "constant"]
Variant = Literal["engram", "overencoding"]


@dataclass
class EngramConfig(JsonConfig):
    """Hyper-parameters of the Engram memory shared by all its layers.

    Defaults follow DeepSeek's published demo (docs/definition.md, "Hashing"). The last five fields
    are ablation switches and controls (docs/definition.md, "Ablation switches and controls"); their
    defaults are the full Engram, bit for bit.

    Attributes:
        layer_ids: backbone layers (0-based, taken literally) that get an Engram module.
        max_ngram_size: N; suffix n-grams of orders 2..N are hashed.
        n_head_per_ngram: K hash heads (tables) per order.
        n_embed_per_ngram: width of one order's retrieved vector; each head contributes
            ``n_embed_per_ngram // n_head_per_ngram`` dims. The memory width is
            ``d_mem = (N-1) * n_embed_per_ngram``.
        engram_vocab_size: base table size per order ``[S_2, ..., S_N]``; the actual sizes are
            the next distinct primes above them.
        pad_id: raw token id that fills positions before a sequence starts (compressed first).
        seed: hash seed.
        kernel_size: taps of the short causal convolution (dilated by N).
        gate_activation: ``"signed_sqrt"`` applies sign(s)*sqrt(|s|) before the sigmoid (demo and
            production models); ``"plain"`` is the paper's sigmoid(s).
        conv_zero_init: zero-initialise the convolution so the module starts as pure gated lookup
            (paper); ``False`` keeps PyTorch's default init (demo).
        table_init_std: standard deviation of the normal init of the embedding tables. The default
            1.0 is the demo's (``nn.Embedding``); inside a model whose residual stream starts at std
            ~0.02, a small value (0.005 in ``engram demo``) lets the sparse Adam steps move a row
            within a few visits and trained much better in our measurements (docs/demo.md).
        gate_norm_eps: epsilon of the key/query RMSNorms; ``None`` means the dtype's machine
            epsilon (PyTorch's RMSNorm default, as in the demo).
        conv_norm_eps: epsilon of the RMSNorm in front of the convolution.
        compress_tokens: ``False`` switches tokenizer compression off: the hash reads the
            tokenizer's raw ids (V' = its raw vocabulary size, which bounds the multipliers; the
            pad id is ``pad_id`` itself).
        use_gate: ``False`` fixes the gate to 1 (v~ = v in every branch); the key projection and
            the key/query norms are not built.
        use_conv: ``False`` builds no short convolution: Y = v~.
        addressing: which row each head reads. ``"ngram"``: the hashed suffix n-gram.
            ``"token"``: the hash of the current token alone, pads before it (a unigram memory in
            the same tables). ``"constant"``: every head has a table of one row that every
            position reads (capacity 1: the parameters and the gate, no content addressing).
        variant: ``"engram"``, or ``"overencoding"``: the OverEncoding baseline, hashed n-gram
            embeddings averaged into the input embedding. The module keeps only its table
            (``use_gate``, ``use_conv``, ``kernel_size`` and the gate and conv settings do not
            apply); a model needs ``layer_ids == [0]`` and ``n_embed_per_ngram == d_model``.
    """

    layer_ids: list[int] = field(default_factory=lambda: [1, 15])
    max_ngram_size: int = 3
    n_head_per_ngram: int = 8
    n_embed_per_ngram: int = 512
    engram_vocab_size: list[int] = field(default_factory=lambda: [129280 * 5, 129280 * 5])
    pad_id: int = 2
    seed: int = 0
    kernel_size: int = 4
    gate_activation: GateActivation = "signed_sqrt"
    conv_zero_init: bool = True
    table_init_std: float = 1.0
    gate_norm_eps: float | None = None
    conv_norm_eps: float = 1e-5
    compress_tokens: bool = True
    use_gate: bool = True
    use_conv: bool = True
    addressing: Addressing = "ngram"
    variant: Variant = "engram"

    def validate(self) -> None:
        try:
            check_hashing_params(self.layer_ids, self.max_ngram_size, self.n_head_per_ngram, self.engram_vocab_size)
        except ValueError as exc:  # the hasher's own rules, shared; their messages name the field
            raise ConfigError("", str(exc)) from None
        if self.n_embed_per_ngram < 1 or self.n_embed_per_ngram % self.n_head_per_ngram != 0:
            raise ConfigError(
                "n_embed_per_ngram",
                f"must be a positive multiple of n_head_per_ngram ({self.n_head_per_ngram}) so that every head "
                f"gets the same width, got {self.n_embed_per_ngram}",
            )
        require(self, "pad_id", ge=0)  # a raw token id
        require(self, "seed", ge=0)  # numpy seeds the multipliers with seed + 10007 * layer
        require(self, "kernel_size", ge=1)
        require(self, "table_init_std", ge=0)
        require(self, "gate_norm_eps", gt=0)
        require(self, "conv_norm_eps", gt=0)

    @property
    def head_dim(self) -> int:
        """Width of one head's table row."""
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def n_heads(self) -> int:
        """Heads per layer, (N-1)*K."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    @property
    def memory_dim(self) -> int:
        """d_mem: width of the concatenated retrieved vector."""
        return (self.max_ngram_size - 1) * self.n_embed_per_ngram
