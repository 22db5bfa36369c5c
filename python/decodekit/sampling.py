"""Filtering and exact sampling (FlashInfer-compatible names and argument orders).

Semantics: docs/semantics.md, "Filters" and "Sampling" (decisions in the README). Every sampler draws EXACTLY from the
renormalised survivors of its filters with a counter-based Philox stream, so the same seed gives
the same tokens on every CPU path and thread count.
"""

import math
import numbers
from typing import Optional, Union

import numpy as np
import torch

from ._ops import ops

__all__ = [
    "softmax",
    "top_k_mask_logits",
    "top_p_mask_logits",
    "min_p_mask_logits",
    "top_k_renorm_probs",
    "top_p_renorm_probs",
    "min_p_renorm_probs",
    "sampling_from_probs",
    "sampling_from_logits",
    "top_k_sampling_from_probs",
    "top_p_sampling_from_probs",
    "min_p_sampling_from_probs",
    "top_k_top_p_sampling_from_probs",
    "top_k_top_p_sampling_from_logits",
    "sample",
]

Param = Union[float, int, torch.Tensor, None]
_ORDERS = {"sequential": 0, "top_k_first": 0, "joint": 1}
_MASK, _RENORM, _SOFTMAX = 0, 1, 2


# ---- fake (meta) impls of this module's ops (schemas: csrc/torch/ops.cpp) ----------------------
def _n_out_rows(x, indices):
    return x.shape[0] if indices is None else indices.shape[0]


@torch.library.register_fake("decodekit::sample")
def _sample_fake(x, indices, *_params, **_kw):  # the other schema arguments set no shape
    n = _n_out_rows(x, indices)
    return (
        x.new_empty((n,), dtype=torch.int64),
        x.new_empty((n,), dtype=torch.bool),
        x.new_empty((n,), dtype=torch.float32),
    )


@torch.library.register_fake("decodekit::gumbel_sample")
def _gumbel_fake(logits, indices, seed_arr, seed_val, offset, offset_arr=None):
    n = _n_out_rows(logits, indices)
    return logits.new_empty((n,), dtype=torch.int64), logits.new_empty((n,), dtype=torch.bool)


@torch.library.register_fake("decodekit::draw_seed")
def _draw_seed_fake():
    return torch.empty((1,), dtype=torch.int64, device="cpu")


@torch.library.register_fake("decodekit::filter")
def _filter_fake(x, kind, *_params):  # the filter parameters set no shape
    return x.new_empty(x.shape, dtype=x.dtype if kind == 0 else torch.float32)


@torch.library.register_fake("decodekit::philox_state")
def _philox_state_fake(like, increment, generator=None):
    return like.new_empty((1,), dtype=torch.int64), like.new_empty((1,), dtype=torch.int64)


def _is_int(v) -> bool:
    """A Python or numpy integer (not a bool)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    """A Python or numpy real number (not a bool)."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


_K_DISABLED = 2**62  # |top_k| beyond this means "disabled" (k <= 0 or k >= V) and fits int64


def _on_host(t: torch.Tensor) -> bool:
    """Whether reading t's values in Python costs no device sync (CPU and meta-free host tensors)."""
    return t.device.type == "cpu"


def _split(value: Param, default, name: str, kind=float, n=None):
    """A per-row parameter as (tensor or None, scalar): the one parser of the sampling, speculative
    and whole-step (pipeline.pack_params) wrappers. Python and numpy scalars and 0-D CPU tensors
    are scalars; a 1-D tensor is one value per row; a 0-D device tensor is broadcast to the n rows
    (never read on the host). kind=int: an integral value (an int, or a float with no fraction),
    clamped to +-2^62 (for top_k, k <= 0 or k >= V is off; for min_tokens_to_keep, 2^62 keeps
    every token). Range checks happen in the op (on the values as given, before any float32
    conversion), so they hold for every caller. Errors name the argument."""
    if value is None:
        return None, default
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            return value, default
        if not _on_host(value) and n is not None:
            return value.reshape(1).expand(n), default
        value = value.item()
    if not _is_real(value):
        raise TypeError(f"{name} must be a number or a 1-D tensor, got {type(value).__name__}")
    if kind is int:
        if not _is_int(value):
            f = _float(value)
            if math.isnan(f) or (math.isfinite(f) and not f.is_integer()):
                raise ValueError(f"{name} must be an integer, got {value}")
            value = int(max(min(f, 2.0**62), -(2.0**62)))
        # k <= 0 or k >= V disables: a k outside int64 keeps that meaning
        return None, max(min(int(value), _K_DISABLED), -_K_DISABLED)
    return None, _float(value)


