"""csrc/cuda/pipeline.cuh (the processing part of the whole step on CUDA: bitmask, bans, logit bias,
penalties) run on CPU threads by tests/cuda_emu and compared with the CPU kernel bit for bit."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import emu  # noqa: E402
import emu_pipe  # noqa: E402
import decodekit as dk  # noqa: E402
from decodekit.pipeline import pack_params  # noqa: E402
from test_pipeline import _inputs, _logits  # noqa: E402

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="no host C++ compiler to build the CUDA emulator")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_processing_matches_cpu(dtype):
    B, V = 5, 1003
    x = _logits(B, V, 3).to(dtype)
    x[4, 17] = float("nan")  # a bad row passes through on both
    kw = _inputs(B, V, 3)
    cpu = dk.apply_penalties(x, **kw)
    P = pack_params(
        B,
        repetition_penalty=kw["repetition_penalty"],
        frequency_penalty=kw["frequency_penalty"],
        presence_penalty=kw["presence_penalty"],
    )
    got = emu_pipe.process(
        x,
        P,
        bitmask=kw["allowed_token_bitmask"],
        banned=kw["banned_token_ids"],
        bias_ids=kw["logit_bias"][0],
        bias_vals=kw["logit_bias"][1],
        prompt=kw["prompt_token_ids"],
        output=kw["output_token_ids"],
    )
    assert torch.equal(
        got.view(torch.int16 if dtype != torch.float32 else torch.int32),
        cpu.view(torch.int16 if dtype != torch.float32 else torch.int32),
    )
