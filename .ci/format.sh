#!/usr/bin/env bash
# Applies the repository's formatters in place: clang-format (.clang-format) to the C++ / CUDA
# sources and ruff format (pyproject.toml [tool.ruff]) to the Python files tracked by git.
#   .ci/format.sh           format in place
#   .ci/format.sh --check   only report files that would change (exit 1 if any)
# Uses clang-format and ruff from PATH when their versions match the pins below, else installs
# the pinned versions into .format-venv (PyPI packages; the same pins as .pre-commit-config.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
CLANG_FORMAT_VERSION=23.1.5
RUFF_VERSION=0.17.6
check=0
[[ "${1:-}" == "--check" ]] && check=1

have() { command -v "$1" >/dev/null 2>&1 && "$1" --version 2>/dev/null | grep -q "$2"; }
if ! have clang-format "$CLANG_FORMAT_VERSION" || ! have ruff "$RUFF_VERSION"; then
  if [[ ! -x .format-venv/bin/ruff || ! -x .format-venv/bin/clang-format ]]; then
    python3 -m venv .format-venv
    .format-venv/bin/pip install -q "clang-format==$CLANG_FORMAT_VERSION" "ruff==$RUFF_VERSION"
  fi
  PATH="$PWD/.format-venv/bin:$PATH"
fi

mapfile -t cxx < <(git ls-files '*.c' '*.cc' '*.cpp' '*.h' '*.hpp' '*.cu' '*.cuh')
mapfile -t py < <(git ls-files '*.py')
if (( check )); then
  status=0
  clang-format --dry-run --Werror "${cxx[@]}" || status=1
  ruff format --check "${py[@]}" || status=1
  exit $status
fi
clang-format -i "${cxx[@]}"
ruff format "${py[@]}"
echo "format: ${#cxx[@]} C++/CUDA files (clang-format $(clang-format --version | grep -o '[0-9][0-9.]*' | head -1)), ${#py[@]} Python files (ruff $(ruff --version | cut -d' ' -f2))"
