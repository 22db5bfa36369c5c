"""``flashinfer.sampling`` on decodekit: ``import decodekit.compat.flashinfer as sampling``.

Every function of ``flashinfer.sampling`` (softmax, the samplers, the renorm / mask filters,
``chain_speculative_sampling``) with FlashInfer's positional order, defaults and return
conventions; the work is done by decodekit's ops (decodekit.sampling / decodekit.speculative).
What the conventions are (FlashInfer's python/flashinfer/sampling.py and csrc/sampling_utils.h):

- Sampled ids are int32, or the dtype of ``indices`` when given. ``return_valid=True`` adds the
  bool validity mask (token 0 and False for a bad row) where FlashInfer offers it.
- ``top_k_renorm_probs`` and ``top_k_mask_logits`` return the input dtype (fp32 / fp16 / bf16);
  ``top_p_renorm_probs`` and ``softmax`` return float32 (FlashInfer converts their input to float32).
- A parameter given as a tensor must be 1-D with one entry per row of the input (ValueError for a
  0-D or 2-D tensor or another length, as FlashInfer's check_tensor_param for the filter parameters;
  softmax's temperature tensor is checked the same way, where FlashInfer does not check); an integer tensor is
  converted (``top_p`` to float, ``top_k`` to int). A ``top_p`` of 0 or less (e.g. an int tensor
  made from 0.5) keeps only the most probable token(s) (the limit p -> 0+); decodekit's own
  functions reject it.
- ``seed`` / ``offset`` are used only when both are given (otherwise one seed is drawn from
  ``generator``, or torch's default generator); both ints or both tensors (int64 / uint64, 1-D,
  length 1 or the batch size). A length-1 seed tensor is one seed for the batch (rows get
  independent streams); a length-B seed tensor gives per-row seeds; an offset tensor must hold one
  value (all entries equal), since decodekit's counters take one offset per call.
- ``deterministic`` and ``is_deterministic`` are accepted and ignored (decodekit is always
  deterministic). ``check_nan=True`` raises ValueError on NaN input.
- ``get_seed_and_offset`` (which advances a CUDA Philox generator's state) is not provided: decodekit
  draws one seed from ``generator`` instead.
- ``chain_speculative_sampling`` returns (output_token_ids int32 [B, N+1] padded with -1,
  accepted_num, emitted_num); the ``maybe_output_*`` tensors, when given, are incremented in place
  and returned (int32 zeros otherwise). ``draft_probs=None`` (one-hot drafts) is a decodekit
  extension.

Tie rule (the one documented difference): top-k keeps every value equal to the k-th largest, and
top-p keeps or drops tied values together (decodekit's filters, README "Sampling semantics");
FlashInfer may keep only some of the tied values.
"""

from typing import Optional, Tuple, Union

import torch

from .. import sampling as _dks
from .. import speculative as _dkspec

__all__ = [
    "softmax",
    "sampling_from_logits",
    "sampling_from_probs",
    "top_p_sampling_from_probs",
    "top_k_sampling_from_probs",
    "min_p_sampling_from_probs",
    "top_k_top_p_sampling_from_logits",
    "top_k_top_p_sampling_from_probs",
    "top_p_renorm_probs",
    "top_p_renorm_prob",
    "top_k_renorm_probs",
    "top_k_renorm_prob",
    "top_k_mask_logits",
    "chain_speculative_sampling",
]

_TINY_P = torch.finfo(torch.float32).tiny


