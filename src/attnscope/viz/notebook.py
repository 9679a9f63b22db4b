"""``AttentionTrace.show`` and ``ResultTable.show``: pick the right figure for a trace or a table, for notebooks.

Both return a plotly ``Figure``; as the last expression of a Jupyter cell it renders inline. The classes get the
methods with one line each (``def show(self, **kw): from .viz.notebook import show_table; return show_table(self,
**kw)``); until then call the functions directly.

Example:
    >>> import torch
    >>> from attnscope.probes.site import Site
    >>> from attnscope.probes.trace import AttentionTrace, SiteRecord
    >>> from attnscope.viz.notebook import show_trace
    >>> rec = SiteRecord(site=Site("text", 0), probs=torch.full((1, 2, 3, 3), 1 / 3), n_query=3, n_key=3)
    >>> show_trace(AttentionTrace([rec]), view="heads").data[0].z.shape
    (1, 2)
"""

from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch

from ..errors import InputError
from ..probes.site import Site
from ..probes.trace import AttentionTrace
from ..results import ResultTable
from .attribution import token_attribution
from .curves import PROFILE_X, PRUNING_X, context_profile, pruning_curves
from .head_lines import head_view
from .head_thumbnails import model_view
from .heads import head_grid
from .images import image_overlay
from .long_sequence import block_pattern, long_sequence_view
from .pattern import attention_pattern

TRACE_VIEWS = ("pattern", "heads", "image", "model_view", "head_view", "long")
TABLE_VIEWS = ("heads", "attribution", "pruning", "profile")


def trace_head_table(trace: AttentionTrace, metric: str = "entropy", tower: str = "text",
                     kind: str = "self") -> ResultTable:
    """A per-head table computed from a trace: ``entropy`` (mean over queries, nats) or ``sink`` (mass on key 0)."""
    if metric not in ("entropy", "sink"):
        raise InputError("unknown trace metric", expected="'entropy' or 'sink'", got=metric)
    sites = [s for s in trace.sites if s.tower == tower and s.kind == kind]
    if not sites:
        raise InputError("no sites of this tower and kind", expected=trace.towers(), got=f"{tower}/{kind}")
    records = []
    for site in sites:
        for step in trace.steps(site)[:1]:
            rec = trace.get(site, step)
            if metric == "entropy" and "entropy" in rec.stats:
                per_head = rec.stats["entropy"].float().mean(dim=(0, 2))
            elif rec.probs is not None:
                p = rec.probs.float()
                per_head = (-(p * torch.log(p.clamp_min(1e-30))).sum(-1)).mean(dim=(0, 2)) if metric == "entropy" \
                    else p[..., 0].mean(dim=(0, 2))
            else:
                raise InputError("trace site holds neither patterns nor this statistic", expected=metric,
                                 got=sorted(rec.stats))
            records += [{"analysis": "trace", "layer": site.layer, "head": h, "metric": metric, "value": float(v)}
                        for h, v in zip(rec.heads(), per_head.tolist())]
    return ResultTable.from_records(records, provenance=dict(trace.provenance))


def _default_trace_view(trace: AttentionTrace) -> str:
    if any(r.probs is None for r in trace.records.values()):
        return "heads"
    if any("grid" in r.meta or r.site.kind == "cross" for r in trace.records.values()):
        return "image"
    return "pattern"


