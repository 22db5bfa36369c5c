"""The whole sampling step in one pass per row (issue 11): grammar bitmask, token bans, logit
bias, repetition / frequency / presence penalties, temperature, top-n-sigma, top-k, top-p, min-p,
typical, epsilon, eta, top-h (with min_tokens_to_keep), the exact draw and the logprobs.

`decodekit.sample(...)` takes every feature as a keyword and comes here when one of them is used;
the standalone ops below share the same kernel. Semantics: reference.pipeline (the executable
specification) and the README section "The whole sampling step".
"""

from typing import NamedTuple, Optional

import torch

from ._ops import ops
from .sampling import _n_out_rows, _split

__all__ = [
    "SampleOutput",
    "apply_token_bitmask_inplace",
    "apply_penalties",
    "typical_mask_logits",
    "epsilon_mask_logits",
    "eta_mask_logits",
    "top_n_sigma_mask_logits",
    "top_h_mask_logits",
]


# ---- fake (meta) impls of this module's ops (schemas: csrc/torch/ops.cpp) ----------------------
@torch.library.register_fake("decodekit::pipeline")
def _pipeline_fake(
    x,
    indices,
    params,
    order,
    bitmask,
    banned,
    bias_ids,
    bias_vals,
    prompt,
    output,
    mode,
    top_n,
    raw_logprobs,
    want_logprob,
    seed_arr,
    seed_val,
    offset,
    offset_arr=None,
):
    n = _n_out_rows(x, indices)
    s = n if mode == 0 else 0
    return (
        x.new_empty((s,), dtype=torch.int64),
        x.new_empty((s,), dtype=torch.bool),
        x.new_empty((s,), dtype=torch.float32),
        x.new_empty((s,), dtype=torch.int64),
        x.new_empty((s, top_n), dtype=torch.int64),
        x.new_empty((s, top_n), dtype=torch.float32),
        x.new_empty((n - s, x.shape[1])),
    )


@torch.library.register_fake("decodekit::apply_token_bitmask_inplace")
def _bitmask_fake(logits, bitmask, indices):
    return None


# Columns of the per-row parameter matrix (csrc/include/decodekit/pipeline.h PipeParam):
# (keyword, default = off, integral)
PARAMS = (
    ("temperature", 1.0, False),
    ("top_k", 0, True),
    ("top_p", 1.0, False),
    ("min_p", 0.0, False),
    ("repetition_penalty", 1.0, False),
    ("frequency_penalty", 0.0, False),
    ("presence_penalty", 0.0, False),
    ("top_n_sigma", 0.0, False),
    ("typical_p", 1.0, False),
    ("epsilon", 0.0, False),
    ("eta", 0.0, False),
    ("top_h", 0.0, False),
    ("min_tokens_to_keep", 1, True),
)
ORDERS = {"sequential": 0, "top_k_first": 0, "joint": 1, "vllm": 2}
LOGPROBS_MODES = ("processed", "raw")
_SAMPLE, _MASK = 0, 1


class SampleOutput(NamedTuple):
    """What `sample(..., top_logprobs=n)` returns for n >= 1 (logprobs of `logprobs_mode`)."""

    tokens: torch.Tensor  # int64 [B] (or out_dtype)
    valid: torch.Tensor  # bool [B]
    logprobs: torch.Tensor  # float32 [B]: the sampled token's logprob
    ranks: torch.Tensor  # int64 [B]: number of tokens with logprob >= the sampled token's
    top_ids: torch.Tensor  # int64 [B, n], most probable first (ties: lowest id)
    top_logprobs: torch.Tensor  # float32 [B, n]


def _as_column(arr, value, name, n, device):
    """One params column, float64 [n] on `device`, from sampling._split's (tensor or None, scalar).
    A device tensor is never read on the host."""
    if arr is None:
        return torch.full((n,), float(value), dtype=torch.float64, device=device)
    if arr.dim() != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be a scalar or a 1-D tensor of length {n}, got shape {tuple(arr.shape)}")
    return arr.detach().to(device, torch.float64)


_PARAM_ROWS = {}  # (device, values) -> float64 [1, 13] on that device, kept for the process
_PARAM_ROWS_MAX = 256


