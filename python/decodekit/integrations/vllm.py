"""decodekit as a vLLM (V1 engine) general plugin.

Entry point: ``[project.entry-points."vllm.general_plugins"] decodekit = "decodekit.integrations.vllm:register"``.
vLLM calls every installed general plugin in every process it starts (front end, engine core,
workers). This one does nothing unless the user asks for it:

- ``VLLM_PLUGINS`` names ``decodekit`` (vLLM's own plugin allow-list), or
- ``DECODEKIT_VLLM=1``.

``DECODEKIT_VLLM=0`` turns it off even when ``VLLM_PLUGINS`` names it.

Once enabled it replaces three methods of vLLM's classes (so every sampler instance, present or
future, uses them):

``Sampler.forward`` (the whole step): when a batch uses penalties (repetition / frequency /
presence over vLLM's prompt and output token ids), logit bias, bad words, allowed-token lists,
min_tokens or logprobs, the step is ONE ``decodekit.sample`` call with ``order="vllm"``: the
allowed-token mask as decodekit's bitmask, bad words (single-token, and multi-token ones whose
prefix ends the request's output, matched exactly as vLLM matches them) and the min_tokens stop ids
as banned ids, vLLM's logit bias, the penalties from the token histories, then temperature, min-p,
top-k, top-p, the draw and the logprobs. Logprobs modes: ``raw_logprobs`` and
``processed_logprobs`` are decodekit's ``logprobs_mode`` "raw" / "processed"; ``raw_logits``
returns the raw logits at decodekit's ids (ranks counted on the logits). The output is vLLM's:
int32 ``[B, 1]`` tokens and ``LogprobsTensors`` (sampled token first, then the top n, ranks).
Batches that use none of these go through vLLM's ``forward``, whose ``sample`` is routed:

``Sampler.sample``: the all-greedy fast path, temperature, min-p, top-k, top-p and the draw go to
``decodekit.sample`` with one 63-bit seed per row, drawn from the request's ``torch.Generator`` when
it has one (seeded requests), otherwise from torch's default generator. vLLM's order is kept:
min-p is evaluated on the temperature-scaled distribution BEFORE top-k / top-p (vLLM applies min-p
as an argmax-invariant logits processor first), then top-k, then top-p on the renormalised top-k
survivors. Rows with temperature < 1e-5 are greedy (vLLM's ``_SAMPLING_EPS``), lowest index on ties.

``RejectionSampler.forward`` (speculative decoding): the target logits of every request (its draft
positions and its bonus position, after vLLM's own penalties / bad words / masks / min-tokens) go
to ``decodekit.chain_speculative_sampling_from_logits`` with the request's temperature, top-k and
top-p applied to the target inside the kernel, with or without draft probabilities, ragged
requests through ``num_draft_tokens``; the output is vLLM's ``[B, max_spec_len + 1]`` int32
padded with -1. A draft id of -1 (vLLM's padding, which its kernel always rejects) ends the chain
there: the token emitted at that position is then drawn from the target, as vLLM's rejection
would draw it.

vLLM 0.32.0's CPU rejection sampler expands the per-request temperature / top-k / top-p to the
draft positions with ``_expand_kernel_impl`` (vllm/utils/cpu_triton_utils.py), which passes
``_ensure_int64(output)`` to the C++ kernel: for the float32 temperature / top-p and the int32
top-k that is a fresh int64 copy, written and dropped, so the expanded tensors keep
``new_empty``'s uninitialised memory (and the float values would be truncated to integers even if
the copy were written back). decodekit follows the documented intent instead: every draft position
of a request uses that request's temperature, top-k and top-p.

Falls back to vLLM's own code for the whole batch (one log line per reason, once per process):

- in the whole step: logprobs in the ``processed_logits`` mode, ``logprob_token_ids`` and
  full-vocabulary logprobs (-1), a thinking-token budget, min_tokens of a structured-output request
  (vLLM restores stop tokens there), a non-argmax-invariant logits processor other than vLLM's
  logit bias and min-tokens; vLLM's forward then runs, and its ``sample`` stays routed unless the
  logprobs mode is a processed one;
- an argmax-invariant logits processor other than vLLM's built-in min-p (an unknown processor);
- in the rejection sampler: any logprobs request, min-p (vLLM does not apply it to the draft
  positions there, only to the bonus token), synthetic acceptance mode; its penalties / bad words /
  masks run in vLLM's processing code before decodekit's verification;
- CUDA tensors in the rejection sampler when top-k / top-p are used (decodekit's CUDA logits
  verification supports temperature only so far), and CUDA tensors in the whole step while
  decodekit's ``pipeline`` op has no CUDA kernel (checked in torch's dispatcher);
- a device other than CPU or CUDA.

On CUDA nothing in this module reads a device value on the host (no ``.item()``, ``.tolist()``,
``nonzero()`` or ``bool()`` of a device tensor): the seeds are an int64 device tensor (a seeded
request's seed is drawn on its generator's device), the bitmask is packed on the device, and the
draft counts up to vLLM's -1 padding are computed on the device.

``stats`` counts the calls served by decodekit and the fallbacks (per process).
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import numpy as np
import torch

import decodekit as dk

__all__ = ["register", "install", "uninstall", "installed", "enabled_by_env", "stats"]

_log = logging.getLogger("decodekit.vllm")
_SAMPLING_EPS = 1e-5  # vLLM's greedy threshold (vllm/v1/sample/sampler.py)

stats: Counter = Counter()
_originals: dict = {}
_logged: set = set()


def enabled_by_env() -> bool:
    """True when the user asked for the plugin: DECODEKIT_VLLM=1, or VLLM_PLUGINS names "decodekit"
    (and DECODEKIT_VLLM is not 0)."""
    flag = os.environ.get("DECODEKIT_VLLM", "").strip().lower()
    if flag in ("0", "false", "off", "no"):
        return False
    if flag in ("1", "true", "on", "yes"):
        return True
    names = os.environ.get("VLLM_PLUGINS")
    return names is not None and "decodekit" in [n.strip() for n in names.split(",")]


def register() -> None:
    """The ``vllm.general_plugins`` entry point: installs the routing only when enabled."""
    if enabled_by_env():
        install()


def installed() -> bool:
    return bool(_originals)


def install() -> None:
    """Route vLLM's Sampler.sample and RejectionSampler.forward to decodekit (idempotent)."""
    if _originals:
        return
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler

    _originals["forward"] = Sampler.forward
    _originals["sample"] = Sampler.sample
    _originals["rejection"] = RejectionSampler.forward
    Sampler.forward = _forward
    Sampler.sample = _sample
    RejectionSampler.forward = _rejection_forward
    _log.info(
        "decodekit: vLLM sampling and rejection sampling routed to decodekit %s",
        dk.__version__ if hasattr(dk, "__version__") else "",
    )


