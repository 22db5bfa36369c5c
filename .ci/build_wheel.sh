#!/usr/bin/env bash
# Builds the decodekit wheel against the torch of the active Python (no build isolation: the wheel
# pins that torch) and repairs it with auditwheel to the lowest manylinux tag its symbols allow.
# torch's own libraries (libc10, libtorch*, torch's libgomp, and for a CUDA build the CUDA runtime
# torch loads) are excluded: they come with the pinned torch, and the extension finds them through
# its RPATH ($ORIGIN/../torch/lib).
#
#   .ci/build_wheel.sh [OUT_DIR]      default OUT_DIR: dist
#   env: DECODEKIT_CUDA=ON (CUDA variant), PLAT (force an auditwheel --plat), CMAKE_BUILD_PARALLEL_LEVEL
# Prints the repaired wheel's path as the last line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=$(mkdir -p "${1:-dist}" && cd "${1:-dist}" && pwd)
raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT

python -m pip wheel --no-build-isolation --no-deps -w "$raw" . >&2
whl=$(ls "$raw"/decodekit-*.whl)

torch_lib=$(python -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
excl=()
for f in "$torch_lib"/*.so*; do excl+=(--exclude "$(basename "$f")"); done
# the CUDA runtime / libraries of the nvidia-* wheels torch depends on (a CUDA build links libcudart)
excl+=(--exclude 'libcudart.so.*' --exclude 'libcuda.so.*' --exclude 'libnvrtc.so.*' --exclude 'libcublas*.so.*')

auditwheel show "$whl" >&2 || true
plat=()
[[ -n "${PLAT:-}" ]] && plat=(--plat "$PLAT")
auditwheel repair "${excl[@]}" "${plat[@]}" -w "$out" "$whl" >&2
name=$(basename "$whl" .whl)
ls -t "$out"/"${name%-linux_*}"-*manylinux*.whl | head -n 1