def _float(v) -> float:
    try:
        return float(v)
    except OverflowError:  # an int beyond float64's range
        return math.copysign(math.inf, v)


def _order(order: str) -> int:
    if order not in _ORDERS:
        raise ValueError(f"filter_apply_order must be one of {sorted(_ORDERS)}, got {order!r}")
    return _ORDERS[order]


MAX_OFFSET = 2**48 - 1  # the Philox counter holds 48 bits of offset (README "Limits")


def _offset(offset):
    """(int offset, offset tensor or None). A device tensor (0-D, [1] or one per row) is passed to
    the op as offset_arr and read by the kernels only; a 0-D CPU tensor is read here."""
    if offset is None:
        return 0, None
    if isinstance(offset, torch.Tensor) and not offset.is_floating_point() and offset.dtype != torch.bool:
        if offset.dim() == 0 and _on_host(offset):
            offset = offset.item()
        else:
            return 0, offset.reshape(1) if offset.dim() == 0 else offset
    if not _is_int(offset) or not 0 <= int(offset) <= MAX_OFFSET:
        raise ValueError(f"offset must be an int in [0, 2^48), got {offset!r}")
    return int(offset), None


_PHILOX_INCREMENT = 4  # how far one call advances torch's CUDA generator (its offsets move in fours)


def _rng(seed, offset, generator, like):
    """(seed tensor or None, scalar seed as int64, int offset, offset tensor or None) for the ops
    that take offset_arr; `like` is the op's input tensor (its device picks the generator).

    seed None on a CUDA input with generator None or a CUDA generator: torch's Philox state of that
    generator (decodekit::philox_state), as device tensors the kernels read, so CUDA graph replays
    draw fresh streams and nothing syncs. Otherwise as _seed."""
    off, off_arr = _offset(offset)
    gen_cuda = generator is None or (isinstance(generator, torch.Generator) and generator.device.type == "cuda")
    if seed is None and like.device.type == "cuda" and gen_cuda:
        if generator is not None and torch.compiler.is_compiling():
            raise ValueError(
                "generator= cannot be used inside torch.compile (dynamo cannot trace a torch.Generator); "
                "pass seed= or leave both None to use torch's default CUDA generator"
            )
        seed_t, off_t = ops.philox_state(like, _PHILOX_INCREMENT, generator)
        return seed_t, 0, off, off_t if off_arr is None else off_t + off_arr
    seed_arr, seed_val, _ = _seed(seed, off, generator, like.device)
    return seed_arr, seed_val, off, off_arr


def _seed(seed, offset, generator, device):
    """(seed tensor or None, scalar seed as int64, offset) for the ops.

    seed None: one 63-bit value drawn from `generator` (or torch's default CPU generator). Eagerly
    it is drawn here; inside torch.compile the op decodekit::draw_seed draws the same value from the
    default generator at run time (dynamo cannot trace a data-dependent Python int, and inductor
    would replace torch.randint with its own generator), and passes it as a one-seed tensor, which
    the ops read as the scalar form. A torch.Generator object cannot enter a compiled graph."""
    off, off_arr = _offset(offset)
    if off_arr is not None:
        raise ValueError("offset must be an int (or a 0-D CPU tensor) for this op, got a tensor")
    if seed is None:
        if torch.compiler.is_compiling():
            if generator is not None:
                raise ValueError(
                    "generator= cannot be used inside torch.compile (dynamo cannot trace a "
                    "torch.Generator); pass seed= (an int or an int64 tensor) or leave both None "
                    "to draw from torch's default generator"
                )
            return ops.draw_seed(), 0, off
        s = torch.randint(0, 2**63 - 1, (1,), generator=generator, device="cpu").item()
        return None, int(s), off
    if isinstance(seed, torch.Tensor):
        if seed.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"seed must be an int or an int64 tensor, got dtype {seed.dtype}")
        if seed.dim() == 0:
            if not _on_host(seed):
                return seed.reshape(1), 0, off  # a device seed: read by the kernels only
            return None, _seed_int(seed.item()), off
        return seed.to(device) if seed.numel() != 1 else seed, 0, off
    if not _is_int(seed):
        raise ValueError(f"seed must be an int or an int64 tensor, got {type(seed).__name__}")
    return None, _seed_int(seed), off


