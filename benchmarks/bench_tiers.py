"""CPU step time of one Engram model with its tables in each memory tier: device, host memory, disk.

One model (bench_training.py's Engram model: vocab 1024, d_model 128, 4 layers, the first dense, MoE
1 shared + 13 routed experts, top-2, expert hidden 128, Engram at layer 1 with N=3, K=4, rows of 16
floats) with tables grown to ``--table-mb`` MiB (float32), built once per configuration. The device
model is built first; the others get its weights (dense weights through ``load_state_dict``, the
disk table's rows through ``write_rows``), so every configuration computes the same thing.
Configurations, each with a model (and disk folder) of its own, so that none finds the pages or
cache lines that another one's step just touched:

- ``device``: the table is a parameter (on CPU here: the "device" is the CPU).
- ``host``, prefetch on / off: rows gathered from a CPU tensor, in a background thread while layer 0
  computes (on), or when layer 1 asks for them (off).
- ``disk warm``, prefetch on / off: memory-mapped files whose pages are in the page cache (written
  and flushed before timing; the optimizer-state files, created as sparse zeros, read once), with
  the default 64 MiB write-back buffer per table; and, prefetch on,
  without read-ahead (the next batch's pages not asked for: what the probe that finds them cached
  costs), with no write buffer (``write_buffer_mb=0``: every optimizer update goes to the files), with the
  row checksums not verified on read (``verify_rows=False``; they are still written), and with
  table files of format 1 (made before row checksums existed: nothing written, nothing verified),
  so that the cost of verifying rows and of the checksums as a whole are measured side by side.
- ``disk cold``: the table's files (weight and optimizer state) are dropped from the page cache
  before every step (``TableFile.evict_page_cache``, outside the timed region), prefetch on, no
  hot-row cache; and the same with a ``--cache-mb`` hot-row cache per table (its hit rate is
  reported). Neither reads ahead: nothing of the step's batch is known before it.
- ``disk cold, batch before``: dropped from the page cache, then the step of the batch before runs
  (untimed), then the timed step; without and with read-ahead (``StorageConfig.read_ahead``: each
  step announces the next batch, whose pages the kernel reads while the step computes). With
  read-ahead the timed batch's rows were all out of the page cache when the step before began, one
  step ahead, as in a stream of batches over a table much larger than memory; without it the
  timed step still finds the rows it shares with the batch before cached, the control that
  separates the read-ahead's effect from that sharing.

Two workloads, each timed with every configuration: (a) inference, ``model.eval()`` forward under
``torch.no_grad()`` of a batch of real text (the model hashes it with its ``EngramIndexer``); (b) a
training step, ``Trainer.train_step()`` (forward, backward, clipping, AdamW and the tables' row
optimizer: ``RowAdam``, or ``RowAdagrad`` with ``--table-optimizer adagrad``; router biases). The
disk tables keep their undo journal on, as a training run does, and get a checkpoint at step 0
before the training rounds (``prepare_checkpoint``/``commit_checkpoint``), as a run past its first
checkpoint has: from then on, rows about to change in the files (written back from the write buffer,
or written through without one) have their old values journaled and fsynced first. No later
checkpoint is taken, so the journal keeps growing. Every configuration runs the same batches (step
``i`` reads batch ``i`` of sonnets 1-140, tokenised with the 1,024-id BPE of ``tests/corpus.py``; with
``--corpus wikipedia``, of the first ``--corpus-tokens`` tokens of the Wikipedia paragraphs of
``engram data wikipedia``, tokenised with the same BPE, whose rows far exceed the hot-row cache and
the write-back buffer, so that their hit rates are those of a working set larger than they are).
Timed calls
alternate configuration by configuration, the order flipping every round, so the noise of a shared
machine hits all alike; the first ``--warmup`` rounds are not timed; medians are reported. The
device and the warm configurations alternate in ``--inference-steps`` (60) or ``--steps`` (30)
rounds; the cold ones alternate with the device in ``--cold-steps`` rounds of their own afterwards
(a cold step reads the table from disk and leaves I/O behind it, which must not land in the steps
the target compares), and their ratios are to the device steps of those rounds. Bytes read from
and dirtied for storage come from ``/proc/self/io`` around each timed step (mapped pages count when
the kernel reads or dirties them), page faults from ``/proc/self/stat`` (the whole process: the
prefetch thread's count too).

Compute runs on ``--threads`` torch threads (default 1), leaving the machine's other core to the
prefetch thread, as a GPU machine leaves its CPU cores to fetching rows. The disk tables live in a
temporary folder under ``--dir`` (default: the system's temporary folder; it should be on a real
disk, not tmpfs), removed at the end.

After the timed rounds, ``--breakdown`` more steps per configuration run with timers around the
table code (fetch in the background thread, the wait for its rows, the table optimizer, the journal,
fsync, write-backs from the write buffer) to show where the time of the off-device tiers goes;
those steps are not in the medians.

Run from the repository root::

    python benchmarks/bench_tiers.py             # plain text
    python benchmarks/bench_tiers.py --markdown  # markdown for docs/benchmarks.md

With a cold configuration, the disk's own random 4 KiB read rate is measured in the same folder
(``bench_disk.py``: one thread, ``--disk-depth`` threads, and reads queued by the kernel;
``--disk-seconds`` each, 0: not measured), and the cold fetch's rate (rows gathered from the weight
file per second of ``TableFile.read_rows``, in the breakdown steps) is reported as a fraction of it.

``--verify-gib N`` also times ``verify_tables`` (``engram tables verify``) over a table file of
N GiB written for it, with its pages in the page cache (just written) and dropped from it.

About 6 minutes on a 2-core machine with the defaults (512 MiB table). Exits 0 whether or not the
target is met; the output says whether it is.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engram import CompressedTokenizer, EngramConfig, EngramIndexer
from engram.data.batches import RandomWindows
from engram.model import EngramLM, ModelConfig, MoEConfig
from engram.storage import DiskTable, OffloadedTable, PendingRows, StorageConfig, TableStorage, place_tables
from engram.storage import journal as journal_module
from engram.storage import table_file as table_file_module
from engram.storage.config import LAYER_FOLDER
from engram.storage.disk import verify_tables
from engram.storage.journal import UndoJournal
from engram.storage.prefetch import wait_for_background
from engram.storage.table_file import DATA_OFFSET, PAGE_BYTES, TableFile, page_runs
from engram.storage.write_buffer import WriteBuffer
from engram.training import RowOptimizer, TrainConfig, Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root, for tests.corpus
from tests.corpus import sonnets_tokenizer, sonnets_tokens

import bench_disk
from _report import environment_lines, format_table

ENGRAM_LAYERS = [1]
N_EMBED_PER_NGRAM = 64
N_HEAD_PER_NGRAM = 4
MAX_NGRAM = 3
TARGET = 0.03  # host and warm disk with prefetch on: at most 3% slower than device
COLD_TARGET = 2.0  # cold page cache: an inference step at most 2x the device's
COLD_FETCH_TARGET = 0.5  # and its fetch at least half the disk's deep-queue random-read rate
READ_WEIGHT = "read_rows: weight file"  # breakdown labels
READ_STATE = "read_rows: state files"
READ_PAGES = "pages of the weight file read"
ADVISE = "will_need (probe + advise)"
READ_AHEAD = "read-ahead of the next batch (background)"
WRITE_BACK = "write buffer: write back to files"  # breakdown labels
WRITE_BACK_WAIT = "write buffer: wait for its worker"
# what "disk-warm-on" (rows verified on read) is compared with, the configurations being otherwise the same
CHECKSUM_BASELINES = {
    "disk-warm-unverified": "not verified (checksums still written)",
    "disk-warm-format1": "no row checksums (format 1 files)",
}
CONFIG_KEYS = [
    "host-on",
    "host-off",
    "disk-warm-on",
    "disk-warm-off",
    "disk-warm-noahead",
    "disk-warm-unbuffered",
    "disk-warm-unverified",
    "disk-warm-format1",
    "disk-cold",
    "disk-cold-cache",
    "disk-cold-before",
    "disk-cold-ahead",
]


def corpus_tokens(corpus: str, limit: int) -> np.ndarray:
    """The training tokens: sonnets 1-140, or the first ``limit`` tokens of the Wikipedia paragraphs
    (documents in order, each followed by ``<eos>``), with the 1,024-id BPE of ``tests/corpus.py``."""
    if corpus == "sonnets":
        return sonnets_tokens()[0]
    from engram.data.sources import open_source

    tokenizer = sonnets_tokenizer()
    eos = tokenizer.token_to_id("<eos>")
    ids: list[int] = []
    documents = (text for _, text in open_source("wikipedia"))
    while len(ids) < limit:
        batch = [text for _, text in zip(range(2000), documents, strict=False)]
        if not batch:
            break
        for encoding in tokenizer.encode_batch(batch):
            ids += [*encoding.ids, eos]
    return np.array(ids[:limit], dtype=np.int32)


def model_config(table_mb: float) -> ModelConfig:
    """bench_training.py's Engram model, with base table sizes giving about ``table_mb`` MiB of float32 rows."""
    head_dim = N_EMBED_PER_NGRAM // N_HEAD_PER_NGRAM
    heads = (MAX_NGRAM - 1) * N_HEAD_PER_NGRAM * len(ENGRAM_LAYERS)
    base = max(1, round(table_mb * 2**20 / (head_dim * 4) / heads))
    engram = EngramConfig(
        layer_ids=ENGRAM_LAYERS,
        max_ngram_size=MAX_NGRAM,
        n_head_per_ngram=N_HEAD_PER_NGRAM,
        n_embed_per_ngram=N_EMBED_PER_NGRAM,
        engram_vocab_size=[base] * (MAX_NGRAM - 1),
        pad_id=sonnets_tokenizer().token_to_id("<pad>"),
    )
    return ModelConfig(
        vocab_size=1024,
        d_model=128,
        n_layers=4,
        n_heads=4,
        moe=MoEConfig(n_routed_experts=13, n_shared_experts=1, top_k=2, expert_hidden=128),
        n_dense_layers=1,
        max_seq_len=256,
        engram=engram,
    )


