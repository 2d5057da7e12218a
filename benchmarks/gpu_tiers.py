"""GPU step time of the host tier against the device tier, with tens of GB of Engram tables.

The paper's setting: the tables stay in host memory and each batch's rows are copied to the GPU,
fetched in a background thread (``prefetch``) while the layers in front of each Engram layer
compute. This script measures that against the same model with its tables in GPU memory, on one
CUDA device:

0. A correctness check on a small model in float32 (no autocast): host-tier and device-tier logits,
   then one training step (RowAdam) and the updated table rows and Adam state; max abs differences
   are reported (0 expected for the logits; the rows may differ in the last bits where the two tiers
   sum repeated rows' gradients in another order).
1. The big model: ``--d-model`` 1024, ``--layers`` 8, 8 heads, dense SwiGLU FFN 4096, Engram at
   layers 1 and 5 (N=3, K=8, rows of 64 floats), with ``--table-gb`` GB of float32 table rows in all
   (default 40). The device model is built on the GPU; the host model gets its weights
   (``load_state_dict`` copies the rows GPU -> host), so both compute the same thing. The host
   model's own random init of its tables is skipped (it would be overwritten at once).
2. Inference forward (``eval``, ``no_grad``, bf16 autocast as the trainer uses on CUDA) and training
   step (``Trainer.train_step``: bf16 autocast, backward, AdamW, the tables' row optimizer), each
   for ``device``, ``host prefetch on``, ``host prefetch off``. Timed calls alternate configuration
   by configuration, the order flipping every round; ``torch.cuda.synchronize()`` before and after
   each timed step, ``time.perf_counter``; medians after ``--warmup`` untimed rounds. Every
   configuration reads the same batches (Shakespeare's sonnets, the 1,024-id BPE of tests/corpus.py;
   the model hashes them with its ``EngramIndexer`` on the GPU).
3. A few extra steps per configuration with timers around the table code (host side): the fetch in
   the prefetch thread and the main thread's wait for it.

Training uses row-wise Adagrad for the tables by default (``--table-optimizer``): Adam's two moments
would triple the tables (120 GB at the default size), more than host memory holds.

Memory: the device model holds the tables on the GPU (40 GB by default); the host model holds them
in ordinary host memory and gathers each lookup's rows into page-locked staging memory
(``--pin yes`` page-locks the whole tables too: torch's pinned-memory allocator rounds every
allocation up to a power of two, so a 20 GB table pins 32 GiB; the script prints the estimate and
refuses to start when the machine lacks it).

Run from the repository root::

    python benchmarks/gpu_tiers.py                       # default: 40 GB of tables, JSON on stdout
    python benchmarks/gpu_tiers.py --out gpu_tiers.json  # JSON to a file (rewritten after every phase)
    python benchmarks/gpu_tiers.py --device cpu --small  # dry run on CPU with a small model

Progress lines (with timestamps) and the human-readable tables go to stderr; JSON to ``--out`` or
stdout. Sized to finish within 10 minutes on one H200 (141 GB) with 16 cores and 128 GiB of RAM:
most of the time is building the tables; the timed steps take about a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

import engram
from engram import CompressedTokenizer, EngramConfig, EngramIndexer
from engram.data.batches import RandomWindows
from engram.model import EngramLM, ModelConfig
from engram.storage import OffloadedTable, PendingRows, StorageConfig, place_tables
from engram.training import RowAdam, TrainConfig, Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root, for tests.corpus
from tests.corpus import sonnets_tokenizer, sonnets_tokens

GB = 10**9
GIB = 2**30
_START = time.perf_counter()


def log(text: str) -> None:
    """A progress line on stderr: wall clock, seconds since start, text."""
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - _START:6.1f}s] {text}", file=sys.stderr, flush=True)


# -- configuration ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run (with --small)")
    parser.add_argument("--small", action="store_true", help="a small model and table (dry run; any device)")
    parser.add_argument("--table-gb", type=float, default=None, help="float32 table GB in all (default 40; small 0.05)")
    parser.add_argument("--d-model", type=int, default=None, help="hidden size (default 1024; small 128)")
    parser.add_argument("--layers", type=int, default=None, help="blocks (default 8; small 4)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default 8; small 4)")
    parser.add_argument("--engram-layers", default=None, help="comma-separated block ids (default 1,5; small 1,3)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 16; small 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 1024; small 128)")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds per workload (default 30; small 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 5; small 1)")
    parser.add_argument("--breakdown", type=int, default=3, help="extra steps per configuration with timers")
    parser.add_argument("--table-optimizer", choices=["adagrad", "adam"], default="adagrad", help="(default adagrad)")
    parser.add_argument("--pin", choices=["auto", "yes", "no"], default="auto", help="page-lock the host tables")
    parser.add_argument("--workloads", default="inference,training", help="comma-separated (default both)")
    parser.add_argument("--skip-check", action="store_true", help="skip the small correctness check")
    parser.add_argument("--out", default=None, help="write the JSON results here (default: stdout)")
    args = parser.parse_args(argv)
    defaults = (
        dict(
            table_gb=0.05, d_model=128, layers=4, heads=4, engram_layers="1,3", batch=4, seq_len=128, steps=3, warmup=1
        )
        if args.small
        else dict(
            table_gb=40.0,
            d_model=1024,
            layers=8,
            heads=8,
            engram_layers="1,5",
            batch=16,
            seq_len=1024,
            steps=30,
            warmup=5,
        )
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        args.engram_layers = [int(x) for x in str(args.engram_layers).split(",") if x.strip()]
    except ValueError:
        parser.error(f"--engram-layers must be comma-separated integers, got {args.engram_layers!r}")
    if not args.engram_layers or any(not 0 <= i < args.layers for i in args.engram_layers):
        parser.error(f"--engram-layers must name blocks in [0, {args.layers})")
    for name in ("d_model", "layers", "heads", "batch", "seq_len", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.breakdown < 0:
        parser.error("--warmup and --breakdown must be >= 0")
    if not args.table_gb > 0:
        parser.error("--table-gb must be > 0")
    try:
        model_config(args)
    except ValueError as e:
        parser.error(f"these sizes make no model: {e}")
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not args.workloads or set(args.workloads) - {"inference", "training"}:
        parser.error("--workloads takes 'inference', 'training' or both")
    return args


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The backbone and Engram layers, with base table sizes giving about ``--table-gb`` GB of float32 rows."""
    n_embed, k, n = (64, 4, 3) if args.small else (512, 8, 3)
    head_dim = n_embed // k
    heads = (n - 1) * k * len(args.engram_layers)
    base = max(1, round(args.table_gb * GB / (head_dim * 4) / heads))
    engram_config = EngramConfig(
        layer_ids=args.engram_layers,
        max_ngram_size=n,
        n_head_per_ngram=k,
        n_embed_per_ngram=n_embed,
        engram_vocab_size=[base] * (n - 1),
        pad_id=sonnets_tokenizer().token_to_id("<pad>"),
        table_init_std=0.02,
    )
    return ModelConfig(
        vocab_size=1024,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        ffn_hidden=4 * args.d_model,
        max_seq_len=args.seq_len,
        engram=engram_config,
    )


