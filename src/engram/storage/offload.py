"""Tables off the accelerator: rows live in CPU memory (``HostTable``) or a file (``DiskTable``).

A lookup takes the distinct rows of a batch, gathers them on the CPU (through the hot-row cache
if there is one), copies the (U, dim) block to the device of the indices and expands it there.
The block is a leaf of the autograd graph, so backward leaves the gradient of the distinct rows
only, which the sparse optimizer takes with ``take_row_grad`` and applies in the tier.

Shapes: U distinct rows of a lookup, D = dim.
"""

from __future__ import annotations

import torch

from engram.storage.base import LocalTable
from engram.storage.init import draw_seed, fill_normal_rows
from engram.storage.prefetch import FetchedRows, PendingRows
from engram.storage.row_cache import RowCache
from engram.storage.row_grad import RowGradients


class OffloadedTable(LocalTable):
    """Rows in a CPU tensor (in memory or memory-mapped), fetched to the compute device per lookup.

    The weight is deliberately neither a parameter nor a buffer: ``model.to("cuda")`` must not
    move it, and dense optimizers must not see it.

    Args:
        weight: (R, D) CPU tensor holding the rows.
        cache_bytes: size of the hot-row cache in bytes (0: none).
        prefetch: fetch rows in a background thread when the model announces a batch.
    """

    def __init__(self, weight: torch.Tensor, cache_bytes: int = 0, prefetch: bool = True):
        if weight.dim() != 2 or weight.device.type != "cpu":
            raise ValueError(f"an offloaded table needs a 2-D CPU tensor, got {tuple(weight.shape)} on {weight.device}")
        super().__init__(weight.shape[0], weight.shape[1])
        self._weight = weight
        self.cache = RowCache(cache_bytes, self.dim, weight.dtype) if cache_bytes > 0 else None
        self.prefetch_enabled = prefetch
        self._row_grads = RowGradients()

    # -- reading -----------------------------------------------------------------------------------
    def fetch(self, indices: torch.Tensor) -> FetchedRows:
        """The distinct rows of ``indices`` (any shape), gathered and moved to the indices' device."""
        rows, inverse = torch.unique(indices.reshape(-1), sorted=True, return_inverse=True)
        rows = self.check_rows(rows.cpu())
        # Rows bound for a GPU are gathered straight into page-locked memory, so the copy is asynchronous.
        staged = None
        if indices.is_cuda:
            staged = torch.empty(rows.numel(), self.dim, dtype=self.weight.dtype, pin_memory=True)
        if self.cache is None:
            values = self._read_weight(rows, out=staged)
        else:
            hit, cached = self.cache.lookup(rows)
            values = torch.empty(rows.numel(), self.dim, dtype=self.weight.dtype) if staged is None else staged
            values[hit] = cached
            missed = rows[~hit]
            from_table = self._read_weight(missed)
            values[~hit] = from_table
            self.cache.admit(missed, from_table)
        if indices.is_cuda:
            values = values.to(indices.device, non_blocking=True)
        return FetchedRows(rows, inverse.view(indices.shape), values)

    def prefetch(self, indices: torch.Tensor) -> PendingRows | None:
        return PendingRows(indices, self.fetch, queue=self) if self.prefetch_enabled else None

    def lookup(self, indices: torch.Tensor, prefetched: PendingRows | None = None) -> torch.Tensor:
        fetched = prefetched.result(indices) if prefetched is not None else self.fetch(indices)
        return self._row_grads.expand(fetched, track=self.training and torch.is_grad_enabled())

    @property
    def weight(self) -> torch.Tensor:
        """The (R, D) CPU tensor holding the rows (for a disk table: mapped from its file; rows in the write-back
        buffer reach it at a ``flush``)."""
        return self._weight

    @property
    def dtype(self) -> torch.dtype:
        return self._weight.dtype

    @property
    def home_device(self) -> torch.device:
        return torch.device("cpu")

    @torch.no_grad()
    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        return self._read_weight(rows)

    def _read_weight(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows (U,) of the weight, (U, D), from where the tier keeps them (into ``out`` if given)."""
        if out is None:
            return self.weight.index_select(0, rows)
        return torch.index_select(self.weight, 0, rows, out=out)

    def _write_weight(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        self.weight.index_copy_(0, rows, values)

    # -- writing -----------------------------------------------------------------------------------
    @torch.no_grad()
    def scatter(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        values = values.to(device="cpu", dtype=self.weight.dtype)
        self._write_weight(rows, values)
        if self.cache is not None:
            self.cache.write_through(rows, values)

    def take_row_grad(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        total = self._row_grads.take(self.num_rows, self.dim)
        return None if total is None else (total.indices()[0].cpu(), total.values().cpu())

    def zero_row_grad(self) -> None:
        self._row_grads.zero()

    def extra_repr(self) -> str:
        cache = f", cache_rows={self.cache.num_slots}" if self.cache is not None else ""
        return f"{super().extra_repr()}, dtype={self.weight.dtype}, prefetch={self.prefetch_enabled}{cache}"


class HostTable(OffloadedTable):
    """Table rows in host memory; the model and its activations may sit on a GPU.

    Rows start exactly like a ``DeviceTable``'s of the same shape and seed, and the weight is saved
    in the model's ``state_dict`` under the same key, so the two tiers' checkpoints are the same.

    Args:
        num_rows, dim: table shape.
        init_std, seed, first_row: the initial rows, as in ``DeviceTable``.
        dtype: of the rows.
        pin_memory: page-lock the whole table. Not needed for fast copies: lookups bound for a GPU
            gather their rows into page-locked staging memory anyway, and PyTorch's pinned allocator
            rounds a block up to a power of two (a 20 GB table would lock 32 GiB). Default False.
        cache_bytes, prefetch: as in ``OffloadedTable``.
    """

    def __init__(
        self,
        num_rows: int,
        dim: int,
        init_std: float = 1.0,
        dtype: torch.dtype = torch.float32,
        pin_memory: bool = False,
        cache_bytes: int = 0,
        prefetch: bool = True,
        seed: int | None = None,
        first_row: int = 0,
    ):
        if num_rows < 1 or dim < 1:
            raise ValueError(f"a table needs num_rows >= 1 and dim >= 1, got ({num_rows}, {dim})")
        weight = torch.empty(num_rows, dim, dtype=dtype, pin_memory=bool(pin_memory))
        fill_normal_rows(weight, draw_seed() if seed is None else seed, init_std, first_row)
        super().__init__(weight, cache_bytes=cache_bytes, prefetch=prefetch)

    def _new_row_state(self, name: str, row_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(self.num_rows, *row_shape, dtype=dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        key = prefix + "weight"
        if key in state_dict:
            value = state_dict[key]
            if value.shape != self.weight.shape:
                errors.append(
                    f"size mismatch for {key}: checkpoint {tuple(value.shape)}, table {tuple(self.weight.shape)}"
                )
            else:
                with torch.no_grad():
                    self.weight.copy_(value)
                if self.cache is not None:
                    self.cache.clear()
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}  # the base class would call "weight" unexpected
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