def uninstall() -> None:
    """Restore vLLM's own methods."""
    if not _originals:
        return
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler

    Sampler.forward = _originals.pop("forward")
    Sampler.sample = _originals.pop("sample")
    RejectionSampler.forward = _originals.pop("rejection")


def _fallback(kind: str, reason: str) -> None:
    stats[f"fallback_{kind}"] += 1
    if (kind, reason) not in _logged:
        _logged.add((kind, reason))
        _log.warning("decodekit: vLLM's own %s runs for batches with %s (logged once)", kind, reason)


# ---------------------------------------------------------------------------------------------
# batch inspection


def _min_p(sm):
    """vLLM's built-in min-p as a [B] float32 tensor (None when no request uses it), or the string
    "unknown" when an argmax-invariant processor other than min-p is present."""
    from vllm.v1.sample.logits_processor.builtin import MinPLogitsProcessor

    min_p = None
    for proc in sm.logitsprocs.argmax_invariant:
        if not isinstance(proc, MinPLogitsProcessor):
            return "unknown"
        if proc.min_p_count:
            min_p = proc.min_p.reshape(-1)
    return min_p


def _seeds(sm, B: int, device) -> torch.Tensor:
    """One 63-bit seed per row: from the request's generator (seeded requests), else from torch's
    default generator of `device`. Drawn every step, so a seeded request's tokens depend only on
    its seed. Nothing is read on the host: a seeded request's seed is drawn on its generator's
    device (vLLM's GPU runner: the CUDA device) and copied into the device tensor of seeds, which
    decodekit's ops read in the kernels (on the CPU the values and tokens are those of a host
    loop)."""
    seeds = torch.randint(0, 2**63 - 1, (B,), dtype=torch.int64, device=device)
    rows = [i for i in sm.generators if i < B]
    if rows:
        drawn = [
            torch.randint(0, 2**63 - 1, (1,), generator=g, dtype=torch.int64, device=g.device)
            for g in (sm.generators[i] for i in rows)
        ]
        at = torch.tensor(rows, dtype=torch.int64)
        seeds.index_copy_(
            0, at.to(device, non_blocking=True), torch.cat([d.to(device, non_blocking=True) for d in drawn])
        )
    return seeds


