#!/usr/bin/env bash
# One lent-GPU session of gpumatch in ONE device call: the GPU tests (match_many's among
# them), bench_gpu.py (issue 3), match_files on a dask-cuda cluster and bench_visit.py
# (issue 5).
#
# How to run it (from a session whose task has a GPU; the device tool's `status` says so):
#   1. on the session machine, in the repository root, put the wheels the device image
#      lacks (astropy; Dask and dask-cuda) where the device can take them along:
#          bash benchmarks/fetch_device_wheels.sh
#      (without network: mkdir -p .whl && cp ../shared/device-wheels/*.whl .whl/ ; the
#      dask-cuda step then fails on its imports and the others run as before)
#   2. one device call (the `run` tool), 10 minutes at most:
#          command:   bash benchmarks/gpu_session.sh
#          carry:     [".whl"]
#          timeout_s: 600
#   3. the outputs come back under the reply's files_at (flat, at most 8 files):
#          summary.txt     nvidia-smi -L, each step's exit status and seconds
#          gpu_tests.log   pytest tests/test_gpu.py tests/test_cuda_compile.py (compile tests)
#          bench_gpu.md    bench_gpu.log     benchmarks/bench_gpu.py --output ...
#          dask_cuda.log   benchmarks/dask_cuda_check.py (LocalCUDACluster against NumPy)
#          bench_visit.md  bench_visit.log   benchmarks/bench_visit.py --backend cupy --output ...
#      Record the tables in benchmarks/RESULTS.md with the device line they print.
#
# Assumes: the repository root as the working directory, $OUT a writable (empty) directory,
# the wheels in .whl/ (device image: Python 3.12 with cupy, numpy, scipy, pytest).
#
# Budget (the device call's wall limit is 600 s): GPU tests ~2 min, bench_gpu ~3 min,
# dask-cuda check ~1 min, bench_visit ~3 min. Every step runs under its own `timeout`, so
# a hanging step cannot eat the whole call and the later steps still run: each step may use
# what is left of TOTAL_S after reserving the guaranteed minimum of every later step (time
# an earlier step does not use goes to the later ones). No `set -e`: a failing step does not stop the others.

set -u
: "${OUT:?OUT must name a writable output directory}"

TOTAL_S=${GPU_SESSION_TOTAL_S:-580}   # stay under the device call's 600 s
# Guaranteed minimum seconds per step, in the order the steps run.
MIN_GPU=150
MIN_DASK=60
MIN_VISIT=150
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME RESERVE_AFTER LOG CMD...: run CMD with a timeout of what is left minus the
# reserve of the later steps (at most $STEP_CAP s when set), output teed to LOG; records
# the exit status (124: timed out).
step() {
    local name=$1 reserve=$2 log=$3
    shift 3
    local left=$(( TOTAL_S - SECONDS - reserve ))
    (( ${STEP_CAP:-0} > 0 && left > STEP_CAP )) && left=$STEP_CAP
    if (( left < 20 )); then
        note "== $name: skipped, only ${left}s left"
        return 0
    fi
    note "== $name: start at ${SECONDS}s, timeout ${left}s: $*"
    local t0=$SECONDS
    timeout -k 5 "$left" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    note "== $name: exit $rc after $(( SECONDS - t0 ))s$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')"
    return 0
}

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \
    || { note "== wheel install failed: astropy may be missing"; export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; }

note "== nvidia-smi -L"
timeout 30 nvidia-smi -L 2>&1 | tee -a "$SUMMARY"
note "== python: $(python3 -c 'import sys, numpy, cupy; print(sys.version.split()[0], "numpy", numpy.__version__, "cupy", cupy.__version__)' 2>&1)"

# 1. GPU tests: the kernels compile (nvcc, NVRTC) and the CuPy backend, match_many
#    included, agrees with NumPy. The tests that run the CUDA sources on the CPU behind a
#    fake CuPy need no GPU (CI runs them), so they do not spend device time here.
step "GPU tests" $(( MIN_GPU + MIN_DASK + MIN_VISIT )) "$OUT/gpu_tests.log" \
    python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_cuda_compile.py \
    -k "not fake_cupy and not fake_streams"

# 2. Single-exposure GPU benchmark (issue 3).
step "bench_gpu" $(( MIN_DASK + MIN_VISIT )) "$OUT/bench_gpu.log" \
    python3 benchmarks/bench_gpu.py --output "$OUT/bench_gpu.md"

# 3. gpumatch.distributed.match_files on a dask-cuda cluster (issue 5), at most 120 s.
STEP_CAP=120 step "dask-cuda check" "$MIN_VISIT" "$OUT/dask_cuda.log" \
    python3 benchmarks/dask_cuda_check.py

# 4. Visit benchmark (issue 5): its own --time-budget keeps it inside the step's timeout
#    (pool build, copy timing and start-up take the rest).
left=$(( TOTAL_S - SECONDS ))
budget=$(( left - 60 ))
(( budget < 30 )) && budget=30
step "bench_visit" 0 "$OUT/bench_visit.log" \
    python3 benchmarks/bench_visit.py --backend cupy --time-budget "$budget" --output "$OUT/bench_visit.md"

note "== done at ${SECONDS}s"
ls -l "$OUT" | tee -a "$SUMMARY"
