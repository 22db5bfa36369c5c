#!/usr/bin/env bash
# Compiles the torch-free CUDA kernels with plain nvcc (no torch): every csrc/cuda/*.cuh on its
# own, and every tests/native/cuda_*_check.cu (TUs that instantiate the kernels), for sm_80 and sm_90.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null; then echo "nvcc not found: skipping the CUDA compile check"; exit 0; fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
srcs=()
for h in "$root"/csrc/cuda/*.cuh; do
  [ -e "$h" ] || continue
  tu="$out/$(basename "$h" .cuh)_include.cu"
  echo "#include \"cuda/$(basename "$h")\"" > "$tu"
  srcs+=("$tu")
done
for tu in "$root"/tests/native/cuda_*_check.cu; do
  [ -e "$tu" ] && srcs+=("$tu")
done
[ ${#srcs[@]} -gt 0 ] || { echo "no CUDA sources"; exit 0; }
for arch in sm_80 sm_90; do
  for tu in "${srcs[@]}"; do
    echo "nvcc -std=c++20 -arch=$arch $(basename "$tu")"
    "$NVCC" -std=c++20 -arch=$arch --expt-relaxed-constexpr -fmad=false -I"$root/csrc" -I"$root/csrc/include" \
      -c "$tu" -o "$out/$(basename "$tu" .cu)_$arch.o"
  done
done
echo "CUDA compile check passed"
