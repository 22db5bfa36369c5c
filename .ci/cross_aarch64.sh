#!/usr/bin/env bash
# Non-x86 check: configures the project with CMake for aarch64 (Debian's g++-aarch64-linux-gnu as
# cross compiler) and compiles the torch-free kernel libraries (dk_scalar, dk_cpu). It checks that
# a non-x86 host gets the scalar path only (no -m flags, no AVX sources) and that the kernels and
# the dispatch compile there. The extension itself is not linked (that needs an aarch64 torch).
# Exits 0 with a note when the cross compiler is not installed (apt-get install g++-aarch64-linux-gnu).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
CXX_AARCH64=${CXX_AARCH64:-aarch64-linux-gnu-g++}
if ! command -v "$CXX_AARCH64" >/dev/null 2>&1; then
  echo "cross_aarch64: $CXX_AARCH64 not found; skipping the aarch64 configure + compile check"
  exit 0
fi
out=${1:-$root/build/cross-aarch64}
rm -rf "$out" && mkdir -p "$out"
cat > "$out/toolchain.cmake" <<TC
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER $CXX_AARCH64)
# host programs and packages (python, pybind11, torch headers) are found on the build machine
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
TC
py=$(command -v python)
cmake -S "$root" -B "$out" -G Ninja -DCMAKE_TOOLCHAIN_FILE="$out/toolchain.cmake" -DPython_EXECUTABLE="$py" \
  -DPython_INCLUDE_DIR="$("$py" -c "import sysconfig; print(sysconfig.get_paths()['include'])")" > "$out/configure.log"
grep "decodekit:" "$out/configure.log"
grep -q "building the scalar CPU path only" "$out/configure.log" || { echo "cross_aarch64: FAIL: no scalar-only note"; exit 1; }
cmake --build "$out" --target dk_scalar dk_cpu -- -v > "$out/build.log" 2>&1 || { cat "$out/build.log"; exit 1; }
if grep -E -- "-mavx|-mfma|-mf16c|-mbmi" "$out/build.log"; then echo "cross_aarch64: FAIL: x86 flags used"; exit 1; fi
if ls "$out"/CMakeFiles | grep -E "dk_avx"; then echo "cross_aarch64: FAIL: an AVX object library was configured"; exit 1; fi
n=0
for o in $(find "$out/CMakeFiles/dk_scalar.dir" "$out/CMakeFiles/dk_cpu.dir" -name '*.o'); do
  file "$o" | grep -q "ARM aarch64" || { echo "cross_aarch64: FAIL: $o is not an aarch64 object"; exit 1; }
  n=$((n + 1))
done
echo "cross_aarch64: ok: $n aarch64 objects (scalar kernels + dispatch), no x86 flags"
