#!/usr/bin/env bash
# Builds and runs the torch-free CPU kernels under AddressSanitizer + UBSan (no torch needed).
# Every tests/native/asan_*.cpp driver is linked against all kernel sources; each ISA object is
# compiled with its own flags, as in CMakeLists.txt.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-$root/build/asan}
mkdir -p "$out"
CXX=${CXX:-g++}
common=(-std=c++20 -O1 -g -fno-omit-frame-pointer -ffp-contract=off -fsanitize=address,undefined
        -fno-sanitize-recover=undefined -I"$root/csrc/include" -I"$root/csrc")
objs=()
for isa in scalar avx2 avx512; do
  case $isa in
    scalar) flags=() ;;
    avx2) flags=(-mavx2 -mfma -mf16c -mbmi2) ;;
    avx512) flags=(-mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512bf16 -mavx2 -mfma -mf16c -mbmi2) ;;
  esac
  up=$(echo $isa | tr a-z A-Z)
  for src in "$root"/csrc/cpu/isa/*.cpp; do
    o="$out/$(basename "$src" .cpp)_$isa.o"
    $CXX "${common[@]}" "${flags[@]}" -DDK_ISA_$up=1 -DDK_ISA_NAME=$isa -c "$src" -o "$o" &
    objs+=("$o")
  done
  wait
done
for src in "$root"/csrc/cpu/*.cpp; do
  o="$out/$(basename "$src" .cpp).o"
  $CXX "${common[@]}" -c "$src" -o "$o"
  objs+=("$o")
done
status=0
for drv in "$root"/tests/native/asan_*.cpp; do
  exe="$out/$(basename "$drv" .cpp)"
  $CXX "${common[@]}" "$drv" "${objs[@]}" -o "$exe"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 "$exe" || status=1
done
exit $status
