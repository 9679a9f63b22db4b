"""Retrieval heads (Wu et al. 2024, arXiv 2404.15574; reference code nightdessert/Retrieval_Head).

For each needle sample the model decodes greedily. At every decode step, for every layer and **query** head (GQA:
one score per query head), the top-1 attended key position ``i`` of the current query counts as a copy when
``needle_start <= i < needle_end`` and ``context[i]`` equals the token generated at that step. The sample's score
of a head is ``copies / span length``. Only samples whose ROUGE-1 recall of the answer exceeds ``rouge_threshold``
(0.5; the reference's ``score > 50``) count; a head's retrieval score is the mean over counted samples, and it is a
retrieval head when the score exceeds ``threshold`` (0.1).

Decoding is our own loop over the KV cache (``greedy_decode``), transcribing the reference's ``decode``
(``retrieval_head_detection.py`` L235-247): prefill all prompt tokens but the last, then feed the last prompt token
and each argmax token in turn; every generated token is scored (the first scored query is the last prompt token),
for at most ``max_new_tokens`` steps (the reference's 50), stopping *after* a token holding a newline (the
reference's ``'<0x0A>'``). End-of-sequence never stops it: ``generate`` is not called, so no transformers release's
generation defaults can change the rule. The capture keeps, per decode step, only the top-k statistic of the last
query row (``capture(stats=("topk",), topk=1, rows="last:1", patterns=False)``): no probability row longer than one
query is ever kept, and long contexts fit in memory.

Options and their reference defaults: ``topk=1`` (a step counts when any of the top-k positions is a copy);
``span="answer"``: the scored span and denominator are the **answer** tokens, the reference's ``real_needle``
(L287 ``find_needle_idx(self.real_needle)``, L227 ``1/(needle_end - needle_start)``, L296 ROUGE against
``real_needle``; ``haystack_for_detect/needles.jsonl``), so a perfect copy head scores 1; ``span="needle"`` uses
the whole needle sentence instead (not the reference's rule). The span comes from the suite's token spans
(``answer_span`` / ``needle_span``, or the queried pair of an associative-recall item), else from character spans
(``answer_span_chars``) through the tokenizer's offsets, else as the reference locates it: the first window whose
token set overlaps the answer's (needle's) by more than 90%. If none of these finds it, an ``InputError``: never a
silent fallback to another span. ``max_new_tokens`` 50 with a tokenizer and the answer's length for token-level
suites; ROUGE-1 recall with stemming (``rouge_score``, as the reference) on text, on token ids otherwise.

Example:
    >>> import torch
    >>> from attnscope.circuits.retrieval_heads import copy_counts
    >>> context = [7, 1, 2, 3, 8]                      # needle [1, 2, 3] at positions 1..3
    >>> top = torch.tensor([[[[2]]], [[[3]]]])           # [step, layer, head, k]: the head looks at 2, then 3
    >>> copy_counts(top, generated=[2, 3], context=context, span=(1, 4)).tolist()
    [[2]]
"""

import contextlib
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._extras import require
from ..datasets._tokenize import encode_with_spans
from ..datasets.suite import PromptSuite
from ..errors import AnalysisError, InputError, InputTooLongError
from ..probes.adapter import ModelLike, as_adapter
from ..probes.capturing import capture
from ..probes.heads import HeadSet
from ..probes.kv_cache import forward_with_cache
from ..results import ResultTable
from .detectors import Encoded, PartialLog, encode_suite, fingerprint, parse_heads, progress_bar, self_sites
from .registry import register_analysis

SPANS = ("needle", "answer")

# ---- ROUGE-1 recall ----------------------------------------------------------------------------------------------


def rouge1_recall(reference: Sequence[Any], candidate: Sequence[Any]) -> float:
    """Clipped unigram overlap divided by the reference's length (ROUGE-1 recall on token sequences)."""
    ref, cand = Counter(reference), Counter(candidate)
    if not ref:
        return 0.0
    return sum(min(n, cand[t]) for t, n in ref.items()) / sum(ref.values())


