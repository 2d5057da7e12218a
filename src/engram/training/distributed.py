"""Training on several processes with ``torch.distributed``: the process group, DDP and the reductions.

A run launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) joins the process group,
builds the model and then shards every Engram table over the ranks with
``engram.storage.place_tables(model, storage, process_group)`` (``training.run.build_model``). Dense
parameters are replicated and averaged by DDP; the tables' rows and row gradients travel through
``ShardedTable``'s all-to-all exchanges. The same script therefore runs on one process or many:

    python -m engram train ...                                    # one process
    torchrun --nproc-per-node 4 -m engram train ...               # four, one machine
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m engram train ...            # two machines

Every collective waits at most ``timeout_s``: a rank that died or hangs makes the others fail with
an error instead of waiting forever (``torchrun`` then stops the rest of the job).
"""

from __future__ import annotations

import datetime
import inspect
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from engram.model.lm import EngramLM


def launched_distributed() -> bool:
    """True when a launcher (``torchrun``) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(timeout_s: float) -> bool:
    """Join the process group ``torchrun`` describes in the environment; False for a single process.

    The backend is NCCL when CUDA is available (each process on GPU ``LOCAL_RANK``), gloo otherwise.
    """
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if not launched_distributed():
        return False
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


# What gloo's TCP transport says when a peer is silent or gone (it raises a plain RuntimeError);
# NCCL and the rendezvous store raise ``torch.distributed.DistError`` subclasses instead. After one
# operation times out gloo closes the pair, and every other operation on it (another gradient bucket
# of the same backward pass) fails with "Application timeout caused pair closure".
_GLOO_TIMED_OUT = ("Timed out waiting", "Application timeout caused pair closure")
_GLOO_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def peer_failure(error: BaseException) -> str | None:
    """What a failed collective says about the other ranks, or None if ``error`` is not one.

    Returns "timed out" when a peer did not answer within the process group's timeout, "gone" when
    its connection closed (it died), "failed" for any other error of the distributed backend, and
    None for everything else (an out-of-memory error, a shape bug), which must surface unchanged.
    """
    message = str(error)
    backend_error = isinstance(error, dist.DistError)
    if any(phrase in message for phrase in _GLOO_PEER_GONE):
        return "gone"
    if any(phrase in message for phrase in _GLOO_TIMED_OUT) or (backend_error and "timeout" in message.lower()):
        return "timed out"
    return "failed" if backend_error else None


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank (nothing on a single process)."""
    if world_size() > 1:
        dist.barrier()


def sum_over_ranks(values: torch.Tensor) -> list[float]:
    """The element-wise sum of the 1-D ``values`` over the ranks, read to the host in one transfer.

    One small all-reduce carries everything the ranks must agree on after a step (the loss, whether
    every value was finite, whether a stop was asked for), so they all take the same decision.
    """
    values = values.detach().to(torch.float64)
    if world_size() > 1:
        values = values.to(_collective_device())
        dist.all_reduce(values)
    return values.tolist()


def sum_over_ranks_(tensor: torch.Tensor) -> torch.Tensor:
    """Replace ``tensor`` by its sum over the ranks, in place; returns it."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def _collective_device() -> torch.device:
    """Where tensors for the process group's collectives live (NCCL reduces GPU tensors only)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_ranks_agree(ok: bool) -> bool:
    """True when ``ok`` holds on every rank (``ok`` itself on a single process)."""
    if world_size() == 1:
        return ok
    flag = torch.tensor([int(ok)], device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def gather_bytes(payload: bytes) -> list[bytes]:
    """Every rank's ``payload``, in rank order (``[payload]`` on a single process). Plain bytes, no pickle."""
    if world_size() == 1:
        return [payload]
    device = _collective_device()
    length = torch.tensor([len(payload)], device=device)
    lengths = [torch.empty_like(length) for _ in range(world_size())]
    dist.all_gather(lengths, length)
    longest = max(int(n) for n in lengths)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    gathered = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(gathered, padded)
    return [bytes(t[: int(n)].cpu().numpy()) for t, n in zip(gathered, lengths, strict=True)]


def wrap_dense_ddp(model: EngramLM) -> nn.Module:
    """``model`` in DDP for its dense parameters; the Engram tables are left to their own exchange.

    Table parameters and buffers are excluded from DDP (each rank holds a different shard, so they
    must be neither broadcast nor averaged). Buffers are not broadcast at each forward: the MoE
    selection bias is kept equal on every rank by ``sum_over_ranks_`` of the expert loads, and the
    loads themselves are per rank until then. Routed experts that receive no token in a batch have
    no gradient, so MoE models need DDP's search for unused parameters.
    """
    table_ids = {id(table) for table in model.engram_tables()}
    tables = [name for name, module in model.named_modules() if id(module) in table_ids]
    ignored = [
        name
        for name, _ in [*model.named_parameters(), *model.named_buffers()]
        if any(name.startswith(prefix + ".") for prefix in tables)
    ]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device = next(model.parameters()).device
    # torch >= 2.13 names the per-forward buffer broadcast ``forward_sync_buffers``
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(
        model,
        device_ids=[device] if device.type == "cuda" else None,
        find_unused_parameters=bool(model.moe_layers()),
        **no_buffer_sync,
    )