# -- models -------------------------------------------------------------------------------------------


def build_model(config: ModelConfig, indexer: EngramIndexer, storage: StorageConfig) -> EngramLM:
    seed_everything(0)
    return place_tables(EngramLM(config, indexer=indexer), storage)


def copy_weights(model: EngramLM, reference: EngramLM, chunk_rows: int = 1 << 21) -> None:
    """Give ``model`` the weights of ``reference`` (device tables), as tests/test_tiers.py does."""
    model.load_state_dict(reference.state_dict(), strict=False)  # a disk model has no table keys
    for table, source in zip(model.engram_tables(), reference.engram_tables(), strict=True):
        if isinstance(table, DiskTable):
            for start in range(0, table.num_rows, chunk_rows):
                rows = torch.arange(start, min(start + chunk_rows, table.num_rows))
                table.write_rows(rows, source.read_rows(rows))
            table.flush()  # written back now, not by the kernel during the timed steps


def write_format_1_tables(directory: Path, reference: EngramLM, table_optimizer: str) -> None:
    """Zero table files of format 1 (no row checksums) for every table of ``reference`` and its optimizer
    state, in ``directory``: the disk tier opens them as a table written before row checksums existed."""
    states = {"sum_sq": ((), torch.float32)} if table_optimizer == "adagrad" else {}
    for layer, engram in reference.engram_layers().items():
        table = engram.table
        folder = directory / LAYER_FOLDER.format(layer)
        folder.mkdir(parents=True)
        files = {"weight": (table.dim, torch.float32, {"committed_step": None, "prepared_step": None, "dirty": False})}
        if table_optimizer == "adam":
            states = {"exp_avg": ((table.dim,), torch.float32), "exp_avg_sq": ((table.dim,), torch.float32)}
            states["row_step"] = ((), torch.int64)
        for name, (shape, dtype) in states.items():
            files[name] = (int(np.prod(shape)), dtype, {"row_shape": list(shape)})
        for name, (width, dtype, metadata) in files.items():
            dtype_name = table_file_module._dtype_name(dtype)
            header = table_file_module._metadata_json(folder, table.num_rows, width, dtype_name, metadata, None)
            with open(folder / f"{name}.table", "wb") as f:
                f.write(table_file_module._slot_bytes(header, 1, 1) + table_file_module._slot_bytes(header, 0, 1))
                f.truncate(DATA_OFFSET + table.num_rows * width * dtype.itemsize)


