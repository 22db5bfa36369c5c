"""Checks what .ci/run built before anything is installed from it.

python .ci/check_dist.py wheel WHEEL   the METADATA pins the torch of this Python (torch==<its
                                       release>), the tag is manylinux, the package files are
                                       there and the extension holds all three CPU ISA paths
python .ci/check_dist.py sdist SDIST   sources only: no objects, libraries, wheels, build
                                       folders, environments or caches
"""

import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile


def fail(msg):
    print(f"check_dist: FAIL: {msg}")
    sys.exit(1)


def check_wheel(path):
    import torch  # the torch this wheel was built against (same Python as the build)

    z = zipfile.ZipFile(path)
    names = z.namelist()
    meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    wheel = z.read(next(n for n in names if n.endswith(".dist-info/WHEEL"))).decode()
    pin = "torch==" + torch.__version__.split("+", 1)[0]
    reqs = re.findall(r"^Requires-Dist: (.*)$", meta, re.M)
    torch_reqs = [r for r in reqs if re.match(r"torch\b", r)]
    if torch_reqs != [pin]:
        fail(f"Requires-Dist for torch is {torch_reqs}, expected [{pin!r}]")
    tags = re.findall(r"^Tag: (.*)$", wheel, re.M)
    if not tags or not all("manylinux" in t for t in tags):
        fail(f"wheel tags {tags} are not manylinux")
    for want in ("decodekit/__init__.py", "decodekit/_build_config.py", "decodekit/reference.py"):
        if want not in names:
            fail(f"{want} missing from the wheel")
    so = [n for n in names if re.match(r"decodekit/_C\..*\.so$", n)]
    if len(so) != 1:
        fail(f"expected one decodekit/_C*.so, found {so}")
    # The installed extension is stripped, so the ISA paths are read off the machine code: the
    # AVX-512 build is the only code using zmm registers, the AVX2 build uses ymm (the scalar path
    # is always there; build_info()["isa_paths"] is checked by the tests on the installed wheel).
    with tempfile.TemporaryDirectory() as d:
        z.extract(so[0], d)
        asm = subprocess.run(
            ["objdump", "-d", "--no-show-raw-insn", os.path.join(d, so[0])], capture_output=True, text=True, check=True
        ).stdout
    n_zmm, n_ymm = asm.count("%zmm"), asm.count("%ymm")
    if n_zmm < 1000 or n_ymm < 1000:
        fail(f"the extension lacks vector code: {n_zmm} zmm and {n_ymm} ymm operands")
    print(
        f"check_dist: ok: {os.path.basename(path)}: Requires-Dist {pin}, tags {', '.join(tags)}, "
        f"AVX-512 and AVX2 code in {so[0]} ({n_zmm} zmm / {n_ymm} ymm operands)"
    )


BAD = re.compile(
    r"(^|/)(build|dist|\.venv|venv|\.ci-venv|\.ci-test-venv|\.format-venv|__pycache__|"
    r"bench_results|\.git)(/|$)|\.(o|a|so|whl|pyc)$"
)


def check_sdist(path):
    members = [m.name.split("/", 1)[1] for m in tarfile.open(path).getmembers() if "/" in m.name]
    bad = [m for m in members if BAD.search(m)]
    if bad:
        fail(f"the sdist holds non-source files: {bad[:10]}")
    for want in (
        "pyproject.toml",
        "CMakeLists.txt",
        "build_support/dk_metadata.py",
        "csrc/module.cpp",
        "python/decodekit/__init__.py",
        "docs/semantics.md",
        "docs/design.md",
    ):
        if want not in members:
            fail(f"{want} missing from the sdist")
    print(f"check_dist: ok: {os.path.basename(path)}: {len(members)} entries, sources only")


if __name__ == "__main__":
    kind, path = sys.argv[1], sys.argv[2]
    {"wheel": check_wheel, "sdist": check_sdist}[kind](path)