def table_bytes(config: ModelConfig) -> list[int]:
    """Float32 bytes of each Engram layer's table."""
    from engram.memory import Engram

    out = []
    for layer in config.engram.layer_ids:
        rows, dim = Engram.table_shape(config.engram, layer)
        out.append(rows * dim * 4)
    return out


def pinned_bytes(nbytes: int) -> int:
    """What torch's caching pinned-memory allocator takes for ``nbytes``: the next power of two."""
    return 1 << max(0, nbytes - 1).bit_length()


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def resolve_device(args: argparse.Namespace) -> torch.device:
    """The device, or a clear exit when CUDA was asked for and is missing."""
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "gpu_tiers.py: no CUDA device (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}, built with CUDA {torch.version.cuda}). This benchmark needs a GPU; "
            "for a dry run on CPU: python benchmarks/gpu_tiers.py --device cpu --small"
        )
    return torch.device(args.device)


def pin_setting(args: argparse.Namespace) -> bool | None:
    return {"auto": False, "yes": True, "no": False}[args.pin]


# -- building ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def skip_large_cpu_init(min_elements: int = 1 << 24) -> Iterator[None]:
    """Make ``torch.nn.init.normal_`` a no-op for large CPU tensors (host tables about to be overwritten)."""
    original = torch.nn.init.normal_

    def normal_(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if tensor.device.type == "cpu" and tensor.numel() >= min_elements:
            return tensor
        return original(tensor, *args, **kwargs)

    torch.nn.init.normal_ = normal_
    try:
        yield
    finally:
        torch.nn.init.normal_ = original


def build_pair(
    config: ModelConfig, indexer: EngramIndexer, device: torch.device, pin: bool | None, notes: list[str]
) -> tuple[EngramLM, EngramLM, dict[str, float]]:
    """(device model, host model with the device model's weights, seconds per phase); problems go to ``notes``."""
    seconds = {}
    start = time.perf_counter()
    seed_everything(0)
    with torch.device(device):  # the device table is drawn where it lives: no host copy of it
        device_model = EngramLM(config, indexer=indexer)
        for table in device_model.engram_tables():
            table.materialize()  # drawn now (rows are drawn on first use), so that it is timed here
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds["device model"] = time.perf_counter() - start
    log(f"device model built in {seconds['device model']:.1f} s")

    start = time.perf_counter()
    seed_everything(0)
    try:
        with skip_large_cpu_init():
            host_model = place_tables(EngramLM(config, indexer=indexer), StorageConfig(tier="host", pin_memory=pin))
    except RuntimeError as e:  # page-locking tens of GB can fail where the driver or the OS refuses it
        if pin is False:
            raise
        log(f"allocating the host tables page-locked failed ({e}); retrying without pinning (--pin no)")
        notes.append(f"pinning failed, host tables not page-locked: {e}")
        with skip_large_cpu_init():
            host_model = place_tables(EngramLM(config, indexer=indexer), StorageConfig(tier="host", pin_memory=False))
    seconds["host model (allocate, pin)"] = time.perf_counter() - start
    log(f"host model allocated in {seconds['host model (allocate, pin)']:.1f} s")

    start = time.perf_counter()
    host_model.load_state_dict(device_model.state_dict())  # tables included: rows copied device -> host
    host_model.to(device)  # the dense part; the tables stay in host memory
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds["copy weights to host model"] = time.perf_counter() - start
    log(f"weights copied to the host model in {seconds['copy weights to host model']:.1f} s")
    return device_model, host_model, seconds


# -- correctness -----------------------------------------------------------------------------------------------


def correctness_check(device: torch.device, indexer_for: Callable[[EngramConfig], EngramIndexer]) -> dict[str, Any]:
    """Host vs device tier on a small float32 model: logits, then one RowAdam step's rows and state."""
    engram_config = EngramConfig(
        layer_ids=[1],
        n_embed_per_ngram=32,
        n_head_per_ngram=4,
        engram_vocab_size=[1009, 1009],
        pad_id=sonnets_tokenizer().token_to_id("<pad>"),
    )
    config = ModelConfig(
        vocab_size=1024, d_model=64, n_layers=2, n_heads=4, ffn_hidden=128, max_seq_len=64, engram=engram_config
    )
    indexer = indexer_for(engram_config)
    models = {}
    for tier in ("device", "host"):
        seed_everything(0)
        models[tier] = place_tables(EngramLM(config, indexer=indexer), StorageConfig(tier=tier)).to(device)
    tokens, _ = sonnets_tokens()
    inputs, targets = (t.to(device) for t in RandomWindows(tokens, 4, 64, seed=1).batch(0))
    result: dict[str, Any] = {}
    with torch.no_grad():
        logits = {tier: model.eval()(inputs).logits for tier, model in models.items()}
    result["logits_max_abs_diff"] = (logits["host"] - logits["device"]).abs().max().item()

    losses = {}
    for tier, model in models.items():
        model.train()
        optimizer = RowAdam(model.engram_tables(), lr=1e-2, betas=(0.9, 0.95))
        out = model(inputs, targets=targets)
        out.loss.backward()
        optimizer.step()
        losses[tier] = out.loss.item()
    result["loss_abs_diff"] = abs(losses["host"] - losses["device"])
    hashed = indexer(inputs)
    layer = models["device"].engram_layers()[1]
    rows = torch.unique(hashed[1] + layer.offsets).cpu()
    dev_table, host_table = (m.engram_tables()[0] for m in (models["device"], models["host"]))
    result["rows_updated"] = int(rows.numel())
    result["rows_max_abs_diff"] = (
        (host_table.read_rows(rows).cpu() - dev_table.read_rows(rows).cpu()).abs().max().item()
    )
    result["rows_stepped"] = int((dev_table.row_states()["row_step"] > 0).sum())
    state_diff = 0.0
    for name in ("exp_avg", "exp_avg_sq", "row_step"):
        a = host_table.row_states()[name].cpu()
        b = dev_table.row_states()[name].cpu()
        state_diff = max(state_diff, (a.double() - b.double()).abs().max().item())
    result["adam_state_max_abs_diff"] = state_diff
    result["ok"] = bool(
        result["logits_max_abs_diff"] <= 1e-5
        and result["rows_max_abs_diff"] <= 1e-6
        and state_diff <= 1e-6
        and result["rows_stepped"] == result["rows_updated"]
    )
    return result


# -- timing -----------------------------------------------------------------------------------------------------


@dataclass
class Config:
    """One timed configuration: which model, and the prefetch flag of its tables."""

    name: str
    model: EngramLM
    prefetch: bool = True
    times: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)

    def apply(self) -> None:
        for table in self.model.engram_tables():
            if isinstance(table, OffloadedTable):
                table.prefetch_enabled = self.prefetch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(
    configs: list[Config],
    workload: str,
    step: Callable[[Config, int], None],
    device: torch.device,
    warmup: int,
    steps: int,
) -> None:
    """``warmup + steps`` rounds of one step per configuration; the order flips every round."""
    for i in range(warmup + steps):
        for config in configs if i % 2 == 0 else reversed(configs):
            config.apply()
            sync(device)
            start = time.perf_counter()
            step(config, i)
            sync(device)
            if i >= warmup:
                config.times[workload].append(time.perf_counter() - start)
        if i == warmup - 1 or (i >= warmup and (i - warmup) % 5 == 4) or i == warmup + steps - 1:
            done = max(0, i + 1 - warmup)
            medians = ", ".join(
                f"{c.name} {statistics.median(c.times[workload]) * 1e3:.1f} ms" for c in configs if c.times[workload]
            )
            log(f"{workload}: round {i + 1}/{warmup + steps} ({done} timed){': ' + medians if medians else ''}")


