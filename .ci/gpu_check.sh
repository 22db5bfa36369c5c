#!/usr/bin/env bash
# The GPU checks of issue 15, prepared to run in one go where a GPU is lent (none has been so far):
# a machine with an NVIDIA GPU (sm_80 or newer), nvcc, and a `python3` that holds a CUDA build of
# torch with scikit-build-core, pybind11, cmake, ninja, pytest, scipy and hypothesis (the device
# tool's machines hold all of these, torch 2.11+cu130, and reach no network). Steps:
#   build  decodekit built in place for this GPU's arch only (pip install -e ., no build isolation,
#          no index, no dependencies; all cores), then `decodekit.build_info()`;
#   test   every test item with "cuda" in its id but not the emulator's (-k "cuda and not
#          cuda_emu"): the cuda backend of each op suite against the CPU op, test_cuda_device_
#          matches_cpu under both plans, tests/test_cuda_sync.py (sync-debug mode "error" and CUDA
#          graph capture / replay of every op), the attention and compat GPU tests;
#   bench  benchmarks/sampling_cuda.py (sampling, speculative chains, the whole step; split and
#          one-CTA plans, the torch chain, FlashInfer where it imports), the same with CUDA-graph
#          replays, and benchmarks/attention_cuda.py.
# Each step's output goes to $OUT/<step>.log ($OUT: the device tool's folder that comes back; else
# build/gpu_check), and a line "step: rc N in S s" to $OUT/summary.txt and stdout. A step has its
# own time limit, so that one that hangs leaves the others their time. The device tool allows 10
# minutes a command and 15 minutes a session, and a machine stays warm ~30 s after a call, so:
#   run(command="bash .ci/gpu_check.sh build test", timeout_s=590)
#   run(command="bash .ci/gpu_check.sh bench", timeout_s=330)     # at once, on the warm machine
# FlashInfer cannot travel there: flashinfer-python 0.7.4's wheel is 101 MB (the tool carries at
# most 64 MiB a call) and it needs nvidia-cutlass-dsl, apache-tvm-ffi, cuda-tile and more; its
# columns then read n/a. DECODEKIT_CUDA_ARCHS=<arch> skips the GPU query (a dry run of the build
# step on a machine without a GPU, with PYTHON=<a python holding a CUDA torch>).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
: >"$OUT/summary.txt"
export PYTHONUNBUFFERED=1

step() { # step NAME LIMIT_S COMMAND...: runs it under `timeout`, logs it, reports its status
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: rc $rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  tail -n 4 "$OUT/$name.log"
  return $rc
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  nvcc --version | tail -n 1
  nproc
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
arch=${DECODEKIT_CUDA_ARCHS:-$("$PY" -c "import torch; c = torch.cuda.get_device_capability(0); print(f'{c[0]}{c[1]}')")} || {
  echo "no CUDA device visible to torch (set DECODEKIT_CUDA_ARCHS for a dry run of the build)"
  exit 1
}

for s in ${*:-build test bench}; do
  case $s in
    build)
      DECODEKIT_CUDA=ON DECODEKIT_CUDA_ARCHS=$arch CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        step build 330 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . || exit 1
      step build_info 60 "$PY" -c "import json, decodekit; print(json.dumps(decodekit.build_info(), default=str))" || exit 1
      ;;
    test)
      step test 240 "$PY" -m pytest tests -q -p no:cacheprovider -k "cuda and not cuda_emu" -rfs --durations=15
      ;;
    bench)
      step bench_sampling 170 "$PY" benchmarks/sampling_cuda.py --B 1 8 64 --V 32000 128256 --reps 50
      step bench_graph 80 "$PY" benchmarks/sampling_cuda.py --B 1 64 --V 128256 --reps 50 --graph
      step bench_attention 60 "$PY" benchmarks/attention_cuda.py --reps 50
      ;;
    *)
      echo "unknown step $s (build, test, bench)"
      exit 2
      ;;
  esac
done