def table_files(table: TableStorage) -> list:
    """The ``TableFile``s of a disk table: the weight and every optimizer state array."""
    if not isinstance(table, DiskTable):
        return []
    return [table.weight_file, *table._state_files.values()]


def caches(model: EngramLM) -> list:
    """The hot-row caches of a model's tables (none for device tables or tables without one)."""
    return [table.cache for table in model.engram_tables() if getattr(table, "cache", None) is not None]


def evict(model: EngramLM) -> None:
    for table in model.engram_tables():
        for table_file in table_files(table):
            table_file.evict_page_cache()


def folder_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def filesystem_of(path: Path) -> str:
    """The filesystem type holding ``path`` (from /proc/mounts; "unknown" elsewhere)."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mount = parts[1]
            inside = str(path.resolve()).startswith(mount.rstrip("/") + "/") or str(path.resolve()) == mount
            if inside and len(mount) >= len(best):
                best, kind = mount, parts[2]
    return kind


def page_faults() -> tuple[int, int]:
    """(minor, major) page faults of this process so far, every thread (Linux; zeros elsewhere)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[7]), int(fields[9])  # minflt, majflt: fields 10 and 12 of stat(5)
    except (OSError, IndexError, ValueError):
        return 0, 0


def io_bytes() -> tuple[int, int]:
    """(read_bytes, write_bytes) this process caused at the storage layer (Linux; zeros elsewhere)."""
    try:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        return int(fields["read_bytes"]), int(fields["write_bytes"])
    except (OSError, KeyError, ValueError):
        return 0, 0


# -- configurations ---------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One configuration: its name, where its model keeps the tables, and its measurements."""

    name: str
    key: str
    storage: StorageConfig
    cold: bool = False
    lead_in: bool = False  # the step of the batch before runs (untimed) after the drop, before the timed step
    format_1: bool = False  # the disk tables' files are of format 1 (no row checksums)
    times: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    reads: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    writes: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    minor: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    major: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    hit_rate: dict[str, float] = field(default_factory=dict)
    rows_written_back: dict[str, float] = field(default_factory=dict)
    counts: dict[str, dict[str, float]] = field(default_factory=dict)  # per workload: Probe.rows per step
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def off_device(self) -> bool:
        return self.storage.tier != "device"


def variants(root: Path, cache_mb: float) -> list[Variant]:
    def disk(key: str, **options) -> StorageConfig:
        return StorageConfig(tier="disk", directory=str(root / key), **options)

    cached = disk("disk-cold-cache", cache_mb=cache_mb, read_ahead=False)
    return [
        Variant("device", "device", StorageConfig(tier="device")),
        Variant("host, prefetch on", "host-on", StorageConfig(tier="host")),
        Variant("host, prefetch off", "host-off", StorageConfig(tier="host", prefetch=False)),
        Variant("disk warm, prefetch on", "disk-warm-on", disk("disk-warm-on")),
        Variant("disk warm, prefetch off", "disk-warm-off", disk("disk-warm-off", prefetch=False)),
        Variant("disk warm, no read-ahead", "disk-warm-noahead", disk("disk-warm-noahead", read_ahead=False)),
        Variant("disk warm, no write buffer", "disk-warm-unbuffered", disk("disk-warm-unbuffered", write_buffer_mb=0)),
        Variant(
            "disk warm, rows not verified", "disk-warm-unverified", disk("disk-warm-unverified", verify_rows=False)
        ),
        Variant("disk warm, no row checksums", "disk-warm-format1", disk("disk-warm-format1"), format_1=True),
        Variant("disk cold, no row cache", "disk-cold", disk("disk-cold", read_ahead=False), cold=True),
        Variant(f"disk cold, {cache_mb:g} MiB row cache", "disk-cold-cache", cached, cold=True),
        Variant(
            "disk cold, batch before, no read-ahead",
            "disk-cold-before",
            disk("disk-cold-before", read_ahead=False),
            cold=True,
            lead_in=True,
        ),
        Variant(
            "disk cold, batch before, read-ahead",
            "disk-cold-ahead",
            disk("disk-cold-ahead"),
            cold=True,
            lead_in=True,
        ),
    ]


