"""Analyses registered by name, so the CLI (``attnscope score NAME``), notebooks and the dashboard list the same set.

An analysis is a plain function returning a ``ResultTable``. Its registration says what it takes
(``model`` + ``suite``, or a ``trace``) and a one-line description.

Example:
    >>> from attnscope.circuits.registry import register_analysis, get_analysis, list_analyses
    >>> @register_analysis("example-constant", takes="trace", description="a constant score, for the docs")
    ... def constant(trace, **options):
    ...     from attnscope.results import ResultTable
    ...     return ResultTable.from_records([])
    >>> get_analysis("example-constant").takes
    'trace'
"""

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import AnalysisError


@dataclass(frozen=True)
class Analysis:
    name: str
    fn: Callable
    takes: str  # "model" (model + suite) or "trace"
    description: str


_ANALYSES: dict[str, Analysis] = {}


def register_analysis(name: str, *, takes: str = "model", description: str = "") -> Callable[[Callable], Callable]:
    """Decorator registering ``fn`` under ``name``."""
    if takes not in ("model", "trace"):
        raise AnalysisError("bad analysis registration", expected="takes='model' or 'trace'", got=takes)

    def decorate(fn: Callable) -> Callable:
        summary = (fn.__doc__ or "").strip().splitlines()
        _ANALYSES[name] = Analysis(name, fn, takes, description or (summary[0] if summary else name))
        return fn
    return decorate


def list_analyses() -> list[Analysis]:
    """Every registered analysis by name (``attnscope.circuits`` registers the built-in ones on import: any
    import of a circuits module runs the package's ``__init__`` first)."""
    return sorted(_ANALYSES.values(), key=lambda a: a.name)


def get_analysis(name: str) -> Analysis:
    if name not in _ANALYSES:
        raise AnalysisError("unknown analysis", expected=sorted(_ANALYSES), got=name,
                            fix="see `attnscope score --help` for the list")
    return _ANALYSES[name]
