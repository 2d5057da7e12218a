"""Host reads (device-to-host syncs on a GPU) and torch.compile graph breaks of one Engram training step.

A read of a tensor's value by Python (``.item()``, ``bool(t)``, ``if t.any():``, ``.tolist()``) and an
operator whose output shape depends on values (``nonzero``, ``unique``, ``bincount``, a sparse
``coalesce``) make a GPU wait for everything queued before it, and ``torch.compile`` cannot trace
them. On a CPU nothing waits, so they cost little here and are easy to miss: this script finds
them anyway, with ``tests/host_reads.py`` (a ``TorchDispatchMode`` that sees every ATen operator of
the forward and backward pass, and a ``TorchFunctionMode`` for ``tolist``/``numpy``/``cpu``), and
attributes each to its call site.

The model is the reference Engram model of ``bench_training.py`` (vocab 1024, d_model 128, 4 layers,
the first dense, MoE 1 shared + 13 routed experts top-2, Engram at layer 1, ``allocate(base, rho=0.8)``),
device tier, trained by the real ``engram.training.Trainer`` (``train_step``: forward, backward,
clipping, the finite checks, RowAdam on the table rows, AdamW, the MoE balancing biases), and the
same model with dense SwiGLU FFNs instead of the MoE (``--models``), which isolates the MoE's reads.

1. Host reads of one ``train_step()`` after ``--warmup`` steps, by kind and by call site: the
   library's own code (src/engram) or torch's code called by it. With ``engram.set_debug_checks``
   (where the library has it) the same step is counted again with every inner check on.
2. Eager step time: two trainers of the same model and seed, stepping in turn (the order flips
   every round), one with the debug checks on (the value checks of every component, as before
   they moved to the boundary), one without; medians and the 10th-90th percentile spread. Without
   ``set_debug_checks`` both run the same code. With ``--compare-source DIR`` (a folder holding
   another version's ``engram`` package, e.g. ``git archive <commit> src | tar -x -C /tmp/before``
   gives ``/tmp/before/src``) the step is also timed against that version: two worker processes,
   one per version, step in turn, so the machine's changing load hits both alike.
3. ``torch.compile``: the trainer's forward module replaced by ``torch.compile(model, backend=...)``
   (``--backend``, default ``aot_eager``: Dynamo's graph capture plus AOT autograd's backward
   graph; breaks are found by Dynamo whatever the backend), ``--compile-steps`` training steps, the
   graph breaks read from torch's ``graph_breaks`` log (location and reason, ours or torch's), the
   graphs compiled and the losses against eager. Once with torch's default configuration and once
   with ``torch._dynamo.config.capture_scalar_outputs = True``, which lets Dynamo trace the MoE's
   one read of its expert counts instead of breaking the graph there.

Run from the repository root::

    python benchmarks/bench_host_syncs.py             # plain text
    python benchmarks/bench_host_syncs.py --markdown  # markdown for docs/benchmarks.md
    python benchmarks/bench_host_syncs.py --json out.json
    python benchmarks/bench_host_syncs.py --compare-source /tmp/before/src  # before/after step times

Takes about 2-4 minutes on a 2-core machine (most of it compiling). Exits 0; the output says what
it found.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

import engram
from engram import CompressedTokenizer, EngramConfig, EngramIndexer
from engram.model import EngramLM, ModelConfig
from engram.model.accounting import allocate
from engram.training import TrainConfig, Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root, for tests.*
from tests.corpus import sonnets_tokenizer, sonnets_tokens
from tests.host_reads import HostReads, Read

from _report import environment_lines, format_table
from bench_training import BASE, ENGRAM_LAYERS, N_EMBED_PER_NGRAM, N_HEAD_PER_NGRAM

MODELS = ("engram-moe", "engram-dense")


# -- models and trainers ----------------------------------------------------------------------------


def model_config(name: str) -> ModelConfig:
    engram_cfg = EngramConfig(
        layer_ids=ENGRAM_LAYERS,
        n_embed_per_ngram=N_EMBED_PER_NGRAM,
        n_head_per_ngram=N_HEAD_PER_NGRAM,
        pad_id=sonnets_tokenizer().token_to_id("<pad>"),
    )
    config = allocate(BASE, rho=0.8, engram=engram_cfg).engram
    if name == "engram-dense":  # the same model with dense SwiGLU FFNs of the MoE's active width
        active = (config.moe.n_shared_experts + config.moe.top_k) * config.moe.expert_hidden
        config = dataclasses.replace(config, moe=None, ffn_hidden=active)
    return config


def make_trainer(name: str, args: argparse.Namespace, tokenizer: CompressedTokenizer, tokens: np.ndarray) -> Trainer:
    config = model_config(name)
    seed_everything(args.seed)
    model = EngramLM(config, indexer=EngramIndexer(config.engram, tokenizer))
    train = TrainConfig(
        steps=10**6,
        batch_size=args.batch,
        seq_len=args.seq_len,
        warmup_steps=10,
        seed=args.seed,
        device="cpu",
        threads=args.threads,
        log_every=0,
        eval_every=0,
        checkpoint_every=0,
    )
    return Trainer(model, train, tokens, out_dir=None, progress=False)


def has_debug_flag() -> bool:
    return hasattr(engram, "set_debug_checks")


@contextmanager
def debug_checks(enabled: bool):
    """The library's debug checks on or off inside (a no-op where the library has no such flag)."""
    if not has_debug_flag():
        yield
        return
    before = engram.debug_checks()
    engram.set_debug_checks(enabled)
    try:
        yield
    finally:
        engram.set_debug_checks(before)