# ---- conventions --------------------------------------------------------------------------------
def _param(value, x: torch.Tensor, name: str, kind):
    """A sampling parameter the FlashInfer way: a Python number, or a 1-D tensor of x.size(0)."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.dim() == 0:
        raise ValueError(
            f"{name}: Expected a 1D tensor of shape (batch_size,) or scalar for the sampling "
            f"parameter, but got a 0-dimensional tensor"
        )
    if value.dim() > 1:
        raise ValueError(
            f"{name}: Expected a 1D tensor or scalar for the sampling parameter, but got a {value.dim()}D tensor"
        )
    if value.size(0) != x.size(0):
        raise ValueError(
            f"{name}: Sampling parameter tensor batch size mismatch: the input has {x.size(0)} rows, "
            f"the parameter has length {value.size(0)}"
        )
    return value.to(torch.float32) if kind is float else value.to(torch.int64)


def _top_p(value, x: torch.Tensor):
    """top_p with 0 (or less) meaning "the most probable token(s) only"."""
    value = _param(value, x, "top_p", float)
    if isinstance(value, torch.Tensor):
        return value.clamp(min=_TINY_P)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
        return _TINY_P
    return value


def _seed_offset(seed, offset, batch_size: int, device):
    """FlashInfer's seed / offset rules -> decodekit's (seed, offset); (None, None) = draw from generator."""
    if seed is None or offset is None:
        return None, None
    if isinstance(seed, torch.Tensor) != isinstance(offset, torch.Tensor):
        raise ValueError("seed and offset must both be tensors or both be scalars")
    if not isinstance(seed, torch.Tensor):
        return seed, offset
    for t, name in ((seed, "seed"), (offset, "offset")):
        if t.device != torch.device(device):
            raise ValueError(f"{name} tensor must be on {device}")
        if t.dtype not in (torch.int64, torch.uint64):
            raise ValueError(f"{name} tensor must be int64/uint64")
        if t.dim() != 1:
            raise ValueError(f"{name} tensor must be 1D")
        if t.size(0) not in (1, batch_size):
            raise ValueError(f"{name} tensor length must be 1 or {batch_size}")
    if seed.dtype == torch.uint64:
        seed = seed.view(torch.int64)
    if offset.dtype == torch.uint64:
        offset = offset.view(torch.int64)
    # passed on as they are: the kernels read seed and offset tensors ([1] or per row) from the
    # input's device, so a CUDA call never reads them on the host
    return seed, offset


def _ids_dtype(indices):
    return indices.dtype if indices is not None else torch.int32


def _sample(fn, x, indices, generator, check_nan, seed, offset, return_valid, **params):
    """Run one of decodekit's samplers with FlashInfer's seed and id-dtype conventions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError("the input must be a torch.Tensor")
    n = indices.size(0) if indices is not None else x.size(0)
    s, off = _seed_offset(seed, offset, n, x.device)
    out = fn(
        x,
        indices=indices,
        generator=generator,
        check_nan=check_nan,
        seed=s,
        offset=off,
        return_valid=return_valid,
        **params,
    )
    dt = _ids_dtype(indices)
    if return_valid:
        ids, valid = out
        return ids.to(dt), valid
    return out.to(dt)


# ---- filters --------------------------------------------------------------------------------------
def softmax(
    logits: torch.Tensor, temperature: Optional[Union[torch.Tensor, float]] = None, enable_pdl: Optional[bool] = None
) -> torch.Tensor:
    """softmax(logits / temperature) in float32; temperature: a number or a [B] tensor (None = 1)."""
    t = _param(temperature, logits, "temperature", float)
    return _dks.softmax(logits, t)


def top_p_renorm_probs(
    probs: torch.Tensor, top_p: Union[torch.Tensor, float], is_deterministic: bool = False
) -> torch.Tensor:
    """Probabilities outside the top-p nucleus set to 0, the rest renormalised; float32 output."""
    return _dks.top_p_renorm_probs(probs, _top_p(top_p, probs))


def top_k_renorm_probs(probs: torch.Tensor, top_k: Union[torch.Tensor, int]) -> torch.Tensor:
    """Probabilities outside the top-k set to 0, the rest renormalised; the input's dtype."""
    out = _dks.top_k_renorm_probs(probs, _param(top_k, probs, "top_k", int))
    return out.to(probs.dtype)


def top_k_mask_logits(logits: torch.Tensor, top_k: Union[torch.Tensor, int]) -> torch.Tensor:
    """Logits outside the top-k set to -inf; the input's dtype."""
    return _dks.top_k_mask_logits(logits, _param(top_k, logits, "top_k", int)).to(logits.dtype)


top_p_renorm_prob = top_p_renorm_probs
top_k_renorm_prob = top_k_renorm_probs


# ---- samplers -------------------------------------------------------------------------------------
def sampling_from_logits(
    logits: torch.Tensor,
    indices: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    check_nan: bool = False,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
) -> torch.Tensor:
    return _sample(_dks.sampling_from_logits, logits, indices, generator, check_nan, seed, offset, False)


