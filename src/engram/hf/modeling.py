"""``EngramForCausalLM``: an ``EngramLM`` behind transformers' ``PreTrainedModel`` and ``GenerationMixin``.

The wrapper holds the reference decoder as its submodule ``lm`` (no copy of its code or weights) and
maps transformers' calling convention onto it:

- ``labels`` (the input ids, -100 where there is no target) are shifted into ``EngramLM``'s next-token
  ``targets``, so the loss is ``EngramLM``'s own, plus its MoE balance loss as engram's ``Trainer``
  adds it (``config.include_aux_loss``);
- the decoding cache is ``EngramCache``, a thin holder of ``EngramLM``'s ``DecodeState`` (KV caches, Engram
  convolution states, canonical-id history for incremental hashing). It is not a transformers ``Cache``:
  the model tells ``generate`` that it supplies its own cache (``_supports_default_dynamic_cache`` is
  False, as transformers' stateful models do), the forward pass creates it on the first call with
  ``use_cache=True`` and ``prepare_inputs_for_generation`` feeds only the ids it has not seen. Beam
  search reorders it along the batch (``EngramCache.reorder_cache``);
- ``save_pretrained`` is transformers' own (safetensors, sharded above ``max_shard_size``); the weights
  include the compression lookup table (buffer ``compression_table``), so loading needs no tokenizer.
  Tables stay in their tier (``engram.hf.tables``): device and host rows in the safetensors, disk
  tables as engram table folders in ``tables/``. ``from_pretrained`` is ours: it builds the model
  plainly, puts the tables in the tier asked for (``storage=``; default the saved one, disk tables
  opened read-only in place), loads every other tensor strictly and rebuilds the indexer from the
  saved table (transformers' loader builds models on the ``meta`` device, which would leave the lazily
  drawn ``DeviceTable`` rows and the float64 rotary tables to a re-initialisation).

With a trimmed vocabulary (``input_vocab_size``, what ``engram train`` builds) the logits are spread
over the tokenizer's ids (``_tokenizer_logits``), so that ``generate`` feeds back tokenizer ids.

Not yet: batches with padding (``attention_mask`` with zeros; exact results would need the mask in
``EngramLM``'s attention, Engram hashing and short convolution, so padding is refused rather than
approximated), tables sharded over several processes, loading from the Hub.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from engram.hf.config import EngramHFConfig, table_sha256
from engram.hf.tables import (
    TABLES_FOLDER,
    copy_saved_table,
    describe_storage,
    open_saved_table,
    read_all_rows,
    same_folder,
    table_key,
    tier_of,
    write_disk_tables,
)
from engram.indexing.compression import CompressedTokenizer
from engram.indexing.indexer import EngramIndexer
from engram.model.lm import DecodeState, EngramLM
from engram.storage.config import StorageConfig
from engram.storage.placement import place_tables

# transformers 5.2x calls the cache ``cache`` (``past_key_values`` before): use the installed version's name.
CACHE_ARG = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# from_pretrained arguments that AutoModelForCausalLM passes on and that mean nothing for a local folder (any other
# argument is refused unless it is None, such as the `adapter_kwargs=None` it also passes).
_IGNORED_LOAD_ARGS = {
    "cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token",
    "trust_remote_code", "code_revision", "use_safetensors", "_from_auto", "_from_pipeline", "_commit_hash",
}  # fmt: skip


class EngramCache:
    """``EngramLM``'s decoding state as ``generate``'s cache object (advanced in place by every forward)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, state: DecodeState):
        self.state = state

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.state.blocks)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions seen so far."""
        return self.state.position

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Make row b of every state tensor row ``beam_idx[b]``'s (beam search's hook; ``beam_idx`` (B,)).

        The keys and values of every block, the Engram convolution states and the canonical-id history
        (what incremental hashing continues from) all have the batch first, so each is re-indexed
        along it; the batch size stays B.
        """
        state = self.state
        for block in state.blocks:
            kv = block.kv
            if kv.keys is not None:
                index = beam_idx.to(kv.keys.device)
                kv.keys, kv.values = kv.keys.index_select(0, index), kv.values.index_select(0, index)
            if block.conv is not None:
                block.conv = block.conv.index_select(0, beam_idx.to(block.conv.device))
        if state.history is not None:
            state.history = state.history.index_select(0, beam_idx.to(state.history.device))


class EngramForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM for transformers around an ``EngramLM`` (``self.lm``).

    Args:
        config: an ``EngramHFConfig``.
        indexer: the ``EngramIndexer`` of a model with Engram layers; without it (``from_pretrained``)
            the indexer is rebuilt from the ``compression_table`` buffer on first use.
        lm: an existing ``EngramLM`` of ``config.model_config`` to wrap as it is (``from_engram``).
    """

    config_class = EngramHFConfig
    base_model_prefix = "lm"
    main_input_name = "input_ids"
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm.head.weight": "lm.embed.weight"}  # if tie_word_embeddings
    _supports_cache_class = False

    def __init__(self, config: EngramHFConfig, indexer: EngramIndexer | None = None, lm: EngramLM | None = None):
        super().__init__(config)
        model_config = config.model_config
        if lm is None:
            lm = EngramLM(model_config, indexer=indexer)
        elif lm.config != model_config:
            raise ValueError("lm was built from a different ModelConfig than config.model_config")
        tier_of(lm)  # tables of one process, all in one tier (a ShardedTable is refused)
        self.lm = lm
        if config.compression is not None:
            raw = int(config.compression["raw_vocab_size"])
            self.register_buffer("compression_table", torch.zeros(raw, dtype=torch.long))
            if lm.indexer is not None:
                table = lm.indexer.compressor.lookup_table
                if table_sha256(table) != config.compression["table_sha256"]:
                    raise ValueError("the indexer's compression table is not the one config.compression describes")
                self.compression_table.copy_(torch.from_numpy(table))
        self.post_init()

    @classmethod
    def from_engram(cls, lm: EngramLM) -> EngramForCausalLM:
        """Wrap an existing ``EngramLM`` (its modules and weights are shared, not copied)."""
        if lm.engram_layers() and lm.indexer is None:
            raise ValueError("the EngramLM has Engram layers but no indexer: build it with indexer=...")
        compressor = lm.indexer.compressor if lm.engram_layers() else None
        config = EngramHFConfig.from_engram(lm.config, compressor)
        config.engram_storage = describe_storage(lm)
        return cls(config, lm=lm)

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: ``EngramLM`` initialises its own weights (and tables, from their seeds)."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model brings its own cache (EngramCache), as transformers' stateful models do

    # -- the indexer ----------------------------------------------------------------------------
    def indexer(self) -> EngramIndexer | None:
        """The model's indexer; rebuilt from the saved compression table if the model has none yet."""
        if self.lm.indexer is None and self.lm.engram_layers():
            table = self.compression_table.cpu().numpy()
            if table_sha256(table) != self.config.compression["table_sha256"]:
                raise ValueError(
                    "the compression_table buffer does not match config.compression (its SHA-256 differs): load "
                    "the model with EngramForCausalLM.from_pretrained, or build it with indexer=... or from_engram"
                )
            compressor = CompressedTokenizer.from_table(table, self.config.compression.get("tokenizer_fingerprint"))
            self.lm.indexer = EngramIndexer(self.lm.config.engram, compressor)
        return self.lm.indexer

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise unless ``tokenizer`` compresses exactly as the model's saved table (so its ids fit the model).

        ``tokenizer``: a ``CompressedTokenizer`` or anything it accepts (a ``tokenizer.json`` path, such
        as the one ``engram export-hf`` writes next to the weights, or a tokenizer object).
        """
        if self.config.compression is None:
            return  # no Engram layers: nothing is hashed
        compressor = tokenizer if isinstance(tokenizer, CompressedTokenizer) else CompressedTokenizer(tokenizer)
        if table_sha256(compressor.lookup_table) != self.config.compression["table_sha256"]:
            raise ValueError(
                f"this tokenizer ({compressor.raw_vocab_size} raw ids, {len(compressor)} canonical) does not "
                f"compress as the model's ({self.config.compression['raw_vocab_size']} raw, "
                f"{self.config.compression['num_canonical']} canonical): not the tokenizer the model was built with"
            )

    def save_tokenizer(self, tokenizer: Any, save_directory: str | Path) -> None:
        """Write ``tokenizer`` as a transformers tokenizer into ``save_directory`` (``tokenizer.json`` and
        ``tokenizer_config.json``), so that ``AutoTokenizer`` and ``pipeline("text-generation")`` load it.

        ``tokenizer``: a ``tokenizers.Tokenizer`` (wrapped in ``PreTrainedTokenizerFast``) or a
        transformers tokenizer. It is checked first (``check_tokenizer``): a tokenizer that does not
        compress as the model's saved table would feed the model ids it was not built for.
        """
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        self.check_tokenizer(tokenizer)
        if isinstance(tokenizer, Tokenizer):
            tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
        tokenizer.save_pretrained(str(save_directory))

    # -- embeddings (the PreTrainedModel interface) ----------------------------------------------
    def get_input_embeddings(self) -> torch.nn.Module:
        return self.lm.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm.head

    # -- forward --------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> MoeCausalLMOutputWithPast:
        """Logits over tokenizer ids (and loss) for ``input_ids`` (B, T): tokenizer ids, as ``EngramLM`` reads them.

        Args:
            attention_mask: all ones, or omitted (padding is not supported yet).
            labels: (B, T) ids, -100 where there is no target; shifted inside (position t predicts
                ``labels[:, t+1]``), the loss is ``EngramLM``'s mean cross-entropy (over model ids with
                a trimmed vocabulary, where a label outside the kept ids is the unknown id 0), plus
                the MoE balance loss (``aux_loss``) with ``config.include_aux_loss`` (default), as
                engram's ``Trainer`` adds it. The loss-free balancing bias updates are the Trainer's
                (after each optimizer step), not the model's.
            cache (or ``past_key_values``): an ``EngramCache`` that ``input_ids`` continue; with
                ``use_cache=True`` and no cache a new one is started. Decoding is for inference.
            use_cache: return the cache (default False outside ``generate``).
            output_hidden_states: ``EngramLM``'s embedding output and every block's output.
            read_ahead: the next batch's ids (B', T'), if known: disk tables read its rows' file pages
                into the page cache while this batch computes (``EngramLM.forward``); no result changes.
        """
        read_ahead = kwargs.pop("read_ahead", None)
        cache = kwargs.pop("cache", None)
        past = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else past
        kwargs.pop("position_ids", None)  # positions follow from the cache
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("EngramForCausalLM reads input_ids (Engram hashes ids): inputs_embeds are not supported")
        if kwargs.get("output_attentions"):
            raise ValueError("EngramForCausalLM does not return attention weights (output_attentions)")
        if cache is not None and not isinstance(cache, EngramCache):
            raise TypeError(f"the cache of an EngramForCausalLM is an EngramCache, got {type(cache).__name__}")
        if attention_mask is not None and cache is None and not bool(attention_mask.all()):
            raise ValueError("EngramForCausalLM does not support padding yet: attention_mask must be all ones")
        if use_cache and cache is None:
            cache = EngramCache(self.lm.new_state(input_ids.shape[0]))
        if cache is not None and labels is not None:
            raise ValueError("labels with a cache: decoding is for inference, compute the loss without a cache")
        targets = None
        if labels is not None:
            targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
        self.indexer()
        out = self.lm(
            input_ids,
            targets=targets,
            state=None if cache is None else cache.state,
            output_hidden_states=bool(output_hidden_states),
            read_ahead=read_ahead,
        )
        logits = self._tokenizer_logits(out.logits)
        loss = out.loss
        if loss is not None and out.aux_loss is not None and self.config.include_aux_loss:
            loss = loss + out.aux_loss  # the composition of engram's Trainer
        fields = {"loss": loss, "aux_loss": out.aux_loss, "logits": logits, "hidden_states": out.hidden_states}
        return MoeCausalLMOutputWithPast(**fields, **{CACHE_ARG: cache})

    def _tokenizer_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over tokenizer ids, which ``generate`` feeds back and ``EngramLM`` reads.

        Without a trimmed vocabulary these are ``EngramLM``'s logits. With one (``input_vocab_size``)
        each kept model id's logit goes to its tokenizer id, every other tokenizer id gets -inf, and
        the unknown model id 0, which has no tokenizer id, is dropped (``engram.inference.generate``
        never samples it either).
        """
        config = self.lm.config
        if config.input_vocab_size is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], config.input_vocab_size), -math.inf)
        full[..., self.lm.output_ids[1:]] = logits[..., 1:]
        return full

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        next_sequence_length: int | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The ids the cache has not seen (all of them without a cache), the cache and ``use_cache``."""
        cache = kwargs.pop("cache", None)
        past = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else past
        if cache is not None:
            input_ids = input_ids[:, cache.get_seq_length() :]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache, CACHE_ARG: cache}
        if kwargs.get("output_hidden_states") is not None:
            inputs["output_hidden_states"] = kwargs["output_hidden_states"]
        return inputs

    # -- saving and loading ---------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """transformers' ``save_pretrained``, with the tables kept in their tier (``engram.hf.tables``).

        ``config.json`` records the tables' tier (``engram_storage``). Device and host tables go into
        the safetensors; disk tables are copied, rows checked, into ``tables/layer_<i>/`` of the
        folder (atomically, before the config that names them is written), not into the safetensors.
        Arguments are transformers' (``max_shard_size``, ``safe_serialization``, ...).
        """
        folder = Path(save_directory)
        self.config.engram_storage = describe_storage(self.lm)
        if self.config.saved_storage.tier == "disk":
            folder.mkdir(parents=True, exist_ok=True)
            write_disk_tables(self.lm, folder)
        super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *model_args: Any,
        config: EngramHFConfig | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        storage: StorageConfig | None = None,
        **kwargs: Any,
    ) -> EngramForCausalLM:
        """The model ``save_pretrained`` wrote to a local folder, in eval mode; its logits equal the saved model's.

        Args:
            pretrained_model_name_or_path: the folder (``config.json`` and ``model.safetensors``, or
                ``model.safetensors.index.json`` and its shards; ``tables/`` for disk tables). The Hub
                is not supported yet.
            config: an ``EngramHFConfig`` to use instead of the folder's ``config.json``.
            dtype: cast the floating-point weights (default: as saved, so the logits are the saved
                model's bit for bit; host and disk tables keep their ``storage.dtype``); ``torch_dtype``
                is the old name.
            device: where to put the model (default: CPU). Host and disk tables stay in their tier.
            storage: where the Engram tables go (default: the tier they were saved from, with its
                options). Disk tier: without ``storage.directory`` the saved tables are opened in the
                folder, memory-mapped and read-only (for inference: no row is read until looked up,
                nothing can change the saved model); with one they are copied there (each row checked)
                and opened for training. Any tier loads from any other.

        Raises:
            OSError: not a folder, or no weights (or a saved disk table) in it.
            ValueError: the weights do not fit the config (missing or unexpected tensors, a table of
                another shape), a damaged table, or a ``storage.directory`` that already holds one.
        """
        dtype = kwargs.pop("torch_dtype", None) if dtype is None else dtype
        unknown = sorted(k for k, v in kwargs.items() if k not in _IGNORED_LOAD_ARGS and v is not None)
        if model_args or unknown:
            raise TypeError(f"EngramForCausalLM.from_pretrained does not take {list(model_args) + unknown}")
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            raise OSError(
                f"{folder} is not a folder: EngramForCausalLM.from_pretrained loads a folder save_pretrained wrote "
                "(loading from the Hugging Face Hub is not supported yet)"
            )
        config = cls.config_class.from_pretrained(folder) if config is None else config
        saved = config.saved_storage
        target = saved if storage is None else storage
        state = _read_weights(folder)
        model = cls(config)  # plain device tables, rows not drawn
        saved_dtype = state["lm.embed.weight"].dtype if "lm.embed.weight" in state else model.dtype
        if model.dtype != saved_dtype:  # as the saved model was: built in the default dtype, then cast
            model = model.to(saved_dtype)
        layers = model.lm.engram_layers()
        if saved.tier == "disk":
            saved_tables = folder / TABLES_FOLDER
            if target.tier == "disk" and (target.directory is None or same_folder(target.directory, saved_tables)):
                # opened where they are, read-only; disk tables take no state-dict key, so loading skips them
                target = dataclasses.replace(target, directory=str(saved_tables))
                for i, layer in layers.items():
                    layer.table = open_saved_table(folder, i, layer.table, target)
                model.lm.placement = target
            else:
                for i, layer in layers.items():
                    source = open_saved_table(folder, i, layer.table, saved)
                    try:
                        if target.tier == "disk":  # a writable copy in the new folder, for training
                            layer.table = copy_saved_table(source, target.layer_directory(i), target)
                        else:  # into the device or host tier: the rows are read into memory, checked
                            state[table_key(i)] = read_all_rows(source)
                    finally:
                        source.close()
                if target.tier == "disk":
                    model.lm.placement = target
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = sorted(set(missing) - set(model.all_tied_weights_keys))
        if missing or unexpected:
            raise ValueError(f"the weights in {folder} do not fit its config: missing {missing}, extra {unexpected}")
        if layers and tier_of(model.lm) == "device" and target.tier != "device":
            place_tables(model.lm, target)  # rows loaded into the plain tables, copied into the tier
        model.config.engram_storage = describe_storage(model.lm)
        model.tie_weights()
        model.indexer()
        if dtype not in (None, "auto"):
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            if dtype != model.dtype:
                model = model.to(dtype)
        if device is not None:
            model = model.to(device)
        return model.eval()


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files ``save_pretrained`` wrote to ``folder``: ``model.safetensors`` or the indexed shards.

    Raises:
        OSError: the folder has neither.
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise OSError(f"no model.safetensors (or model.safetensors.index.json) in {folder}")


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors file, or of the shards its index names."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        state.update(load_file(str(path)))
    return state
