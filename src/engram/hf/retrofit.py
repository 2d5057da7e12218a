"""Adding Engram to an existing transformers decoder: ``retrofit``, ``load_retrofitted``, ``RetrofitOptimizer``.

``retrofit(model, tokenizer, layers=[...])`` inserts an ``engram.Engram`` module before each chosen
decoder layer of a Llama, Qwen2, Qwen3 or GPT-2 causal LM, in place (the same object, the same
class), with the tokenizer compression built from the model's own tokenizer:

- **Where**: a forward pre-hook on each chosen decoder layer replaces its input hidden state h by
  ``h + Engram(h, hash_ids)`` and calls the layer with all its other arguments unchanged. The
  Engram modules and the compression table live in one submodule, ``model.engram``, so their
  state-dict keys are ``engram.layers.<i>.*`` and ``engram.compression_table`` and every backbone
  key stays what it was.
- **Hash ids**: a forward pre-hook on the backbone (``model.model``, ``model.transformer``) reads
  ``input_ids`` once per forward pass, compresses and hashes them for every Engram layer
  (``EngramIndexer.hash_step``). ``inputs_embeds`` without ``input_ids`` is refused (Engram hashes
  ids), and so is an ``attention_mask`` with zeros (padding would enter the n-grams and the
  convolution), and gradient checkpointing (a layer recomputed in backward would miss its hash ids).
- **Unchanged outputs at insertion**: the value projection W_V, b_V starts at zero. Then v = 0, the
  gated value v~ = alpha * v = 0, RMSNorm(0) = 0, Conv1D(0) = 0 and SiLU(0) = 0, so
  Y = v~ + SiLU(Conv1D(RMSNorm(v~))) is exactly 0 and h + Y == h bit for bit: the retrofitted model's
  logits are the original's. Zeroing the convolution alone (``conv_zero_init``, the paper's choice)
  is not enough, since it leaves Y = v~ = alpha * v, which is not zero. At the first step only W_V
  and b_V receive a gradient (dL/dW_V = alpha * dL/dY e^T, with e the non-zero table rows); the key
  projection, the norms and the table rows get exactly zero, because v = 0 and W_V = 0 stand in the
  way. From the second step all of them learn. (The looked-up rows count that first zero update in
  ``RowAdam``'s per-row step count.)
- **Decoding**: the model's transformers cache carries Engram's state: each sequence's last N-1
  canonical ids (for incremental hashing) and each Engram layer's convolution state, attached to the
  cache object by a forward hook on the backbone. Cached greedy decoding equals recomputing the
  whole sequence. Beam search is supported: the cache's ``reorder_cache`` reorders Engram's state
  with it. A cache whose length changes behind Engram's back (cropped, or filled by the model before
  it was retrofitted) is refused at the next forward pass.
- **Saving**: ``save_pretrained`` is transformers' own. ``config.json`` gains ``engram_retrofit``
  (the layers, the ``EngramConfig``, the prime table sizes and the compression's SHA-256) and the
  weights hold the Engram tensors and the compression table. ``load_retrofitted(folder)`` rebuilds
  the model bit for bit; ``AutoModelForCausalLM.from_pretrained`` alone would load the backbone
  without its Engram modules (and report their weights as unexpected).
- **Training**: ``freeze_backbone=True`` leaves only Engram's parameters trainable.
  ``RetrofitOptimizer`` (a ``torch.optim.AdamW`` that also steps the tables with ``RowAdam``, sparse
  rows at their own learning rate) plugs into ``transformers.Trainer`` as ``optimizers=(opt, None)``.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from engram.config import EngramConfig
from engram.hf.config import describe_compression, table_sha256
from engram.hf.modeling import weight_files
from engram.indexing.compression import CompressedTokenizer
from engram.indexing.indexer import EngramIndexer, engram_head_sizes
from engram.memory.layer import Engram
from engram.storage.config import StorageConfig
from engram.storage.device import DeviceTable
from engram.storage.placement import place_tables
from engram.training.row_optim import RowAdam

# model_type -> (attribute of the backbone under the causal LM, attribute of its decoder layer list)
SUPPORTED = {"llama": ("model", "layers"), "qwen2": ("model", "layers"), "qwen3": ("model", "layers"),
             "gpt2": ("transformer", "h")}  # fmt: skip
CONFIG_KEY = "engram_retrofit"  # the config.json entry a retrofitted model saves
FORMAT = 1
_STATE_ATTR = "_engram_retrofit_state"  # where Engram's decoding state sits on a transformers cache object

# What retrofit changes in EngramConfig's defaults: a table init the size of a residual stream (engram demo's
# 0.005, docs/definition.md "Where the paper and the demo differ"); layer_ids, pad_id and the base table sizes
# (5x the model's vocabulary per order, as the demo's 129280 * 5) follow from the model and the tokenizer.
RETROFIT_DEFAULTS: dict[str, Any] = {"table_init_std": 0.005}


@dataclass
class _DecodeState:
    """Engram's part of a transformers cache: what the next forward pass of the same sequences needs.

    Attributes:
        history: (B, N-1) canonical ids of the last positions seen (for incremental hashing).
        conv: {layer: (B, d, (kernel_size-1)*N) convolution state}, or None for layers without a convolution.
        position: positions seen so far (checked against the cache's own length).
    """

    history: torch.Tensor
    conv: dict[int, torch.Tensor | None]
    position: int

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Follow the cache's beam reordering: row b becomes row beam_idx[b]."""
        self.history = self.history.index_select(0, beam_idx.to(self.history.device))
        self.conv = {k: None if v is None else v.index_select(0, beam_idx.to(v.device)) for k, v in self.conv.items()}


@dataclass
class _Forward:
    """What the backbone's pre-hook computed for the forward pass under way, for the layer hooks."""

    hash_ids: dict[int, torch.Tensor]  # {layer: (B, T, H)}
    history: torch.Tensor  # (B, N-1) after these positions
    position: int  # positions seen after this pass
    conv_before: dict[int, torch.Tensor | None] | None  # None: the sequences start here
    conv_after: dict[int, torch.Tensor | None] = field(default_factory=dict)


class EngramRetrofit(nn.Module):
    """The Engram modules of a retrofitted model (``model.engram``) and the hooks that run them.

    Attributes:
        config: the ``EngramConfig`` (``layer_ids`` are the decoder layers, 0-based).
        layers: ``ModuleDict`` {str(layer): Engram}.
        compression_table: (raw ids,) int64 buffer, the tokenizer compression (saved with the weights).
        indexer: the ``EngramIndexer`` built from that table.
    """

    def __init__(self, config: EngramConfig, compressor: CompressedTokenizer, hidden_size: int):
        super().__init__()
        self.config = config
        self.register_buffer("compression_table", torch.from_numpy(compressor.lookup_table.copy()))
        self.indexer = EngramIndexer(config, compressor)
        self.layers = nn.ModuleDict(
            {str(i): Engram(config, i, hidden_size, indexer=self.indexer) for i in config.layer_ids}
        )
        for engram in self.layers.values():
            # The output-preserving init (module docstring): v = 0, so Y = 0 exactly, whatever the rest.
            nn.init.zeros_(engram.value_proj.weight)
            nn.init.zeros_(engram.value_proj.bias)
        self._forward: _Forward | None = None
        self._handles: list[Any] = []
        self._signature: inspect.Signature | None = None

    # -- hooks ----------------------------------------------------------------------------------
    def attach(self, backbone: nn.Module, decoder_layers: nn.ModuleList) -> None:
        """Register the hooks on ``backbone`` and on the chosen ``decoder_layers``."""
        self._signature = inspect.signature(backbone.forward)
        self._handles.append(backbone.register_forward_pre_hook(self._before_backbone, with_kwargs=True))
        self._handles.append(backbone.register_forward_hook(self._after_backbone, with_kwargs=True))
        for i in self.config.layer_ids:
            hook = self._layer_hook(i)
            self._handles.append(decoder_layers[i].register_forward_pre_hook(hook, with_kwargs=True))

    def _before_backbone(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Hash the new ids of this forward pass for every Engram layer, continuing the cache's sequences."""
        if module.training and getattr(module, "gradient_checkpointing", False):
            # Recomputing a layer in backward would run its Engram hook after this pass's hash ids are gone.
            raise ValueError(
                "a retrofitted Engram model does not support gradient checkpointing yet: "
                "call model.gradient_checkpointing_disable()"
            )
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        extra = bound.get("kwargs", {})
        input_ids = bound.get("input_ids")
        if input_ids is None:
            raise ValueError(
                "a retrofitted Engram model reads input_ids (Engram hashes token ids): "
                "pass input_ids, not inputs_embeds"
            )
        mask = bound.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
            raise ValueError(
                "a retrofitted Engram model does not support padding yet: attention_mask must be all ones "
                "(padded positions would enter Engram's n-grams and convolution); batch sequences of equal length"
            )
        cache = bound.get("cache", bound.get("past_key_values", extra.get("cache", extra.get("past_key_values"))))
        past = 0 if cache is None else int(cache.get_seq_length())
        state: _DecodeState | None = None if cache is None else getattr(cache, _STATE_ATTR, None)
        if past > 0 and state is None:
            raise ValueError(
                f"the cache already holds {past} positions that Engram has not seen (filled before the model was "
                "retrofitted, or by another model): start generation with a fresh cache"
            )
        if state is not None and state.position != past:
            raise ValueError(
                f"the cache holds {past} positions but Engram's state {state.position}: the cache was cropped or "
                "reset outside the model, which a retrofitted Engram model does not support"
            )
        if state is not None and state.history.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"input_ids has {input_ids.shape[0]} sequences but the cache {state.history.shape[0]}: continue "
                "a cache with the batch that filled it"
            )
        hash_ids, history = self.indexer.hash_step(input_ids, None if state is None else state.history)
        self._forward = _Forward(
            hash_ids, history, past + input_ids.shape[1], None if state is None else dict(state.conv)
        )

    def _layer_hook(self, layer: int):
        engram = self.layers[str(layer)]

        def add_memory(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            forward = self._forward
            if forward is None:
                raise RuntimeError(
                    f"decoder layer {layer} carries an Engram module, which needs the hash ids of the backbone's "
                    "forward pass: call the model (or its backbone), not the decoder layer on its own"
                )
            hidden = args[0] if args else kwargs["hidden_states"]
            conv = None if forward.conv_before is None else forward.conv_before[layer]
            update, forward.conv_after[layer] = engram.step(
                hidden, forward.hash_ids[layer].to(hidden.device), conv, check_ids=False
            )  # hashes of checked ids are in range by construction
            hidden = hidden + update
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return add_memory

    def _after_backbone(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Attach Engram's state after this pass to the cache the backbone returns (if any)."""
        forward, self._forward = self._forward, None
        cache = getattr(output, "cache", None) if hasattr(output, "cache") else getattr(output, "past_key_values", None)
        if cache is None or forward is None:
            return
        state = getattr(cache, _STATE_ATTR, None)
        if state is None:
            state = _DecodeState(forward.history, forward.conv_after, forward.position)
            setattr(cache, _STATE_ATTR, state)
            _follow_reordering(cache, state)
        else:
            state.history, state.conv, state.position = forward.history, forward.conv_after, forward.position

    def detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _reorder_with_engram(cache: Any, beam_idx: torch.Tensor) -> Any:
    """The cache class's own ``reorder_cache``, then the same reordering of Engram's state on that cache."""
    result = type(cache).reorder_cache(cache, beam_idx)
    getattr(cache, _STATE_ATTR).reorder(beam_idx)
    return result


def _follow_reordering(cache: Any, state: _DecodeState) -> None:
    """Make ``cache.reorder_cache`` (beam search) reorder Engram's state too (on this cache object only).

    A method bound to the cache, not a closure: a deep copy of the cache then reorders its own state.
    """
    if hasattr(type(cache), "reorder_cache"):
        cache.reorder_cache = types.MethodType(_reorder_with_engram, cache)


# -- retrofit -----------------------------------------------------------------------------------
def _family(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The backbone and its decoder layer list, for the supported families; a clear error otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED or not hasattr(model, "generate"):
        raise TypeError(
            f"retrofit supports the causal LMs of the {sorted(SUPPORTED)} families (LlamaForCausalLM, "
            f"Qwen2ForCausalLM, Qwen3ForCausalLM, GPT2LMHeadModel), got {type(model).__name__} "
            f"(model_type {model_type!r})"
        )
    backbone_name, layers_name = SUPPORTED[model_type]
    backbone = getattr(model, backbone_name, None)
    layers = getattr(backbone, layers_name, None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no decoder layer list at {backbone_name}.{layers_name}")
    return backbone, layers


def _compressor(tokenizer: Any, vocab_size: int) -> CompressedTokenizer:
    """The compression of ``tokenizer``, extended to the model's ``vocab_size`` ids.

    Models often have more embedding rows than their tokenizer has ids (rounded vocabularies); each id
    beyond the tokenizer's gets a canonical id of its own, so that whatever the model generates can be hashed.
    """
    compressor = tokenizer if isinstance(tokenizer, CompressedTokenizer) else CompressedTokenizer(tokenizer)
    raw = compressor.raw_vocab_size
    if raw > vocab_size:
        raise ValueError(
            f"the tokenizer has {raw} ids but the model's vocabulary only {vocab_size}: pass the model's own tokenizer"
        )
    if raw == vocab_size:
        return compressor
    table = compressor.lookup_table
    extra = np.arange(vocab_size - raw, dtype=np.int64) + (int(table.max()) + 1 if raw else 0)
    return CompressedTokenizer.from_table(np.concatenate([table, extra]), compressor.fingerprint)


def _default_pad_id(tokenizer: Any, model: nn.Module) -> int:
    """The raw id that stands before a sequence: the tokenizer's (or model's) pad, else end-of-text, else 0."""
    for source in (tokenizer, getattr(model, "config", None)):
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(source, name, None)
            value = value[0] if isinstance(value, (list, tuple)) and value else value
            if isinstance(value, int) and value >= 0:
                return value
    return 0


def retrofit(
    model: nn.Module,
    tokenizer: Any,
    layers: list[int] | None = None,
    engram_config: EngramConfig | None = None,
    freeze_backbone: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Insert Engram modules before the chosen decoder layers of ``model``, in place; returns ``model``.

    At insertion the model's outputs are unchanged bit for bit (W_V = 0, see the module docstring).

    Args:
        model: a transformers ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM`` or
            ``GPT2LMHeadModel`` (not yet retrofitted).
        tokenizer: the model's tokenizer: a transformers tokenizer, a ``tokenizers.Tokenizer``, a
            ``tokenizer.json`` path or a ``CompressedTokenizer``. Its compression is built here.
        layers: decoder layers (0-based) that get an Engram module before them; default
            ``engram_config.layer_ids``, or layer 1 (or 0 for a one-layer model).
        engram_config: the full ``EngramConfig``; default: EngramConfig's defaults with
            ``RETROFIT_DEFAULTS``, ``pad_id`` from the tokenizer and base table sizes of 5x the
            model's vocabulary per order.
        freeze_backbone: ``True``: every backbone parameter gets ``requires_grad=False``, so only
            Engram trains; ``False``: everything stays trainable.
        **overrides: ``EngramConfig`` fields to change (``n_embed_per_ngram=64``, ...); not with
            ``engram_config``.

    Raises:
        TypeError: an unsupported model.
        ValueError: a retrofitted model, bad layers, a tokenizer larger than the model's
            vocabulary, or an ``EngramConfig`` retrofit cannot use.
    """
    backbone, decoder_layers = _family(model)
    if isinstance(getattr(model, "engram", None), EngramRetrofit):
        raise ValueError("this model is retrofitted already (model.engram): retrofit a fresh model")
    vocab_size = int(model.get_input_embeddings().weight.shape[0])
    compressor = _compressor(tokenizer, vocab_size)
    if engram_config is not None and overrides:
        raise ValueError(f"pass engram_config or EngramConfig fields {sorted(overrides)}, not both")
    if engram_config is None:
        n = overrides.get("max_ngram_size", EngramConfig.max_ngram_size)
        layers = layers if layers is not None else [min(1, len(decoder_layers) - 1)]
        settings = {
            **RETROFIT_DEFAULTS,
            "layer_ids": list(layers),
            "pad_id": _default_pad_id(tokenizer, model),
            "engram_vocab_size": [5 * vocab_size] * (n - 1),
            **overrides,
        }
        engram_config = EngramConfig(**settings)
    elif layers is not None and list(layers) != list(engram_config.layer_ids):
        raise ValueError(f"layers {layers} differ from engram_config.layer_ids {engram_config.layer_ids}")
    bad = [i for i in engram_config.layer_ids if not 0 <= i < len(decoder_layers)]
    if bad or not engram_config.layer_ids:
        raise ValueError(
            f"layers {engram_config.layer_ids}: each must be a decoder layer in [0, {len(decoder_layers)})"
        )
    if engram_config.variant != "engram":
        raise ValueError("retrofit inserts the full Engram layer: engram_config.variant must be 'engram'")

    hidden_size = int(model.config.hidden_size)
    memory = EngramRetrofit(engram_config, compressor, hidden_size)
    # Each Engram module on its decoder layer's device, in the model's dtype.
    for i, engram in memory.layers.items():
        reference = next(decoder_layers[int(i)].parameters())
        engram.to(device=reference.device, dtype=reference.dtype)
        engram.table.materialize()  # drawn now: transformers' save/load walks every tensor
    place_tables(memory, StorageConfig(), sparse_grad=True)  # plain device tables, sparse gradients for RowAdam
    if freeze_backbone:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    model.engram = memory
    memory.attach(backbone, decoder_layers)
    model.config.engram_retrofit = {
        "format": FORMAT,
        "engram_config": engram_config.to_dict(),
        "table_sizes": {str(i): engram_head_sizes(engram_config, i) for i in engram_config.layer_ids},
        "compression": describe_compression(compressor),
    }
    return model


# -- training -----------------------------------------------------------------------------------
def engram_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[DeviceTable]]:
    """(dense Engram parameters, Engram tables) of a retrofitted model."""
    memory = _memory(model)
    tables = [engram.table for engram in memory.layers.values()]
    table_ids = {id(t.weight) for t in tables}
    dense = [p for p in memory.parameters() if id(p) not in table_ids]
    return dense, tables


def _memory(model: nn.Module) -> EngramRetrofit:
    memory = getattr(model, "engram", None)
    if not isinstance(memory, EngramRetrofit):
        raise ValueError(f"{type(model).__name__} is not retrofitted with Engram: call engram.hf.retrofit first")
    return memory


class RetrofitOptimizer(torch.optim.AdamW):
    """AdamW for the dense parameters and ``RowAdam`` for the Engram tables, as one ``torch.optim`` optimizer.

    Built by ``RetrofitOptimizer.for_model``; give it to ``transformers.Trainer(optimizers=(opt, None))``.
    Its last parameter group holds no tensors but the tables' hyper-parameters (``lr``, ``betas``,
    ``eps``, ``weight_decay``); ``RowAdam`` reads that very group, so the learning-rate schedule the
    Trainer builds scales the tables' rate with the rest.

    Gradient clipping: the tables' gradients are sparse, and ``torch.nn.utils.clip_grad_norm_``
    (which the Trainer calls on ``model.parameters()``) cannot take sparse tensors. The optimizer
    therefore takes each table's gradient off the parameter as soon as backward has accumulated it
    (``register_post_accumulate_grad_hook``; gradient accumulation sums them) and hands it to
    ``RowAdam`` at ``step``. Clipping so covers the dense parameters only, as engram's own trainer
    does; the tables are not clipped (Adam normalises every row by its own second moment).
    """

    def __init__(
        self,
        dense: list[nn.Parameter],
        tables: list[DeviceTable],
        lr: float = 1e-3,
        table_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if not dense:
            raise ValueError("RetrofitOptimizer needs the dense parameters to train (Engram's projections at least)")
        super().__init__(dense, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        table_lr = 5 * lr if table_lr is None else table_lr  # the paper's 5x
        self.add_param_group({"params": [], "lr": table_lr, "weight_decay": 0.0, "betas": betas, "eps": eps})
        self.rows = RowAdam(tables, lr=table_lr, betas=betas, eps=eps)
        self.rows.param_groups = [self.param_groups[-1]]  # one group, shared with the schedule
        self._pending: dict[int, torch.Tensor] = {}
        self._tables = tables
        for table in tables:
            # The newest optimizer of a table takes its gradients: a hook left by an earlier one would starve it.
            previous = getattr(table, "_retrofit_grad_hook", None)
            if previous is not None:
                previous.remove()
            table._retrofit_grad_hook = table.weight.register_post_accumulate_grad_hook(self._take_table_grad)

    @classmethod
    def for_model(
        cls, model: nn.Module, lr: float = 1e-3, table_lr: float | None = None, **kwargs: Any
    ) -> RetrofitOptimizer:
        """The optimizer of every trainable parameter of a retrofitted ``model``.

        Trainable: Engram's dense parameters and tables, and the backbone's parameters that have
        ``requires_grad`` (none after ``retrofit(..., freeze_backbone=True)``). ``table_lr``
        defaults to 5x ``lr``; ``kwargs``: ``betas``, ``eps``, ``weight_decay`` (dense only).
        """
        engram_dense, tables = engram_parameters(model)
        table_ids = {id(t.weight) for t in tables}
        known = {id(p) for p in engram_dense}
        backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in known | table_ids]
        dense = [p for p in engram_dense if p.requires_grad] + backbone
        return cls(dense, [t for t in tables if t.weight.requires_grad], lr=lr, table_lr=table_lr, **kwargs)

    def _take_table_grad(self, parameter: torch.Tensor) -> None:
        grad, parameter.grad = parameter.grad, None
        if grad is None:
            return
        key = id(parameter)
        self._pending[key] = grad if key not in self._pending else self._pending[key] + grad

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        for table in self._tables:
            grad = self._pending.pop(id(table.weight), None)
            if grad is not None:
                table.weight.grad = grad
        self.rows.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._pending.clear()
        self.rows.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["row_state"] = self.rows.state_dict()["state"]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        rows = state_dict.pop("row_state", None)
        super().load_state_dict(state_dict)
        self.rows.param_groups = [self.param_groups[-1]]
        if rows is not None:
            self.rows.load_state_dict({"param_groups": [self.param_groups[-1]], "state": rows})
            self.rows.param_groups = [self.param_groups[-1]]


# -- loading ------------------------------------------------------------------------------------
def load_retrofitted(folder: str | Path, **kwargs: Any) -> nn.Module:
    """A retrofitted model that ``save_pretrained`` wrote to ``folder``, equal to the saved one bit for bit.

    The backbone loads through ``AutoModelForCausalLM.from_pretrained(folder, **kwargs)`` (dtype,
    device placement, sharded files: all transformers' own); the Engram modules are rebuilt from
    ``config.json``'s ``engram_retrofit`` and the saved compression table (no tokenizer needed),
    and their tensors loaded strictly. The model comes back in eval mode, every parameter trainable.

    Raises:
        OSError: ``folder`` is not a folder with weights.
        ValueError: the folder holds no retrofitted model, or its Engram tensors do not fit its config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    if not folder.is_dir():
        raise OSError(f"{folder} is not a folder: load_retrofitted reads a folder save_pretrained wrote")
    config = AutoConfig.from_pretrained(folder)
    settings = getattr(config, CONFIG_KEY, None)
    if not isinstance(settings, dict):
        raise ValueError(
            f"{folder}/config.json has no {CONFIG_KEY!r} entry: not a retrofitted model (load it with "
            "AutoModelForCausalLM.from_pretrained)"
        )
    if settings.get("format") != FORMAT:
        raise ValueError(f"{folder}: retrofit format {settings.get('format')!r}, this engram reads {FORMAT}")
    engram_config = EngramConfig.from_dict(dict(settings["engram_config"]))
    sizes = {str(i): engram_head_sizes(engram_config, i) for i in engram_config.layer_ids}
    if sizes != {str(k): list(v) for k, v in settings["table_sizes"].items()}:
        raise ValueError(
            f"{folder}: the saved table sizes {settings['table_sizes']} differ from the ones this engram derives "
            f"({sizes}): the weights were written by an engram that hashes differently"
        )
    prefix = "engram."
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        with safe_open(str(path), "pt") as f:
            tensors.update({k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})  # noqa: SIM118
    if "compression_table" not in tensors:
        raise ValueError(f"{folder}: no engram.compression_table in the weights")
    table = tensors["compression_table"].numpy()
    if table_sha256(table) != settings["compression"]["table_sha256"]:
        raise ValueError(f"{folder}: the saved compression table does not match its SHA-256 in config.json")
    compressor = CompressedTokenizer.from_table(table, settings["compression"].get("tokenizer_fingerprint"))

    # transformers reports the Engram tensors as unexpected for the backbone class: checked here instead.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, config=config, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith(prefix)]
    if info["missing_keys"] or unexpected:
        raise ValueError(f"{folder}: backbone weights missing {info['missing_keys']}, unexpected {unexpected}")
    delattr(model.config, CONFIG_KEY)  # retrofit writes it again
    retrofit(model, compressor, engram_config=engram_config)
    missing, extra = model.engram.load_state_dict(tensors, strict=False)
    if missing or extra:
        raise ValueError(f"{folder}: the Engram weights do not fit its config: missing {missing}, extra {extra}")
    return model.eval()
