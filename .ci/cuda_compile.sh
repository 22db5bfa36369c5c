#!/usr/bin/env bash
# Compiles every torch-free CUDA header csrc/cuda/*.cuh with plain nvcc for sm_80 and sm_90
# (no torch, no GPU needed). Each header X.cuh gets a generated one-line TU that includes it and
# odr-uses dk::cuda::instantiate_X() when the header defines it (that function must reference
# every kernel / launcher of the header so that all template instantiations are compiled);
# a header without it is compiled include-only and a note is printed.
#
# Spills fail the check: ptxas runs with -v, and every function it reports (each kernel, and each
# real call once per kernel that calls it, under its own "Function properties" line) must have
# 0 bytes of spill stores and loads.
#
# Exits 0 with a message when nvcc is not installed. Env: NVCC (compiler), DK_CUDA_ARCHS
# (default "80 90"), DK_CUDA_JOBS (parallel compiles, default 2), DK_CUDA_WERROR=1 (warnings fail).
set -euo pipefail
cd "$(dirname "$0")/.."

# NVCC unset: nvcc on PATH, else /usr/local/cuda/bin/nvcc; NVCC set but empty: no nvcc.
if [[ -z "${NVCC+set}" ]]; then
  NVCC="$(command -v nvcc || true)"
  if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
fi
if [[ -z "$NVCC" ]]; then
  echo "cuda_compile: nvcc not found; skipping the CUDA compile check (set NVCC or put nvcc on PATH)"
  exit 0
fi

if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "cuda_compile: FAIL: NVCC=$NVCC is not an executable" >&2
  exit 1
fi

shopt -s nullglob
headers=(csrc/cuda/*.cuh)
if (( ${#headers[@]} == 0 )); then echo "cuda_compile: no csrc/cuda/*.cuh"; exit 0; fi

# kernels must stay torch-free
if grep -nE '#\s*include\s*[<"](torch/|ATen/|c10/|pybind11/)' "${headers[@]}"; then
  echo "cuda_compile: FAIL: csrc/cuda/*.cuh must not include torch/ATen/c10/pybind11 headers" >&2
  exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
archs="${DK_CUDA_ARCHS:-80 90}"
flags=(-std=c++20 -O3 -fmad=false --expt-relaxed-constexpr -Icsrc/include -Icsrc -Xptxas -v)
[[ "${DK_CUDA_WERROR:-0}" == 1 ]] && flags+=(--Werror all-warnings)

jobs=()
for h in "${headers[@]}"; do
  stem="$(basename "$h" .cuh)"
  tu="$tmp/$stem.cu"
  {
    echo "#include \"cuda/$stem.cuh\""
    if grep -q "instantiate_${stem}\b" "$h"; then
      echo "void* dk_cuda_compile_check_$stem = reinterpret_cast<void*>(&dk::cuda::instantiate_${stem});"
    else
      echo "cuda_compile: note: $h defines no dk::cuda::instantiate_${stem}(); its templates are not instantiated" >&2
    fi
  } > "$tu"
  for a in $archs; do jobs+=("$stem $a"); done
done

echo "cuda_compile: $("$NVCC" --version | tail -n 2 | head -n 1)"
start=$(date +%s)
status=0
printf '%s\n' "${jobs[@]}" | xargs -P "${DK_CUDA_JOBS:-2}" -L 1 bash -c '
  stem=$0; arch=$1; shift 2
  if out=$("'"$NVCC"'" '"${flags[*]}"' -arch=sm_$arch -c "'"$tmp"'/$stem.cu" -o "'"$tmp"'/$stem.sm_$arch.o" 2>&1); then
    spills=$(echo "$out" | awk "/Function properties for|Compiling entry function/ { f = \$NF }
      / bytes spill stores, / { if (\$5 != 0 || \$9 != 0) print \"  \" f \": \" \$5 \" B spill stores, \" \$9 \" B spill loads\" }")
    nf=$(echo "$out" | grep -c " bytes spill stores, " || true)
    rest=$(echo "$out" | grep -v "^ptxas info" | grep -v "bytes stack frame" || true)
    [[ -n "$rest" ]] && echo "$rest"
    if [[ -n "$spills" ]]; then
      echo "cuda_compile: FAIL csrc/cuda/$stem.cuh  sm_$arch: register spills"; echo "$spills"; exit 1
    fi
    echo "cuda_compile: ok   csrc/cuda/$stem.cuh  sm_$arch  (no spill in $nf functions)"
    exit 0
  else
    echo "cuda_compile: FAIL csrc/cuda/$stem.cuh  sm_$arch"; echo "$out"; exit 1
  fi' || status=1
echo "cuda_compile: ${#jobs[@]} compiles in $(( $(date +%s) - start )) s"
exit $status