class Probe:
    """Host-side seconds per label from timers around the table code (the prefetch thread included)."""

    TARGETS: ClassVar[tuple[tuple[type, str, str], ...]] = (
        (OffloadedTable, "fetch", "fetch (unique, gather, copy issue)"),
        (PendingRows, "result", "wait for prefetched rows"),
        (OffloadedTable, "take_row_grad", "take_row_grad"),
        (OffloadedTable, "scatter", "write_rows"),  # the optimizer's (unchecked) row writes
    )

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in self.TARGETS]

        def wrap(function: Callable, label: str) -> Callable:
            def timed(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    with self._lock:
                        self.seconds[label] += time.perf_counter() - start

            return timed

        try:
            for owner, name, label in self.TARGETS:
                setattr(owner, name, wrap(owner.__dict__[name], label))
            yield
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)


def breakdown(
    configs: list[Config], workload: str, step: Callable[[Config, int], None], device: torch.device, first: int, n: int
) -> None:
    for config in configs:
        probe = Probe()
        total = 0.0
        with probe.installed():
            for k in range(n):
                config.apply()
                sync(device)
                start = time.perf_counter()
                step(config, first + k)
                sync(device)
                total += time.perf_counter() - start
        config.breakdown[workload] = {"whole step": total / n, **{k: v / n for k, v in probe.seconds.items()}}


