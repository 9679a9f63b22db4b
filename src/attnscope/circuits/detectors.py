"""Head detectors over whole prompt suites: previous-token, duplicate-token, induction, and any template.

A detector is a template ``P[query, key]`` per item (1 where the head type should attend). A head's score on one
item is its attention mass on the template, normalised as TransformerLens ``detect_head`` does in its ``"mul"``
mode (``transformer_lens/head_detector.py``, ``compute_head_attention_similarity_score``)::

    score = sum(A * P) / sum(A)          # A: the head's pattern, with column 0 (exclude_bos) and/or the
                                         # diagonal (exclude_current_token) zeroed first

and the suite score is the mean over items (``detect_head`` with a list of prompts also averages per prompt).

``normalise`` picks the rows the two sums run over:

- ``"tl"``: every query row, exactly TransformerLens. A perfect previous-token head scores ``(n-1)/n`` there (row 0
  has no previous token) and a perfect induction head scores the fraction of rows in the repeated half.
- ``"rows"`` (default of the built-in detectors): only the rows where the template has a key (for induction, only
  the repeated half, when the suite records ``repeat_span``). Without exclusions this is the mean over those rows
  of the mass on the template, so a perfect head scores 1 (the Olsson et al. 2022 "prefix matching" reading).

Templates follow TransformerLens' definitions (``get_previous_token_head_detection_pattern`` ...): previous-token
``P[t, t-1]``; duplicate-token ``P[i, j] = [ids[j] == ids[i]], j < i``; induction ``P[i, j] = [ids[j-1] == ids[i]],
1 <= j <= i`` (from the second occurrence to the token after the first occurrence).

Patterns are captured per batch with only the rows the templates need (``rows`` selection), never kept beyond the
batch. This module also holds the suite plumbing the other head-scoring analyses share (item encoding, head
selection, progress bars, resumable partial results).

Example:
    >>> import torch
    >>> from attnscope.circuits.detectors import previous_token_template, template_scores
    >>> P = previous_token_template([5, 6, 7, 8])
    >>> A = P.clone(); A[0, 0] = 1.0            # a perfect previous-token head (row 0 can only see itself)
    >>> template_scores(A[None], P).tolist(), template_scores(A[None], P, normalise="tl").tolist()
    ([1.0], [0.75])
"""

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..datasets.input_suite import InputSuite
from ..datasets.suite import PromptItem, PromptSuite, pad_ids
from ..errors import AnalysisError, InputError
from ..probes.adapter import ModelLike, as_adapter
from ..probes.capturing import capture
from ..probes.heads import HeadSet
from ..probes.site import Site
from ..results import ResultTable
from .registry import register_analysis
from .task_metrics import require_suite_fits

NORMALISE = ("rows", "tl")
Template = Callable[[list[int], PromptItem], Tensor]

# ---- suite plumbing shared by the head-scoring analyses ----------------------------------------------------------


@dataclass
class Encoded:
    """One item as the model sees it: ``ids``, and ``offset`` = special tokens put before the suite's ids."""

    ids: list[int]
    offset: int = 0
    item: PromptItem | None = None
    index: int = 0


def encode_item(item: PromptItem, tokenizer: Any, add_special_tokens: bool = True, index: int = 0) -> Encoded:
    """Ids for ``item``: the suite's ids, or its text tokenised; with a tokenizer and text, the tokenizer's special
    tokens are added (``[CLS] ... [SEP]``, BOS) and ``offset`` tells how far the suite's token spans moved."""
    if tokenizer is None or item.text is None:
        if item.ids is None:
            raise InputError("text item but the model has no tokenizer", expected="a token-level suite",
                             got="text", fix="use a token-level suite (induction, needle, recall, agreement)")
        return Encoded(list(item.ids), 0, item, index)
    if not add_special_tokens and item.ids is not None:
        return Encoded(list(item.ids), 0, item, index)
    full = list(tokenizer(item.text, add_special_tokens=add_special_tokens)["input_ids"])
    if item.ids is None:
        return Encoded(full, 0, item, index)
    n = len(item.ids)
    for off in range(0, len(full) - n + 1):
        if full[off:off + n] == item.ids:
            return Encoded(full, off, item, index)
    return Encoded(list(item.ids), 0, item, index)  # the tokenizer splits differently in context: keep the suite's


def encode_suite(suite: PromptSuite, tokenizer: Any, add_special_tokens: bool = True) -> list[Encoded]:
    if not isinstance(suite, PromptSuite) or not len(suite):
        raise InputError("an analysis needs a non-empty prompt suite", expected="PromptSuite with items",
                         got=type(suite).__name__ if not isinstance(suite, PromptSuite) else "empty suite",
                         fix="build one with attnscope.datasets (induction, needle, ...)")
    return [encode_item(item, tokenizer, add_special_tokens, i) for i, item in enumerate(suite)]


