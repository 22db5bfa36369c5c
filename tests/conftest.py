import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import decodekit  # noqa: E402

ISAS = ["scalar"]
_f = decodekit.cpu_features()
if _f["avx2"]:
    ISAS.append("avx2")
if _f["avx512"] and _f["avx512_bf16"]:
    ISAS.append("avx512")


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test on one forced CPU kernel path; restores the automatic choice afterwards."""
    decodekit.set_isa(request.param)
    yield request.param
    decodekit.set_isa("auto")


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