class Bench:
    """The models and runners of one benchmark run."""

    def __init__(self, args: argparse.Namespace, root: Path):
        self.args = args
        self.root = root
        self.config = model_config(args.table_mb)
        self.tokens = corpus_tokens(args.corpus, args.corpus_tokens)
        compressor = CompressedTokenizer(sonnets_tokenizer(), cache_dir=False)
        self.indexer = EngramIndexer(self.config.engram, compressor)
        self.windows = RandomWindows(self.tokens, args.batch, args.seq_len, seed=args.seed)
        self.variants = [v for v in variants(root, args.cache_mb) if v.key == "device" or v.key in args.configs]
        self.models: dict[str, EngramLM] = {}
        self.trainers: dict[str, Trainer] = {}
        self.setup_seconds: dict[str, float] = {}

    def log(self, text: str) -> None:
        if self.args.verbose:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def build(self) -> None:
        for variant in self.variants:
            start = time.perf_counter()
            if variant.format_1:
                write_format_1_tables(Path(variant.storage.directory), self.models["device"], self.args.table_optimizer)
            model = build_model(self.config, self.indexer, variant.storage)
            if variant.key != "device":
                copy_weights(model, self.models["device"])
            self.models[variant.key] = model
            self.setup_seconds[variant.key] = time.perf_counter() - start
            self.log(f"built the {variant.key} model in {self.setup_seconds[variant.key]:.1f} s")

    def prepare(self, variant: Variant, step_fn: Callable[[Variant, int], None], step: int) -> None:
        """Drop a cold configuration's files from the page cache; then, for a lead-in one, run the step before."""
        if variant.cold:
            evict(self.models[variant.key])
        if variant.lead_in and step > 0:
            step_fn(variant, step - 1)

    def infer(self, variant: Variant, step: int) -> None:
        """An inference step on batch ``step``, announcing batch ``step + 1`` (read ahead where the tables do)."""
        model = self.models[variant.key]
        inputs, _ = self.windows.batch(step)
        with torch.no_grad():
            model(inputs, read_ahead=self.windows.batch(step + 1)[0])

    def train(self, variant: Variant, step: int) -> None:
        trainer = self.trainers[variant.key]
        trainer.step = step  # every configuration trains on batch `step`
        trainer.train_step()

    def make_trainers(self) -> None:
        args = self.args
        config = TrainConfig(
            steps=10 * (args.warmup + args.steps + args.breakdown) + 10,
            batch_size=args.batch,
            seq_len=args.seq_len,
            warmup_steps=5,
            table_optimizer=args.table_optimizer,
            seed=args.seed,
            device="cpu",
            threads=args.threads,
            log_every=0,
            eval_every=0,
            checkpoint_every=0,
        )
        cold = {variant.key for variant in self.variants if variant.cold}
        for key, model in self.models.items():
            self.trainers[key] = Trainer(model, config, self.tokens, out_dir=None, progress=False)
            # A checkpoint at step 0, as a run past its first checkpoint has: from now on the undo
            # journal saves the old values of rows before they change in the files.
            for table in model.engram_tables():
                if isinstance(table, DiskTable):
                    table.prepare_checkpoint(0)
                    table.commit_checkpoint(0)
            # The optimizer just created its state files (sparse zeros): a warm configuration has their
            # pages in the page cache too, as the device and host tiers have their zeroed state in RAM.
            if key not in cold:
                for table in model.engram_tables():
                    for table_file in table_files(table):
                        table_file.warm_page_cache()

    def warm_steps(self, workload: str) -> int:
        return self.args.inference_steps if workload == "inference" else self.args.steps

    def run_workload(self, workload: str, step_fn: Callable[[Variant, int], None]) -> None:
        """The warm configurations alternate with each other; the cold ones, with the device, in rounds of their own.

        Cold steps read from disk and leave I/O behind them: kept apart, they cannot slow the steps
        that the target compares. Each block reports its own device median, the reference of its rows.
        """
        warm = [v for v in self.variants if not v.cold]
        cold = [self.variants[0], *(v for v in self.variants if v.cold)]
        self.rounds(workload, step_fn, warm, self.warm_steps(workload))
        if len(cold) > 1:
            self.rounds(cold_label(workload), step_fn, cold, self.args.cold_steps)

    def rounds(self, label: str, step_fn: Callable[[Variant, int], None], group: list[Variant], steps: int) -> None:
        """``warmup + steps`` rounds of one step per configuration, alternating; the order flips each round."""
        warmup = self.args.warmup
        for i in range(warmup + steps):
            if i == warmup:  # hit rates count the timed steps only
                for variant in group:
                    for cache in caches(self.models[variant.key]):
                        cache.reset_stats()
            for variant in group if i % 2 == 0 else reversed(group):
                self.prepare(variant, step_fn, i)
                read0, write0 = io_bytes()
                minor0, major0 = page_faults()
                start = time.perf_counter()
                step_fn(variant, i)
                elapsed = time.perf_counter() - start
                minor1, major1 = page_faults()
                read1, write1 = io_bytes()
                wait_for_background()  # the next batch's read-ahead, if any: done before the next configuration
                if i >= warmup:
                    variant.times[label].append(elapsed)
                    variant.reads[label].append(read1 - read0)
                    variant.writes[label].append(write1 - write0)
                    variant.minor[label].append(minor1 - minor0)
                    variant.major[label].append(major1 - major0)
            if i % 5 == 4 or i == warmup + steps - 1:
                self.log(f"{label}: round {i + 1}/{warmup + steps}")
        for variant in group:
            found = caches(self.models[variant.key])
            if found:
                hits, misses = sum(c.hits for c in found), sum(c.misses for c in found)
                variant.hit_rate[label] = hits / max(1, hits + misses)

    def breakdown(self, workload: str, step_fn: Callable[[Variant, int], None], first_step: int) -> None:
        """``--breakdown`` more steps per configuration with timers around the table code (not in the medians)."""
        if self.args.breakdown == 0:
            return
        for variant in self.variants:
            probe = Probe()
            with probe.installed():
                for k in range(self.args.breakdown):
                    probe.enabled = False  # the lead-in step is not this step's
                    self.prepare(variant, step_fn, first_step + k)
                    probe.enabled = True
                    with probe.timing("whole step"):
                        step_fn(variant, first_step + k)
                    wait_for_background()
            variant.breakdown[workload] = probe.per_step(self.args.breakdown)
            variant.rows_written_back[workload] = probe.rows_written_back / self.args.breakdown
            variant.counts[workload] = {key: n / self.args.breakdown for key, n in probe.rows.items()}

    def corpus_rows(self) -> tuple[int, float]:
        """Distinct table rows the whole training corpus touches, and the median per batch."""
        ids = torch.from_numpy(self.tokens.astype(np.int64))[None]
        model = self.models["device"]
        engrams = model.engram_layers()
        hashed = self.indexer(ids)
        self.corpus_row_ids = {i: torch.unique(hashed[i] + e.offsets) for i, e in engrams.items()}
        total = sum(rows.numel() for rows in self.corpus_row_ids.values())
        per_batch = []
        for step in range(self.args.warmup, self.args.warmup + self.args.steps):
            batch = self.indexer(self.windows.batch(step)[0])
            per_batch.append(sum(torch.unique(batch[i] + e.offsets).numel() for i, e in engrams.items()))
        return total, statistics.median(per_batch)

    def shared_with_batch_before(self) -> float:
        """Median share of a timed cold step's distinct weight-file pages that the batch before it also reads."""
        model = next((self.models[v.key] for v in self.variants if v.lead_in), None)
        if model is None:
            return 0.0
        engrams = model.engram_layers()

        def pages(step: int) -> set[tuple[int, int]]:
            hashed = self.indexer(self.windows.batch(step)[0])
            found = set()
            for i, engram in engrams.items():
                record = engram.table.weight_file.record_bytes
                first_pages = (DATA_OFFSET + torch.unique(hashed[i] + engram.offsets) * record) // PAGE_BYTES
                found.update((i, page) for page in first_pages.tolist())
            return found

        shares = []
        for step in range(self.args.warmup, self.args.warmup + self.args.cold_steps):
            now = pages(step)
            shares.append(len(now & pages(step - 1)) / len(now))
        return statistics.median(shares)