def _seed_int(seed) -> int:
    """A scalar seed as the int64 the op takes: any value in [-2^63, 2^64) (the 64-bit key's bits)."""
    seed = int(seed)
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must be in [-2^63, 2^64) (a 64-bit key), got {seed}")
    return seed - 2**64 if seed >= 2**63 else seed


def _indices(indices, device, name="indices"):
    """An index tensor argument (a Python / numpy sequence of ints is accepted)."""
    if indices is None or isinstance(indices, torch.Tensor):
        return indices
    try:
        return torch.as_tensor(indices, dtype=torch.int64, device=device)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise ValueError(f"{name} must be a 1-D int tensor or a sequence of ints, got {indices!r}") from None


def _n_rows(x, indices):
    """The number of output rows (a shape, never a value); None for a non-tensor x."""
    if not isinstance(x, torch.Tensor):
        return None
    if indices is not None and indices.dim() >= 1:
        return indices.shape[0]
    return x.shape[0] if x.dim() >= 1 else 1


def _check_nan(x, check_nan, name):
    # check_nan=True asks for an eager check: on a CUDA input this reads the device (one sync)
    if check_nan and bool(torch.isnan(x).any()):
        raise ValueError(f"{name} contains NaN")


def _finish(tokens, valid, logprobs, out_dtype, return_valid, return_logprobs=False):
    if out_dtype is not None and out_dtype != torch.int64:
        if out_dtype != torch.int32:
            raise ValueError(f"out_dtype must be torch.int64 or torch.int32, got {out_dtype}")
        tokens = tokens.to(torch.int32)
    out = (tokens,)
    if return_valid:
        out += (valid,)
    if return_logprobs:
        out += (logprobs,)
    return out[0] if len(out) == 1 else out


def _run_sample(
    x,
    is_probs,
    *,
    temperature=1.0,
    top_k=None,
    top_p=None,
    min_p=None,
    order=0,
    indices=None,
    generator=None,
    seed=None,
    offset=None,
    check_nan=False,
    return_valid=False,
    return_logprobs=False,
    out_dtype=None,
    name="probs",
):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor")
    _check_nan(x, check_nan, name)
    indices = _indices(indices, x.device)
    n = _n_rows(x, indices)
    T_arr, T_val = _split(temperature, 1.0, "temperature", n=n)
    k_arr, k_val = _split(top_k, 0, "top_k", int, n=n)
    p_arr, p_val = _split(top_p, 1.0, "top_p", n=n)
    mp_arr, mp_val = _split(min_p, 0.0, "min_p", n=n)
    seed_arr, seed_val, off, off_arr = _rng(seed, offset, generator, x)
    tokens, valid, logprobs = ops.sample(
        x,
        indices,
        is_probs,
        T_arr,
        T_val,
        k_arr,
        k_val,
        p_arr,
        p_val,
        mp_arr,
        mp_val,
        order,
        seed_arr,
        seed_val,
        off,
        off_arr,
    )
    return _finish(tokens, valid, logprobs, out_dtype, return_valid, return_logprobs)


# ---------------------------------------------------------------------------------------------
# filters
def softmax(logits: torch.Tensor, temperature: Param = None, enable_pdl=None) -> torch.Tensor:
    """softmax(logits / temperature) in float32 (temperature None means 1)."""
    T_arr, T_val = _split(temperature, 1.0, "temperature", n=_n_rows(logits, None))
    if T_arr is None and T_val == 0:
        raise ValueError("temperature must be > 0 for softmax, got 0")
    if T_arr is not None and _on_host(T_arr) and bool((T_arr == 0).any()):  # on a device: the op's deferred check
        raise ValueError("temperature must be > 0 for softmax in every row")
    return ops.filter(logits, _SOFTMAX, False, T_arr, T_val, None, 0, None, 1.0, None, 0.0, 0)