def _param_row(row, device):
    """One params row of scalars on `device`. Not on the CPU: written by fills on the device (no
    host-to-device copy, which would sync and could not be graph-captured) and cached, so repeated
    calls with the same scalars launch nothing."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.tensor([row], dtype=torch.float64)
    key = (str(device), tuple(row))
    t = _PARAM_ROWS.get(key)
    if t is not None:
        return t
    t = torch.stack([torch.full((), v, dtype=torch.float64, device=device) for v in row]).unsqueeze(0)
    cacheable = type(t) is torch.Tensor and not torch.compiler.is_compiling()
    if cacheable and device.type == "cuda":
        cacheable = not torch.cuda.is_current_stream_capturing()
    if cacheable and len(_PARAM_ROWS) < _PARAM_ROWS_MAX:
        _PARAM_ROWS[key] = t
    return t


def pack_params(n: int, device=None, **kw) -> torch.Tensor:
    """float64 [n, 13] per-row parameters on `device` (default the CPU; missing keywords: off);
    each keyword is parsed by sampling._split (the one parser of per-row parameters, shared with
    the sampling and speculative wrappers); ranges are checked by the op. All scalars (the common
    case): one row, broadcast (the op makes it contiguous). No tensor value is read on the host and
    nothing moves through the CPU."""
    device = torch.device("cpu") if device is None else device
    cols = [_split(kw.get(name), d, name, int if integral else float, n=n) for name, d, integral in PARAMS]
    if all(arr is None for arr, _ in cols):
        return _param_row([float(v) for _, v in cols], device).expand(n, len(PARAMS))
    return torch.stack([_as_column(arr, v, name, n, device) for (arr, v), (name, _, _) in zip(cols, PARAMS)], 1)


def _ids(t, name):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=torch.int64)
    return t


def _history(logits, n, prompt_token_ids, output_token_ids, logit_bias, banned_token_ids):
    bias_ids = bias_vals = None
    if logit_bias is not None:
        if not (isinstance(logit_bias, (tuple, list)) and len(logit_bias) == 2):
            raise ValueError("logit_bias must be a pair (token_ids [B, M] int64 padded with -1, values [B, M])")
        bias_ids, bias_vals = _ids(logit_bias[0], "logit_bias"), logit_bias[1]
        if not isinstance(bias_vals, torch.Tensor):
            bias_vals = torch.as_tensor(bias_vals, dtype=torch.float32)
    return (
        _ids(banned_token_ids, "banned_token_ids"),
        bias_ids,
        bias_vals,
        _ids(prompt_token_ids, "prompt_token_ids"),
        _ids(output_token_ids, "output_token_ids"),
    )


def run_pipeline(
    logits,
    *,
    indices=None,
    seed=None,
    offset=None,
    generator=None,
    order="sequential",
    allowed_token_bitmask=None,
    banned_token_ids=None,
    logit_bias=None,
    prompt_token_ids=None,
    output_token_ids=None,
    top_logprobs=None,
    logprobs_mode="processed",
    return_valid=False,
    return_logprobs=False,
    out_dtype=None,
    check_nan=False,
    **params,
):
    """decodekit.sample with any of the issue-11 keywords (see `sample` for their meaning)."""
    from .sampling import _check_nan, _finish, _indices, _rng

    if not isinstance(logits, torch.Tensor):
        raise TypeError("logits must be a torch.Tensor")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {sorted(ORDERS)}, got {order!r}")
    if logprobs_mode not in LOGPROBS_MODES:
        raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
    n_top = 0 if top_logprobs is None else top_logprobs
    if isinstance(n_top, bool) or not isinstance(n_top, int) or n_top < 0:
        raise ValueError(f"top_logprobs must be an int >= 0, got {top_logprobs!r}")
    _check_nan(logits, check_nan, "logits")
    indices = _indices(indices, logits.device)
    n = logits.shape[0] if indices is None else indices.shape[0]
    P = pack_params(n, logits.device, **params)
    banned, bias_ids, bias_vals, prompt, output = _history(
        logits, n, prompt_token_ids, output_token_ids, logit_bias, banned_token_ids
    )
    seed_arr, seed_val, off, off_arr = _rng(seed, offset, generator, logits)
    want = bool(return_logprobs) or n_top > 0
    tokens, valid, lp, rank, top_ids, top_lp, _ = ops.pipeline(
        logits,
        indices,
        P,
        ORDERS[order],
        allowed_token_bitmask,
        banned,
        bias_ids,
        bias_vals,
        prompt,
        output,
        _SAMPLE,
        n_top,
        logprobs_mode == "raw",
        want,
        seed_arr,
        seed_val,
        off,
        off_arr,
    )
    if n_top == 0:
        return _finish(tokens, valid, lp, out_dtype, return_valid, return_logprobs)
    tokens = _finish(tokens, valid, lp, out_dtype, False, False)
    return SampleOutput(tokens, valid, lp, rank, top_ids, top_lp)


def _mask(
    logits,
    indices=None,
    order="sequential",
    allowed_token_bitmask=None,
    banned_token_ids=None,
    logit_bias=None,
    prompt_token_ids=None,
    output_token_ids=None,
    **params,
):
    if not isinstance(logits, torch.Tensor):
        raise TypeError("logits must be a torch.Tensor")
    n = logits.shape[0] if indices is None else indices.shape[0]
    P = pack_params(n, logits.device, **params)
    banned, bias_ids, bias_vals, prompt, output = _history(
        logits, n, prompt_token_ids, output_token_ids, logit_bias, banned_token_ids
    )
    return ops.pipeline(
        logits,
        indices,
        P,
        ORDERS[order],
        allowed_token_bitmask,
        banned,
        bias_ids,
        bias_vals,
        prompt,
        output,
        _MASK,
        0,
        False,
        False,
        None,
        0,
        0,
    )[6]


# ---------------------------------------------------------------------------------------------
# standalone ops
def apply_token_bitmask_inplace(logits: torch.Tensor, bitmask: torch.Tensor, indices=None) -> None:
    """xgrammar's op: logits[i] (every row, or each row i in `indices`) gets -inf where bit j of
    word w of bitmask[i] is 0 for token 32*w + j. Tokens past 32 * bitmask.shape[-1] are left as
    they are. logits float32 / bfloat16 / float16, 1-D or 2-D; bitmask int32 of the same rank."""
    if indices is not None and not isinstance(indices, torch.Tensor):
        indices = torch.as_tensor(list(indices), dtype=torch.int64, device=logits.device)
    ops.apply_token_bitmask_inplace(logits, bitmask, indices)


def apply_penalties(
    logits: torch.Tensor,
    *,
    prompt_token_ids=None,
    output_token_ids=None,
    repetition_penalty=1.0,
    frequency_penalty=0.0,
    presence_penalty=0.0,
    logit_bias=None,
    banned_token_ids=None,
    allowed_token_bitmask=None,
) -> torch.Tensor:
    """New logits (same dtype): bitmask and bans (-inf), logit bias, then the repetition penalty over
    prompt + output and the frequency / presence penalties over the output (histories: int64
    [B, L] padded with -1). A row with NaN or +inf is returned unchanged."""
    return _mask(
        logits,
        allowed_token_bitmask=allowed_token_bitmask,
        banned_token_ids=banned_token_ids,
        logit_bias=logit_bias,
        prompt_token_ids=prompt_token_ids,
        output_token_ids=output_token_ids,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
    )


def typical_mask_logits(logits: torch.Tensor, typical_p, min_tokens_to_keep=1) -> torch.Tensor:
    """Locally typical sampling (HF TypicalLogitsWarper): -inf outside the typical set."""
    return _mask(logits, typical_p=typical_p, min_tokens_to_keep=min_tokens_to_keep)


def epsilon_mask_logits(logits: torch.Tensor, epsilon, min_tokens_to_keep=1) -> torch.Tensor:
    """Epsilon sampling (HF EpsilonLogitsWarper): -inf where p < epsilon."""
    return _mask(logits, epsilon=epsilon, min_tokens_to_keep=min_tokens_to_keep)


def eta_mask_logits(logits: torch.Tensor, eta, min_tokens_to_keep=1) -> torch.Tensor:
    """Eta sampling (HF EtaLogitsWarper): -inf where p < min(eta, sqrt(eta) * exp(-entropy))."""
    return _mask(logits, eta=eta, min_tokens_to_keep=min_tokens_to_keep)


def top_n_sigma_mask_logits(logits: torch.Tensor, top_n_sigma) -> torch.Tensor:
    """Top-n-sigma (llama.cpp): -inf below max - n * std of the row's finite logits."""
    return _mask(logits, top_n_sigma=top_n_sigma)


def top_h_mask_logits(logits: torch.Tensor, top_h, min_tokens_to_keep=1) -> torch.Tensor:
    """Top-H (HF TopHLogitsWarper): the most probable tokens (of the top 100) while their cumulative
    entropy stays <= top_h * the entropy of those 100."""
    return _mask(logits, top_h=top_h, min_tokens_to_keep=min_tokens_to_keep)