def rouge1_recall_text(reference: str, candidate: str, use_stemmer: bool = True) -> float:
    """ROUGE-1 recall of text as ``rouge_score.RougeScorer(["rouge1"], use_stemmer=True)`` computes it."""
    try:
        rouge_scorer = require("rouge_score.rouge_scorer", "retrieval")
    except ImportError:  # MissingExtraError is one  # the same tokenisation without stemming: lowercase alphanumeric runs
        words = lambda s: re.findall(r"[a-z0-9]+", s.lower())  # noqa: E731
        return rouge1_recall(words(reference), words(candidate))
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=use_stemmer)
    return float(scorer.score(reference, candidate)["rouge1"].recall)


# ---- needle samples ----------------------------------------------------------------------------------------------


def find_needle(context: Sequence[int], needle: Sequence[int], min_overlap: float = 0.9) -> tuple[int, int]:
    """The reference's ``find_needle_idx``: first window of ``len(needle)`` tokens whose token set covers more than
    ``min_overlap`` of the needle's token set; ``(-1, -1)`` when none does."""
    want = set(needle)
    for i in range(len(context)):
        if len(set(context[i:i + len(needle)]) & want) / max(len(want), 1) > min_overlap:
            return i, i + len(needle)
    return -1, -1


@dataclass
class NeedleSample:
    """One prompt (``ids``, special tokens included), its needle span, and the reference answer for ROUGE."""

    index: int
    ids: list[int]
    span: tuple[int, int]
    reference: Any  # answer text (str) or answer token ids (list[int])
    meta: dict = field(default_factory=dict)


def _metadata_span(meta: dict, span: str) -> tuple[int, int] | None:
    key = "needle_span" if span == "needle" else "answer_span"
    if key in meta:
        return int(meta[key][0]), int(meta[key][1])
    if meta.get("queries"):  # associative recall: the pair of the last (prompted) query
        q = meta["queries"][-1]
        start = int(q["key_position"]) if span == "needle" else int(q["value_position"])
        return start, int(q["value_position"]) + 1
    return None


def _sublist(haystack: Sequence[int], part: Sequence[int]) -> int | None:
    n = len(part)
    return next((i for i in range(len(haystack) - n + 1) if list(haystack[i:i + n]) == list(part)), None)


def _char_span(enc: Encoded, tokenizer: Any, span: str) -> tuple[int, int] | None:
    """A ``*_span_chars`` character span of a text item as tokens of ``enc.ids`` (offset mapping)."""
    chars = enc.item.metadata.get(f"{span}_span_chars")
    if chars is None or tokenizer is None or enc.item.text is None:
        return None
    plain, spans = encode_with_spans(tokenizer, enc.item.text, {span: tuple(chars)})
    shift = _sublist(enc.ids, plain)
    if shift is None or spans[span][0] >= spans[span][1]:
        return None
    return spans[span][0] + shift, spans[span][1] + shift


def _target_tokens(item: Any, tokenizer: Any, span: str) -> list[int] | None:
    """The tokens the reference's ``find_needle_idx`` looks for: the needle, or the answer (``real_needle``)."""
    meta = item.metadata
    if span == "needle":
        if meta.get("needle") is not None:
            return list(meta["needle"])
        text = meta.get("needle_text")
    else:
        if item.answer_ids is not None:
            return list(item.answer_ids)
        text = item.answer_text
    if text and tokenizer is not None:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return None


def locate_span(enc: Encoded, tokenizer: Any, span: str = "answer") -> tuple[int, int]:
    """``[start, end)`` of the scored span in ``enc.ids``: the answer (``real_needle``, the reference's rule) or the
    whole needle sentence. Token spans in the metadata first, then character spans, then the reference's search
    (``find_needle``) for the answer's or needle's tokens; an error when none finds it, never another span.
    """
    found = _metadata_span(enc.item.metadata, span)
    if found is not None:
        return found[0] + enc.offset, found[1] + enc.offset
    found = _char_span(enc, tokenizer, span)
    if found is not None:
        return found
    target = _target_tokens(enc.item, tokenizer, span)
    if not target:
        what = "needle_span, needle or needle_text" if span == "needle" else "answer_span, answer_ids or answer_text"
        raise InputError(f"item has no {span} to score", expected=f"metadata or fields {what}",
                         got=sorted(enc.item.metadata), fix="use a needle or recall suite, or pass span='needle'")
    start, end = find_needle(enc.ids, target)
    if start < 0:
        raise InputError(f"the {span} tokens are not in the prompt", expected=f"{len(target)} tokens found by the "
                         "reference's >90% token-set overlap rule", got="no such window",
                         fix=f"give the item an {span}_span, or check that the {span} text appears in the prompt")
    return start, end


