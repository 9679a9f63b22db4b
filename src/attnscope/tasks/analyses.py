"""Run a registered analysis on a model and a suite: bind its options, capture for trace analyses, check the result.

The CLI (``attnscope score``), sweep cells and the dashboard all run analyses through ``run_analysis``, so they
share one capture default (full patterns of the suite as one batch) and one rule for options:

- options an analysis names in its signature are passed; ``**options`` analyses take the rest;
- ``offered`` options (what a front end has at hand: ``heads``, ``batch_size``, ``progress`` ...) are passed only
  to analyses that take them (by name, or through a model analysis' ``**options``; ``partial`` only by name); ``options`` the user asked for must be taken, else ``AnalysisError`` names the
  accepted ones. An error raised inside the analysis is never rewritten.

Example:
    >>> import attnscope, transformers
    >>> from attnscope.tasks.analyses import get_analysis, run_analysis
    >>> from attnscope.datasets import induction
    >>> cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=32)
    >>> model = attnscope.load(transformers.GPT2LMHeadModel(cfg).eval())
    >>> table = run_analysis(get_analysis("head-stats"), model, induction(2, seq_len=12, vocab_size=32), {"batch_size": 2})
    >>> sorted(table.df.metric.unique())
    ['entropy', 'sink_mass']
"""

import inspect
import random
from typing import Any

import numpy as np
import torch

from ..circuits.registry import Analysis, get_analysis, list_analyses  # noqa: F401 (re-exported)
from ..errors import AnalysisError
from ..probes.adapter import ModelAdapter
from ..probes.capturing import capture
from ..results import ResultTable
from .._progress import stage

TRACE_CAPTURE = {"patterns": True}
NAMED_ONLY = ("partial",)  # offered only to analyses that name it (a resume file is not an option to pass along)  # how a trace analysis sees the suite, unless the caller says otherwise


def bind_options(analysis: Analysis, options: dict[str, Any], offered: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``analysis.fn``: every one of ``options`` (refused when not taken) plus those of
    ``offered`` it takes (``None`` values dropped)."""
    params = inspect.signature(analysis.fn).parameters
    named = {name for name, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    inputs = {"model", "suite", "trace"} & set(list(params)[:2])
    unknown = sorted(k for k in options if (k not in named and not var_kw) or k in inputs)
    if unknown:
        raise AnalysisError(f"{analysis.name} does not take {', '.join(unknown)}",
                            expected=sorted(named - inputs) + (["any (**options)"] if var_kw else []), got=unknown,
                            fix="`attnscope score --help` and the analysis' docstring list its options")
    chosen = {k: v for k, v in (offered or {}).items() if v is not None and k not in inputs
              and (k in named or (var_kw and analysis.takes == "model" and k not in NAMED_ONLY))}
    kwargs = {**chosen, **options}
    missing = [name for name, p in list(params.items())[2 if analysis.takes == "model" else 1:]
               if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in kwargs]
    if missing:
        raise AnalysisError(f"{analysis.name} needs {', '.join(missing)}", expected=missing, got=sorted(kwargs),
                            fix="give it with --option KEY=VALUE (or the matching flag, e.g. --concepts)")
    return kwargs


def seed_everything(seed: int) -> None:
    """Seed ``random``, ``numpy`` and ``torch`` with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_analysis(analysis: Analysis, model: ModelAdapter, suite: Any, options: dict[str, Any] | None = None,
                 *, offered: dict[str, Any] | None = None, capture_options: dict[str, Any] | None = None,
                 seed: int | None = None) -> ResultTable:
    """``analysis`` (a registered ``Analysis``: ``get_analysis(name)``) on ``model`` and ``suite``; returns its
    ``ResultTable``.

    Trace analyses get one capture of the whole suite as a batch (``capture_options``, default full patterns).
    ``seed``: seed ``random``, ``numpy`` and ``torch`` first, so the table does not depend on what ran before."""
    kwargs = bind_options(analysis, dict(options or {}), offered)
    stage(f"running {analysis.name} on {getattr(suite, 'name', 'the suite')}")
    if seed is not None:
        seed_everything(seed)
    if analysis.takes == "trace":
        batch = next(suite.batches(len(suite), tokenizer=model.tokenizer))
        table = analysis.fn(capture(model, batch.inputs, **(capture_options or TRACE_CAPTURE)), **kwargs)
    else:
        table = analysis.fn(model, suite, **kwargs)
    if not isinstance(table, ResultTable):
        raise AnalysisError("analysis did not return a ResultTable", expected="ResultTable", got=type(table).__name__,
                            fix=f"make {analysis.name!r} return attnscope.ResultTable")
    return table
