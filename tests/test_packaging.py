"""What a user installs: the torch pin in the package metadata, the import-time torch check, the
compiled CPU paths, and `python -m decodekit` without the optional packages."""

import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import decodekit
from decodekit import _build_config


def public(v: str) -> str:
    return v.split("+", 1)[0]


def test_metadata_pins_the_build_torch():
    reqs = importlib.metadata.requires("decodekit") or []
    torch_reqs = [r for r in reqs if r.split(";")[0].strip().startswith("torch")]
    assert torch_reqs == [f"torch=={public(_build_config.TORCH_VERSION)}"], reqs
    assert _build_config.TORCH_VERSION == decodekit.build_info()["torch"]


def test_version_and_local_tag():
    assert importlib.metadata.version("decodekit") == decodekit.__version__ == _build_config.VERSION
    if decodekit.build_info()["cuda"]:
        cu = "cu" + "".join(str(_build_config.TORCH_CUDA).split(".")[:2])
        assert decodekit.__version__.endswith(f"+{cu}.torch{public(_build_config.TORCH_VERSION)}")
    else:
        assert "+" not in decodekit.__version__ and _build_config.TORCH_CUDA is None


def test_extras_name_what_the_demo_and_benchmarks_use():
    reqs = importlib.metadata.requires("decodekit") or []
    extra = {}
    for r in reqs:
        if "extra ==" in r:
            name, marker = r.split(";", 1)
            extra.setdefault(marker.split("==")[1].strip().strip("'\""), set()).add(name.strip())
    assert {"transformers", "matplotlib"} <= extra["bench"]
    assert {"pytest", "scipy", "hypothesis"} <= extra["test"]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 build")
def test_all_three_isa_paths_are_compiled():
    assert tuple(decodekit.build_info()["isa_paths"]) == ("scalar", "avx2", "avx512")


def one_sentence(msg: str) -> bool:
    return "\n" not in msg and msg.endswith(".") and ". " not in msg and msg.count(":") == 1


def test_torch_mismatch_rules():
    m = decodekit._torch_mismatch
    assert m("2.13.0+cpu", None, "2.13.0", "13.0") is None  # same release, any local tag / CUDA
    assert m("2.14.1", "13.0", "2.14.1+cu130", "13.0") is None
    msg = m("2.12.0", None, "2.13.0+cpu", None, "0.1.0")
    assert msg.startswith("decodekit 0.1.0 was built against torch 2.12.0 but torch 2.13.0+cpu is installed")
    assert "install torch==2.12.0" in msg and "rebuild" in msg and one_sentence(msg)
    msg = m("2.14.1", "13.0", "2.14.1+cpu", None, "0.1.0+cu130.torch2.14.1")
    assert "CUDA 13.0" in msg and "no CUDA" in msg and one_sentence(msg)
    assert m("2.14.1", "13.0", "2.14.1+cu126", "12.6") is not None


def fake_build(tmp_path: Path, torch_version: str, torch_cuda) -> Path:
    """A copy of the installed package (under another name, so an editable install's import hook
    does not redirect it) whose build record names another torch."""
    pkg = tmp_path / "dk_fake_build"
    shutil.copytree(Path(decodekit.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "_build_config.py").write_text(
        f'VERSION = "{_build_config.VERSION}"\nTORCH_VERSION = "{torch_version}"\nTORCH_CUDA = {torch_cuda!r}\n'
    )
    return pkg


@pytest.mark.parametrize("case", ["other-release", "cuda-build-on-cpu-torch"])
def test_import_against_another_torch_fails_with_one_sentence(tmp_path, case):
    major, minor = (int(x) for x in public(torch.__version__).split(".")[:2])
    other = f"{major}.{minor - 1}.0" if minor > 0 else f"{major - 1}.9.0"
    built, built_cuda = (other, None) if case == "other-release" else (public(torch.__version__), "99.0")
    fake_build(tmp_path, built, built_cuda)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tmp_path)
    r = subprocess.run(
        [sys.executable, "-c", "import dk_fake_build"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    expected = decodekit._torch_mismatch(
        built, built_cuda, torch.__version__, torch.version.cuda, _build_config.VERSION
    )
    assert last == f"ImportError: {expected}", r.stderr
    assert one_sentence(expected)
    assert "undefined symbol" not in r.stderr


def test_python_m_decodekit_names_the_extra_for_each_skipped_part(monkeypatch, capsys):
    import decodekit.__main__ as main

    real = importlib.util.find_spec
    gone = {"transformers", "matplotlib", "llama_cpp"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in gone else real(name, *a))
    main.report_skipped(tables=True)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert "transformers" in lines[0] and "attention demo" in lines[0] and "decodekit[bench]" in lines[0]
    assert "matplotlib" in lines[1] and "plots" in lines[1] and "decodekit[bench]" in lines[1]
    assert "llama-cpp-python" in lines[2]
    main.report_skipped(tables=False)  # `python -m decodekit demo`: only what the demo misses
    assert capsys.readouterr().out.strip().splitlines() == lines[:1]


def test_cuda_sources_avoid_the_aten_cuda_context_header():
    """ATen/cuda/CUDAContext.h includes cusparse.h and the cuBLAS headers, which the pip CUDA
    toolkit next to torch 2.14.1+cu130 lacks: the full CUDA build failed on it (split_plan's SM
    count first came from at::cuda::getDeviceProperties). The CUDA sources use c10/cuda headers
    and the CUDA runtime instead."""
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    offenders = [
        str(p.relative_to(csrc))
        for p in sorted(csrc.rglob("*"))
        if p.suffix in (".cu", ".cuh", ".h", ".cpp")
        and re.search(r"^\s*#\s*include\s*[<\"]ATen/cuda/CUDAContext\.h[>\"]", p.read_text(), flags=re.M)
    ]
    assert not offenders, offenders