def top_k_mask_logits(logits: torch.Tensor, top_k: Param) -> torch.Tensor:
    """Logits with -inf outside the top-k (ties at the k-th value kept); same dtype."""
    k_arr, k_val = _split(top_k, 0, "top_k", int, n=_n_rows(logits, None))
    return ops.filter(logits, _MASK, False, None, 1.0, k_arr, k_val, None, 1.0, None, 0.0, 0)


def top_p_mask_logits(logits: torch.Tensor, top_p: Param) -> torch.Tensor:
    """Logits with -inf outside the top-p nucleus of softmax(logits); same dtype."""
    p_arr, p_val = _split(top_p, 1.0, "top_p", n=_n_rows(logits, None))
    return ops.filter(logits, _MASK, False, None, 1.0, None, 0, p_arr, p_val, None, 0.0, 0)


def min_p_mask_logits(logits: torch.Tensor, min_p: Param) -> torch.Tensor:
    """Logits with -inf where softmax prob < min_p * max prob; same dtype."""
    mp_arr, mp_val = _split(min_p, 0.0, "min_p", n=_n_rows(logits, None))
    return ops.filter(logits, _MASK, False, None, 1.0, None, 0, None, 1.0, mp_arr, mp_val, 0)


def top_k_renorm_probs(probs: torch.Tensor, top_k: Param) -> torch.Tensor:
    k_arr, k_val = _split(top_k, 0, "top_k", int, n=_n_rows(probs, None))
    return ops.filter(probs, _RENORM, True, None, 1.0, k_arr, k_val, None, 1.0, None, 0.0, 0)


def top_p_renorm_probs(probs: torch.Tensor, top_p: Param) -> torch.Tensor:
    p_arr, p_val = _split(top_p, 1.0, "top_p", n=_n_rows(probs, None))
    return ops.filter(probs, _RENORM, True, None, 1.0, None, 0, p_arr, p_val, None, 0.0, 0)


def min_p_renorm_probs(probs: torch.Tensor, min_p: Param) -> torch.Tensor:
    mp_arr, mp_val = _split(min_p, 0.0, "min_p", n=_n_rows(probs, None))
    return ops.filter(probs, _RENORM, True, None, 1.0, None, 0, None, 1.0, mp_arr, mp_val, 0)


# ---------------------------------------------------------------------------------------------
# samplers (FlashInfer signatures)
def sampling_from_probs(
    probs,
    indices=None,
    deterministic=True,
    generator=None,
    check_nan=False,
    seed=None,
    offset=None,
    return_valid=False,
    out_dtype=None,
):
    return _run_sample(
        probs,
        True,
        indices=indices,
        generator=generator,
        seed=seed,
        offset=offset,
        check_nan=check_nan,
        return_valid=return_valid,
        out_dtype=out_dtype,
    )