def needle_sample(enc: Encoded, tokenizer: Any, span: str = "answer") -> NeedleSample:
    """The sample of one encoded item (prompt cut after the suite's ids: no trailing special token)."""
    item, meta = enc.item, enc.item.metadata
    ids = enc.ids[:enc.offset + len(item.ids)] if item.ids is not None else list(enc.ids)
    start, end = locate_span(Encoded(ids, enc.offset, item, enc.index), tokenizer, span)
    if not 0 <= start < end <= len(ids):
        raise InputError(f"{span} span not inside the prompt", expected=f"a span inside [0, {len(ids)})",
                         got=(start, end), fix=f"check the suite's {span}_span metadata")
    reference = item.answer_text if (tokenizer is not None and item.answer_text) else item.answer_ids
    if reference is None:
        raise InputError("item has no answer", expected="answer_text or answer_ids", got=None,
                         fix="give each item an answer_text or answer_ids")
    extra = {k: meta[k] for k in ("context_length", "depth") if k in meta}
    return NeedleSample(enc.index, ids, (start, end), reference, extra)


# ---- decoding with streaming top-k -------------------------------------------------------------------------------


def _is_newline(tokenizer: Any, token: int) -> bool:
    """The reference's stop rule (``step_token == '<0x0A>'``): the token's text holds a newline."""
    if tokenizer is None:
        return False
    piece = tokenizer.convert_ids_to_tokens(int(token))
    return piece == "<0x0A>" or "\n" in tokenizer.decode([int(token)])


def greedy_decode(module: Any, prompt: Sequence[int], max_new_tokens: int,
                  stop: Callable[[int], bool] | None = None,
                  on_prefill: contextlib.AbstractContextManager | None = None,
                  on_decode: contextlib.AbstractContextManager | None = None) -> list[int]:
    """The reference's decoding loop (``retrieval_head_detection.py`` ``decode``, L235-247), owned by us.

    Prefill ``prompt[:-1]`` into the cache, then feed the last prompt token and each argmax token in turn, for at
    most ``max_new_tokens`` steps; stop *after* a token for which ``stop(token)`` is true (the reference scores the
    newline step, then breaks). End-of-sequence never stops it, whatever the model's generation config says:
    ``generate`` is not used, so no transformers release can refill a stopping rule. ``on_decode`` wraps the decode
    steps only (the capture), so capture step ``i`` is the forward that produced token ``i``.

    Example:
        >>> import torch, transformers
        >>> _ = torch.manual_seed(0)
        >>> cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=11, bos_token_id=0, eos_token_id=0)
        >>> model = transformers.GPT2LMHeadModel(cfg).eval()
        >>> len(greedy_decode(model, [1, 2, 3], max_new_tokens=4))
        4
    """
    if len(prompt) < 1 or max_new_tokens < 1:
        raise InputError("nothing to decode", expected="a non-empty prompt and max_new_tokens >= 1",
                         got=(len(prompt), max_new_tokens), fix="give a prompt and a positive max_new_tokens")
    device = next(module.parameters()).device
    ids = torch.tensor([list(prompt)], device=device)
    past, generated = None, []
    with torch.no_grad():
        if ids.shape[1] > 1:
            with on_prefill or contextlib.nullcontext():
                _, past = forward_with_cache(module, ids[:, :-1], None)
        token = ids[:, -1:]
        with on_decode or contextlib.nullcontext():
            for _ in range(int(max_new_tokens)):
                logits, past = forward_with_cache(module, token, past)
                next_id = int(logits[0, -1].argmax())
                generated.append(next_id)
                if stop is not None and stop(next_id):
                    break
                token = torch.tensor([[next_id]], device=device)
    return generated


