"""Autoregressive generation: one prefill call over the prompt, then one incremental call per token.

Every call continues a ``DecodeState`` (KV caches, the Engram convolution states and the canonical-id
history), so each new token costs one position of compute and its logits equal those of a full
forward pass over the whole sequence. Shapes: B batch, T prompt length, V model vocabulary.

With a trimmed vocabulary the model predicts model ids; they are mapped back to tokenizer ids before
being fed back (the model reads and Engram hashes tokenizer ids), and the unknown model id 0, which
stands for every id outside the kept set and has no tokenizer id, is never sampled.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch

from engram._checks import as_id_tensor
from engram.model.lm import DecodeState, EngramLM


@torch.no_grad()
def generate(
    model: EngramLM,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
) -> torch.Tensor:
    """Continue each prompt by ``max_new_tokens`` tokens.

    Args:
        model: the decoder; run in eval mode for the call (its mode is restored afterwards).
        prompt_ids: (B, T) tokenizer ids, T >= 1.
        max_new_tokens: tokens to append; T + max_new_tokens must not exceed ``max_seq_len``.
        temperature: divides the logits before sampling; 0 is greedy (argmax).
        top_k: sample among the k most likely tokens only.
        top_p: sample from the smallest set of most likely tokens whose probability reaches top_p
            (nucleus sampling), in (0, 1].
        seed: seeds a private ``torch.Generator``: the same seed gives the same tokens. ``None``
            draws from torch's global generator.
        eos_id: tokenizer id that ends a sequence: after it a sequence gets only ``eos_id``, and
            decoding stops once every sequence has ended.

    Returns:
        (B, T + max_new_tokens) tokenizer ids on the model's device: the prompts and their
        continuations (padded with ``eos_id`` after it).
    """
    prompt_ids = _check_arguments(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, eos_id)
    device = model.embed.weight.device
    prompt_ids = prompt_ids.to(device)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()  # generation is inference; in training mode the MoE layers would also count the loads
    try:
        sample = partial(_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        new = _decode(model, prompt_ids, max_new_tokens, sample, eos_id)
    finally:
        model.train(was_training)
    return torch.cat([prompt_ids, new], dim=1)


def _decode(
    model: EngramLM,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    sample: Callable[[torch.Tensor], torch.Tensor],
    eos_id: int | None,
) -> torch.Tensor:
    """The (B, max_new_tokens) new tokenizer ids; ``sample`` picks model ids (B,) from logits (B, V)."""
    batch, length = prompt_ids.shape
    if max_new_tokens == 0:
        return prompt_ids.new_empty(batch, 0)
    # The last new token is returned, never fed back: the state needs one position less.
    state = model.new_state(batch, capacity=length + max_new_tokens - 1)
    logits = _next_logits(model, prompt_ids, state)
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    tokens = []
    for step in range(max_new_tokens):
        token = model.to_tokenizer_ids(sample(logits))  # (B,)
        if eos_id is not None:
            token = token.masked_fill(finished, eos_id)
            finished |= token == eos_id
        tokens.append(token)
        # With an eos_id, one host read per token to stop early once every sequence has ended.
        if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
            break
        logits = _next_logits(model, token[:, None], state)
    new = torch.stack(tokens, dim=1)
    missing = max_new_tokens - new.shape[1]  # only after every sequence ended: pad with eos
    return torch.cat([new, new.new_full((batch, missing), eos_id)], dim=1) if missing else new


def _next_logits(model: EngramLM, input_ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
    """(B, V) logits for the position after ``input_ids`` (B, t), which continue ``state``.

    The unknown model id of a trimmed vocabulary gets -inf: it has no tokenizer id to feed back; so do
    model ids beyond the ids the model reads (a vocabulary padded beyond the Engram tokenizer's), so
    every sampled token can be fed back unchecked.
    """
    # The prompt was checked once by generate, the tokens after it are sampled: nothing to check per token.
    logits = model(input_ids, state=state, check_ids=False).logits[:, -1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # sample in at least float32
    if model.config.input_vocab_size is not None:
        logits[:, 0] = -math.inf
    elif model.num_input_ids < logits.shape[-1]:
        logits[:, model.num_input_ids :] = -math.inf
    return logits


def _sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """(B, V) logits -> (B,) model ids: argmax at temperature 0, else a draw after top-k and top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1:
        logits = _nucleus(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p`` (at least one)."""
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
    ordered = ordered.masked_fill(before >= top_p, -math.inf)
    return torch.full_like(logits, -math.inf).scatter(-1, order, ordered)


def _check_arguments(
    model: EngramLM,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
) -> torch.Tensor:
    """Validate ``generate``'s arguments; return the prompt as int64."""
    prompt_ids = as_id_tensor(prompt_ids, "prompt_ids", ndim=2)
    config = model.config
    n_ids = config.input_vocab_size or config.vocab_size
    if prompt_ids.shape[0] < 1 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must hold at least one token per sequence, got shape {tuple(prompt_ids.shape)}")
    model.check_input_ids(prompt_ids, "prompt_ids")
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if prompt_ids.shape[1] + max_new_tokens > config.max_seq_len:
        raise ValueError(
            f"the prompt ({prompt_ids.shape[1]} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
            f"max_seq_len={config.max_seq_len}"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if eos_id is not None and (not _is_int(eos_id) or not 0 <= eos_id < n_ids):
        raise ValueError(f"eos_id must be None or a tokenizer id in [0, {n_ids}), got {eos_id!r}")
    if config.input_vocab_size is not None:
        if config.vocab_size < 2:
            raise ValueError("a trimmed vocabulary of the unknown id alone has nothing to generate")
        if bool((model.output_ids[1:] < 0).any()):
            raise ValueError("the model's vocabulary is trimmed but not set: call model.set_vocabulary(kept_ids) first")
    return prompt_ids


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
