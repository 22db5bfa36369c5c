"""The whole sampling step (issue 11): decodekit's one-pass `sample` against the same chain written
in torch the way vLLM's V1 sampler writes it and against Hugging Face's processors.

    python -m decodekit bench --only pipeline [--full]

The chain: a grammar bitmask allowing 30% of the vocabulary, a 512-token history (256 prompt + 256
output tokens), repetition penalty 1.1, frequency 0.5, presence 0.5, temperature 0.7, min-p 0.05,
top-k 50, top-p 0.9 (vLLM's order: min-p first), the draw and the top-5 logprobs of the processed
distribution with the sampled token's logprob and rank.

* decodekit: ``sample(logits, order="vllm", allowed_token_bitmask=..., prompt_token_ids=...,
  output_token_ids=..., ..., top_logprobs=5)``, one call;
* torch (vLLM's way): ``reference.pipeline_torch_vllm``: bitmask expanded to a [B, V] mask, token counts
  by scatter_add, penalties, temperature, min-p, sort-based top-k/top-p, multinomial, log_softmax + topk;
* HF: the bitmask applied with masked_fill (HF has no bitmask processor), RepetitionPenalty, Temperature,
  MinP, TopK, TopP warpers in a LogitsProcessorList, softmax + multinomial, log_softmax + topk. HF has no
  frequency / presence penalty, so its column does less work than the other two.

Floor: the bytes every implementation must read once (B*V fp32 logits, the B*V/8-byte bitmask and the
histories) at the measured read bandwidth, hot (L2) and cold (DRAM; caches flushed before every call).
"""

from __future__ import annotations

import os
import time
from typing import Dict, List

import torch

import decodekit as dk
from decodekit import reference as ref

from . import harness as H
from . import sampling as S
from .sampling import Inputs, bandwidth, llm_logits, measure

REP, FREQ, PRES, TEMP, TOP_K, TOP_P, MIN_P, TOP_N = 1.1, 0.5, 0.5, 0.7, 50, 0.9, 0.05, 5
HIST = 512
ALLOWED = 0.3
SEED = 1234
SHAPES_FULL = [(1, 128256), (8, 128256), (64, 128256), (1, 151936), (8, 151936), (64, 151936)]
SHAPES_QUICK = [(1, 128256), (8, 128256)]