def decode_top_positions(model: ModelLike, prompt: Sequence[int], *, max_new_tokens: int, topk: int = 1,
                         heads: HeadSet | None = None, stop_at_newline: bool = True,
                         tower: str = "text") -> "Decoded":
    """Greedy decoding (``greedy_decode``) with streaming top-k of the current query per step.

    Returns the generated ids, ``top [step, layer, head, k]`` key positions (layers and heads as captured; ``-1``
    where a head was not captured), the captured layers' numbers and their model head numbers.
    """
    adapter = as_adapter(model)
    module, tokenizer = adapter.module, adapter.tokenizer
    if adapter.info().family != "causal-lm":
        raise AnalysisError("retrieval scoring decodes, so it needs a causal LM", expected="a causal LM",
                            got=f"{type(module).__name__} ({adapter.info().family})",
                            fix="load a causal language model (GPT-2, Llama, Qwen ...)")
    limit = adapter.info().max_positions
    if limit and len(prompt) + int(max_new_tokens) > limit:
        raise InputTooLongError("prompt plus decoded tokens exceed the model's context",
                                expected=f"<= {limit} tokens", got=len(prompt) + int(max_new_tokens),
                                fix="use shorter needle contexts or fewer --max-new-tokens")
    stop = (lambda t: _is_newline(tokenizer, t)) if stop_at_newline and tokenizer is not None else None
    cap = capture(adapter, stats=("topk",), topk=topk, rows="last:1", patterns=False, heads=heads)
    generated = greedy_decode(module, prompt, max_new_tokens, stop=stop, on_decode=cap)
    sites = self_sites(cap.trace, tower)
    head_ids = [cap.trace.get(s, step=0).heads() for s in sites]
    width = max(len(h) for h in head_ids)
    top = torch.full((len(generated), len(sites), width, topk), -1, dtype=torch.long)
    for li, site in enumerate(sites):
        for step in range(len(generated)):
            index = cap.trace.get(site, step=step).stats["topk_index"][0, :, -1].long()  # [head, k']
            top[step, li, :index.shape[0], :index.shape[1]] = index
    return Decoded(generated, top, [s.layer for s in sites], head_ids)


@dataclass
class Decoded:
    generated: list[int]
    top: Tensor  # [step, layer, head, k]
    layers: list[int]
    heads: list[list[int]]


def copy_counts(top: Tensor, generated: Sequence[int], context: Sequence[int], span: tuple[int, int]) -> Tensor:
    """``[layer, head]`` number of steps whose top-k positions hold a copy (at most one per step, as the
    reference breaks after the first hit): position in ``[span)`` and ``context[i] == generated[step]``."""
    start, end = span
    ctx = torch.as_tensor(list(context))
    gen = torch.as_tensor(list(generated)).view(-1, 1, 1, 1)
    inside = (top >= start) & (top < end)
    tokens = ctx[top.clamp(0, len(ctx) - 1)]
    hit = inside & (tokens == gen)
    return hit.any(-1).sum(0)


# ---- the analysis ------------------------------------------------------------------------------------------------


@dataclass
class RetrievalResult:
    """The result table, the heads whose score exceeds the threshold, and the ``[layer, head]`` scores."""

    table: ResultTable
    heads: HeadSet
    scores: dict[tuple[int, int], float]


def _score_sample(adapter: Any, sample: NeedleSample, *, max_new_tokens: int | None, topk: int,
                  heads: HeadSet | None, stop_at_newline: bool, rouge_threshold: float | None) -> list[dict]:
    tokenizer = adapter.tokenizer
    text = isinstance(sample.reference, str)
    n_new = max_new_tokens or (50 if text else len(sample.reference))
    dec = decode_top_positions(adapter, sample.ids, max_new_tokens=n_new, topk=topk, heads=heads,
                               stop_at_newline=stop_at_newline and text)
    generated = dec.generated
    counts = copy_counts(dec.top, generated, sample.ids, sample.span)
    if text:
        response = tokenizer.decode(generated, skip_special_tokens=True).strip()
        rouge = rouge1_recall_text(sample.reference, response)
    else:
        response = " ".join(str(t) for t in generated)
        rouge = rouge1_recall(sample.reference, generated)
    counted = rouge_threshold is None or rouge > rouge_threshold
    needle_len = sample.span[1] - sample.span[0]
    common = {"analysis": "retrieval", "sample": sample.index, **sample.meta}
    rows = [dict(common, layer=-1, head=-1, metric="rouge1_recall", value=float(rouge), counted=bool(counted),
                 response=response, needle_len=needle_len, n_generated=len(generated))]
    for li, (layer, hs) in enumerate(zip(dec.layers, dec.heads)):
        rows += [dict(common, layer=layer, head=h, metric="copies", value=float(counts[li, j]), needle_len=needle_len)
                 for j, h in enumerate(hs)]
    return rows


