"""``score``: resolve an analysis, a model and a suite by name, run the analysis and write its table.

What ``attnscope score`` runs (the CLI only parses its flags into a ``ScoreRequest``); notebooks can call it too.
The output path is checked before any work; analyses that take ``partial`` (retrieval) save per-sample rows to
``OUT.partial.parquet`` as they go and a rerun resumes from it (``restart=True`` discards it).

Example:
    >>> import tempfile, pathlib
    >>> from attnscope.tasks.scoring import ScoreRequest, score
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "sinks.parquet"
    >>> table = score(ScoreRequest("sinks", "minilm", "sentences", out=out, n_items=2, offered={"progress": False}))
    >>> out.is_file(), table.provenance["model"], table.provenance["suite"]
    (True, 'minilm', 'sentences')
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._atomic import check_output
from ..circuits.registry import get_analysis
from ..datasets.shapes import COLORS, SHAPES
from ..results import ResultTable
from .analyses import run_analysis
from .models import load_ref
from .references import ModelRef, SuiteRef
from .suites import build_suite


@dataclass(frozen=True)
class ScoreRequest:
    """One ``score`` run. ``options``: what the user asked the analysis for (each must be taken); ``offered``:
    front-end settings passed only to analyses that take them (heads, batch_size, progress, threshold ...)."""

    analysis: str
    model: ModelRef
    suite: SuiteRef
    out: "Path | str | None" = None
    options: dict[str, Any] = field(default_factory=dict)
    offered: dict[str, Any] = field(default_factory=dict)
    n_items: int | None = None
    seed: int | None = None
    suite_params: dict[str, Any] = field(default_factory=dict)
    restart: bool = False

    def __post_init__(self) -> None:  # references given as strings (Python callers) are parsed here, once
        if isinstance(self.model, str):
            object.__setattr__(self, "model", ModelRef.parse(self.model))
        if isinstance(self.suite, str):
            object.__setattr__(self, "suite", SuiteRef.parse(self.suite))


def score(request: ScoreRequest) -> ResultTable:
    """Run ``request`` and return its table (written to ``request.out`` when given, atomically)."""
    out = check_output(request.out) if request.out is not None else None
    analysis = get_analysis(request.analysis)
    model = load_ref(request.model)
    suite = build_suite(request.suite, model, n_items=request.n_items, seed=request.seed, **request.suite_params)
    offered = dict(request.offered)
    if request.suite.name == "shapes" and offered.get("concept_words") is None:
        offered["concept_words"] = {w: [w] for w in (*COLORS, *SHAPES)}
    partial = out.with_name(out.stem + ".partial.parquet") if out is not None else None
    if partial is not None:
        if request.restart and partial.is_file():
            partial.unlink()
        offered["partial"] = partial
    table = run_analysis(analysis, model, suite, request.options, offered=offered)
    table.provenance.setdefault("model", str(request.model))
    table.provenance.setdefault("suite", suite.name)
    if out is not None:
        table.save(out)
        if partial.is_file():
            partial.unlink()
    return table
