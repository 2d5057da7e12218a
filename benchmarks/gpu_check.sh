#!/usr/bin/env bash
# The GPU check: the CUDA tests and the GPU tier benchmark on one CUDA device, then a summary table.
#
#   benchmarks/gpu_check.sh                 # on a machine with a CUDA GPU (about 4-6 minutes on one H200)
#   benchmarks/gpu_check.sh --cpu-dry-run   # the same steps on the CPU (--device cpu --small): checks the plumbing
#
# Options:
#   --out DIR        results folder (default: $OUT if set, else runs/gpu-check-<UTC time>)
#   --table-gb GB    float32 table GB of the benchmark (default 8: the paper's setting at several GB,
#                    sized so that the whole check ends in under 8 minutes; see docs/benchmarks.md)
#   --bench-timeout S  stop the benchmark after S seconds (default 390)
#
# It runs, in the repository root:
#   1. python -m pytest tests/test_cuda.py: hashing and Engram layer parity on the device against the
#      CPU, device/host/disk tier equivalence on the device, pinned-memory prefetch on a side stream,
#      a disk model reading the next batch ahead from ids on the device;
#   2. python benchmarks/gpu_tiers.py --table-gb GB: host tier against device tier, inference and
#      training, prefetch on and off (JSON in the results folder);
#   3. python benchmarks/gpu_check_summary.py: the summary table (also written to summary.txt).
# Files in the results folder: env.txt, tests.log, tests.xml, gpu_tiers.log, gpu_tiers.json, summary.txt.
# Exit status 0 when every test passed (or skipped) and the benchmark finished with its correctness check OK.
#
# Python: $ENGRAM_PYTHON if set; else the repository's .venv (make setup) if its torch sees a CUDA
# device (any torch for --cpu-dry-run); else a virtual environment .venv-gpu created with
# --system-site-packages from python3, so that the torch with CUDA installed on the machine is the one
# used (make setup would install the CPU build it pins). engram itself is not installed: the checkout's
# src/ goes first on PYTHONPATH, as the tests' torchrun jobs do. Packages the check needs and that are
# missing (numpy, safetensors, tokenizers, tqdm, pytest) are pip-installed into .venv-gpu; a machine without
# network access needs them preinstalled or carried as wheels.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

dry_run=0
out_dir="${OUT:-}"
table_gb=8
bench_timeout=390
while (($#)); do
    case "$1" in
        --cpu-dry-run) dry_run=1 ;;
        --out) out_dir="$2"; shift ;;
        --table-gb) table_gb="$2"; shift ;;
        --bench-timeout) bench_timeout="$2"; shift ;;
        -h | --help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
out_dir="${out_dir:-runs/gpu-check-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd)"
started=$SECONDS

log() { echo "[gpu_check $(date -u +%H:%M:%S) +$((SECONDS - started))s] $*" >&2; }

# -- python ------------------------------------------------------------------------------------------
sees_cuda() { "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
has_torch() { "$1" -c 'import torch' 2>/dev/null; }

pick_python() {
    if [[ -n "${ENGRAM_PYTHON:-}" ]]; then
        echo "$ENGRAM_PYTHON"
    elif [[ -x .venv/bin/python ]] && { ((dry_run)) && has_torch .venv/bin/python || sees_cuda .venv/bin/python; }; then
        echo "$REPO/.venv/bin/python"
    else
        if [[ ! -x .venv-gpu/bin/python ]]; then
            log "creating .venv-gpu (python3 -m venv --system-site-packages: the machine's own torch)"
            python3 -m venv --system-site-packages .venv-gpu
            # python3 may itself be a virtual environment, whose packages --system-site-packages does not
            # reach: a .pth file puts its site-packages folders on the new environment's path as well.
            local site
            site="$(.venv-gpu/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
            python3 -c 'import site; print("\n".join(site.getsitepackages()))' >"$site/_machine_packages.pth"
        fi
        echo "$REPO/.venv-gpu/bin/python"
    fi
}
PY="$(pick_python)"
has_torch "$PY" || { echo "gpu_check.sh: $PY has no torch; install torch (with CUDA) for it, or set ENGRAM_PYTHON" >&2; exit 1; }
if ((!dry_run)) && ! sees_cuda "$PY"; then
    echo "gpu_check.sh: torch in $PY sees no CUDA device; on a machine without a GPU run: $0 --cpu-dry-run" >&2
    exit 1
fi
missing=()
for module in numpy safetensors tokenizers tqdm pytest; do
    "$PY" -c "import $module" 2>/dev/null || missing+=("$module")
done
if ((${#missing[@]})); then
    log "pip-installing what $PY lacks: ${missing[*]}"
    "$PY" -m pip install --quiet "${missing[@]}" || {
        echo "gpu_check.sh: $PY lacks ${missing[*]} and pip could not install them (no network?)" >&2
        exit 1
    }
fi

export PYTHONPATH="$REPO/src:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if ((dry_run)); then
    export ENGRAM_CUDA_TESTS_ON_CPU=1
    bench_args=(--device cpu --small)
else
    bench_args=(--table-gb "$table_gb")
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "mode: $( ((dry_run)) && echo 'cpu dry run' || echo gpu)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (uncommitted changes)')"
    echo "python: $PY"
    "$PY" -c 'import platform, torch; print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)'
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    echo "cpus: $(nproc), memory: $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
} | tee "$out_dir/env.txt" >&2

# -- 1. the CUDA tests ------------------------------------------------------------------------------------
log "1/3 CUDA tests: tests/test_cuda.py"
tests_rc=0
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py --junitxml="$out_dir/tests.xml" 2>&1 |
    tee "$out_dir/tests.log" >&2 || tests_rc=$?
log "tests exit status $tests_rc"

# -- 2. the GPU tier benchmark ------------------------------------------------------------------------------
log "2/3 GPU tier benchmark: benchmarks/gpu_tiers.py ${bench_args[*]} (stopped after ${bench_timeout} s)"
bench_rc=0
timeout --signal=TERM --kill-after=20 "$bench_timeout" \
    "$PY" benchmarks/gpu_tiers.py "${bench_args[@]}" --out "$out_dir/gpu_tiers.json" 2>&1 |
    tee "$out_dir/gpu_tiers.log" >&2 || bench_rc=$?
log "benchmark exit status $bench_rc"

# -- 3. the summary -----------------------------------------------------------------------------------------
log "3/3 summary"
summary_rc=0
"$PY" benchmarks/gpu_check_summary.py "$out_dir" || summary_rc=$?
log "done in $((SECONDS - started)) s; results in $out_dir"
((tests_rc == 0 && bench_rc == 0 && summary_rc == 0))
