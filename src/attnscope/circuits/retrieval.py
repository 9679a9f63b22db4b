"""Retrieval heads (Wu et al. 2024, arXiv 2404.15574; reference code nightdessert/Retrieval_Head).

For each needle sample the model decodes greedily. At every decode step, for every layer and **query** head (GQA:
one score per query head), the top-1 attended key position ``i`` of the current query counts as a copy when
``needle_start <= i < needle_end`` and ``context[i]`` equals the token generated at that step. The sample's score
of a head is ``copies / needle length``. Only samples whose ROUGE-1 recall of the answer exceeds ``rouge_threshold``
(0.5; the reference's ``score > 50``) count; a head's retrieval score is the mean over counted samples, and it is a
retrieval head when the score exceeds ``threshold`` (0.1).

As in the reference, every generated token is scored: the reference prefills all prompt tokens but the last, then
decodes from the last prompt token, so the first scored query is the last prompt token and the scored token is the
one it predicts. Here the capture keeps, per forward of ``generate``, only the top-k statistic of the last query row
(``capture(stats=("topk",), topk=1, rows="last:1", patterns=False)``): no probability row longer than one query is
ever kept, and long contexts fit in memory.

Options and their reference defaults: ``topk=1`` (a step counts when any of the top-k positions is a copy);
``span="needle"`` (the whole needle span as the denominator; ``"answer"`` uses only the tokens to be generated, so a
perfect copy head scores 1); ``max_new_tokens`` 50 with a tokenizer (decoding stops after a token containing a
newline, as the reference stops at ``<0x0A>``; end-of-sequence does not stop it) and the answer's length for
token-level suites; ROUGE-1 recall with stemming (``rouge_score``, as the reference) on text, on token ids otherwise.
The needle span comes from the suite's metadata (``needle_span``, or the queried pair of an associative-recall item);
without it the span is located as the reference does: the first window whose token set overlaps the needle's by
more than 90%.

Example:
    >>> import torch
    >>> from attnscope.circuits.retrieval import copy_counts
    >>> context = [7, 1, 2, 3, 8]                      # needle [1, 2, 3] at positions 1..3
    >>> top = torch.tensor([[[[2]]], [[[3]]]])           # [step, layer, head, k]: the head looks at 2, then 3
    >>> copy_counts(top, generated=[2, 3], context=context, span=(1, 4)).tolist()
    [[2]]
"""

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..datasets.suite import PromptSuite
from ..errors import AnalysisError, InputError, InputTooLongError
from ..probes.capture import capture, resolve_adapter
from ..probes.heads import HeadSet
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
        from rouge_score import rouge_scorer
    except ImportError:  # the same tokenisation without stemming: lowercase alphanumeric runs
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


def needle_sample(enc: Encoded, tokenizer: Any, span: str = "needle") -> NeedleSample:
    """The sample of one encoded item (prompt cut after the suite's ids: no trailing special token)."""
    item, meta = enc.item, enc.item.metadata
    ids = enc.ids[:enc.offset + len(item.ids)] if item.ids is not None else list(enc.ids)
    found = _metadata_span(meta, span)
    if found is not None:
        start, end = found[0] + enc.offset, found[1] + enc.offset
    else:
        needle = meta.get("needle")
        if needle is None and meta.get("needle_text") and tokenizer is not None:
            needle = tokenizer(meta["needle_text"], add_special_tokens=False)["input_ids"]
        if needle is None:
            raise InputError("item has no needle", expected="metadata needle_span, needle or needle_text",
                             got=sorted(meta), fix="use a needle or recall suite")
        start, end = find_needle(ids, list(needle))
    if not 0 <= start < end <= len(ids):
        raise InputError("needle not found in the prompt", expected="a span inside the prompt",
                         got=(start, end), fix="check the suite's needle_span metadata")
    reference = item.answer_text if (tokenizer is not None and item.answer_text) else item.answer_ids
    if reference is None:
        raise InputError("item has no answer", expected="answer_text or answer_ids", got=None)
    extra = {k: meta[k] for k in ("context_length", "depth") if k in meta}
    return NeedleSample(enc.index, ids, (start, end), reference, extra)