def _temperature(sm, B: int, device):
    """vLLM's per-row temperature with its greedy rows (T < 1e-5) as decodekit's 0."""
    if sm.all_greedy or sm.temperature is None:
        return 0.0
    t = sm.temperature.to(torch.float32)
    return torch.where(t < _SAMPLING_EPS, torch.zeros_like(t), t)


def _supported_device(x: torch.Tensor) -> bool:
    return x.device.type in ("cpu", "cuda")


def _pipeline_on(device_type: str) -> bool:
    """Whether decodekit's one-pass step (the `pipeline` op) has a kernel for this device."""
    if device_type == "cpu":
        return True
    key = {"cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("decodekit::pipeline", key)


# ---------------------------------------------------------------------------------------------
# Sampler.sample


def _sample(self, logits, sampling_metadata, logprobs_mode_override=None):
    """Replacement of vllm.v1.sample.sampler.Sampler.sample (same signature and return)."""
    from vllm.config.model import PROCESSED_LOGPROBS_MODES

    sm = sampling_metadata
    mode = logprobs_mode_override or self.logprobs_mode
    wants_logprobs = sm.max_num_logprobs is not None or bool(sm.logprob_token_ids)
    min_p = _min_p(sm)
    reason = None
    if not _supported_device(logits):
        reason = f"logits on {logits.device.type}"
    elif wants_logprobs and mode in PROCESSED_LOGPROBS_MODES:
        reason = f"logprobs_mode={mode}"
    elif isinstance(min_p, str):
        reason = "an argmax-invariant logits processor other than min-p"
    if reason is not None:
        _fallback("sampler", reason)
        return _originals["sample"](self, logits, sampling_metadata, logprobs_mode_override)

    B = logits.shape[0]
    if sm.all_greedy:
        stats["greedy"] += 1
        return dk.sample(logits, temperature=0.0), None
    stats["sample"] += 1
    T = _temperature(sm, B, logits.device)
    seeds = _seeds(sm, B, logits.device)
    if min_p is None:
        tokens = dk.sample(logits, temperature=T, top_k=sm.top_k, top_p=sm.top_p, seed=seeds)
    else:
        # vLLM's order: temperature, min-p on the scaled distribution, then top-k and top-p on the
        # min-p survivors. decodekit's sequential order puts min-p last, so the scaled logits are
        # masked by decodekit's min-p filter first and then sampled at temperature 1 (0 for greedy).
        stats["min_p"] += 1
        scale = torch.where(T > 0, T, torch.ones_like(T)) if isinstance(T, torch.Tensor) else 1.0
        scaled = logits.div_(scale.unsqueeze(1)) if isinstance(scale, torch.Tensor) else logits
        masked = dk.min_p_mask_logits(scaled, min_p.to(scaled.device, torch.float32))
        T1 = (T > 0).to(torch.float32) if isinstance(T, torch.Tensor) else 0.0
        tokens = dk.sample(masked, temperature=T1, top_k=sm.top_k, top_p=sm.top_p, seed=seeds)
    return tokens, None


# ---------------------------------------------------------------------------------------------
# Sampler.forward: the whole step (penalties, logit bias, bad words, allowed tokens, min-tokens,
# logprobs) in one decodekit.sample call


def _matched_bad_words(words, past):
    """The last token of every bad word whose prefix ends `past` (vLLM's rule: a word of length L
    is checked once at least L - 1 tokens were generated; single-token words always match)."""
    out = []
    for w in words:
        if len(w) > len(past) + 1:
            continue
        prefix = w[:-1]
        if not prefix or list(past[len(past) - len(prefix) :]) == list(prefix):
            out.append(w[-1])
    return out


def _padded(rows, device, fill=-1, dtype=torch.int64):
    """list of lists -> [len(rows), max(1, longest)] tensor padded with `fill`."""
    width = max(1, max(map(len, rows), default=0))
    a = np.full((len(rows), width), fill, dtype=np.float32 if dtype == torch.float32 else np.int64)
    for i, r in enumerate(rows):
        if r:
            a[i, : len(r)] = r
    return torch.from_numpy(a).to(device, non_blocking=True)


def _bitmask(disallowed: torch.Tensor) -> torch.Tensor:
    """vLLM's allowed_token_ids_mask rows (bool [B, V], True = masked) as decodekit's int32
    allowed-token bitmask [B, ceil(V / 32)] (bit j of word w allows token 32 w + j)."""
    B, V = disallowed.shape
    W = -(-V // 32)
    if disallowed.device.type == "cpu":  # bits packed by numpy, little-endian words
        allowed = np.zeros((B, W * 32), dtype=bool)
        allowed[:, :V] = ~disallowed.numpy()
        return torch.from_numpy(np.packbits(allowed, axis=-1, bitorder="little").view("<i4").astype(np.int32))
    allowed = torch.zeros(B, W * 32, dtype=torch.int64, device=disallowed.device)
    allowed[:, :V] = (~disallowed).to(torch.int64)
    words = (allowed.view(B, W, 32) << torch.arange(32, device=disallowed.device)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _step_plan(self, logits, sm, mode, predict_bonus_token):
    """The decodekit.sample keywords of this batch's whole step; a string (the reason) when a part
    of it is not exact in decodekit; None when only temperature / filters are used (the step then
    goes through vLLM's forward, whose `sample` is routed)."""
    from vllm.v1.sample.logits_processor.builtin import (
        LogitBiasLogitsProcessor,
        MinPLogitsProcessor,
        MinTokensLogitsProcessor,
    )

    B, V = logits.shape
    wants_logprobs = sm.max_num_logprobs is not None or bool(sm.logprob_token_ids)
    if not _pipeline_on(logits.device.type):
        return f"the whole step on {logits.device.type} (no decodekit pipeline kernel there)"
    if wants_logprobs and mode == "processed_logits":
        return "logprobs_mode=processed_logits"
    if sm.logprob_token_ids:
        return "logprob_token_ids"
    if sm.max_num_logprobs is not None and sm.max_num_logprobs < 0:
        return "full-vocabulary logprobs (-1)"
    holder = sm.thinking_budget_state_holder
    if holder is not None and holder.has_tracked_requests():
        return "a thinking-token budget"
    banned = [[] for _ in range(B)]
    bias = None
    for proc in sm.logitsprocs.non_argmax_invariant:
        if isinstance(proc, LogitBiasLogitsProcessor):
            if proc.biases:
                bias = proc.biases
        elif isinstance(proc, MinTokensLogitsProcessor):
            for i, (_, _, stop_ids, structured) in proc.min_toks.items():
                if structured:
                    return "min_tokens with structured output"
                if i < B:
                    banned[i].extend(stop_ids)
        else:
            return "a logits processor other than vLLM's built-in ones"
    min_p = None
    for proc in sm.logitsprocs.argmax_invariant:
        if not isinstance(proc, MinPLogitsProcessor):
            return "an argmax-invariant logits processor other than min-p"
        if proc.min_p_count:
            min_p = proc.min_p.reshape(-1)
    penalties = not sm.no_penalties
    output_ids = sm.output_token_ids
    if predict_bonus_token and (penalties or sm.bad_words_token_ids):
        output_ids = self._combine_outputs_with_spec_tokens(output_ids, sm.spec_token_ids)
    for i, words in sm.bad_words_token_ids.items():
        if i < B:
            banned[i].extend(_matched_bad_words(words, output_ids[i]))
    routed = wants_logprobs or penalties or bias is not None or any(banned) or sm.allowed_token_ids_mask is not None
    if not routed:
        return None

    device = logits.device
    kw = dict(order="vllm", min_p=min_p)
    if sm.all_greedy:
        kw["temperature"] = 0.0
    else:
        kw.update(temperature=_temperature(sm, B, device), top_k=sm.top_k, top_p=sm.top_p)
        kw["seed"] = _seeds(sm, B, device)
    if sm.allowed_token_ids_mask is not None:
        kw["allowed_token_bitmask"] = _bitmask(sm.allowed_token_ids_mask[:B])
    if any(banned):
        kw["banned_token_ids"] = _padded(banned, device)
    if bias is not None:
        rows = [list(bias.get(i, {}).items()) for i in range(B)]
        kw["logit_bias"] = (
            _padded([[t for t, _ in r] for r in rows], device),
            _padded([[v for _, v in r] for r in rows], device, 0.0, torch.float32),
        )
    if penalties:
        prompt = sm.prompt_token_ids[:B]
        kw.update(
            prompt_token_ids=prompt.masked_fill(prompt >= V, -1),  # vLLM pads with V
            output_token_ids=_padded(output_ids[:B], device),  # async placeholders (-1): ignored
            repetition_penalty=sm.repetition_penalties[:B],
            frequency_penalty=sm.frequency_penalties[:B],
            presence_penalty=sm.presence_penalties[:B],
        )
    if sm.max_num_logprobs is not None:
        kw["top_logprobs"] = max(1, sm.max_num_logprobs)
        kw["logprobs_mode"] = "processed" if mode == "processed_logprobs" else "raw"
    return kw


def _forward(self, logits, sampling_metadata, predict_bonus_token=False, logprobs_mode_override=None):
    """Replacement of vllm.v1.sample.sampler.Sampler.forward (same signature and return)."""
    from vllm.v1.outputs import LogprobsTensors, SamplerOutput

    sm = sampling_metadata
    mode = logprobs_mode_override or self.logprobs_mode
    plan = _step_plan(self, logits, sm, mode, predict_bonus_token)
    if isinstance(plan, str):
        _fallback("sampler step", plan)
    if not isinstance(plan, dict):  # vLLM's own step; its `sample` is decodekit's when exact
        return _originals["forward"](self, logits, sampling_metadata, predict_bonus_token, logprobs_mode_override)
    stats["pipeline"] += 1
    n = sm.max_num_logprobs
    res = dk.sample(logits, **plan)
    if n is None:
        return SamplerOutput(sampled_token_ids=res.to(torch.int32).unsqueeze(-1), logprobs_tensors=None)
    tokens = res.tokens
    ids = torch.cat((tokens.unsqueeze(-1), res.top_ids[:, :n]), 1)
    if mode == "raw_logits":  # the raw logits themselves at decodekit's ids; ranks on the logits
        raw = logits.to(torch.float32)
        values = raw.gather(1, ids)
        ranks = (raw >= values[:, :1]).sum(-1)
    else:
        values = torch.cat((res.logprobs.unsqueeze(-1), res.top_logprobs[:, :n]), 1)
        ranks = res.ranks
    return SamplerOutput(
        sampled_token_ids=tokens.to(torch.int32).unsqueeze(-1),
        logprobs_tensors=LogprobsTensors(ids.to(torch.int32), values.to(torch.float32), ranks.to(torch.int64)),
    )


# ---------------------------------------------------------------------------------------------
# RejectionSampler.forward


def _vllm_processing_needed(sm) -> bool:
    """Whether vLLM's penalties / bad words / masks / non-argmax-invariant processors would change
    any logits of this batch (if not, its processing steps are skipped: they would only copy)."""
    from vllm.v1.sample.logits_processor.builtin import LogitBiasLogitsProcessor, MinTokensLogitsProcessor

    if not sm.no_penalties or sm.bad_words_token_ids or sm.allowed_token_ids_mask is not None:
        return True
    holder = sm.thinking_budget_state_holder
    if holder is not None and holder.has_tracked_requests():
        return True
    for proc in sm.logitsprocs.non_argmax_invariant:
        if isinstance(proc, LogitBiasLogitsProcessor) and not proc.biases:
            continue
        if isinstance(proc, MinTokensLogitsProcessor) and not proc.min_toks:
            continue
        return True
    return False


def _rows(x, b0, b1):
    """Rows b0..b1 of a per-row parameter (scalars and None pass through)."""
    return x[b0:b1] if isinstance(x, torch.Tensor) else x


def _rejection_forward(self, metadata, draft_probs, logits, sampling_metadata):
    """Replacement of vllm.v1.sample.rejection_sampler.RejectionSampler.forward."""
    from vllm.v1.outputs import SamplerOutput

    sm = sampling_metadata
    min_p = _min_p(sm)
    filtered = sm.top_k is not None or sm.top_p is not None
    reason = None
    if not _supported_device(logits):
        reason = f"logits on {logits.device.type}"
    elif getattr(self, "synthetic_mode", False):
        reason = "synthetic acceptance rates"
    elif sm.max_num_logprobs is not None or sm.logprob_token_ids:
        reason = "logprobs"
    elif isinstance(min_p, str):
        reason = "an argmax-invariant logits processor other than min-p"
    elif min_p is not None:
        reason = "min-p"
    elif logits.device.type == "cuda" and filtered and not sm.all_greedy:
        reason = "top-k/top-p on CUDA"
    if reason is not None:
        _fallback("rejection sampler", reason)
        return _originals["rejection"](self, metadata, draft_probs, logits, sampling_metadata)
    stats["rejection"] += 1

    device = logits.device
    n = list(metadata.num_draft_tokens)
    B, N, V = len(n), metadata.max_spec_len, logits.shape[-1]

    # The flat logits hold, per request, its n_b draft positions followed by its bonus position.
    flat = logits
    if _vllm_processing_needed(sm):
        stats["rejection_vllm_processing"] += 1
        flat = logits.to(torch.float32, copy=True)
        target = self.apply_logits_processors(flat[metadata.target_logits_indices], sm, metadata)
        bonus = self.sampler.apply_logits_processors(flat[metadata.bonus_logits_indices], sm, True)
        flat[metadata.target_logits_indices] = target
        flat[metadata.bonus_logits_indices] = bonus

    # vLLM's padded drafts (-1) are always rejected: a request's chain ends at its first one (its
    # draft count, computed on the device below; the ids are clamped to stay in range)
    draft_ids = metadata.draft_token_ids.to(torch.int64)
    starts, s = [], 0
    for nb in n:
        starts.append(s)
        s += nb

    T = _temperature(sm, B, device)
    greedy = isinstance(T, float)  # all greedy: no filters, no randomness
    seeds = 0 if greedy else _seeds(sm, B, device)
    k = None if greedy else sm.top_k
    p = None if greedy else sm.top_p
    out = torch.full((B, N + 1), -1, dtype=torch.int32, device=device)
    # Requests with the same draft count that follow each other in the batch lie back to back in
    # the flat logits, so each such run is a [L, n+1, V] view: one call per run, no copy.
    nd = metadata.num_draft_tokens
    b0 = 0
    while b0 < B:
        nb, b1 = nd[b0], b0 + 1
        while b1 < B and nd[b1] == nb:
            b1 += 1
        L, r0, d0 = b1 - b0, starts[b0] + b0, starts[b0]
        ids = draft_ids[d0 : d0 + L * nb].view(L, nb)
        counts = None
        if nb:  # the drafts before the first -1 of each request
            counts = (ids >= 0).to(torch.int64).cumprod(1).sum(1)
            if device.type == "cpu" and bool((counts == nb).all()):  # a host read only on the CPU
                counts = None
        res, _, _ = dk.chain_speculative_sampling_from_logits(
            None if draft_probs is None else draft_probs[d0 : d0 + L * nb].view(L, nb, V).to(torch.float32),
            ids.clamp(min=0),
            flat[r0 : r0 + L * (nb + 1)].view(L, nb + 1, V),
            temperature=_rows(T, b0, b1),
            top_k=_rows(k, b0, b1),
            top_p=_rows(p, b0, b1),
            num_draft_tokens=counts,
            seed=_rows(seeds, b0, b1),
            out_dtype=torch.int32,
        )
        out[b0:b1, : nb + 1] = res
        b0 = b1
    return SamplerOutput(sampled_token_ids=out, logprobs_tensors=None)