def sampling_from_probs(
    probs: torch.Tensor,
    indices: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    check_nan: bool = False,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
    return_valid: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    return _sample(_dks.sampling_from_probs, probs, indices, generator, check_nan, seed, offset, return_valid)


def top_p_sampling_from_probs(
    probs: torch.Tensor,
    top_p: Union[torch.Tensor, float],
    indices: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    check_nan: bool = False,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
    return_valid: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    return _sample(
        _dks.top_p_sampling_from_probs,
        probs,
        indices,
        generator,
        check_nan,
        seed,
        offset,
        return_valid,
        top_p=_top_p(top_p, probs),
    )


def top_k_sampling_from_probs(
    probs: torch.Tensor,
    top_k: Union[torch.Tensor, int],
    indices: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    check_nan: bool = False,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
    return_valid: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    return _sample(
        _dks.top_k_sampling_from_probs,
        probs,
        indices,
        generator,
        check_nan,
        seed,
        offset,
        return_valid,
        top_k=_param(top_k, probs, "top_k", int),
    )


def min_p_sampling_from_probs(
    probs: torch.Tensor,
    min_p: Union[torch.Tensor, float],
    indices: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    check_nan: bool = False,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
    return_valid: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    return _sample(
        _dks.min_p_sampling_from_probs,
        probs,
        indices,
        generator,
        check_nan,
        seed,
        offset,
        return_valid,
        min_p=_param(min_p, probs, "min_p", float),
    )


def top_k_top_p_sampling_from_logits(
    logits: torch.Tensor,
    top_k: Union[torch.Tensor, int],
    top_p: Union[torch.Tensor, float],
    indices: Optional[torch.Tensor] = None,
    filter_apply_order: str = "top_k_first",
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    check_nan: bool = False,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
) -> torch.Tensor:
    """ "top_k_first": top-k, then top-p on the renormalised survivors; "joint": both on softmax(logits)."""
    if filter_apply_order not in ("top_k_first", "joint"):
        raise ValueError(f"Invalid filter_apply_order: {filter_apply_order}")
    return _sample(
        _dks.top_k_top_p_sampling_from_logits,
        logits,
        indices,
        generator,
        check_nan,
        seed,
        offset,
        False,
        top_k=_param(top_k, logits, "top_k", int),
        top_p=_top_p(top_p, logits),
        filter_apply_order=filter_apply_order,
    )


def top_k_top_p_sampling_from_probs(
    probs: torch.Tensor,
    top_k: Union[torch.Tensor, int],
    top_p: Union[torch.Tensor, float],
    indices: Optional[torch.Tensor] = None,
    filter_apply_order: str = "top_k_first",
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    check_nan: bool = False,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
    return_valid: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    if filter_apply_order not in ("top_k_first", "joint"):
        raise ValueError(f"Invalid filter_apply_order: {filter_apply_order}")
    return _sample(
        _dks.top_k_top_p_sampling_from_probs,
        probs,
        indices,
        generator,
        check_nan,
        seed,
        offset,
        return_valid,
        top_k=_param(top_k, probs, "top_k", int),
        top_p=_top_p(top_p, probs),
        filter_apply_order=filter_apply_order,
    )


# ---- speculative ----------------------------------------------------------------------------------
def chain_speculative_sampling(
    draft_probs,
    draft_token_ids,
    target_probs,
    maybe_output_accepted_token_num: Optional[torch.Tensor] = None,
    maybe_output_emitted_draft_token_num: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
):
    """Returns (output_token_ids int32 [B, N+1] padded with -1, accepted_num, emitted_num)."""
    B = draft_token_ids.size(0)
    s, off = _seed_offset(seed, offset, B, draft_token_ids.device)
    dev = draft_token_ids.device
    acc = maybe_output_accepted_token_num
    emi = maybe_output_emitted_draft_token_num
    if acc is None:
        acc = torch.zeros(B, dtype=torch.int32, device=dev)
    if emi is None:
        emi = torch.zeros(B, dtype=torch.int32, device=dev)
    ids, acc, emi = _dkspec.chain_speculative_sampling(
        None if draft_probs is None else draft_probs.float(),
        draft_token_ids,
        target_probs.float(),
        acc,
        emi,
        generator=generator,
        seed=s,
        offset=off,
        out_dtype=torch.int32,
    )
    return ids, acc, emi