def parse_heads(model: ModelLike, heads: "HeadSet | str | None") -> HeadSet | None:
    if heads is None or isinstance(heads, HeadSet):
        return heads
    tower = as_adapter(model).info().tower()
    return HeadSet.parse(str(heads), n_layers=tower.n_layers, n_heads=tower.n_heads)


def self_sites(trace: Any, tower: str = "text") -> list[Site]:
    sites = [s for s in trace.sites if s.tower == tower and s.kind == "self"]
    if not sites:
        towers = sorted({s.tower for s in trace.sites if s.kind == "self"})
        raise AnalysisError("no self-attention sites captured", expected=f"tower {tower!r}",
                            got=[str(s) for s in trace.sites][:6],
                            fix=f"pass tower= one of {towers} (CLI: --option tower=NAME)" if towers else None)
    return sites


def pad_id_for(suite: PromptSuite, tokenizer: Any) -> int:
    if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    return int(suite.params.get("pad_id") or 0)


def batches(encoded: list[Encoded], batch_size: int, pad: int) -> Iterator[tuple[list[Encoded], dict[str, Tensor]]]:
    if int(batch_size) < 1:
        raise InputError("batch size must be positive", expected=">= 1", got=batch_size)
    for start in range(0, len(encoded), int(batch_size)):
        chunk = encoded[start:start + int(batch_size)]
        ids, mask = pad_ids([e.ids for e in chunk], pad_id=pad)
        yield chunk, {"input_ids": ids, "attention_mask": mask}


def progress_bar(iterable: Any, total: int | None, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, mininterval=0.5)


