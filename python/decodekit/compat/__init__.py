"""Drop-in replacements for engine kernel modules, over decodekit's ops.

- ``decodekit.compat.flashinfer``: the functions of ``flashinfer.sampling`` with FlashInfer's exact
  signatures and return conventions (``import decodekit.compat.flashinfer as sampling``).
- ``decodekit.compat.sglang``: sgl-kernel's ``verify_tree_greedy`` and
  ``tree_speculative_sampling_target_only`` (outputs written into the caller's tensors, SGLang's
  coins and thresholds), and a sampler backend for SGLang's sampling-backend registry.

These modules hold no math: only argument checks, dtype and layout conventions, and copies into
caller buffers; every computation is a decodekit op.
"""

from . import flashinfer, sglang  # noqa: F401

__all__ = ["flashinfer", "sglang"]
