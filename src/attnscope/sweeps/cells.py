"""Running one cell: load the model (cached per worker process), build the suite, apply the intervention, run the
analysis, return its table. Pure Python: the Ray task in ``runner`` calls ``run_cell``, and so does the plain loop
the benchmark compares against. Everything by name goes through ``attnscope.tasks``.

Seeds: ``random``, ``numpy`` and ``torch`` are seeded with the cell's seed before the analysis runs, so a cell
gives the same table whichever worker runs it and however often it is retried.
"""

import json
import os
import socket
import time
from contextlib import nullcontext
from typing import Any

from .._version import library_versions
from ..probes.device_map import placement
from ..probes.interventions import apply_plan
from ..tasks.analyses import get_analysis, run_analysis
from ..tasks.models import load_ref
from ..tasks.plans import build_plan
from ..tasks.references import ModelRef
from ..tasks.suites import build_suite
from .spec import Cell, load_imports


def run_cell(cell_data: dict[str, Any], imports: list[str] | None = None, cache: bool = True) -> dict[str, Any]:
    """Run one cell (given as ``Cell.to_dict()``); returns ``{"df", "provenance", "seconds", "worker"}``."""
    start = time.perf_counter()
    load_imports(list(imports or []))
    cell = Cell.from_dict(cell_data)
    model = load_ref(ModelRef.parse(cell.model.source), cache=cache, **cell.model.load_options())
    analysis = get_analysis(cell.analysis.name)
    suite = build_suite(cell.suite.ref, model)
    entry = cell.intervention
    plan = None if entry.is_none else build_plan(entry.heads, entry.mode, entry.options, model, suite)
    options = dict(cell.analysis.options)
    capture_options = options.pop("capture", None) or None
    context = nullcontext()
    if cell.remote:
        options.update(remote=cell.remote, plan=plan)
    elif plan is not None:
        context = apply_plan(model, plan)
    with context:  # workers: no progress bars in the driver's log
        table = run_analysis(analysis, model, suite, options, offered={"progress": False},
                             capture_options=capture_options, seed=cell.seed)
    provenance = {"analysis": _jsonable(table.provenance), "plan": plan.to_dict() if plan is not None else None,
                  "placement": placement(model), "versions": library_versions()}
    return {"df": table.df, "provenance": provenance, "seconds": time.perf_counter() - start,
            "worker": {"host": socket.gethostname(), "pid": os.getpid()}}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


__all__ = ["run_cell"]
