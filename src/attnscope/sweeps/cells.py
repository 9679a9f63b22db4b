"""Running one cell: load the model (cached per worker process), build the suite, apply the intervention, run the
analysis, return its table. Pure Python: the Ray task in ``runner`` calls ``run_cell``, and so does the plain loop
the benchmark compares against.

Seeds: ``random``, ``numpy`` and ``torch`` are seeded with the cell's seed before the analysis runs, so a cell
gives the same table whichever worker runs it and however often it is retried.
"""

import inspect
import os
import platform
import random
import socket
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from ..errors import AnalysisError
from .spec import Cell, ModelEntry, load_imports

_MODEL_CACHE: dict[str, Any] = {}  # one model per worker process: consecutive cells on it skip the load


def versions() -> dict[str, str]:
    import transformers

    import attnscope

    out = {"attnscope": attnscope.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version()}
    for name in ("ray", "nnsight", "accelerate"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def load_model(entry: ModelEntry, cache: bool = True) -> Any:
    """``attnscope.load`` with the entry's loading options (device map, max memory, offload folder ...)."""
    import json

    from ..probes.device_map import parse_max_memory
    from ..probes.loading import load

    key = json.dumps(entry.identity(), sort_keys=True, default=str)
    if cache and key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    kwargs = dict(entry.load)
    if "max_memory" in kwargs:
        kwargs["max_memory"] = parse_max_memory(kwargs["max_memory"])
    if "dtype" in kwargs:
        kwargs["dtype"] = getattr(torch, kwargs["dtype"].removeprefix("torch."))
    model = load(entry.source, **kwargs)
    if cache:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = model
    return model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _suite_ids(suite: Any, tokenizer: Any) -> list[list[int]]:
    return [suite._item_ids(item, tokenizer, "clean") for item in suite.items]


def build_plan(cell: Cell, model: Any, suite: Any) -> Any:
    """The cell's ``InterventionPlan`` (or None); mean/resample references are the suite's prompts."""
    from ..probes.heads import HeadSet
    from ..probes.interventions import InterventionPlan, mean_plan, resample_plan

    entry = cell.intervention
    if entry.is_none:
        return None
    tower = model.info().tower()
    heads = HeadSet.parse(entry.heads, n_layers=tower.n_layers, n_heads=tower.n_kv_heads
                          if entry.options.get("select") == "kv" else tower.n_heads)
    select = entry.options.get("select", "query")
    if entry.mode == "mean" and entry.options.get("mean_values") is None:
        return mean_plan(model.module, heads, _suite_ids(suite, model.tokenizer), select=select,
                         per_position=bool(entry.options.get("per_position", False)))
    if entry.mode == "resample":
        return resample_plan(heads, _suite_ids(suite, model.tokenizer), seed=int(entry.options.get("seed", 0)),
                             select=select)
    return InterventionPlan(heads, entry.mode, scale=entry.options.get("scale"), select=select,
                            mean_values=entry.options.get("mean_values"),
                            per_position=bool(entry.options.get("per_position", False)),
                            seed=int(entry.options.get("seed", 0)))


def _call(analysis: Any, model: Any, suite: Any, options: dict[str, Any]) -> Any:
    params = inspect.signature(analysis.fn).parameters
    options = dict(options)
    if "progress" in params and "progress" not in options:
        options["progress"] = False  # workers: no progress bars in the driver's log
    if analysis.takes == "trace":
        from ..probes.capture import capture

        batch = next(suite.batches(len(suite), tokenizer=model.tokenizer))
        capture_options = options.pop("capture", {}) or {}
        return analysis.fn(capture(model, batch.inputs, **capture_options), **options)
    return analysis.fn(model, suite, **options)


def run_cell(cell_data: dict[str, Any], imports: list[str] | None = None, cache: bool = True) -> dict[str, Any]:
    """Run one cell (given as ``Cell.to_dict()``); returns ``{"df", "provenance", "seconds", "worker"}``."""
    from ..circuits.registry import get_analysis
    from ..results import ResultTable
    from . import analyses as _builtin  # noqa: F401  (registers head-stats)

    start = time.perf_counter()
    load_imports(list(imports or []))
    cell = Cell.from_dict(cell_data)
    analysis = get_analysis(cell.analysis.name)
    model = load_model(cell.model, cache=cache)
    suite = cell.suite.build(model.tokenizer)
    seed_everything(cell.seed)
    plan = build_plan(cell, model, suite)
    options = dict(cell.analysis.options)
    context = nullcontext()
    if cell.remote:
        options.update(remote=cell.remote, plan=plan)
    elif plan is not None:
        from ..probes.interventions import apply_plan

        context = apply_plan(model, plan)
    with context:
        table = _call(analysis, model, suite, options)
    if not isinstance(table, ResultTable):
        raise AnalysisError("analysis did not return a ResultTable", expected="ResultTable", got=type(table).__name__,
                            fix=f"make {cell.analysis.name!r} return attnscope.ResultTable")
    from ..probes.device_map import placement

    provenance = {"analysis": _jsonable(table.provenance), "plan": plan.to_dict() if plan is not None else None,
                  "placement": placement(model), "versions": versions()}
    return {"df": table.df, "provenance": provenance, "seconds": time.perf_counter() - start,
            "worker": {"host": socket.gethostname(), "pid": os.getpid()}}


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


__all__ = ["build_plan", "load_model", "run_cell", "seed_everything", "versions"]