# -- 1. host reads ------------------------------------------------------------------------------------


def owner(read: Read) -> str:
    if read.ours:
        return "engram"
    if read.torch_site is not None and read.torch_site.startswith("torch/optim/"):
        return "torch.optim (step counts kept on the CPU)"
    return "torch" if read.torch_site is not None else "other"


def count_reads(trainer: Trainer, warmup: int, debug: bool) -> list[Read]:
    for _ in range(warmup):
        trainer.train_step()
    with debug_checks(debug), HostReads() as seen:
        trainer.train_step()
    return seen.reads


def reads_summary(reads: list[Read]) -> dict[str, Any]:
    return {
        "total": len(reads),
        "by_kind": dict(Counter(r.kind for r in reads)),
        "by_owner": dict(Counter(owner(r) for r in reads)),
        "sites": [
            {"count": n, "kind": kind, "op": op, "site": site, "torch_site": torch_site}
            for (kind, op, site, torch_site), n in sorted(
                Counter((r.kind, r.op, r.site, r.torch_site) for r in reads).items(), key=lambda i: i[0][2]
            )
        ],
    }


# -- 2. eager step time -----------------------------------------------------------------------------------


def time_steps(name: str, args: argparse.Namespace, tokenizer, tokens) -> dict[str, list[float]]:
    """Milliseconds per train_step of two identical trainers, debug checks off and on, alternating."""
    trainers = {"default": make_trainer(name, args, tokenizer, tokens)}
    trainers["debug checks on" if has_debug_flag() else "same code again"] = make_trainer(name, args, tokenizer, tokens)
    times: dict[str, list[float]] = {label: [] for label in trainers}
    labels = list(trainers)
    for i in range(args.warmup + args.steps):
        for label in labels if i % 2 == 0 else reversed(labels):
            with debug_checks(label == "debug checks on"):
                start = time.perf_counter()
                trainers[label].train_step()
                elapsed = time.perf_counter() - start
            if i >= args.warmup:
                times[label].append(elapsed * 1e3)
    return times


