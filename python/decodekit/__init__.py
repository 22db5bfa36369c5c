"""decodekit: hand-written CPU (AVX2/AVX-512) and CUDA kernels for LLM token selection."""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _build_config


def _torch_mismatch(built: str, built_cuda, running: str, running_cuda, version: str = ""):
    """The one-sentence reason this build cannot load into the running torch, or None.

    The extension uses torch C++ symbols that change between releases, so the torch release
    (the version without its local tag: 2.13.0+cpu and 2.13.0 are the same release) must be
    the one it was compiled against, and a CUDA build needs a CUDA torch of the same major
    CUDA version."""

    def public(v):
        return str(v).split("+", 1)[0]

    rebuild = "or rebuild decodekit from its source against this torch (pip install --no-build-isolation .)"
    if public(built) != public(running):
        return (
            f"decodekit {version} was built against torch {built} but torch {running} is installed: "
            f"install torch=={public(built)} {rebuild}."
        )
    if built_cuda and (not running_cuda or str(running_cuda).split(".")[0] != str(built_cuda).split(".")[0]):
        return (
            f"decodekit {version} was built with CUDA kernels against torch {built} (CUDA {built_cuda}) "
            f"but the installed torch {running} has {'no CUDA' if not running_cuda else 'CUDA ' + str(running_cuda)}: "
            f"install a CUDA {str(built_cuda).split('.')[0]}.x build of torch=={public(built)} {rebuild}."
        )
    return None


_why = _torch_mismatch(
    _build_config.TORCH_VERSION, _build_config.TORCH_CUDA, torch.__version__, torch.version.cuda, _build_config.VERSION
)
if _why:
    raise ImportError(_why)

from ._ops import ops  # noqa: F401,E402
from . import _C  # noqa: E402
from .sampling import *  # noqa: F401,F403
from .sampling import __all__ as _sampling_all
from .pipeline import *  # noqa: F401,F403
from .pipeline import __all__ as _pipeline_all
from .speculative import *  # noqa: F401,F403
from .speculative import __all__ as _speculative_all
from .attention import *  # noqa: F401,F403
from .attention import __all__ as _attention_all

__version__ = _build_config.VERSION


def cpu_features():
    """CPU features found by cpuid and the active kernel path."""
    return _C.cpu_features()


def build_info():
    return _C.build_info()


def check_errors() -> None:
    """Raise the problems the deferred (sync-free) checks of CUDA ops found since the last call.

    On CUDA tensors the ops check only shapes, dtypes and devices on the host; bad VALUES (indices,
    parameters, offsets, num_draft_tokens, retrive_index, coins, prefix_lens, trees) give their rows
    the documented defined results and set a per-device error flag. This reads the flags (one host
    sync, the only one), resets them and raises a ValueError naming the arguments; it returns None
    when every flag is clear. README "CUDA in a serving engine"."""
    ops.check_errors()


def _set_deferred_checks(on: bool) -> None:
    """Tests only: make the CPU ops use the deferred checks of the CUDA path (no eager ValueError
    on bad values; defined results plus the error flag read by check_errors)."""
    ops._set_deferred_checks(bool(on))


def set_isa(name: str) -> str:
    """Force the CPU kernel path ('scalar', 'avx2', 'avx512' or 'auto'); returns the active one."""
    return _C.set_isa(name)


__all__ = (
    ["cpu_features", "build_info", "set_isa", "check_errors"]
    + list(_sampling_all)
    + list(_pipeline_all)
    + list(_speculative_all)
    + list(_attention_all)
)
