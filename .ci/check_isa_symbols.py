"""Guards the one-definition-rule hazard of per-ISA objects.

The kernels are compiled three times (scalar, avx2, avx512) with different -m flags. Any inline
function with external linkage that two of those objects both define is merged by the linker into
ONE copy; if that copy came from the AVX-512 object, the scalar path would execute AVX-512
instructions. decodekit's own code avoids this (per-ISA namespaces, static helpers). What remains
are standard-library template instantiations (std::vector<float>, std::sort on float*), and for
those the scalar objects come first on the link line, so the linker keeps their baseline copies.
This script fails if (a) an object of avx2/avx512 defines a shared non-std symbol, or (b) the
scalar objects do not precede the others in the link command."""

import glob
import os
import subprocess
import sys

build = sys.argv[1] if len(sys.argv) > 1 else "build"


def defined(obj):
    out = subprocess.run(["nm", "--defined-only", "-C", obj], capture_output=True, text=True, check=True).stdout
    syms = {}
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "TWVuRDB" and parts[1] not in "tr":
            syms[parts[2]] = parts[1]
    return syms


objs = {
    isa: sorted(glob.glob(f"{build}/**/dk_{isa}.dir/**/*.o", recursive=True)) for isa in ("scalar", "avx2", "avx512")
}
if not all(objs.values()):
    print(f"no per-ISA objects under {build}; build first")
    sys.exit(1)
scalar = {}
for o in objs["scalar"]:
    scalar.update(defined(o))
bad = []
for isa in ("avx2", "avx512"):
    for o in objs[isa]:
        for name, kind in defined(o).items():
            if name in scalar and not (
                name.startswith("std::")
                or name.startswith("__gnu_cxx::")
                or name.startswith("void std::")
                or " std::" in name.split("(")[0]
                or name.startswith("operator new")
                or name.startswith("typeinfo")
            ):
                bad.append(f"{isa}: {name}")
if bad:
    print("symbols shared between the scalar and a vector ISA object (ODR hazard):")
    print("\n".join(bad[:50]))
    sys.exit(1)
# link order: scalar objects first
links = glob.glob(f"{build}/**/build.ninja", recursive=True)
for ln in links:
    text = open(ln).read()
    i_s = text.find("dk_scalar.dir")
    i_v = min(x for x in (text.find("dk_avx2.dir/csrc"), text.find("dk_avx512.dir/csrc")) if x >= 0)
    link_line = [l for l in text.splitlines() if "_C" in l and "dk_scalar.dir" in l and "dk_avx512.dir" in l]
    for l in link_line:
        if l.find("dk_scalar.dir") > l.find("dk_avx2.dir") or l.find("dk_scalar.dir") > l.find("dk_avx512.dir"):
            print("scalar objects are not first on the link line:", l[:200])
            sys.exit(1)
print(f"ISA symbol check ok: {sum(len(v) for v in objs.values())} objects, no shared non-std symbols, scalar first")