def show_trace(trace: AttentionTrace, view: str | None = None, layer: int = 0, heads: Any = None,
               **options: Any) -> go.Figure:
    """A figure of ``trace``: ``pattern`` (``attention_pattern``), ``heads`` (entropy or sink grid), ``image``,
    ``model_view`` (every layer x head as thumbnails), ``head_view`` (token-to-token lines of ``layer``'s heads) or
    ``long`` (block means of one head's pattern with arcs of its strongest links: ``long_trace_view``).

    ``view`` defaults to ``image`` for latent/cross-attention traces, ``heads`` for statistics-only traces, else
    ``pattern``. ``options`` go to the figure function (``batch``, ``tower``, ``kind``, ``mode``, ``metric`` ...).
    """
    view = view or _default_trace_view(trace)
    if view not in TRACE_VIEWS:
        raise InputError("unknown trace view", expected=TRACE_VIEWS, got=view)
    if view == "model_view":
        return model_view(trace, **options)
    if view == "head_view":
        return head_view(trace, layer, heads, **options)
    if view == "long":
        return long_trace_view(trace, layer, heads, **options)
    if view == "heads":
        metric = options.pop("metric", "entropy")
        table = trace_head_table(trace, metric, options.pop("tower", "text"), options.pop("kind", "self"))
        return head_grid(table, metric, **options)
    if view == "image":
        if "tower" not in options:
            site = next((s for s in trace.sites if s.kind == "cross"), trace.sites[0])
            options.update(tower=site.tower, kind=options.get("kind", site.kind))
        return image_overlay(trace, layer, heads, **options)
    if "tower" not in options and "text" not in trace.towers():
        options["tower"] = trace.towers()[0]
    return attention_pattern(trace, layer, heads, **options)


def long_trace_view(trace: AttentionTrace, layer: int = 0, head: Any = None, *, tower: str | None = None,
                    kind: str = "self", batch: int = 0, how: str = "mean", max_cells: int = 512,
                    step: int | None = None) -> go.Figure:
    """The long-sequence view of a captured pattern: ``how`` (``mean``/``max``) of blocks of ``head`` (default 0)
    at ``layer``, at most ``max_cells`` blocks a side, with arcs of the strongest links (``block_pattern``).
    For inputs too long to capture in full, ``block_pattern`` takes ``collect_layer_inputs`` instead."""
    tower = tower or ("text" if "text" in trace.towers() else trace.towers()[0])
    record = trace.get(Site(tower, int(layer), kind), step)
    if record.probs is None:
        raise InputError("the long view needs a full pattern", expected="a capture with patterns",
                         got="statistics only", fix="capture with patterns, or use collect_layer_inputs")
    head = 0 if head is None else int(head)
    if head not in record.heads():
        raise InputError("head not in this record", expected=record.heads(), got=head, fix="pick a captured head")
    matrix = record.probs[batch, record.heads().index(head)].float()
    return long_sequence_view(block_pattern(matrix, how=how, max_cells=max_cells))


def _default_table_view(table: ResultTable) -> str:
    columns = set(table.df.columns)
    if {"token", "token_index"} <= columns:
        return "attribution"
    if columns & set(PRUNING_X):
        return "pruning"
    if columns & set(PROFILE_X):
        return "profile"
    return "heads"


def show_table(table: ResultTable, view: str | None = None, metric: str | None = None, **options: Any) -> go.Figure:
    """A figure of ``table``: ``attribution`` (token, token_index columns), ``pruning`` (a fraction column),
    ``profile`` (a context-length column) or ``heads`` (the head grid), chosen from the columns unless given."""
    view = view or _default_table_view(table)
    if view not in TABLE_VIEWS:
        raise InputError("unknown table view", expected=TABLE_VIEWS, got=view)
    if view == "attribution":
        return token_attribution(table, metric=metric, **options)
    if view == "pruning":
        return pruning_curves(table, metric, **options)
    if view == "profile":
        return context_profile(table, metric, **options)
    return head_grid(table, metric, **options)


def figure_size(fig: go.Figure) -> int:
    """Number of values a figure sends to the browser (array cells of all traces), for budgets and tests."""
    total = 0
    for trace in fig.data:
        for name in ("z", "x", "y", "customdata", "text"):
            value = getattr(trace, name, None)
            if value is not None:
                total += int(np.asarray(value, dtype=object).size)
    return total


__all__ = ["figure_size", "long_trace_view", "show_table", "show_trace", "trace_head_table"]
