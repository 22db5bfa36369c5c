"""sgl-kernel's tree verification on decodekit, and a sampler backend for SGLang.

``verify_tree_greedy`` and ``tree_speculative_sampling_target_only`` take sgl-kernel's arguments in
sgl-kernel's order (sgl_kernel/speculative.py) and, like sgl-kernel, write into the caller's
``predicts`` / ``accept_index`` / ``accept_token_num`` and return None. The conventions
(SGLang's CUDA kernels, csrc/speculative/{eagle_utils.cu, speculative_sampling.cuh}):

- ``accept_index`` [B, W] fixes W = num_speculative_tokens (at most W - 1 drafts are accepted);
  ``predicts`` is flat [B * T] and indexed by ``retrive_index``. Only the slots the walk writes are
  written (the accepted path's predicts and accept_index entries); the others keep the caller's
  values. ``accept_token_num`` is overwritten. Values are cast to the caller tensors' dtypes.
- ``verify_tree_greedy``: ``target_predict`` is read at ``retrive_index`` (flat), as sgl-kernel
  does; children are tried in ``retrive_next_sibling`` order and the first one equal to the target's
  token is accepted (repeated sibling tokens are fine).
- ``tree_speculative_sampling_target_only``: ``uniform_samples`` [B, T] holds one coin per node
  (the coin of the node whose children are tried), ``uniform_samples_for_final_sampling`` [B] the
  coin of the final draw; child x is accepted iff coin <= (mass of the rejected siblings + p(x)) /
  threshold_acc or p(x) >= threshold_single (threshold_acc floored at 1e-9); thresholds of 1 are
  the lossless case. The final token is drawn by inverse CDF with the final coin from the target at
  the last accepted node without the rejected children. ``target_probs`` [B, T, V] float32.
  Difference from sgl-kernel (the lossless rule, decodekit.speculative): a child whose token was
  already rejected at the same node is skipped, where sgl-kernel adds that token's probability to
  the accumulated mass a second time (over-accepting repeated tokens). ``deterministic`` is
  accepted and ignored (decodekit is deterministic). ``draft_probs`` (older sgl-kernel
  signatures) is accepted as a keyword and ignored: target-only verification does not use it.
- Argument names: sgl-kernel spells them ``retrive_*``; some of its tests use ``retrieve_*``
  keywords, accepted here as well.

Sampler backend: ``register()`` registers decodekit with SGLang's sampler-backend registry
(``sglang.srt.layers.sampler.register_sampler_backend(name, factory)``, SGLang 0.5.23;
then start the server with ``--sampling-backend decodekit``). Its sampling step is
``sample_from_probs`` below, which SGLang's Sampler calls with the softmax probabilities.
"""

import functools
from typing import Optional

import torch

from .. import sampling as _dks
from .. import speculative as _dkspec

__all__ = ["verify_tree_greedy", "tree_speculative_sampling_target_only", "sample_from_probs", "register"]

_ALIASES = {
    "retrieve_index": "retrive_index",
    "retrieve_next_token": "retrive_next_token",
    "retrieve_next_sibling": "retrive_next_sibling",
}


