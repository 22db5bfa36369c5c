"""Loads the native extension; `ops` is torch.ops.decodekit. Every op's schema is in
csrc/torch/ops.cpp (with its CPU and CUDA impls named); its fake (meta) impl, for torch.compile and
FakeTensorMode, is registered beside its Python wrapper (sampling.py, pipeline.py, speculative.py,
attention.py)."""

import torch

from . import _C  # noqa: F401  (registers the ops via TORCH_LIBRARY)

ops = torch.ops.decodekit
