"""decodekit: hand-written CPU (AVX2/AVX-512) and CUDA kernels for LLM token selection."""
import torch  # noqa: F401  (loads libtorch before the extension)

from ._ops import ops  # noqa: F401
from . import _C
from .sampling import *  # noqa: F401,F403
from .sampling import __all__ as _sampling_all
from .pipeline import *  # noqa: F401,F403
from .pipeline import __all__ as _pipeline_all
from .speculative import *  # noqa: F401,F403
from .speculative import __all__ as _speculative_all
from .attention import *  # noqa: F401,F403
from .attention import __all__ as _attention_all

__version__ = "0.1.0"


def cpu_features():
    """CPU features found by cpuid and the active kernel path."""
    return _C.cpu_features()


def build_info():
    return _C.build_info()


def set_isa(name: str) -> str:
    """Force the CPU kernel path ('scalar', 'avx2', 'avx512' or 'auto'); returns the active one."""
    return _C.set_isa(name)


__all__ = (["cpu_features", "build_info", "set_isa"] + list(_sampling_all) + list(_pipeline_all) + list(_speculative_all)
           + list(_attention_all))
