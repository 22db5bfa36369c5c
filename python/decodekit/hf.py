"""decodekit inside Hugging Face transformers' `generate`.

    out = model.generate(input_ids, do_sample=True, temperature=0.7, top_k=50, top_p=0.9,
                         custom_generate=decodekit.hf.generate)

transformers (>= 5.x) calls a callable `custom_generate` as the decoding loop after its usual
input, cache, processor and stopping-criteria preparation. `generate` below is that loop: the
temperature / top-k / top-p / min-p warpers at the end of HF's processor list become ONE decodekit
`sample` call per step (no softmax row, no sort, no `torch.multinomial`); every other processor
stays in HF's list and runs first, on the raw logits, as in HF. Greedy (`do_sample=False`) is HF's
argmax of the processed scores (computed by decodekit: the lowest index of the max, as
torch.argmax; a NaN row gives token 0). `torch.manual_seed` reproduces a run (decodekit draws its Philox
seed from torch's default generator each step).

Assisted generation: pass `draft_model=<a small model with the same vocabulary>` (or HF's own
`assistant_model=`): the draft proposes `num_draft_tokens` tokens, the target scores them in one
forward pass and decodekit's chain verification (`chain_speculative_sampling_from_logits`, or
`greedy_verify` for greedy) accepts a prefix: sampling follows the non-assisted distribution
exactly, greedy gives the same tokens. `dk_stats={}` receives the acceptance counts.

The drop-in classes (`TopKLogitsWarper`, ...) subclass transformers' own, keep their constructor
arguments and validation, and compute the same outputs with decodekit's filter kernels (the one
difference: decodekit's top-p keeps or drops tied tokens together; HF's sort order can split a
tie).
"""

import inspect
import math
from typing import Optional

import torch
import transformers
from transformers import LogitsProcessorList
from transformers.generation import logits_process as _lp
from transformers.generation.utils import GenerateDecoderOnlyOutput

from . import pipeline as _pipeline
from . import sampling as _sampling
from ._ops import ops
from .speculative import chain_speculative_sampling, chain_speculative_sampling_from_logits, greedy_verify

__all__ = [
    "generate",
    "split_processors",
    "TemperatureLogitsWarper",
    "TopKLogitsWarper",
    "TopPLogitsWarper",
    "MinPLogitsWarper",
    "TypicalLogitsWarper",
    "EpsilonLogitsWarper",
    "EtaLogitsWarper",
    "TopHLogitsWarper",
    "RepetitionPenaltyLogitsProcessor",
]