# ---- decoding with streaming top-k -------------------------------------------------------------------------------


def _newline_stop(tokenizer: Any) -> Any:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfterNewline(StoppingCriteria):
        def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: Any) -> Tensor:
            last = input_ids[:, -1].tolist()
            return torch.tensor(["\n" in tokenizer.decode([t]) for t in last], device=input_ids.device)
    return StoppingCriteriaList([StopAfterNewline()])


def decode_top_positions(model: Any, prompt: Sequence[int], *, max_new_tokens: int, topk: int = 1,
                         heads: HeadSet | None = None, stop_at_newline: bool = True,
                         tower: str = "text") -> "Decoded":
    """Greedy decoding with streaming top-k of the current query per step.

    Returns the generated ids, ``top [step, layer, head, k]`` key positions (layers and heads as captured; ``-1``
    where a head was not captured), the captured layers' numbers and their model head numbers.
    """
    from transformers import GenerationConfig

    adapter = resolve_adapter(model)
    module, tokenizer = adapter.module, adapter.tokenizer
    if not hasattr(module, "generate") or adapter.info().family != "causal-lm":
        raise AnalysisError("retrieval scoring decodes, so it needs a causal LM", expected="a causal LM",
                            got=f"{type(module).__name__} ({adapter.info().family})")
    limit = adapter.info().max_positions
    if limit and len(prompt) + int(max_new_tokens) > limit:
        raise InputTooLongError("prompt plus decoded tokens exceed the model's context",
                                expected=f"<= {limit} tokens", got=len(prompt) + int(max_new_tokens),
                                fix="use shorter needle contexts or fewer --max-new-tokens")
    device = next(module.parameters()).device
    ids = torch.tensor([list(prompt)], device=device)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    config = GenerationConfig(max_new_tokens=int(max_new_tokens), do_sample=False, eos_token_id=None,
                              pad_token_id=0 if pad is None else pad)
    stop = _newline_stop(tokenizer) if stop_at_newline and tokenizer is not None else None
    with capture(adapter, stats=("topk",), topk=topk, rows="last:1", patterns=False, heads=heads) as cap:
        with torch.no_grad():
            out = module.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                  stopping_criteria=stop)
    generated = out[0, len(prompt):].tolist()
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


def retrieval_scores(model: Any, suite: PromptSuite, *, threshold: float = 0.1, rouge_threshold: float | None = 0.5,
                     span: str = "needle", max_new_tokens: int | None = None, stop_at_newline: bool = True,
                     topk: int = 1, heads: Any = None, partial: Any = None, progress: bool = True,
                     add_special_tokens: bool = True) -> RetrievalResult:
    """Retrieval score per (layer, query head) over the suite's needle samples (see the module docstring).

    partial: a parquet path where per-sample rows are saved as the run goes; a rerun with the same suite, model and
    options skips the samples already there. ``rouge_threshold=None`` counts every sample.
    """
    if span not in SPANS:
        raise InputError("unknown needle span", expected=SPANS, got=span)
    adapter = resolve_adapter(model)
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
def retrieval(model: Any, suite: PromptSuite, *, threshold: float = 0.1, rouge_threshold: float | None = 0.5,
              span: str = "needle", max_new_tokens: int | None = None, stop_at_newline: bool = True, topk: int = 1,
              heads: Any = None, partial: Any = None, progress: bool = True,
              add_special_tokens: bool = True) -> ResultTable:
    """``retrieval_scores(...).table``; the flagged heads are in ``table.provenance["retrieval_heads"]``."""
    return retrieval_scores(model, suite, threshold=threshold, rouge_threshold=rouge_threshold, span=span,
                            max_new_tokens=max_new_tokens, stop_at_newline=stop_at_newline, topk=topk, heads=heads,
                            partial=partial, progress=progress, add_special_tokens=add_special_tokens).table
