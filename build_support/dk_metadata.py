"""In-tree dynamic-metadata provider: decodekit's version and its torch pin, computed at build time.

The extension calls torch C++ functions whose symbols change between torch releases, so a wheel
only works with the torch it was compiled against. This provider reads the torch installed in the
build environment (builds run with --no-build-isolation) and returns

- dependencies: numpy and `torch==<torch's public version>` (`2.13.0+cpu` pins `torch==2.13.0`);
- version: the base version for a CPU build; with DECODEKIT_CUDA=ON in the environment, a local
  version tag naming the CUDA and torch versions, e.g. `0.1.0+cu130.torch2.14.1`.

An sdist is source only: it records `torch` unpinned (marked Dynamic in PKG-INFO) and the base
version, and the wheel built from it gets the pin of the torch it is built against.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

_state = "metadata_wheel"
_TRUE = {"1", "on", "true", "yes", "y"}


def build_state(state: str) -> None:
    global _state
    _state = state


def dynamic_wheel(settings) -> dict:
    return {"dependencies": True}


def installed_torch() -> tuple[str, str | None] | None:
    """(torch.__version__, torch.version.cuda) of the installed torch, without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    version_py = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    ns: dict = {}
    exec(compile(version_py.read_text(), str(version_py), "exec"), ns)  # plain assignments only
    return str(ns["__version__"]), ns.get("cuda")


def cuda_requested() -> bool:
    return os.environ.get("DECODEKIT_CUDA", "OFF").strip().lower() in _TRUE


def torch_pin(torch_version: str) -> str:
    return "torch==" + torch_version.split("+", 1)[0]


def wheel_version(base: str, torch_version: str, torch_cuda: str | None, cuda: bool) -> str:
    if not cuda:
        return base
    if not torch_cuda:
        raise RuntimeError(f"DECODEKIT_CUDA=ON needs a CUDA build of torch; torch {torch_version} is CPU-only")
    cu = "cu" + "".join(re.findall(r"\d+", torch_cuda)[:2])
    return f"{base}+{cu}.torch{torch_version.split('+', 1)[0]}"


def dynamic_metadata(settings, project) -> dict:
    base = settings["base-version"]
    deps = list(settings.get("dependencies", []))
    if _state == "sdist":
        return {"version": base, "dependencies": deps + ["torch"]}
    found = installed_torch()
    if found is None:
        raise RuntimeError(
            "decodekit is compiled against the installed torch and pins it: install torch "
            "first, then build with `pip install --no-build-isolation ...`"
        )
    torch_version, torch_cuda = found
    return {
        "version": wheel_version(base, torch_version, torch_cuda, cuda_requested()),
        "dependencies": deps + [torch_pin(torch_version)],
    }