def _retrieve_spelling(fn):
    """Accept the ``retrieve_*`` keyword spelling next to sgl-kernel's ``retrive_*``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for a, b in _ALIASES.items():
            if a in kwargs:
                if b in kwargs:
                    raise TypeError(f"{fn.__name__}() got both {a} and {b}")
                kwargs[b] = kwargs.pop(a)
        return fn(*args, **kwargs)

    return wrapper


def _write_outputs(predicts, accept_index, accept_token_num, pred, ai, an):
    """Copy the walk's results into the caller's tensors: only the slots the walk wrote (>= 0)."""
    n = pred.numel()
    flat = predicts.view(-1)
    if flat.numel() < n:
        raise ValueError(f"predicts must have at least B*T = {n} elements, got {flat.numel()}")
    head = flat[:n]
    head.copy_(torch.where(pred >= 0, pred.to(head.dtype), head))
    if accept_index.shape != ai.shape:
        raise ValueError(f"accept_index must have shape {tuple(ai.shape)}, got {tuple(accept_index.shape)}")
    accept_index.copy_(torch.where(ai >= 0, ai.to(accept_index.dtype), accept_index))
    if accept_token_num.shape != an.shape:
        raise ValueError(f"accept_token_num must have shape {tuple(an.shape)}, got {tuple(accept_token_num.shape)}")
    accept_token_num.copy_(an)


def _width(accept_index):
    if not isinstance(accept_index, torch.Tensor) or accept_index.dim() != 2:
        raise ValueError("accept_index must be a 2-D tensor [B, num_speculative_tokens]")
    return accept_index.size(1)


@_retrieve_spelling
def verify_tree_greedy(
    predicts: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    target_predict: torch.Tensor,
) -> None:
    """Greedy tree verification into the caller's outputs (sgl-kernel's verify_tree_greedy)."""
    if not isinstance(target_predict, torch.Tensor) or not isinstance(retrive_index, torch.Tensor):
        raise TypeError("target_predict and retrive_index must be tensors")
    # sgl-kernel reads the target's token of node t at target_predict.flat[retrive_index[b, t]]
    flat = target_predict.reshape(-1)
    if retrive_index.numel() > 0 and int(retrive_index.max()) >= flat.numel():
        raise ValueError(f"target_predict has {flat.numel()} entries, retrive_index reaches {int(retrive_index.max())}")
    target = flat[retrive_index.long()]
    pred, ai, an = _dkspec.verify_tree_greedy(
        candidates,
        retrive_index,
        retrive_next_token,
        retrive_next_sibling,
        target,
        num_speculative_tokens=_width(accept_index),
    )
    _write_outputs(predicts, accept_index, accept_token_num, pred, ai, an)


@_retrieve_spelling
def tree_speculative_sampling_target_only(
    predicts: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    uniform_samples: torch.Tensor,
    uniform_samples_for_final_sampling: torch.Tensor,
    target_probs: torch.Tensor,
    threshold_single: float = 1.0,
    threshold_acc: float = 1.0,
    deterministic: bool = True,
    *,
    draft_probs: Optional[torch.Tensor] = None,
) -> None:
    """Tree rejection sampling with one-hot drafts and SGLang's coins, into the caller's outputs."""
    pred, ai, an = _dkspec.tree_speculative_sampling(
        candidates,
        retrive_index,
        retrive_next_token,
        retrive_next_sibling,
        target_probs,
        num_speculative_tokens=_width(accept_index),
        coins=uniform_samples,
        coins_final=uniform_samples_for_final_sampling,
        threshold_single=float(threshold_single),
        threshold_acc=float(threshold_acc),
    )
    _write_outputs(predicts, accept_index, accept_token_num, pred, ai, an)


# ---- sampler backend ----------------------------------------------------------------------------
def sample_from_probs(
    probs: torch.Tensor,
    top_ks: torch.Tensor,
    top_ps: torch.Tensor,
    min_ps: torch.Tensor,
    need_min_p_sampling: bool,
    sampling_seed: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The backend's sampling step: SGLang's filter semantics on softmax probabilities [B, V].

    Without min-p: top-k and top-p evaluated jointly on the probabilities (SGLang's flashinfer
    backend calls top_k_top_p_sampling_from_probs with filter_apply_order="joint"); with min-p:
    top-k, then top-p on the renormalised survivors, then min-p (its top_k_renorm -> top_p_renorm ->
    min_p path). top_k >= V disables top-k (SGLang's "no limit" is a large value). With per-request
    ``sampling_seed`` [B] the row's draw depends only on (seed, position): decodekit per-row seed
    (seed << 32) ^ position. Returns int32 token ids [B]."""
    B, V = probs.shape
    top_ks = top_ks.to(torch.int64).clamp(max=V)
    kw = dict(top_k=top_ks, top_p=top_ps.float(), order="joint")
    if need_min_p_sampling:
        kw.update(min_p=min_ps.float(), order="sequential")
    seed = None
    if sampling_seed is not None:
        pos = (
            positions.to(torch.int64)
            if positions is not None
            else torch.zeros(B, dtype=torch.int64, device=probs.device)
        )
        seed = (sampling_seed.to(torch.int64) << 32) ^ pos
    return _dks._run_sample(probs, True, seed=seed, out_dtype=torch.int32, order=_dks._order(kw.pop("order")), **kw)


def register(name: str = "decodekit") -> None:
    """Register decodekit as SGLang sampler backend `name` (requires sglang; SGLang 0.5.23 API).

    Afterwards ``--sampling-backend decodekit`` (or ServerArgs(sampling_backend="decodekit")) makes
    SGLang's Sampler draw through ``sample_from_probs``; rows that need SGLang's sampling-mask capture
    run SGLang's own code."""
    from sglang.srt.layers.sampler import Sampler, register_sampler_backend  # noqa: import only with sglang

    class DecodekitSampler(Sampler):
        def _sample_from_probs(self, probs, sampling_info, positions, simple_sampling_case):
            if sampling_info.sampling_mask_batch_indices is not None:
                return super()._sample_from_probs(probs, sampling_info, positions, simple_sampling_case)
            ids = sample_from_probs(
                probs,
                sampling_info.top_ks,
                sampling_info.top_ps,
                sampling_info.min_ps,
                sampling_info.need_min_p_sampling,
                sampling_info.sampling_seed,
                positions,
            )
            return ids, None

    register_sampler_backend(name, DecodekitSampler)