_MASK, _RENORM = 0, 1
NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------
# drop-in warpers (transformers' names, constructor arguments, validation and outputs)
def _mask(scores: torch.Tensor, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """decodekit's one-pass mask: scores with -inf outside the survivors (bad rows pass through)."""
    x = scores if scores.dtype in (torch.float32, torch.bfloat16, torch.float16) else scores.float()
    return ops.filter(
        x.contiguous(), _MASK, False, None, 1.0, None, int(top_k), None, float(top_p), None, float(min_p), 0
    )


def _finish(scores, masked, filter_value):
    if filter_value != NEG_INF:  # HF lets the caller pick the fill value
        masked = masked.masked_fill(masked == NEG_INF, filter_value)
    return masked.to(scores.dtype)


def _keep_at_least(scores, masked, min_tokens_to_keep):
    """HF's min_tokens_to_keep: survivors of top-p / min-p are the largest values, so keeping at
    least m tokens is the union with the top-m set."""
    if min_tokens_to_keep <= 1:
        return masked
    return torch.maximum(masked, _mask(scores, top_k=min(min_tokens_to_keep, scores.shape[-1])))


class TemperatureLogitsWarper(_lp.TemperatureLogitsWarper):
    """transformers.TemperatureLogitsWarper (scores / temperature); absorbed into decodekit's
    sampler by `decodekit.hf.generate`."""


class TopKLogitsWarper(_lp.TopKLogitsWarper):
    """transformers.TopKLogitsWarper: -inf (filter_value) below the k-th largest score (ties kept)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, scores.shape[-1])
        return _finish(scores, _mask(scores, top_k=k if k < scores.shape[-1] else 0), self.filter_value)


class TopPLogitsWarper(_lp.TopPLogitsWarper):
    """transformers.TopPLogitsWarper: keeps the smallest set of most probable tokens whose mass
    reaches top_p (decodekit rule: token i is kept iff the mass strictly more probable than i is
    < top_p, so tied tokens are kept or dropped together)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.top_p >= 1.0:
            return scores.clone()
        if self.top_p <= 0.0:  # HF keeps only min_tokens_to_keep tokens
            masked = _mask(scores, top_k=min(self.min_tokens_to_keep, scores.shape[-1]))
        else:
            masked = _keep_at_least(scores, _mask(scores, top_p=self.top_p), self.min_tokens_to_keep)
        return _finish(scores, masked, self.filter_value)


class MinPLogitsWarper(_lp.MinPLogitsWarper):
    """transformers.MinPLogitsWarper: drops tokens with probability < min_p * (max probability)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        masked = _keep_at_least(scores, _mask(scores, min_p=self.min_p), self.min_tokens_to_keep)
        return _finish(scores, masked, self.filter_value)


def _float_scores(scores):
    return scores if scores.dtype in (torch.float32, torch.bfloat16, torch.float16) else scores.float()


class TypicalLogitsWarper(_lp.TypicalLogitsWarper):
    """transformers.TypicalLogitsWarper (locally typical sampling), one decodekit pass per row."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        out = _pipeline.typical_mask_logits(_float_scores(scores).contiguous(), self.mass, self.min_tokens_to_keep)
        return _finish(scores, out, self.filter_value)


class EpsilonLogitsWarper(_lp.EpsilonLogitsWarper):
    """transformers.EpsilonLogitsWarper: drops tokens with probability < epsilon."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        out = _pipeline.epsilon_mask_logits(_float_scores(scores).contiguous(), self.epsilon, self.min_tokens_to_keep)
        return _finish(scores, out, self.filter_value)


class EtaLogitsWarper(_lp.EtaLogitsWarper):
    """transformers.EtaLogitsWarper: drops tokens with probability < min(eta, sqrt(eta) * exp(-entropy))."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        out = _pipeline.eta_mask_logits(_float_scores(scores).contiguous(), self.epsilon, self.min_tokens_to_keep)
        return _finish(scores, out, self.filter_value)


class TopHLogitsWarper(_lp.TopHLogitsWarper):
    """transformers.TopHLogitsWarper: of the 100 most probable tokens, the leading ones whose
    cumulative entropy stays <= top_h * the entropy of those 100."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        out = _pipeline.top_h_mask_logits(_float_scores(scores).contiguous(), self.top_h)
        return _finish(scores, out, self.filter_value)


def _penalty_history(input_ids: torch.Tensor, prompt_ignore_length, V: int) -> torch.Tensor:
    """The token history the repetition penalty sees (HF: input_ids after prompt_ignore_length),
    int64 [B, L] padded with -1; ids outside the output vocabulary are ignored, as in HF."""
    ids = input_ids if input_ids.dim() == 2 else input_ids.reshape(1, -1)
    ids = ids.to(torch.int64)
    if isinstance(prompt_ignore_length, int):
        ids = ids[:, prompt_ignore_length:]
    elif isinstance(prompt_ignore_length, torch.Tensor):
        if ids.shape[0] != prompt_ignore_length.shape[0]:
            raise ValueError("prompt_ignore_length: incompatible batch size")
        pos = torch.arange(ids.shape[1], device=ids.device)
        ids = ids.masked_fill(pos[None, :] < prompt_ignore_length.to(ids.device)[:, None], -1)
    return ids.masked_fill(ids >= V, -1).contiguous()


class RepetitionPenaltyLogitsProcessor(_lp.RepetitionPenaltyLogitsProcessor):
    """transformers.RepetitionPenaltyLogitsProcessor: every token seen in input_ids (after
    prompt_ignore_length) gets score * penalty if negative, score / penalty otherwise; decodekit's
    apply_penalties on 2-D scores (3-D continuous-batching scores use transformers' own code)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.dim() != 2 or input_ids.dim() > 2:
            return super().__call__(input_ids, scores)
        hist = _penalty_history(input_ids, self.prompt_ignore_length, scores.shape[-1])
        if hist.shape[0] != scores.shape[0]:
            hist = hist.expand(scores.shape[0], -1)
        out = _pipeline.apply_penalties(
            _float_scores(scores).contiguous(), prompt_token_ids=hist, repetition_penalty=self.penalty
        )
        return out.to(scores.dtype)


# ---------------------------------------------------------------------------------------------
# which processors decodekit's sampler absorbs
# HF appends its processors, then its warpers in the order temperature, top-h, top-k, top-p, min-p,
# typical, epsilon, eta (GenerationMixin._get_logits_processor). decodekit's one pass applies the
# repetition penalty, then temperature -> top-k -> top-p (on the renormalised top-k survivors) ->
# min-p -> typical -> epsilon -> eta -> top-h. A trailing run of HF's list is absorbed when it is in
# decodekit's order (so top-h, which HF applies before top-k, is absorbed only when nothing after
# it is) and only where that gives HF's distribution exactly.
_RANK = (
    (_lp.RepetitionPenaltyLogitsProcessor, -1),
    (_lp.TemperatureLogitsWarper, 0),
    (_lp.TopKLogitsWarper, 1),
    (_lp.TopPLogitsWarper, 2),
    (_lp.MinPLogitsWarper, 3),
    (_lp.TypicalLogitsWarper, 4),
    (_lp.EpsilonLogitsWarper, 5),
    (_lp.EtaLogitsWarper, 6),
    (_lp.TopHLogitsWarper, 7),
)


def _absorb(proc, params: dict) -> Optional[int]:
    """The rank of `proc` in decodekit's order, after writing its sample() keywords into params, or
    None when decodekit cannot take it over exactly."""
    for cls, rank in _RANK:
        if type(proc) is cls or type(proc) is globals().get(cls.__name__):
            break
    else:
        return None  # subclasses of HF's classes may change __call__: they stay in HF's list
    if rank == -1:
        if not (isinstance(proc.penalty, (int, float)) and proc.penalty > 0 and math.isfinite(proc.penalty)):
            return None
        params["repetition_penalty"] = float(proc.penalty)
        params["_prompt_ignore_length"] = proc.prompt_ignore_length
        return -1
    if rank == 0:
        t = proc.temperature
        if not isinstance(t, (int, float)) or not t > 0 or not math.isfinite(t):
            return None
        params["temperature"] = float(t)
        return 0
    if getattr(proc, "filter_value", NEG_INF) != NEG_INF:
        return None  # a finite fill value leaves filtered tokens some probability
    mtk = getattr(proc, "min_tokens_to_keep", 1)
    if rank == 1:
        params["top_k"] = int(proc.top_k)  # already max(top_k, min_tokens_to_keep); >= V disables
        return 1
    if rank == 2:
        if not 0.0 < proc.top_p:
            return None
        params["top_p"] = min(float(proc.top_p), 1.0)
    elif rank == 3:
        params["min_p"] = float(proc.min_p)
    elif rank == 4:
        params["typical_p"] = float(proc.mass)
    elif rank == 5:
        params["epsilon"] = float(proc.epsilon)
    elif rank == 6:
        params["eta"] = float(proc.epsilon)
    else:
        if getattr(proc, "top_n", 100) != 100:
            return None
        params["top_h"] = float(proc.top_h)
        mtk = 1
    if mtk != 1:
        params["min_tokens_to_keep"] = int(mtk)
    return rank


def split_processors(processors):
    """Split HF's processor list into (head, params): `head` (a LogitsProcessorList) keeps every
    processor decodekit does not take over and runs first; `params` are the sample() keywords
    (temperature, top_k, top_p, min_p) of the trailing warpers decodekit applies in one pass.
    Only a trailing run of warpers in decodekit's order is absorbed, so the composition is HF's.
    (The internal key `_prompt_ignore_length` goes with repetition_penalty.)"""
    procs = list(processors or [])
    params: dict = {}
    cut, last = len(procs), 8
    while cut > 0:
        trial: dict = {}
        rank = _absorb(procs[cut - 1], trial)
        if rank is None or rank >= last:
            break
        # one min_tokens_to_keep for the whole pass (HF's generate gives every warper the same one)
        m_new, m_old = trial.get("min_tokens_to_keep", 1), params.get("min_tokens_to_keep", 1)
        if (
            rank in (2, 3, 4, 5, 6)
            and any(r in params for r in ("top_p", "min_p", "typical_p", "epsilon", "eta", "top_h"))
            and m_new != m_old
        ):
            break
        params.update(trial)
        last, cut = rank, cut - 1
    return LogitsProcessorList(procs[:cut]), params


_BASIC = ("temperature", "top_k", "top_p", "min_p")


def _step_kwargs(params: dict, input_ids: torch.Tensor, V: int) -> dict:
    """decodekit sample() keywords for this step (the repetition penalty needs the history)."""
    kw = {k: v for k, v in params.items() if not k.startswith("_")}
    if "repetition_penalty" in kw:
        kw["prompt_token_ids"] = _penalty_history(input_ids, params.get("_prompt_ignore_length"), V)
    return kw


def _hf_scores(scores: torch.Tensor, kw: dict) -> torch.Tensor:
    """What HF's absorbed processors would have returned for `scores` (output_scores keeps HF's
    meaning): (penalised scores) / temperature with -inf outside the survivors. Costs a [B, V] write."""
    if not kw:
        return scores
    T = kw.get("temperature", 1.0)
    if all(k in _BASIC for k in kw):
        masked = ops.filter(
            scores.contiguous(),
            _MASK,
            False,
            None,
            float(T),
            None,
            kw.get("top_k", 0),
            None,
            kw.get("top_p", 1.0),
            None,
            kw.get("min_p", 0.0),
            0,
        )
    else:
        masked = _pipeline._mask(scores.contiguous(), **kw)
    return masked / T if T != 1.0 else masked


def _draw(scores: torch.Tensor, kw: dict, do_sample: bool) -> torch.Tensor:
    if not do_sample:  # greedy: the lowest index of the max, as torch.argmax (7x faster at [8, 128256])
        return _sampling.sample(scores, temperature=0.0, seed=0)  # seed given: no draw from torch RNG
    return _sampling.sample(scores, **kw)


def _draft_probs(scores: torch.Tensor, kw: dict) -> torch.Tensor:
    """The draft's filtered, renormalised distribution q (float32 [B, V]) that its token is drawn from."""
    if all(k in _BASIC for k in kw):
        return ops.filter(
            scores.contiguous(),
            _RENORM,
            False,
            None,
            float(kw.get("temperature", 1.0)),
            None,
            int(kw.get("top_k", 0) or 0),
            None,
            float(kw.get("top_p", 1.0)),
            None,
            float(kw.get("min_p", 0.0)),
            0,
        )
    T = kw.get("temperature", 1.0)
    return torch.softmax(_pipeline._mask(scores.contiguous(), **kw).float() / T, -1)


# ---------------------------------------------------------------------------------------------
# the decoding loop
def _caller_assistant():
    """transformers 5.x does not forward `assistant_model=` to a callable custom_generate; read it
    from the calling `generate` frame when it is there."""
    f = inspect.currentframe()
    try:
        f = f.f_back.f_back if f is not None and f.f_back is not None else None
        if f is not None and f.f_code.co_name == "generate":
            return f.f_locals.get("assistant_model")
    finally:
        del f
    return None


def generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    draft_model=None,
    num_draft_tokens: Optional[int] = None,
    dk_stats: Optional[dict] = None,
    **model_kwargs,
):
    """The decoding loop for `model.generate(..., custom_generate=decodekit.hf.generate)`.

    Extra `generate` keywords: `draft_model` (assisted generation; HF's `assistant_model=` works
    too), `num_draft_tokens` (drafts per round, default generation_config.num_assistant_tokens or
    4), `dk_stats` (a dict that receives steps / rounds / drafted / accepted / acceptance_rate).
    Returns what HF's `_sample` returns (a LongTensor, or GenerateDecoderOnlyOutput with
    return_dict_in_generate=True; `scores` / `logits` have HF's meaning)."""
    if synced_gpus:
        raise ValueError("synced_gpus: decodekit.hf.generate runs on one process (synced_gpus=False)")
    if model.config.is_encoder_decoder:
        raise ValueError("model: decodekit.hf.generate supports decoder-only models")
    cfg = generation_config
    if getattr(cfg, "num_beams", 1) not in (None, 1):
        raise ValueError(f"num_beams must be 1 with decodekit.hf.generate, got {cfg.num_beams}")
    logits_processor = logits_processor if logits_processor is not None else LogitsProcessorList()
    stopping_criteria = stopping_criteria if stopping_criteria is not None else transformers.StoppingCriteriaList()
    do_sample = bool(cfg.do_sample)
    if do_sample:
        head, params = split_processors(logits_processor)
    else:
        head, params = LogitsProcessorList(logits_processor), {}
    draft = draft_model if draft_model is not None else _caller_assistant()
    stats = dk_stats if dk_stats is not None else {}
    stats.update(steps=0, rounds=0, drafted=0, accepted=0, absorbed=dict(params), head=[type(p).__name__ for p in head])
    if draft is not None:
        return _assisted(
            model,
            draft,
            input_ids,
            head,
            params,
            do_sample,
            stopping_criteria,
            cfg,
            streamer,
            num_draft_tokens,
            stats,
            model_kwargs,
        )

    pad = cfg._pad_token_tensor
    ret = cfg.return_dict_in_generate
    want_scores, want_logits = ret and cfg.output_scores, ret and cfg.output_logits
    want_att, want_hid = ret and cfg.output_attentions, ret and cfg.output_hidden_states
    scores_t, logits_t, att_t, hid_t = (), (), (), ()
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    B = input_ids.shape[0]
    unfinished = torch.ones(B, dtype=torch.long, device=input_ids.device)
    if pad is not None:
        pad = pad.to(input_ids.device)

    outputs = model._prefill(input_ids, cfg, model_kwargs, is_first_iteration=not cfg.is_assistant)
    first = True
    while True:
        if not first:
            inputs = model.prepare_inputs_for_generation(
                input_ids, next_sequence_length=1 if model_kwargs["use_cache"] else None, **model_kwargs
            )
            outputs = model(**inputs, return_dict=True)
        first = False
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
        logits = outputs.logits[:, -1]
        if logits.dtype != torch.float32 or head or want_logits:
            logits = logits.to(copy=True, dtype=torch.float32, device=input_ids.device)
        scores = head(input_ids, logits) if head else logits
        kw = _step_kwargs(params, input_ids, scores.shape[-1]) if do_sample else {}
        tokens = _draw(scores, kw, do_sample)
        if ret:
            if want_scores:
                scores_t += (_hf_scores(scores, kw),)
            if want_logits:
                logits_t += (logits,)
            if want_att:
                att_t += (outputs.attentions,)
            if want_hid:
                hid_t += (outputs.hidden_states,)
        if has_eos:
            tokens = tokens * unfinished + pad * (1 - unfinished)
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        stats["steps"] += 1
        if streamer is not None:
            streamer.put(tokens.cpu())
        unfinished = unfinished & ~stopping_criteria(input_ids, scores_t if want_scores else None)
        del outputs
        if unfinished.max() == 0:
            break
    if streamer is not None:
        streamer.end()
    if ret:
        cache = model_kwargs.get("cache")
        return GenerateDecoderOnlyOutput(
            sequences=input_ids,
            scores=scores_t if want_scores else None,
            logits=logits_t if want_logits else None,
            attentions=att_t if want_att else None,
            hidden_states=hid_t if want_hid else None,
            cache=cache,
        )
    return input_ids


def _forward(model, tokens, cache, start: int, keep: int):
    """One forward of `tokens` [1, n] at positions start.. over `cache`; logits of the last `keep`."""
    n = tokens.shape[1]
    pos = torch.arange(start, start + n, device=tokens.device)[None]
    out = model(input_ids=tokens, cache=cache, position_ids=pos, use_cache=True, logits_to_keep=keep, return_dict=True)
    return out.logits[:, -keep:].float()


def draft_token(scores, seq, params, do_sample):
    """The draft's token after `seq` [B, L] from its (head-processed) scores [B, V]: sampling draws
    from q, the draft's distribution under the same step as the target's (returned with the token);
    greedy takes the argmax (q None)."""
    if not do_sample:
        return _draw(scores, {}, False), None
    q = _draft_probs(scores, _step_kwargs(params, seq, scores.shape[-1]))
    return _sampling.sampling_from_probs(q), q


def assist_round(model, draft, seq, cache, dcache, head, params, do_sample, n):
    """One round of assisted generation, the one `generate(..., draft_model=)` runs each step: the
    draft proposes n tokens after `seq` [B, L] (rows of equal length), the target scores them in
    one forward pass and decodekit's chain verification accepts a prefix. The caches hold a prefix
    of `seq` (or nothing) and are extended, not cropped. Returns (out [B, n + 1] with -1 past the
    emitted tokens, emitted [B]: the number of accepted drafts; row b emits out[b, : emitted + 1])."""
    L = seq.shape[1]
    # draft n tokens, one at a time, from the draft's filtered distribution q
    drafts, qs, dseq = [], [], seq
    dlen = dcache.get_seq_length()
    for _ in range(n):
        dl = _forward(draft, dseq[:, dlen:], dcache, dlen, 1)[:, -1]
        dlen = dseq.shape[1]
        tok, q = draft_token(head(dseq, dl) if head else dl, dseq, params, do_sample)
        qs.append(q)
        drafts.append(tok)
        dseq = torch.cat([dseq, tok[:, None]], dim=-1)
    d = torch.stack(drafts, dim=1)  # [B, n]
    # target: one forward over the uncached tokens and the drafts; logits of the last n + 1
    tlen = cache.get_seq_length()
    tl = _forward(model, dseq[:, tlen:], cache, tlen, n + 1)  # [B, n + 1, V]
    if head:
        tl = torch.stack([head(dseq[:, : L + j], tl[:, j]) for j in range(n + 1)], dim=1)
    return verify_drafts(torch.stack(qs, dim=1) if do_sample else None, d, tl, dseq, params, do_sample)


def verify_drafts(Q, d, tl, dseq, params, do_sample):
    """decodekit's verification of one assisted round (what `assist_round` does after the forward
    passes): Q [B, n, V] the draft's distributions the drafts d [B, n] were drawn from, tl
    [B, n + 1, V] the target's logits (after HF's head processors), dseq [B, L + n] the sequences
    with the drafts (the repetition penalty's history). Greedy: `greedy_verify`; sampling with only
    temperature / top-k / top-p / min-p: `chain_speculative_sampling_from_logits` (the filters
    applied inside the kernel); otherwise the whole step per position, then
    `chain_speculative_sampling` from probabilities. Returns (out [B, n + 1], emitted [B])."""
    if not do_sample:
        out, _, emitted = greedy_verify(d, tl)
        return out, emitted
    if all(k in _BASIC for k in params):
        out, _, emitted = chain_speculative_sampling_from_logits(
            Q,
            d,
            tl,
            temperature=params.get("temperature", 1.0),
            top_k=params.get("top_k"),
            top_p=params.get("top_p"),
            min_p=params.get("min_p"),
        )
    else:
        n, V = d.shape[1], tl.shape[-1]
        L = dseq.shape[1] - n
        Pt = torch.stack(
            [_draft_probs(tl[:, j], _step_kwargs(params, dseq[:, : L + j], V)) for j in range(n + 1)], dim=1
        )
        out, _, emitted = chain_speculative_sampling(Q, d, Pt)
    return out, emitted


def _assisted(
    model, draft, input_ids, head, params, do_sample, stopping_criteria, cfg, streamer, n_draft, stats, model_kwargs
):
    """Assisted (speculative) generation verified by decodekit's chain verification, batch 1."""
    from transformers import DynamicCache

    if input_ids.shape[0] != 1:
        raise ValueError(
            f"input_ids: assisted generation with decodekit.hf.generate needs batch size 1, got {input_ids.shape[0]}"
        )
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool((mask == 1).all()):
        raise ValueError("attention_mask: assisted generation with decodekit.hf.generate does not take padding")
    if cfg.return_dict_in_generate:
        raise ValueError("return_dict_in_generate is not supported with assisted generation in decodekit.hf.generate")
    N = int(n_draft or getattr(cfg, "num_assistant_tokens", None) or 4)
    if N < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {N}")
    cache = model_kwargs.get("cache")
    if cache is None or not hasattr(cache, "crop"):
        cache = DynamicCache(config=model.config)
    dcache = DynamicCache(config=draft.config)
    prompt_len = input_ids.shape[1]
    max_len = stopping_criteria.max_length if stopping_criteria.max_length is not None else prompt_len + 64
    seq = input_ids
    done = False
    while not done:
        n = max(1, min(N, max_len - seq.shape[1]))
        out, emitted = assist_round(model, draft, seq, cache, dcache, head, params, do_sample, n)
        m = int(emitted[0])
        new = out[0, : m + 1]
        stats["rounds"] += 1
        stats["drafted"] += n
        stats["accepted"] += m
        # append one token at a time so that a stop (EOS, max_length) ends the sequence where HF's would
        for t in new.tolist():
            seq = torch.cat([seq, torch.tensor([[t]], dtype=seq.dtype, device=seq.device)], dim=-1)
            stats["steps"] += 1
            if streamer is not None:
                streamer.put(seq[:, -1:].cpu())
            if bool(stopping_criteria(seq, None).all()):
                done = True
                break
        # keep cache entries only for tokens that stay (the last token of seq is not cached yet)
        keep = seq.shape[1] - 1
        for c in (cache, dcache):
            extra = c.get_seq_length() - keep
            if extra > 0:
                c.crop(-extra)
    if streamer is not None:
        streamer.end()
    stats["acceptance_rate"] = stats["accepted"] / max(stats["drafted"], 1)
    return seq