# -- report ------------------------------------------------------------------------------------------------------


def format_table(header: list[str], body: list[list[str]]) -> list[str]:
    """Aligned plain text: the first column left, the others right."""
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [fmt(header), "  ".join("-" * w for w in widths), *(fmt(row) for row in body)]


def summary(configs: list[Config], workload: str) -> dict[str, Any]:
    reference = statistics.median(configs[0].times[workload])
    out = {}
    for config in configs:
        samples = config.times[workload]
        median = statistics.median(samples)
        out[config.name] = {
            "median_ms": median * 1e3,
            "min_ms": min(samples) * 1e3,
            "vs_device": median / reference,
            # the median of per-round ratios: a step and the device step of its round ran back to back
            "vs_device_paired": statistics.median(
                a / b for a, b in zip(samples, configs[0].times[workload], strict=True)
            ),
            "samples_ms": [s * 1e3 for s in samples],
            "breakdown_ms": {k: v * 1e3 for k, v in config.breakdown.get(workload, {}).items()},
        }
    return out


def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "command": " ".join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "engram": engram.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "host_memory_available_gib": (mem_available() or 0) / GIB,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / GIB, capability=f"{props.major}.{props.minor}")
    return env


def write_json(results: dict[str, Any], path: str | None, final: bool) -> None:
    """Rewrite ``path`` with the results so far; on stdout only at the end."""
    text = json.dumps(results, indent=2)
    if path is not None:
        Path(path).write_text(text + "\n")
    elif final:
        print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args)
    log(f"engram {engram.__version__}, torch {torch.__version__}, device {device}")
    results: dict[str, Any] = {"environment": environment(device), "args": {k: v for k, v in vars(args).items()}}
    compressor = CompressedTokenizer(sonnets_tokenizer(), cache_dir=False)

    if not args.skip_check:
        log("correctness check (small float32 model, host vs device tier)")
        check = correctness_check(device, lambda cfg: EngramIndexer(cfg, compressor))
        results["correctness"] = check
        log(
            f"correctness: {'OK' if check['ok'] else 'DIFFERENT'}: "
            f"logits max |diff| {check['logits_max_abs_diff']:.3g}, "
            f"loss |diff| {check['loss_abs_diff']:.3g}, {check['rows_updated']} rows updated, rows max |diff| "
            f"{check['rows_max_abs_diff']:.3g}, Adam state max |diff| {check['adam_state_max_abs_diff']:.3g}"
        )
        write_json(results, args.out, final=False)

    config = model_config(args)
    per_table = table_bytes(config)
    total = sum(per_table)
    pin = pin_setting(args)
    pinned = device.type == "cuda" if pin is None else pin
    host_need = sum(pinned_bytes(b) for b in per_table) if pinned else total
    rows = sum(b // (config.engram.head_dim * 4) for b in per_table)
    state = rows * 4 if args.table_optimizer == "adagrad" else 2 * total + rows * 8
    results["model"] = {
        "config": config.to_dict(),
        "table_bytes": per_table,
        "table_rows": rows,
        "host_bytes_estimate": host_need,
        "pinned": pinned,
        "optimizer_state_bytes": state,
    }
    log(
        f"model: d_model {config.d_model}, {config.n_layers} layers, Engram at {config.engram.layer_ids}; tables "
        f"{total / GB:.3g} GB ({rows:,} rows of {config.engram.head_dim} floats) = "
        + " + ".join(f"{b / GB:.2f}" for b in per_table)
        + " GB"
    )
    log(
        f"host memory for the host tables: {host_need / GIB:.1f} GiB"
        + (" (pinned: torch rounds each table up to a power of two)" if pinned else "")
        + f"; {args.table_optimizer} state {state / GB:.2f} GB per tier (training)"
    )
    log(
        "estimate (a rough guess): drawing the device tables takes seconds; pinning host memory 1-5 GiB/s "
        f"(~{host_need / GIB / 5:.0f}-{host_need / GIB / 1:.0f} s here), the GPU -> host copy at 10-50 GB/s"
    )
    available = mem_available()
    need = host_need + ("training" in args.workloads) * state + 8 * GIB
    if available is not None and need > available:
        sys.exit(
            f"gpu_tiers.py: the host tables need about {need / GIB:.0f} GiB of host memory (with an 8 GiB margin), "
            f"{available / GIB:.0f} GiB is available; use a smaller --table-gb, or --pin no"
        )
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        gpu_need = total + ("training" in args.workloads) * state + 12 * GIB
        if gpu_need > free:
            sys.exit(
                f"gpu_tiers.py: the device tables need about {gpu_need / GIB:.0f} GiB of GPU memory (with a 12 GiB "
                f"margin for the backbone and activations), {free / GIB:.0f} GiB is free; use a smaller --table-gb"
            )

    indexer = EngramIndexer(config.engram, compressor)
    notes: list[str] = []
    device_model, host_model, build_seconds = build_pair(config, indexer, device, pin, notes)
    results["build_seconds"] = build_seconds
    results["notes"] = notes
    write_json(results, args.out, final=False)
    configs = [
        Config("device", device_model),
        Config("host, prefetch on", host_model),
        Config("host, prefetch off", host_model, prefetch=False),
    ]
    tokens, _ = sonnets_tokens()
    windows = RandomWindows(tokens, args.batch, args.seq_len, seed=0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    rounds = args.warmup + args.steps + args.breakdown
    batches = [windows.batch(i)[0].to(device) for i in range(rounds)]

    def infer(config: Config, i: int) -> None:
        with torch.no_grad(), autocast:
            config.model(batches[i])

    trainers: dict[int, Trainer] = {}

    def train(config: Config, i: int) -> None:
        trainer = trainers[id(config.model)]
        trainer.step = i  # the same batch for every configuration (the prefetch pair shares a model)
        trainer.train_step()

    hashed = indexer(batches[0])
    lookups = sum(h.numel() for h in hashed.values())
    distinct = sum(torch.unique(hashed[i] + layer.offsets).numel() for i, layer in device_model.engram_layers().items())
    results["batch"] = {"sequences": args.batch, "seq_len": args.seq_len, "lookups": lookups, "distinct_rows": distinct}
    log(f"batch {args.batch} x {args.seq_len}: {lookups:,} table lookups, {distinct:,} distinct rows (batch 0)")

    results["workloads"] = {}
    for workload in args.workloads:
        if workload == "inference":
            for model in (device_model, host_model):
                model.eval()
            step = infer
        else:
            train_config = TrainConfig(
                steps=10 * rounds + 10,
                batch_size=args.batch,
                seq_len=args.seq_len,
                warmup_steps=5,
                table_optimizer=args.table_optimizer,
                device=device.type,
                log_every=0,
                eval_every=0,
                checkpoint_every=0,
            )
            for model in (device_model, host_model):
                trainers[id(model)] = Trainer(model, train_config, tokens, out_dir=None, progress=False)
            step = train
        log(f"{workload}: {args.warmup} warmup + {args.steps} timed rounds of {len(configs)} configurations")
        alternate(configs, workload, step, device, args.warmup, args.steps)
        if args.breakdown:
            breakdown(configs, workload, step, device, args.warmup + args.steps, args.breakdown)
        results["workloads"][workload] = summary(configs, workload)
        if device.type == "cuda":
            results.setdefault("max_gpu_memory_gib", {})[workload] = torch.cuda.max_memory_allocated(device) / GIB
        write_json(results, args.out, final=False)

    lines = ["", f"== host vs device tier, {total / GB:.3g} GB of tables, {args.batch} x {args.seq_len} tokens =="]
    for workload in args.workloads:
        body = []
        for name, r in results["workloads"][workload].items():
            parts = r["breakdown_ms"]
            body.append(
                [
                    name,
                    f"{r['median_ms']:.2f}",
                    f"{r['min_ms']:.2f}",
                    f"{r['vs_device']:.3f}x",
                    f"{r['vs_device_paired']:.3f}x",
                    f"{parts.get('fetch (unique, gather, copy issue)', 0):.2f}" if name != "device" else "-",
                    f"{parts.get('wait for prefetched rows', 0):.2f}" if name != "device" else "-",
                ]
            )
        header = [workload, "median ms", "min ms", "vs device", "paired", "fetch ms (host)", "wait ms (host)"]
        lines += ["", *format_table(header, body)]
    if "correctness" in results:
        c = results["correctness"]
        lines += [
            "",
            f"correctness (float32): {'OK' if c['ok'] else 'DIFFERENT'}; logits max |diff| "
            f"{c['logits_max_abs_diff']:.3g}, rows max |diff| {c['rows_max_abs_diff']:.3g}, "
            f"Adam state max |diff| {c['adam_state_max_abs_diff']:.3g}",
        ]
    print("\n".join(lines), file=sys.stderr, flush=True)
    results["wall_seconds"] = time.perf_counter() - _START
    write_json(results, args.out, final=True)
    log(f"done in {results['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