def sampling_from_logits(
    logits,
    indices=None,
    deterministic=True,
    generator=None,
    check_nan=False,
    seed=None,
    offset=None,
    return_valid=False,
    out_dtype=None,
):
    """Gumbel-max: argmax(logits + Gumbel noise), one Philox word pair per element."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError("logits must be a torch.Tensor")
    _check_nan(logits, check_nan, "logits")
    seed_arr, seed_val, off, off_arr = _rng(seed, offset, generator, logits)
    tokens, valid = ops.gumbel_sample(logits, _indices(indices, logits.device), seed_arr, seed_val, off, off_arr)
    return _finish(tokens, valid, None, out_dtype, return_valid)


def top_k_sampling_from_probs(
    probs,
    top_k,
    indices=None,
    deterministic=True,
    generator=None,
    check_nan=False,
    seed=None,
    offset=None,
    return_valid=False,
    out_dtype=None,
):
    return _run_sample(
        probs,
        True,
        top_k=top_k,
        indices=indices,
        generator=generator,
        seed=seed,
        offset=offset,
        check_nan=check_nan,
        return_valid=return_valid,
        out_dtype=out_dtype,
    )


def top_p_sampling_from_probs(
    probs,
    top_p,
    indices=None,
    deterministic=True,
    generator=None,
    check_nan=False,
    seed=None,
    offset=None,
    return_valid=False,
    out_dtype=None,
):
    return _run_sample(
        probs,
        True,
        top_p=top_p,
        indices=indices,
        generator=generator,
        seed=seed,
        offset=offset,
        check_nan=check_nan,
        return_valid=return_valid,
        out_dtype=out_dtype,
    )


def min_p_sampling_from_probs(
    probs,
    min_p,
    indices=None,
    deterministic=True,
    generator=None,
    check_nan=False,
    seed=None,
    offset=None,
    return_valid=False,
    out_dtype=None,
):
    return _run_sample(
        probs,
        True,
        min_p=min_p,
        indices=indices,
        generator=generator,
        seed=seed,
        offset=offset,
        check_nan=check_nan,
        return_valid=return_valid,
        out_dtype=out_dtype,
    )


def top_k_top_p_sampling_from_probs(
    probs,
    top_k,
    top_p,
    indices=None,
    filter_apply_order="top_k_first",
    deterministic=True,
    generator=None,
    check_nan=False,
    seed=None,
    offset=None,
    return_valid=False,
    out_dtype=None,
):
    return _run_sample(
        probs,
        True,
        top_k=top_k,
        top_p=top_p,
        order=_order(filter_apply_order),
        indices=indices,
        generator=generator,
        seed=seed,
        offset=offset,
        check_nan=check_nan,
        return_valid=return_valid,
        out_dtype=out_dtype,
    )


def top_k_top_p_sampling_from_logits(
    logits,
    top_k,
    top_p,
    indices=None,
    filter_apply_order="top_k_first",
    deterministic=True,
    generator=None,
    check_nan=False,
    seed=None,
    offset=None,
    return_valid=False,
    out_dtype=None,
):
    return _run_sample(
        logits,
        False,
        top_k=top_k,
        top_p=top_p,
        order=_order(filter_apply_order),
        indices=indices,
        generator=generator,
        seed=seed,
        offset=offset,
        check_nan=check_nan,
        return_valid=return_valid,
        out_dtype=out_dtype,
        name="logits",
    )


def sample(
    logits: torch.Tensor,
    *,
    temperature: Param = 1.0,
    top_k: Param = None,
    top_p: Param = None,
    min_p: Param = None,
    order: str = "sequential",
    indices=None,
    seed=None,
    offset=None,
    generator=None,
    check_nan=False,
    return_valid=False,
    return_logprobs=False,
    out_dtype=None,
    **step,
):
    """decodekit's one-pass sampler: temperature -> top-k -> top-p -> min-p (Hugging Face order, or
    order="joint"), then an exact draw from the renormalised survivors. temperature 0 = greedy.
    No probability row is materialised and the vocabulary is never sorted.

    The whole step (decodekit.pipeline; README "The whole sampling step") adds the keywords
    allowed_token_bitmask, banned_token_ids, logit_bias, prompt_token_ids, output_token_ids,
    repetition_penalty, frequency_penalty, presence_penalty, top_n_sigma, typical_p, epsilon, eta,
    top_h, min_tokens_to_keep, top_logprobs, logprobs_mode and order="vllm"."""
    if step or order == "vllm":
        from .pipeline import run_pipeline

        return run_pipeline(
            logits,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            order=order,
            indices=indices,
            seed=seed,
            offset=offset,
            generator=generator,
            check_nan=check_nan,
            return_valid=return_valid,
            return_logprobs=return_logprobs,
            out_dtype=out_dtype,
            **step,
        )
    return _run_sample(
        logits,
        False,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        order=_order(order),
        indices=indices,
        generator=generator,
        seed=seed,
        offset=offset,
        check_nan=check_nan,
        return_valid=return_valid,
        return_logprobs=return_logprobs,
        out_dtype=out_dtype,
        name="logits",
    )
