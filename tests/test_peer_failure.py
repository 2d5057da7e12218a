"""Which errors the trainer explains as a failed rank: the real errors of gloo when a peer hangs or
dies, and nothing else (an out-of-memory error or a bug passes through unchanged)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

from engram.training.distributed import peer_failure

# Rank 0 reports what its all-reduces after the first raised; rank 1 hangs or exits before them.
# "hang" waits for one all-reduce; "hang-buckets" starts three at once and waits for each in turn, as
# DDP's backward pass does with its gradient buckets (the first times out, the others find the
# connection closed because of it).
_WORKER = """
import datetime, os, sys, time, torch, torch.distributed as dist
from engram.training.distributed import peer_failure
rank, mode, port = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=2))
t = torch.ones(4)
dist.all_reduce(t)
if rank == 1:
    if mode.startswith("hang"):
        time.sleep(8)
    os._exit(0)
works = [dist.all_reduce(torch.ones(4), async_op=True) for _ in range(3 if mode == "hang-buckets" else 1)]
for work in works:
    try:
        work.wait()
    except RuntimeError as error:
        print("FAILURE", peer_failure(error))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("mode", "expected"), [("hang", "timed out"), ("hang-buckets", "timed out"), ("exit", "gone")])
def test_gloo_errors_of_a_hung_or_dead_peer_are_recognised(mode, expected):
    port = str(_free_port())
    ranks = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(r), mode, port], stdout=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=60)[0] for p in ranks]
    expected_lines = 3 if mode == "hang-buckets" else 1
    assert outputs[0] == f"FAILURE {expected}\n" * expected_lines, outputs


def test_other_errors_are_not_blamed_on_another_rank():
    assert peer_failure(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) is None
    assert peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x4)")) is None
    assert peer_failure(dist.DistBackendError("NCCL communicator was aborted")) == "failed"
    assert peer_failure(dist.DistBackendError("Watchdog caught collective operation timeout")) == "timed out"