def chain_inputs(B: int, V: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Bitmask (30% of the tokens allowed, i.i.d. bits; the row's top tokens stay allowed so the chain
    has a head to cut) and a history of 256 prompt + 256 output ids (half of them from the head region,
    so repetitions happen)."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.rand(B, (V + 31) // 32 * 32, generator=g) < ALLOWED
    words = (bits.view(B, -1, 32).long() << torch.arange(32)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    hist = torch.randint(0, V, (B, HIST), generator=g)
    hist[:, ::2] = torch.randint(0, min(2000, V), (B, HIST // 2), generator=g)
    return dict(
        allowed_token_bitmask=words,
        prompt_token_ids=hist[:, : HIST // 2].contiguous(),
        output_token_ids=hist[:, HIST // 2 :].contiguous(),
    )


def _hf_chain():
    try:
        from transformers.generation import logits_process as LP
    except Exception:
        return None
    return LP.LogitsProcessorList(
        [
            LP.RepetitionPenaltyLogitsProcessor(REP),
            LP.TemperatureLogitsWarper(TEMP),
            LP.MinPLogitsWarper(MIN_P),
            LP.TopKLogitsWarper(TOP_K),
            LP.TopPLogitsWarper(TOP_P),
        ]
    )


def run(quick: bool = False, json_path=None, shapes=None, threads=None, clock: str = "wall") -> Dict:
    """clock="cpu": CPU time of the calling thread (the runner then uses 1 thread), for figures that
    hold on a busy shared machine; "wall": median wall time."""
    S._CLOCK[0] = time.thread_time if clock == "cpu" else time.perf_counter
    try:
        return _run(quick, json_path, shapes, clock)
    finally:
        S._CLOCK[0] = time.perf_counter


def _run(quick, json_path, shapes, clock) -> Dict:
    shapes = shapes or (SHAPES_QUICK if quick else SHAPES_FULL)
    load0 = os.getloadavg()
    hf = _hf_chain()
    bw_hot, bw_cold = bandwidth(False), bandwidth(True)
    rows: List[List[str]] = []
    results = []
    for B, V in shapes:
        inp = Inputs(llm_logits, B, V, seed=B + V)
        c = chain_inputs(B, V, seed=B)
        x = inp.logits
        allowed = ref.unpack_bitmask(c["allowed_token_bitmask"], V)
        history = torch.cat([c["prompt_token_ids"], c["output_token_ids"]], 1)
        nbytes = B * V * 4 + c["allowed_token_bitmask"].numel() * 4 + history.numel() * 8
        fns = {
            "decodekit": lambda: dk.sample(
                x,
                order="vllm",
                temperature=TEMP,
                top_k=TOP_K,
                top_p=TOP_P,
                min_p=MIN_P,
                repetition_penalty=REP,
                frequency_penalty=FREQ,
                presence_penalty=PRES,
                top_logprobs=TOP_N,
                seed=SEED,
                **c,
            ),
            "torch": lambda: ref.pipeline_torch_vllm(
                x,
                repetition_penalty=REP,
                frequency_penalty=FREQ,
                presence_penalty=PRES,
                temperature=TEMP,
                top_k=TOP_K,
                top_p=TOP_P,
                min_p=MIN_P,
                top_logprobs=TOP_N,
                **c,
            ),
        }
        if hf is not None:

            def hf_step():
                s = hf(history, x.masked_fill(~allowed, float("-inf")))
                lp = torch.log_softmax(s, -1)
                tok = torch.multinomial(lp.exp(), 1)
                return tok, lp.gather(-1, tok), lp.topk(TOP_N, -1)

            fns["hf"] = hf_step
        res = {"B": B, "V": V, "bytes": nbytes}
        for cold in (False, True):
            tag = "cold" if cold else "hot"
            for name, fn in fns.items():
                budget = 0.5 if name == "decodekit" else 1.5
                res[f"{name}_{tag}"] = measure(
                    fn, inp.next_logits, cold=cold, budget=budget, reps=11 if name == "decodekit" else 5
                )
            res[f"floor_{tag}"] = nbytes / (bw_cold if cold else bw_hot)
        results.append(res)
        for tag in ("hot", "cold"):
            d = res[f"decodekit_{tag}"]
            t = res[f"torch_{tag}"]
            h = res.get(f"hf_{tag}")
            fl = res[f"floor_{tag}"]
            rows.append(
                [
                    f"{B}x{V}",
                    tag,
                    H.fmt_us(d),
                    H.fmt_us(t),
                    f"{t / d:.0f}x",
                    H.fmt_us(h),
                    f"{h / d:.0f}x" if h else "-",
                    H.fmt_us(fl),
                    f"{d / fl:.2f}",
                ]
            )
    H.print_table(
        "the whole sampling step (bitmask 30%, 512-token history, rep 1.1 freq 0.5 pres 0.5, T 0.7, "
        "min-p 0.05, top-k 50, top-p 0.9, top-5 logprobs), microseconds",
        ["BxV", "cache", "decodekit", "torch (vLLM way)", "x", "HF processors", "x", "read floor", "dk / floor"],
        rows,
    )
    load1 = os.getloadavg()
    print(
        f"clock={clock}, {H.machine()}; load average {[round(v, 2) for v in load0]} at the start, "
        f"{[round(v, 2) for v in load1]} at the end (the machine is shared with other jobs)"
    )
    payload = {
        "machine": H.machine(),
        "clock": clock,
        "loadavg": [load0, load1],
        "bandwidth_hot": bw_hot,
        "bandwidth_cold": bw_cold,
        "results": results,
    }
    if json_path:
        H.save_json(json_path, payload)
    return payload
