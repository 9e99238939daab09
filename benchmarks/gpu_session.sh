#!/usr/bin/env bash
# One lent-GPU session of gpumatch in ONE device call of at most ~400 s, so that it and one
# rerun fit in a session's 15 device minutes with two cold starts of the machine.
#
# How to run it (from a session whose task has a GPU; the device tool's `status` says so):
#   1. on the session machine, in the repository root, put the wheels the device image
#      lacks (astropy; Dask and dask-cuda; pytest-timeout) where the device can take them:
#          bash benchmarks/fetch_device_wheels.sh
#      (without network: mkdir -p .whl && cp ../shared/device-wheels/*.whl .whl/ ; the
#      dask-cuda step then fails on its imports and the GPU tests run without --timeout)
#   2. one device call (the `run` tool):
#          command:   bash benchmarks/gpu_session.sh
#          carry:     [".whl"]
#          timeout_s: 450
#   3. the outputs come back under the reply's files_at:
#          summary.txt     nvidia-smi -L, each step's exit status and seconds
#          selftest.log    gpumatch selftest --backend cupy (device, agreement per stage, timings)
#          bench_gpu.md    bench_gpu.log     benchmarks/bench_gpu.py (lean: 5 GPU runs, 1 CPU run)
#          gpu_tests.log   pytest -x -v --timeout 60 tests/test_gpu.py + the compile tests
#          dask_cuda.log   benchmarks/dask_cuda_check.py (LocalCUDACluster against NumPy)
#          bench_visit.md  bench_visit.log   benchmarks/bench_visit.py --backend cupy
#      Record the tables in benchmarks/RESULTS.md with the device line they print.
#
# Order: what answers "is the GPU path right?" first (selftest), then the numbers the open
# issues need (bench_gpu), then the tests (-x -v: the first failure, or with --timeout the
# first hang, names its test), then the rest. Each step runs under its own `timeout`, capped
# so the later steps keep their guaranteed minimum; time a step does not use goes to the
# later ones. No `set -e`: a failing step does not stop the others.
#
# Assumes: the repository root as the working directory, $OUT a writable (empty) directory,
# the wheels in .whl/ (device image: Python 3.12 with cupy, numpy, scipy, pytest).

set -u
: "${OUT:?OUT must name a writable output directory}"

TOTAL_S=${GPU_SESSION_TOTAL_S:-400}
# Guaranteed minimum seconds per step, in the order the steps run.
MIN_SELFTEST=30
MIN_BENCH=60
MIN_TESTS=90
MIN_DASK=40
MIN_VISIT=60
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME RESERVE_AFTER CAP LOG CMD...: run CMD with a timeout of what is left minus the
# reserve of the later steps (at most CAP s), output teed to LOG; records the exit status
# (124: timed out).
step() {
    local name=$1 reserve=$2 cap=$3 log=$4
    shift 4
    local left=$(( TOTAL_S - SECONDS - reserve ))
    (( left > cap )) && left=$cap
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

# 1. Does the GPU give NumPy's answers? (exit 1 on a disagreement, 2 if CuPy is unusable)
step "selftest" $(( MIN_BENCH + MIN_TESTS + MIN_DASK + MIN_VISIT )) 60 "$OUT/selftest.log" \
    python3 -m gpumatch.cli selftest --backend cupy

# 2. Single-exposure GPU benchmark: per-stage medians, baselines, floors, peak memory.
step "bench_gpu" $(( MIN_TESTS + MIN_DASK + MIN_VISIT )) 120 "$OUT/bench_gpu.log" \
    python3 benchmarks/bench_gpu.py --repeat 5 --cpu-repeat 1 --output "$OUT/bench_gpu.md"

# 3. GPU tests (the kernels compile with nvcc and NVRTC; every stage against NumPy). The
#    tests that run the CUDA sources on the CPU behind a fake CuPy need no GPU (CI runs them).
timeout_flag=()
python3 -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout 60)
step "GPU tests" $(( MIN_DASK + MIN_VISIT )) 150 "$OUT/gpu_tests.log" \
    python3 -m pytest -x -v -rs -p no:cacheprovider "${timeout_flag[@]}" \
    tests/test_gpu.py tests/test_cuda_compile.py -k "not fake_cupy and not fake_streams"

# 4. gpumatch.distributed.match_files on a dask-cuda cluster.
step "dask-cuda check" "$MIN_VISIT" 60 "$OUT/dask_cuda.log" \
    python3 benchmarks/dask_cuda_check.py

# 5. Visit benchmark: its own --time-budget keeps it inside the step's timeout (pool build,
#    copy timing and start-up take the rest).
left=$(( TOTAL_S - SECONDS ))
budget=$(( left - 40 ))
(( budget < 20 )) && budget=20
step "bench_visit" 0 "$left" "$OUT/bench_visit.log" \
    python3 benchmarks/bench_visit.py --backend cupy --time-budget "$budget" --output "$OUT/bench_visit.md"

note "== done at ${SECONDS}s"
ls -l "$OUT" | tee -a "$SUMMARY"