def fingerprint(suite: PromptSuite, model: ModelLike, **options: Any) -> str:
    """A hash of the suite, the model's name and the options: a partial file is only resumed by the same run."""
    adapter = as_adapter(model)
    blob = json.dumps({"suite": suite.to_dict(), "model": adapter.name or type(adapter.module).__name__,
                       "options": {k: str(v) for k, v in sorted(options.items())}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class PartialLog:
    """Per-sample rows written to ``path`` (parquet) as a run goes, so an interrupted run resumes where it stopped.

    Rows carry a ``sample`` column; ``done`` is the set of samples already there, computed once from the file and
    kept up to date by ``add`` (callers test ``index in log.done`` per sample: rebuilding it from every row each
    time made a resume cost about as much as the run it saved). A file written by a different run (other suite,
    model or options: ``fingerprint``) is refused rather than mixed in.
    """

    def __init__(self, path: "str | Path | None", fingerprint: str, every_s: float = 20.0):
        self.path = Path(path) if path is not None else None
        self.fingerprint, self.every_s = fingerprint, every_s
        self.rows: list[dict] = []
        self._done: set[int] = set()
        self._last = time.monotonic()
        if self.path is not None and self.path.is_file():
            table = ResultTable.load(self.path)
            if table.provenance.get("fingerprint") != fingerprint:
                raise InputError("partial results belong to another run", expected=f"fingerprint {fingerprint}",
                                 got=table.provenance.get("fingerprint"),
                                 fix=f"delete {self.path} (CLI: --restart) or write to another --out")
            self.rows = table.df.to_dict("records")
            self._note(self.rows)

    def _note(self, rows: list[dict]) -> None:
        self._done.update(int(r["sample"]) for r in rows if "sample" in r and pd.notna(r["sample"]))

    @property
    def done(self) -> set[int]:
        """Sample indices already logged (the live set: do not modify it)."""
        return self._done

    def add(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        self._note(rows)
        if self.path is not None and time.monotonic() - self._last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.path is not None and self.rows:
            ResultTable.from_records(self.rows, provenance={"fingerprint": self.fingerprint}).save(self.path)
            self._last = time.monotonic()

    def remove(self) -> None:
        if self.path is not None and self.path.is_file():
            self.path.unlink()


# ---- templates -------------------------------------------------------------------------------------------------


def previous_token_template(ids: Sequence[int], item: PromptItem | None = None) -> Tensor:
    """``P[t, t-1] = 1`` (TransformerLens ``get_previous_token_head_detection_pattern``)."""
    n = len(ids)
    out = torch.zeros(n, n)
    if n > 1:
        out[1:, :-1] = torch.eye(n - 1)
    return out


previous_token_template.positional = True  # depends on positions only: defined on images and latents too


def duplicate_token_template(ids: Sequence[int], item: PromptItem | None = None) -> Tensor:
    """``P[i, j] = 1`` where ``ids[j] == ids[i]`` and ``j < i`` (TransformerLens duplicate-token pattern)."""
    t = torch.as_tensor(list(ids))
    return torch.tril((t[:, None] == t[None, :]).float(), diagonal=-1)


def induction_template(ids: Sequence[int], item: PromptItem | None = None, *, rows: str = "repeat") -> Tensor:
    """``P[i, j] = 1`` where ``ids[j-1] == ids[i]``, ``1 <= j <= i`` (TransformerLens induction pattern).

    rows: ``"repeat"`` keeps only query rows inside the item's ``repeat_span`` (the repeated half) when the suite
    records one; ``"all"`` keeps every row.
    """
    dup = duplicate_token_template(ids)
    out = torch.zeros_like(dup)
    out[:, 1:] = dup[:, :-1]
    out = torch.tril(out)
    span = (item.metadata.get("repeat_span") if item is not None else None) if rows == "repeat" else None
    if span is not None:
        keep = torch.zeros(len(ids), 1)
        keep[int(span[0]):int(span[1])] = 1.0
        out = out * keep
    return out


def load_template(path: "str | Path") -> np.ndarray:
    """A ``[query, key]`` template from a ``.npy`` file (never unpickled); InputError for anything else."""
    path = Path(path).expanduser()
    fix = "save a square float array with numpy.save('t.npy', array)"
    if not path.is_file():
        raise InputError("template file not found", expected="a .npy file", got=str(path), fix=fix)
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError("not a readable .npy template", expected="a numeric .npy array (no pickled objects)",
                         got=f"{path.name} ({type(exc).__name__})", fix=fix) from None
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.number) or \
            not np.isfinite(array).all():
        raise InputError("template must be a finite numeric array", expected="a float [query, key] array",
                         got=f"{getattr(array, 'dtype', type(array).__name__)}", fix=fix)
    return array


def fixed_template(template: Any) -> Template:
    """A ``[query, key]`` array used for every item (cropped to the item's length)."""
    array = torch.as_tensor(np.asarray(template), dtype=torch.float32)
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise InputError("template must be a square [query, key] array", expected="shape (n, n)",
                         got=tuple(array.shape), fix="save a square array, one row and column per token")

    def make(ids: list[int], item: PromptItem | None = None) -> Tensor:
        n = len(ids)
        if n > array.shape[0]:
            raise InputError("template shorter than an item", expected=f">= {n} rows", got=array.shape[0],
                             fix="pass a larger template or a function of the item's ids")
        return array[:n, :n]
    make.positional = True
    return make


# ---- scoring -----------------------------------------------------------------------------------------------------


def template_scores(probs: Float[Tensor, "head query key"], template: Float[Tensor, "query key"], *,
                    normalise: str = "rows", exclude_bos: bool = False, exclude_current_token: bool = False,
                    row_ids: Tensor | None = None) -> Float[Tensor, "head"]:
    """Per head, ``sum(A * P) / sum(A)`` over the rows ``normalise`` selects (see the module docstring).

    ``probs`` holds query rows ``row_ids`` (default: all rows) of one item; ``template`` is the full ``[n, n]``.
    Returns NaN for every head when no row is selected.
    """
    if normalise not in NORMALISE:
        raise InputError("unknown normalisation", expected=NORMALISE, got=normalise)
    n_rows = probs.shape[-2]
    rows = torch.arange(n_rows) if row_ids is None else row_ids.long()
    P = template.float().index_select(0, rows)[:, :probs.shape[-1]]
    A = probs.float().clone()
    if exclude_bos:
        A[..., 0] = 0.0
    if exclude_current_token:
        on_diagonal = rows < A.shape[-1]
        A[:, torch.arange(n_rows)[on_diagonal], rows[on_diagonal]] = 0.0
    if normalise == "rows":
        active = P.sum(-1) > 0
        A, P = A[:, active], P[active]
    denom = A.sum((-1, -2))
    if A.shape[-2] == 0:
        return torch.full((probs.shape[0],), float("nan"))
    return (A * P).sum((-1, -2)) / denom.clamp_min(1e-30)


def _row_selection(templates: list[Tensor], normalise: str) -> tuple[int, int] | None:
    """The smallest row range holding every active template row (None: all rows)."""
    if normalise == "tl":
        return None
    active = [torch.nonzero(t.sum(-1) > 0).flatten() for t in templates]
    active = [a for a in active if len(a)]
    if not active:
        return (0, 1)
    return int(min(a.min() for a in active)), int(max(a.max() for a in active)) + 1


def suite_template_scores(model: ModelLike, suite: "PromptSuite | InputSuite", template: "Template | Any", *,
                          analysis: str = "pattern", normalise: str = "tl", exclude_bos: bool = False,
                          exclude_current_token: bool = False, heads: "HeadSet | str | None" = None,
                          batch_size: int = 8, add_special_tokens: bool = True, progress: bool = True,
                          tower: str | None = None) -> ResultTable:
    """Mean over the suite's items of each head's template score (metric ``score``; ``n_items`` = items with rows).

    template: a function ``(ids, item) -> [n, n]`` tensor, or one fixed ``[query, key]`` array. tower: the
    self-attention tower scored (default ``text``; on an images / latents suite the model's only one).
    """
    make = template if callable(template) else fixed_template(template)
    require_suite_fits(model, suite, analysis)
    if isinstance(suite, InputSuite):
        return input_template_scores(model, suite, make, analysis=analysis, normalise=normalise,
                                     exclude_bos=exclude_bos, exclude_current_token=exclude_current_token,
                                     heads=heads, batch_size=batch_size, tower=tower)
    adapter = as_adapter(model)
    head_set = parse_heads(model, heads)
    encoded = encode_suite(suite, adapter.tokenizer, add_special_tokens)
    sums: dict[tuple[int, int], list[float]] = {}
    provenance: dict = {}
    bar = progress_bar(batches(encoded, batch_size, pad_id_for(suite, adapter.tokenizer)),
                       -(-len(encoded) // int(batch_size)), analysis, progress)
    for chunk, inputs in bar:
        templates = [make(e.ids, e.item) for e in chunk]
        span = _row_selection(templates, normalise)
        rows = None if span is None else f"{span[0]}:{span[1]}"
        trace = capture(adapter, inputs, patterns=True, heads=head_set, rows=rows)
        provenance = dict(trace.provenance)
        for site in self_sites(trace, tower or "text"):
            rec = trace.get(site)
            row_ids = torch.as_tensor(rec.rows())
            for b, (enc, tmpl) in enumerate(zip(chunk, templates)):
                keep = row_ids < len(enc.ids)
                probs = rec.probs[b][:, keep][..., :len(enc.ids)]
                scores = template_scores(probs, tmpl, normalise=normalise, exclude_bos=exclude_bos,
                                         exclude_current_token=exclude_current_token, row_ids=row_ids[keep])
                for h, value in zip(rec.heads(), scores.tolist()):
                    if value == value:  # not NaN: the item has rows for this template
                        sums.setdefault((site.layer, h), []).append(value)
    records = [{"analysis": analysis, "layer": l, "head": h, "metric": "score", "value": float(np.mean(v)),
                "n_items": len(v)} for (l, h), v in sorted(sums.items())]
    if not records:
        raise AnalysisError("no item had a row for this template", expected="items where the head type applies",
                            got=f"{len(suite)} items of suite {suite.name!r}",
                            fix="use a suite with repeats (induction) or another detector")
    provenance.update({"analysis": analysis, "suite": suite.name, "suite_params": suite.params,
                       "normalise": normalise, "exclude_bos": exclude_bos,
                       "exclude_current_token": exclude_current_token, "main_metric": "score"})
    return ResultTable.from_records(records, provenance=provenance)


def attention_sites(trace: Any, tower: str | None = None) -> list[tuple[int, Site]]:
    """(layer, site) of the self-attention of ``tower`` (default: the only self-attention tower, else ``text``;
    AnalysisError naming the towers when there is none of that name); a model without self-attention (an MMDiT such
    as Flux: joint attention only) gives every site, numbered in forward order."""
    towers = sorted({s.tower for s in trace.sites if s.kind == "self"})
    if tower is None and not towers:
        return list(enumerate(trace.sites))
    chosen = tower or (towers[0] if len(towers) == 1 else "text")
    return [(site.layer, site) for site in self_sites(trace, chosen)]


def input_template_scores(model: ModelLike, suite: InputSuite, make: Template, *, analysis: str, normalise: str,
                          exclude_bos: bool, exclude_current_token: bool, heads: "HeadSet | str | None",
                          batch_size: int, tower: str | None) -> ResultTable:
    """Template scores over an images / latents suite: positional templates only, on the sequence the model's
    attention sees (a ViT: ``[CLS]`` then patches in raster order, so ``t - 1`` is the patch to the left; Flux:
    text tokens then image tokens)."""
    if not getattr(make, "positional", False):
        raise InputError(f"{analysis} compares token ids, which a suite of {suite.kind} does not have",
                         expected="a positional template (prev-token, or pattern with a fixed array)",
                         got=f"{analysis} on {suite.name}", fix="run prev-token, head-stats, importance or the "
                         "ablation sweep on images and latents; token-identity detectors need a token suite")
    head_set = parse_heads(model, heads)
    sums: dict[tuple[int, int], list[float]] = {}
    provenance: dict = {}
    for batch in suite.batches(batch_size):
        trace = capture(model, batch.inputs, patterns=True, heads=head_set)
        provenance = dict(trace.provenance)
        for layer, site in attention_sites(trace, tower):
            rec = trace.get(site)
            template = make(list(range(rec.probs.shape[-1])), None)
            for probs in rec.probs:
                scores = template_scores(probs, template, normalise=normalise, exclude_bos=exclude_bos,
                                         exclude_current_token=exclude_current_token)
                for h, value in zip(rec.heads(), scores.tolist()):
                    sums.setdefault((layer, h), []).append(value)
    records = [{"analysis": analysis, "layer": l, "head": h, "metric": "score", "value": float(np.mean(v)),
                "n_items": len(v)} for (l, h), v in sorted(sums.items())]
    provenance.update({"analysis": analysis, "suite": suite.name, "suite_params": suite.params,
                       "normalise": normalise, "exclude_bos": exclude_bos,
                       "exclude_current_token": exclude_current_token, "main_metric": "score"})
    return ResultTable.from_records(records, provenance=provenance)


# ---- registered detectors ----------------------------------------------------------------------------------------


@register_analysis("prev-token", description="previous-token score per head: attention mass on t-1, over a suite")
def previous_token_scores(model: ModelLike, suite: PromptSuite, *, normalise: str = "rows", exclude_bos: bool = False,
                          exclude_current_token: bool = False, **options: Any) -> ResultTable:
    """Previous-token heads (template ``P[t, t-1]``)."""
    return suite_template_scores(model, suite, previous_token_template, analysis="prev-token", normalise=normalise,
                                 exclude_bos=exclude_bos, exclude_current_token=exclude_current_token, **options)


@register_analysis("duplicate", description="duplicate-token score per head: mass on earlier copies of the token")
def duplicate_token_scores(model: ModelLike, suite: PromptSuite, *, normalise: str = "rows", exclude_bos: bool = False,
                           exclude_current_token: bool = False, **options: Any) -> ResultTable:
    """Duplicate-token heads (template ``P[i, j] = [ids[j] == ids[i]], j < i``)."""
    return suite_template_scores(model, suite, duplicate_token_template, analysis="duplicate", normalise=normalise,
                                 exclude_bos=exclude_bos, exclude_current_token=exclude_current_token, **options)


@register_analysis("induction", description="induction score per head: from a repeated token to the token after "
                   "its first occurrence, on the repeated half")
def induction_scores(model: ModelLike, suite: PromptSuite, *, normalise: str = "rows", rows: str = "repeat",
                     exclude_bos: bool = False, exclude_current_token: bool = False, **options: Any) -> ResultTable:
    """Induction heads (template ``P[i, j] = [ids[j-1] == ids[i]]``; ``rows="repeat"``: repeated half only)."""
    if rows not in ("repeat", "all"):
        raise InputError("unknown induction rows", expected="'repeat' or 'all'", got=rows)

    def template(ids: list[int], item: PromptItem | None) -> Tensor:
        return induction_template(ids, item, rows=rows)
    return suite_template_scores(model, suite, template, analysis="induction", normalise=normalise,
                                 exclude_bos=exclude_bos, exclude_current_token=exclude_current_token, **options)


@register_analysis("pattern", description="score per head for a user template [query, key] (TransformerLens "
                   "detect_head 'mul' normalisation)")
def pattern_scores(model: ModelLike, suite: PromptSuite, *, template: Any = None, normalise: str = "tl",
                   exclude_bos: bool = False, exclude_current_token: bool = False, **options: Any) -> ResultTable:
    """A user template: a function ``(ids, item) -> [n, n]`` or an array (``.npy`` path from the CLI)."""
    if template is None:
        raise InputError("the pattern analysis needs a template", expected="a function or a [query, key] array",
                         got="no template", fix="pass template=... (CLI: --template FILE.npy)")
    if isinstance(template, (str, Path)):
        template = load_template(template)
    return suite_template_scores(model, suite, template, analysis="pattern", normalise=normalise,
                                 exclude_bos=exclude_bos, exclude_current_token=exclude_current_token, **options)