class _StepWorker:
    """A trainer in a process of its own, with the library from ``source`` (a folder holding ``engram``)."""

    def __init__(self, name: str, args: argparse.Namespace, source: Path):
        command = [sys.executable, __file__, "--worker", name, "--batch", str(args.batch), "--seq-len"]
        command += [str(args.seq_len), "--seed", str(args.seed), "--threads", str(args.threads)]
        env = {**os.environ, "PYTHONPATH": str(source)}
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.source = self._reply()  # the engram it imported

    def _reply(self) -> str:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the step worker exited with code {self.process.wait()}")
        return line.strip()

    def step(self) -> float:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        return float(self._reply())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def worker_main(args: argparse.Namespace) -> int:
    """``--worker``: build the trainer, then time one train_step per ``step`` line read from stdin."""
    torch.set_num_threads(args.threads)
    tokenizer = CompressedTokenizer(sonnets_tokenizer(), cache_dir=False)
    trainer = make_trainer(args.worker, args, tokenizer, sonnets_tokens()[0])
    print(Path(engram.__file__).resolve().parent, flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        start = time.perf_counter()
        trainer.train_step()
        print(f"{(time.perf_counter() - start) * 1e3:.6f}", flush=True)
    return 0


def time_sources(name: str, args: argparse.Namespace) -> dict[str, list[float]]:
    """Milliseconds per train_step of this library and of ``--compare-source``'s, each in a worker
    process, stepping in turn (the order flips every round): the same load hits both."""
    here = Path(engram.__file__).resolve().parents[1]
    workers = {
        "this source": _StepWorker(name, args, here),
        "--compare-source": _StepWorker(name, args, args.compare_source),
    }
    times: dict[str, list[float]] = {label: [] for label in workers}
    labels = list(workers)
    try:
        for i in range(args.warmup + args.steps):
            for label in labels if i % 2 == 0 else reversed(labels):
                elapsed = workers[label].step()
                if i >= args.warmup:
                    times[label].append(elapsed)
    finally:
        for worker in workers.values():
            worker.close()
    return times


def spread(samples: list[float]) -> tuple[float, float, float]:
    """(median, 10th percentile, 90th percentile)."""
    q = np.percentile(samples, [50, 10, 90])
    return float(q[0]), float(q[1]), float(q[2])


# -- 3. torch.compile ---------------------------------------------------------------------------------------

_BREAK_AT = re.compile(r"in user code at (\S+):(\d+)")
_ENGRAM_SRC = str(Path(engram.__file__).resolve().parent) + "/"
_TORCH_SRC = str(Path(torch.__file__).resolve().parent) + "/"


class _BreakLog(logging.Handler):
    """Collects Dynamo's graph-break records (torch's ``graph_breaks`` log artifact)."""

    def __init__(self) -> None:
        super().__init__()
        self.breaks: list[dict[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        where = _BREAK_AT.search(text)
        if "Graph break" not in text or where is None:
            return
        path, line = where.group(1), where.group(2)
        reason = next(
            (ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.strip().startswith("Explanation:")),
            next((ln.strip() for ln in text.splitlines()[1:] if ln.strip()), "?"),
        )
        if path.startswith(_ENGRAM_SRC):
            site, ours = f"engram/{path[len(_ENGRAM_SRC) :]}:{line}", "engram"
        elif path.startswith(_TORCH_SRC):
            site, ours = f"torch/{path[len(_TORCH_SRC) :]}:{line}", "torch"
        else:
            site, ours = f"{path}:{line}", "other"
        self.breaks.append({"site": site, "owner": ours, "reason": reason[:200]})


def compile_check(
    name: str, args: argparse.Namespace, tokenizer, tokens, capture_scalars: bool, eager_losses: list[float]
) -> dict[str, Any]:
    """Train ``--compile-steps`` steps through ``torch.compile(model)``; graph breaks, graphs, losses."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    trainer = make_trainer(name, args, tokenizer, tokens)
    trainer.forward_model = torch.compile(trainer.model, backend=args.backend)
    handler = _BreakLog()
    logger = logging.getLogger("torch._dynamo.symbolic_convert.__graph_breaks")
    torch._logging.set_logs(graph_breaks=True)
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False  # keep torch's own printing off the report
    result: dict[str, Any] = {"capture_scalar_outputs": capture_scalars, "backend": args.backend}
    start = time.perf_counter()
    try:
        with torch._dynamo.config.patch(capture_scalar_outputs=capture_scalars):
            result["losses"] = [trainer.train_step() for _ in range(args.compile_steps)]
        result["error"] = None
    except Exception as exc:  # report what failed, e.g. a backend that cannot compile a sparse gradient
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        result["losses"] = []
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        torch._logging.set_logs()
    result["seconds"] = time.perf_counter() - start
    result["graphs"] = int(counters["stats"]["unique_graphs"])
    result["breaks"] = handler.breaks
    steps = len(result["losses"])
    result["max_loss_difference"] = (
        max(abs(a - b) for a, b in zip(result["losses"], eager_losses[:steps], strict=True)) if steps else None
    )
    torch._dynamo.reset()
    return result


# -- report ---------------------------------------------------------------------------------------------------


def reads_lines(name: str, label: str, reads: list[Read], md: bool) -> list[str]:
    summary = reads_summary(reads)
    body = [
        [
            str(s["count"]),
            s["kind"],
            s["op"],
            f"`{s['site']}`" if md else s["site"],
            (f"`{s['torch_site']}`" if md else s["torch_site"]) if s["torch_site"] else "-",
        ]
        for s in summary["sites"]
    ]
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(summary["by_kind"].items()))
    owners = ", ".join(f"{k} {v}" for k, v in sorted(summary["by_owner"].items()))
    return [
        f"{name}, {label}: {summary['total']} host reads in one train_step ({kinds}; {owners}).",
        "",
        *format_table(["reads", "kind", "operator", "call site (src/engram)", "inside torch at"], body, md),
    ]


def timing_lines(
    name: str, times: dict[str, list[float]], args: argparse.Namespace, md: bool, what: str = "alternating"
) -> list[str]:
    body = []
    base = statistics.median(next(iter(times.values())))
    for label, samples in times.items():
        median, low, high = spread(samples)
        body.append([label, str(len(samples)), f"{median:.1f}", f"{low:.1f} - {high:.1f}", f"{median / base:.3f}x"])
    return [
        f"{name}: eager `train_step`, {args.batch} x {args.seq_len} tokens, {args.threads} thread(s), "
        f"{args.steps} timed steps each after {args.warmup} warmup, {what}.",
        "",
        *format_table(["configuration", "steps", "median ms", "p10 - p90 ms", "vs first row"], body, md),
    ]


def compile_lines(name: str, results: list[dict[str, Any]], md: bool) -> list[str]:
    lines = []
    for r in results:
        config = "capture_scalar_outputs=True" if r["capture_scalar_outputs"] else "torch's default configuration"
        owners = Counter(b["owner"] for b in r["breaks"])
        status = "ran" if r["error"] is None else f"FAILED ({r['error']})"
        diff = r["max_loss_difference"]
        lines.append(
            f"- {name}, backend `{r['backend']}`, {config}: {len(r['breaks'])} graph breaks "
            f"({', '.join(f'{k} {v}' for k, v in sorted(owners.items())) or 'none'}), {r['graphs']} graphs compiled; "
            f"{len(r['losses'])} training steps {status} in {r['seconds']:.0f} s"
            + (f"; losses differ from eager by at most {diff:.2e}" if diff is not None else "")
            + "."
        )
        for (site, owner_, reason), n in Counter((b["site"], b["owner"], b["reason"]) for b in r["breaks"]).items():
            lines.append(f"  - {n} x {'`' + site + '`' if md else site} ({owner_}): {reason}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per configuration (default 40)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data seed (default 0)")
    parser.add_argument("--backend", default="aot_eager", help="torch.compile backend (default aot_eager)")
    parser.add_argument("--compile-steps", type=int, default=3, help="training steps compiled (default 3; 0: skip)")
    parser.add_argument("--no-timing", action="store_true", help="skip part 2 (eager step times)")
    parser.add_argument(
        "--compare-source",
        type=Path,
        help="also time the step with the engram package under this folder (e.g. an export of an older "
        "commit's src/), in worker processes stepping in turn with this one's",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--markdown", action="store_true", help="print markdown for docs/benchmarks.md")
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.compare_source is not None and not (args.compare_source / "engram" / "__init__.py").is_file():
        parser.error(f"--compare-source: no engram package in {args.compare_source}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown or not args.models:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    for name in ("threads", "steps", "batch", "seq_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.compile_steps < 0:
        parser.error("--warmup and --compile-steps must be >= 0")
    if args.seq_len > BASE.max_seq_len:
        parser.error(f"--seq-len must be <= the model's max_seq_len, {BASE.max_seq_len}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    md = args.markdown
    heading = (lambda text: f"### {text}") if md else (lambda text: f"== {text} ==")
    tokens, _ = sonnets_tokens()
    tokenizer = CompressedTokenizer(sonnets_tokenizer(), cache_dir=False)

    record: dict[str, Any] = {"debug_flag": has_debug_flag(), "models": {}}
    sections: list[str] = []
    for name in args.models:
        entry: dict[str, Any] = record["models"].setdefault(name, {})
        reads = count_reads(make_trainer(name, args, tokenizer, tokens), args.warmup, debug=False)
        entry["reads"] = reads_summary(reads)
        sections += [heading(f"Host reads of one training step: {name}"), ""]
        sections += [*reads_lines(name, "default", reads, md), ""]
        if has_debug_flag():
            debug_reads = count_reads(make_trainer(name, args, tokenizer, tokens), args.warmup, debug=True)
            entry["reads_debug"] = reads_summary(debug_reads)
            sections += [*reads_lines(name, "with engram.set_debug_checks(True)", debug_reads, md), ""]
        eager = make_trainer(name, args, tokenizer, tokens)
        eager_losses = [eager.train_step() for _ in range(args.compile_steps)]
        if not args.no_timing:
            times = time_steps(name, args, tokenizer, tokens)
            entry["step_ms"] = times
            sections += [heading(f"Eager step time: {name}"), "", *timing_lines(name, times, args, md), ""]
        if args.compare_source is not None:
            times = time_sources(name, args)
            entry["step_ms_sources"] = times
            what = f"alternating between two worker processes (--compare-source {args.compare_source})"
            sections += [*timing_lines(name, times, args, md, what), ""]
        if args.compile_steps:
            results = [compile_check(name, args, tokenizer, tokens, capture, eager_losses) for capture in (False, True)]
            entry["compile"] = results
            sections += [heading(f"torch.compile: {name}"), "", *compile_lines(name, results, md), ""]
    elapsed = time.perf_counter() - start
    facts = [
        ("batch", f"{args.batch} x {args.seq_len} tokens, seed {args.seed}"),
        ("debug flag", "engram.set_debug_checks" if has_debug_flag() else "none (code before the boundary checks)"),
        ("wall time", f"{elapsed:.0f} s"),
    ]
    out = [heading("Environment"), "", *environment_lines(facts, md), "", *sections]
    print("\n".join(out).rstrip())
    if args.json is not None:
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