def retrieval_scores(model: ModelLike, suite: PromptSuite, *, threshold: float = 0.1, rouge_threshold: float | None = 0.5,
                     span: str = "answer", max_new_tokens: int | None = None, stop_at_newline: bool = True,
                     topk: int = 1, heads: Any = None, partial: Any = None, progress: bool = True,
                     add_special_tokens: bool = True) -> RetrievalResult:
    """Retrieval score per (layer, query head) over the suite's needle samples (see the module docstring).

    partial: a parquet path where per-sample rows are saved as the run goes; a rerun with the same suite, model and
    options skips the samples already there. ``rouge_threshold=None`` counts every sample.
    """
    if span not in SPANS:
        raise InputError("unknown needle span", expected=SPANS, got=span)
    adapter = as_adapter(model)
    head_set = parse_heads(model, heads)
    options = dict(rouge_threshold=rouge_threshold, span=span, max_new_tokens=max_new_tokens, topk=topk,
                   stop_at_newline=stop_at_newline, heads=str(head_set), add_special_tokens=add_special_tokens)
    log = PartialLog(partial, fingerprint(suite, model, **options))
    encoded = encode_suite(suite, adapter.tokenizer, add_special_tokens)
    todo = [e for e in encoded if e.index not in log.done]
    try:
        for enc in progress_bar(todo, len(todo), "retrieval", progress):
            log.add(_score_sample(adapter, needle_sample(enc, adapter.tokenizer, span), max_new_tokens=max_new_tokens,
                                  topk=topk, heads=head_set, stop_at_newline=stop_at_newline,
                                  rouge_threshold=rouge_threshold))
    finally:  # an interrupted run keeps every finished sample
        log.flush()
    return _aggregate(log.rows, threshold, adapter, suite, options, log.fingerprint)


def _aggregate(rows: list[dict], threshold: float, adapter: Any, suite: PromptSuite, options: dict,
               fp: str) -> RetrievalResult:
    counted = {int(r["sample"]) for r in rows if r["metric"] == "rouge1_recall" and bool(r["counted"])}
    per_head: dict[tuple[int, int], list[float]] = {}
    for r in rows:
        if r["metric"] == "copies":
            key = (int(r["layer"]), int(r["head"]))
            per_head.setdefault(key, [])
            if int(r["sample"]) in counted:
                per_head[key].append(r["value"] / r["needle_len"])
    scores = {k: float(np.mean(v)) if v else float("nan") for k, v in per_head.items()}
    flagged = HeadSet(k for k, v in scores.items() if v > threshold)
    summary = [{"analysis": "retrieval", "layer": l, "head": h, "metric": "retrieval_score", "value": v,
                "n_samples": len(counted), "is_retrieval_head": (l, h) in flagged, "threshold": threshold}
               for (l, h), v in sorted(scores.items())]
    provenance = dict(adapter.provenance(), analysis="retrieval", suite=suite.name, suite_params=suite.params,
                      threshold=threshold, fingerprint=fp, retrieval_heads=str(flagged),
                      n_samples=len({int(r["sample"]) for r in rows if "sample" in r}), n_counted=len(counted),
                      main_metric="retrieval_score", **{k: str(v) for k, v in options.items()})
    return RetrievalResult(ResultTable.from_records(summary + rows, provenance=provenance), flagged, scores)


@register_analysis("retrieval", description="retrieval heads (Wu et al. 2024): copy-paste score from the needle "
                   "during greedy decoding, per query head")
def retrieval(model: ModelLike, suite: PromptSuite, *, threshold: float = 0.1, rouge_threshold: float | None = 0.5,
              span: str = "answer", max_new_tokens: int | None = None, stop_at_newline: bool = True, topk: int = 1,
              heads: Any = None, partial: Any = None, progress: bool = True,
              add_special_tokens: bool = True) -> ResultTable:
    """``retrieval_scores(...).table``; the flagged heads are in ``table.provenance["retrieval_heads"]``."""
    return retrieval_scores(model, suite, threshold=threshold, rouge_threshold=rouge_threshold, span=span,
                            max_new_tokens=max_new_tokens, stop_at_newline=stop_at_newline, topk=topk, heads=heads,
                            partial=partial, progress=progress, add_special_tokens=add_special_tokens).table