# -- breakdown timers ----------------------------------------------------------------------------------------


class Probe:
    """Cumulative seconds (and calls) per label, from timers wrapped around library methods."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.rows_written_back = 0
        self.rows: dict[str, int] = defaultdict(int)  # rows per counter (file reads, write buffer)
        self.enabled = True  # False: the wrapped methods run untimed and uncounted
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def timing(self, label: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self.seconds[label] += elapsed
                self.calls[label] += 1

    def _wrap(self, function: Callable, label: str) -> Callable:
        @functools.wraps(function)
        def timed(*args, **kwargs):
            if not self.enabled:
                return function(*args, **kwargs)
            name = label
            if label == WRITE_BACK:  # WriteBuffer._write_back_rows(self, rows, values), maybe on its worker
                with self._lock:
                    self.rows_written_back += args[1].numel()
            if name == "read_rows":  # TableFile.read_rows(self, rows, ...): by file
                name = READ_WEIGHT if args[0].path.name == "weight.table" else READ_STATE
                pages = int(page_runs(args[1], args[0].record_bytes)[1].sum()) if name == READ_WEIGHT else 0
                with self._lock:
                    self.rows[name] += args[1].numel()
                    self.rows[READ_PAGES] += pages
            if name == "write buffer read" and hasattr(
                WriteBuffer, "resident"
            ):  # WriteBuffer.read(self, name, rows): rows served from the buffer
                with self._lock:
                    self.rows["buffer reads"] += args[2].numel()
                    self.rows["buffer hits"] += int(args[0].resident(args[2]).sum())
                return function(*args, **kwargs)
            if name == "write buffer claim":  # WriteBuffer._claim(self, name, rows, values, found): the rows
                with self._lock:  # of found.missing enter
                    self.rows["buffer claims"] += args[4].missing.numel()
                return function(*args, **kwargs)
            if name == "write buffer overflow":  # WriteBuffer._to_overflow(self, rows, values): rows leaving a slot
                with self._lock:  # (displaced by a newcomer, or a newcomer whose set is full)
                    self.rows["buffer evictions"] += args[1].numel()
                return function(*args, **kwargs)
            with self.timing(name):
                return function(*args, **kwargs)

        return timed

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        targets = [
            (EngramLM, "forward", "forward"),
            (TableStorage, "forward", "table lookup (main thread)"),
            (OffloadedTable, "fetch", "fetch: unique + gather + copy"),
            (PendingRows, "result", "wait for prefetched rows"),
            (OffloadedTable, "take_row_grad", "take_row_grad"),
            (RowOptimizer, "step", "table optimizer step"),
            (DiskTable, "begin_update", "begin_update (journal)"),
            (UndoJournal, "protect", "journal protect"),
            (OffloadedTable, "scatter", "write_rows"),  # the optimizer's (unchecked) row writes
            (WriteBuffer, "_write_back_rows", WRITE_BACK),
            (WriteBuffer, "wait", WRITE_BACK_WAIT),
            (journal_module.os, "fsync", "fsync (any file)"),
            (table_file_module, "row_checksums", "row checksums (reads and writes)"),
            (TableFile, "read_rows", "read_rows"),
            (TableFile, "will_need", ADVISE),
            (DiskTable, "_will_need", READ_AHEAD),
            (WriteBuffer, "read", "write buffer read"),
            (WriteBuffer, "_claim", "write buffer claim"),
            (WriteBuffer, "_to_overflow", "write buffer overflow"),
        ]
        targets = [target for target in targets if target[1] in target[0].__dict__]  # older sources lack some
        saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in targets]
        try:
            for owner, name, label in targets:
                setattr(owner, name, self._wrap(owner.__dict__[name], label))
            yield
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)

    def per_step(self, steps: int) -> dict[str, float]:
        return {label: seconds / steps for label, seconds in self.seconds.items()}


# -- report -----------------------------------------------------------------------------------------------


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def cold_label(workload: str) -> str:
    return f"{workload}, cold rounds"


def results_lines(bench: Bench, workload: str, md: bool) -> tuple[list[str], dict[str, float], dict[str, float]]:
    """The table of one workload; each configuration's ratio to the device of its own block, as a
    ratio of medians and as the median of the per-round ratios (a step and the device step of the
    same round ran within a second of each other, so slow changes in the machine's load cancel)."""
    body, ratios, paired = [], {}, {}
    device = bench.variants[0]
    for label in (workload, cold_label(workload)):
        if label not in device.times:
            continue
        reference = statistics.median(device.times[label])
        for v in bench.variants:
            if label not in v.times:
                continue
            seconds = statistics.median(v.times[label])
            name = f"{v.name} (cold rounds)" if v is device and label != workload else v.name
            ratios[name] = seconds / reference
            paired[name] = statistics.median(a / b for a, b in zip(v.times[label], device.times[label], strict=True))
            body.append(
                [
                    name,
                    str(len(v.times[label])),
                    f"{seconds * 1e3:.1f}",
                    f"{min(v.times[label]) * 1e3:.1f}",
                    f"{ratios[name]:.3f}x",
                    f"{paired[name]:.3f}x",
                    f"{v.hit_rate[label]:.1%}" if label in v.hit_rate else "-",
                    f"{statistics.median(v.reads[label]) / 2**20:.1f}" if v.off_device else "-",
                    f"{statistics.median(v.writes[label]) / 2**20:.1f}" if v.off_device else "-",
                    f"{statistics.median(v.minor[label]):,.0f} / {statistics.median(v.major[label]):,.0f}",
                ]
            )
    header = [
        "tables",
        "steps",
        "median ms/step",
        "min ms",
        "vs device",
        "vs device, paired",
        "row cache hits",
        "read MiB",
        "dirtied MiB",
        "page faults minor / major",
    ]
    return format_table(header, body, md), ratios, paired


def verdict_lines(ratios: dict[str, float], paired: dict[str, float]) -> list[str]:
    """PASS only if both estimates of both configurations are within the target."""
    names = [name for name in ("host, prefetch on", "disk warm, prefetch on") if name in ratios]
    if not names:
        return []
    ok = all(r[name] <= 1 + TARGET for name in names for r in (ratios, paired))
    detail = "; ".join(f"{name} {ratios[name] - 1:+.1%} (paired {paired[name] - 1:+.1%})" for name in names)
    verdict = "PASS" if ok else "FAIL"
    return [
        f"**Target (host and warm disk, prefetch on, at most {TARGET:.0%} over device, by the ratio of medians and "
        f"by the paired ratio): {verdict} ({detail}).**"
    ]


def checksum_lines(bench: Bench, workload: str) -> list[str]:
    """Warm disk with prefetch and rows verified on read, against each configuration of
    ``CHECKSUM_BASELINES``: a ratio of medians and a median of per-round ratios, from the same rounds."""
    by_key = {v.key: v for v in bench.variants}
    if "disk-warm-on" not in by_key:
        return []
    on = by_key["disk-warm-on"].times[workload]
    lines = []
    for key, what in CHECKSUM_BASELINES.items():
        if key in by_key:
            off = by_key[key].times[workload]
            ratio = statistics.median(on) / statistics.median(off)
            paired = statistics.median(a / b for a, b in zip(on, off, strict=True))
            lines.append(
                f"- rows verified on every read (the default) against {what}: {median_ms(on):.1f} vs "
                f"{median_ms(off):.1f} ms per step, {ratio:.3f}x by the ratio of medians, {paired:.3f}x paired"
            )
    return [f"**Row checksums, warm disk with prefetch, {len(on)} rounds:**", "", *lines, ""] if lines else []


def verify_scan_lines(root: Path, gib: float, md: bool) -> list[str]:
    """``verify_tables`` over a table file of ``gib`` GiB (64-byte rows), cached and not."""
    folder = root / "verify-scan"
    folder.mkdir()
    rows = max(1, int(gib * 2**30) // 64)
    start = time.perf_counter()
    TableFile.create(folder / "weight.table", rows, 16, init_std=0.02).close()
    created = time.perf_counter() - start
    size = (folder / "weight.table").stat().st_size
    body = []
    for cache in ("pages cached (just written)", "pages dropped from the cache"):
        if cache.startswith("pages dropped"):
            with TableFile.open(folder / "weight.table") as table:
                table.evict_page_cache()
        read0, _ = io_bytes()
        start = time.perf_counter()
        (check,) = verify_tables(folder)
        seconds = time.perf_counter() - start
        assert check.intact and check.rows_checked == rows
        read = (io_bytes()[0] - read0) / 2**30
        body.append([cache, f"{seconds:.2f}", f"{size / 2**30 / seconds:.2f}", f"{read:.2f}"])
    note = (
        f"`verify_tables` (what `engram tables verify` runs) over one table file of {rows:,} rows of 16 float32 "
        f"({size / 2**30:.2f} GiB with its checksums; written in {created:.0f} s), read in 64 MiB chunks."
    )
    return [note, "", *format_table(["page cache", "seconds", "GiB/s", "read from disk GiB"], body, md)]


BREAKDOWN_ORDER = [
    "whole step",
    "forward",
    "table lookup (main thread)",
    "wait for prefetched rows",
    "fetch: unique + gather + copy",
    "take_row_grad",
    "table optimizer step",
    "begin_update (journal)",
    "journal protect",
    "fsync (any file)",
    "write_rows",
    WRITE_BACK,
    WRITE_BACK_WAIT,
    "row checksums (reads and writes)",
    ADVISE,
    READ_AHEAD,
    READ_WEIGHT,
    READ_STATE,
]


def breakdown_lines(bench: Bench, workload: str, md: bool) -> list[str]:
    labels = [label for label in BREAKDOWN_ORDER if any(label in v.breakdown.get(workload, {}) for v in bench.variants)]
    body = []
    for v in bench.variants:
        values = v.breakdown.get(workload, {})
        body.append([v.name, *(f"{values[label] * 1e3:.2f}" if label in values else "-" for label in labels)])
    return format_table(["tables", *labels], body, md)


def cache_note(args: argparse.Namespace, cache, total_rows: int) -> str:
    """What the hot-row cache can hold, against the rows the corpus touches."""
    if cache is None:
        return ""
    share = cache.num_slots / total_rows
    return (
        f" The {args.cache_mb:g} MiB hot-row cache ({cache.num_slots:,} slots) can hold "
        f"{min(1.0, share):.{0 if share >= 0.01 else 2}%} of everything the corpus ever reads"
        + (": its hit rate here is that of a tiny corpus, not of a real one." if share > 0.1 else ".")
    )


def disk_limit(root: Path, seconds: float, depth: int) -> dict[str, bench_disk.ReadRate]:
    """The disk's random 4 KiB read rates in ``root`` (``bench_disk.py``), over a 1 GiB file of its own."""
    path = root / "disk-limit.bin"
    bench_disk.write_file(path, 1 << 30)
    try:
        return {
            "queue depth 1": bench_disk.reads_per_second(path, 1, seconds),
            f"queue depth {depth} (threads)": bench_disk.reads_per_second(path, depth, seconds),
            "queued by the kernel (WILLNEED)": bench_disk.willneed_rate(path, seconds),
        }
    finally:
        path.unlink()


def cold_lines(
    bench: Bench, workload: str, limit: dict[str, bench_disk.ReadRate], ratios: dict[str, float]
) -> list[str]:
    """Each cold configuration's fetch rate (rows read from the weight file per second spent reading them, in
    the breakdown steps) against the disk's own limit, and the cold targets' verdict."""
    deep = max((rate.per_second for key, rate in limit.items() if key != "queue depth 1"), default=0.0)
    lines = []
    for v in bench.variants:
        if not v.cold or workload not in v.breakdown:
            continue
        rows = v.counts[workload].get(READ_WEIGHT, 0.0)
        pages = v.counts[workload].get(READ_PAGES, 0.0)
        seconds = v.breakdown[workload].get(READ_WEIGHT, 0.0)
        fetch = v.breakdown[workload].get("fetch: unique + gather + copy", 0.0)
        line = (
            f"- {v.name}: {rows:,.0f} rows ({pages:,.0f} distinct pages) per step read from the weight file in "
            f"{seconds * 1e3:.1f} ms"
        )
        if seconds:
            line += f", {rows / seconds:,.0f} rows/s, {pages / seconds:,.0f} pages/s"
            if deep:
                line += f" = {pages / seconds / deep:.0%} of the disk's deep-queue rate"
        line += f" (the whole fetch {fetch * 1e3:.1f} ms)"
        if workload == "inference" and v.name in ratios and seconds and deep:
            ok = ratios[v.name] <= COLD_TARGET and pages / seconds >= COLD_FETCH_TARGET * deep
            line += (
                f"; target (step at most {COLD_TARGET:g}x the device's, fetch at least {COLD_FETCH_TARGET:.0%} of "
                f"the deep-queue rate): {'PASS' if ok else 'FAIL'} ({ratios[v.name]:.2f}x)"
            )
        lines.append(line + ".")
    if not lines:
        return []
    rates = ", ".join(f"{key} {rate.per_second:,.0f}" for key, rate in limit.items())
    head = f"**Cold fetch against the disk** (random 4 KiB reads/s in the same folder: {rates}):" if limit else ""
    if any(v.lead_in for v in bench.variants):
        lines.append(
            f"- A timed cold step's batch shares {bench.shared_with_batch_before():.1%} of its distinct weight-file "
            "pages with the batch before it (median): those are cached after the step before, with or without "
            "read-ahead."
        )
    return [head or "**Cold fetch** (disk limit not measured):", "", *lines, ""]


def buffer_lines(bench: Bench, workload: str) -> list[str]:
    """What the write-back buffer did in the breakdown steps: reads it served, rows entering it, rows it displaced."""
    lines = []
    for v in bench.variants:
        counts = v.counts.get(workload, {})
        reads = counts.get("buffer reads", 0.0)
        moved = [counts.get(key, 0.0) for key in ("buffer hits", "buffer claims", "buffer evictions")]
        if not reads or (not any(moved) and not v.rows_written_back.get(workload)):  # an empty buffer, only read past
            continue
        lines.append(
            f"- {v.name}: {counts.get('buffer hits', 0.0) / reads:.1%} of {reads:,.0f} row reads per step served from "
            f"the buffer; {counts.get('buffer claims', 0.0):,.0f} rows entered it per step, "
            f"{counts.get('buffer evictions', 0.0):,.0f} rows moved to its overflow list (displaced, or no slot) "
            f"({v.rows_written_back.get(workload, 0.0):,.0f} rows written back to the files per step)"
        )
    if not lines:
        return []
    return [f"**Write-back buffer** (mean per step over the {bench.args.breakdown} breakdown steps):", "", *lines, ""]


def buffer_note(bench: Bench, total_rows: int) -> str:
    """What the disk tables' write-back buffer holds and writes back, against the rows the corpus touches."""
    variant = next((v for v in bench.variants if v.key == "disk-warm-on"), None)
    if variant is None:
        return ""
    model = bench.models[variant.key]
    buffers = {i: e.table._buffer for i, e in model.engram_layers().items() if getattr(e.table, "_buffer", None)}
    if not buffers:
        return ""
    slots = sum(buffer.num_slots for buffer in buffers.values())
    overflow = 0  # corpus rows beyond the ways of their set: the most the buffer cannot keep at once
    for layer, buffer in buffers.items():
        _, counts = torch.unique(buffer.set_of(bench.corpus_row_ids[layer]), return_counts=True)
        overflow += int((counts - buffer.ways).clamp(min=0).sum())
    ways = next(iter(buffers.values())).ways
    note = (
        f" The write-back buffer ({variant.storage.write_buffer_mb:g} MiB per table) holds {slots:,} rows (weight "
        f"and optimizer state), {slots / total_rows:.1f}x the rows the whole corpus touches, in sets of {ways} "
        f"(set = row mod sets, the least recently written row of a set leaves first); {overflow / total_rows:.2%} "
        "of the corpus's rows do not fit in their set"
    )
    written = variant.rows_written_back.get("training")
    if written is not None:
        note += f": in the breakdown steps it wrote {written:,.0f} rows per step back to the files"
    return note + "."


def corpus_name(args: argparse.Namespace) -> str:
    if args.corpus == "sonnets":
        return "sonnets 1-140"
    return f"the first {args.corpus_tokens:,} tokens of the Wikipedia paragraphs (`engram data wikipedia`)"


def source_version() -> str:
    """The checkout's commit, and whether src/ differs from it ("unknown" outside a git checkout)."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}{' with uncommitted changes in src/' if dirty else ''}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--table-mb", type=float, default=512, help="float32 table size in MiB (default 512)")
    parser.add_argument("--cache-mb", type=float, default=4, help="hot-row cache per table, MiB (default 4)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--steps", type=int, default=30, help="timed training rounds (default 30)")
    parser.add_argument("--inference-steps", type=int, default=60, help="timed inference rounds (default 60)")
    parser.add_argument("--cold-steps", type=int, default=6, help="timed rounds of the cold block (default 6)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--breakdown", type=int, default=3, help="steps per configuration with timers (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for compute (default 1)")
    parser.add_argument("--workloads", default="inference,training", help="comma-separated (default both)")
    parser.add_argument("--table-optimizer", choices=["adam", "adagrad"], default="adam", help="(default adam)")
    parser.add_argument(
        "--configs",
        default=",".join(CONFIG_KEYS),
        help="comma-separated configurations besides device (default all: " + ", ".join(CONFIG_KEYS) + ")",
    )
    parser.add_argument("--dir", default=None, help="parent of the temporary disk-table folder (default: tmp)")
    parser.add_argument(
        "--verify-gib", type=float, default=0, help="time `tables verify` over a table of this many GiB (default 0: no)"
    )
    parser.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    parser.add_argument("--corpus", choices=["sonnets", "wikipedia"], default="sonnets", help="(default sonnets)")
    parser.add_argument(
        "--corpus-tokens", type=int, default=4_000_000, help="tokens of --corpus wikipedia (default 4,000,000)"
    )
    parser.add_argument(
        "--disk-seconds", type=float, default=2.0, help="per rate of the disk limit, with a cold config (0: none)"
    )
    parser.add_argument("--disk-depth", type=int, default=64, help="threads of the deep-queue disk rate (default 64)")
    parser.add_argument("--markdown", action="store_true", help="print markdown for docs/benchmarks.md")
    parser.add_argument("--quiet", dest="verbose", action="store_false", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    for name in ("threads", "steps", "inference_steps", "batch", "seq_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.breakdown < 0 or args.cold_steps < 1:
        parser.error("--warmup and --breakdown must be >= 0, --cold-steps >= 1")
    if args.table_mb <= 0 or args.cache_mb <= 0 or args.verify_gib < 0:
        parser.error("--table-mb and --cache-mb must be > 0, --verify-gib >= 0")
    if args.seq_len > 256:
        parser.error("--seq-len must be <= the model's max_seq_len, 256")
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if set(args.configs) - set(CONFIG_KEYS):
        parser.error(f"--configs takes some of {', '.join(CONFIG_KEYS)}")
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not args.workloads or set(args.workloads) - {"inference", "training"}:
        parser.error("--workloads takes 'inference', 'training' or both")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    source = source_version()  # now: the modules were imported from this
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as the Trainer does on CPU, for the inference rounds too
    md = args.markdown
    heading = (lambda text: f"### {text}") if md else (lambda text: f"== {text} ==")
    root = Path(tempfile.mkdtemp(prefix="engram-bench-tiers-", dir=args.dir))
    fs = filesystem_of(root)
    if fs == "tmpfs":
        print(f"warning: {root} is on tmpfs (memory), not a disk; use --dir", file=sys.stderr)
    out: list[str] = []
    bench = None
    try:
        bench = Bench(args, root)
        bench.log(f"building models (tables in {root}, {fs})")
        bench.build()
        total_rows, batch_rows = bench.corpus_rows()
        ratios: dict[str, dict[str, float]] = {}
        paired: dict[str, dict[str, float]] = {}
        sections: dict[str, list[str]] = {}
        for workload in args.workloads:
            if workload == "inference":
                for model in bench.models.values():
                    model.eval()
                bench.run_workload("inference", bench.infer)
                bench.breakdown("inference", bench.infer, args.warmup + args.inference_steps)
            else:
                bench.make_trainers()
                bench.run_workload("training", bench.train)
                bench.breakdown("training", bench.train, args.warmup + args.steps)
            sections[workload], ratios[workload], paired[workload] = results_lines(bench, workload, md)
        disk_sizes = {key: folder_mib(root / key) for key in bench.models if key.startswith("disk")}
        limit = {}
        if args.disk_seconds and any(v.cold for v in bench.variants):
            bench.log("measuring the disk's random read rate")
            limit = disk_limit(root, args.disk_seconds, args.disk_depth)
        if args.verify_gib:
            bench.log(f"timing verify_tables over a {args.verify_gib:g} GiB table")
            scan = verify_scan_lines(root, args.verify_gib, md)
        elapsed = time.perf_counter() - start

        config = bench.config
        e = config.engram
        table = bench.models["device"].engram_tables()[0]
        table_mib = table.num_rows * table.dim * 4 / 2**20
        row_bytes = table.dim * 4
        cache_model = bench.models.get("disk-cold-cache")
        cache = cache_model.engram_tables()[0].cache if cache_model is not None else None
        optimizer_name = "RowAdagrad" if args.table_optimizer == "adagrad" else "RowAdam"
        facts = [
            (
                "rounds",
                f"{args.inference_steps} (inference) and {args.steps} (training) timed with the device and warm "
                f"configurations, then per workload {args.cold_steps} timed (device and "
                f"cold), each block after {args.warmup} warmup, alternating, order flipped every round; medians",
            ),
            ("batch", f"{args.batch} x {args.seq_len} tokens of {corpus_name(args)} (1,024-id BPE), seed {args.seed}"),
            ("disk tables", f"{root.parent} ({fs}), removed at the end"),
            ("source", source),
            ("wall time", f"{elapsed:.0f} s"),
        ]
        out += [heading("Environment"), "", *environment_lines(facts, md), ""]
        out += [
            heading("Model and tables"),
            "",
            f"vocab {config.vocab_size}, d_model {config.d_model}, {config.n_layers} layers ({config.n_dense_layers} "
            f"dense), MoE 1 shared + {config.moe.n_routed_experts} routed experts, top-{config.moe.top_k}; Engram at "
            f"layers {e.layer_ids}, N={e.max_ngram_size}, K={e.n_head_per_ngram}, rows of {table.dim} float32 "
            f"({row_bytes} B), base sizes {e.engram_vocab_size}: {table.num_rows:,} rows, {table_mib:,.1f} MiB. "
            f"Disk folders after the run (table, {optimizer_name} state, journal): "
            + ", ".join(f"{key} {mib:,.0f} MiB" for key, mib in disk_sizes.items())
            + ". "
            f"A batch touches {batch_rows:,.0f} distinct rows (median); the whole training corpus "
            f"({len(bench.tokens):,} tokens) only {total_rows:,} ({total_rows * row_bytes / 2**20:.1f} MiB of rows)."
            + cache_note(args, cache, total_rows)
            + buffer_note(bench, total_rows),
            "",
        ]
        where = f"{args.batch} x {args.seq_len} tokens/step, {args.threads} compute thread(s)"
        titles = {
            "inference": f"Inference forward (eval, no_grad), {where}",
            "training": f"Training step (Trainer.train_step, {optimizer_name}, disk journal on), {where}",
        }
        for workload in args.workloads:
            out += [
                heading(titles[workload]),
                "",
                *sections[workload],
                "",
                *verdict_lines(ratios[workload], paired[workload]),
                "",
                *checksum_lines(bench, workload),
                *cold_lines(bench, workload, limit, ratios[workload]),
                *buffer_lines(bench, workload),
            ]
            if args.breakdown:
                out += [
                    f"Where the time goes: mean ms per step over {args.breakdown} extra steps per configuration, "
                    "timers around the library's methods (nested: 'forward' contains the lookup, which contains "
                    "the wait; 'fetch' runs in the prefetch thread when prefetch is on, overlapping the compute, and "
                    "the write buffer's write-back on its worker thread, the training thread waiting only where the "
                    "next column says).",
                    "",
                    *breakdown_lines(bench, workload, md),
                    "",
                ]
        if args.verify_gib:
            out += [heading("Checking whole tables (engram tables verify)"), "", *scan, ""]
        print("\n".join(out).rstrip())
    finally:
        for model in bench.models.values() if bench is not None else []:
            for table in model.engram_tables():
                if isinstance(table, DiskTable):
                    table.close()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
