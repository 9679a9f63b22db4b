"""The coverage matrix: which architectures attnscope captures, validates and edits correctly, checked on tiny
random-init models against references written without attnscope code.

``ARCHITECTURES`` maps a name to ``(kind, builder)``; ``check_architecture(name)`` runs every check and returns
one cell per column (``pass``, ``fail: <reason>`` or ``unsupported: <reason>``); ``python -m
attnscope.probes.coverage --write`` regenerates ``attnscope/probes/coverage.json`` and ``docs/architectures.md``;
``row_for_model(model)`` finds a model's row (by class name, then ``config.model_type``).

Columns: ``capture`` (every site recorded), ``patterns`` (probabilities equal the model's own eager weights, else
the adapter's reference, atol 1e-5), ``validate`` (``attnscope.probes.fidelity`` is ok), ``statistics``
(streaming entropy / mass / top-k equal ``statistics_from_probs`` of the reference), ``outputs`` (bit-identical
with and without capture, attention implementation unchanged), and ``zero``, ``rescale``, ``mean``,
``resample``, ``uniform`` (``apply_plan`` equals an independent reference edit, see ``reference_edits``).

Example:
    >>> from attnscope.probes.coverage import ARCHITECTURES, COLUMNS
    >>> ARCHITECTURES["gpt2"].kind, COLUMNS[:2]
    ('text-decoder', ('capture', 'patterns'))
"""

import contextlib
import json
from collections.abc import Iterator
from importlib import resources
from typing import Any

import torch

from ..adapter import ModelLike, module_of
from .catalogue import ARCHITECTURES, KINDS, Architecture, inputs_for
from .checks import CAPTURE_CHECKS, Subject
from .intervention_checks import INTERVENTION_MODES, check_mode
from .outcome import PASS, cell_of

COLUMNS = tuple(CAPTURE_CHECKS) + INTERVENTION_MODES
FORMAT = "attnscope.coverage/1"
RESULTS = "coverage.json"


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Checks run single-threaded: bit-level results must not depend on how many cores are free."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _class_name(model: ModelLike) -> str:
    return f"{type(model).__module__.split('.')[0]}.{type(model).__name__}"


def check_row(name: str) -> dict[str, Any]:
    """The full row of ``name``: kind, class, model type, which reference the patterns were compared with, and
    the cells of every column."""
    kind, builder = ARCHITECTURES[name]
    with _one_thread():
        model = builder()
        subject = Subject(name, model, inputs_for(name, model))
        cells = {column: cell_of(lambda c=check: c(subject)) for column, check in CAPTURE_CHECKS.items()}
        cells.update({mode: cell_of(lambda m=mode: check_mode(subject, m)) for mode in INTERVENTION_MODES})
    config = getattr(model, "config", None)
    return {"kind": kind, "class": _class_name(model), "model_type": str(getattr(config, "model_type", "") or ""),
            "patterns_reference": subject.reference_source or "none", "columns": cells}


def check_architecture(name: str) -> dict[str, str]:
    """Run every check on architecture ``name``: column -> ``pass`` / ``fail: ...`` / ``unsupported: ...``."""
    return check_row(name)["columns"]


def load_matrix() -> dict[str, Any]:
    """The shipped results (``attnscope/probes/coverage.json``)."""
    text = resources.files("attnscope.probes").joinpath(RESULTS).read_text(encoding="utf-8")
    return json.loads(text)


def row_for_model(model: ModelLike) -> tuple[str, dict[str, Any]] | None:
    """``(name, row)`` of the model's architecture in the shipped matrix, by class name, then by
    ``config.model_type``; a diffusers pipeline is looked up by its denoiser. None when it is not there."""
    model = module_of(model)
    model = getattr(model, "transformer", None) or getattr(model, "unet", None) or model \
        if hasattr(model, "components") else model
    rows = load_matrix()["architectures"]
    cls = type(model).__name__
    for name, row in rows.items():
        if row["class"].rsplit(".", 1)[-1] == cls:
            return name, row
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for name, row in rows.items():
        if model_type and row["model_type"] == model_type:
            return name, row
    return None


def summary_line(model: ModelLike) -> str:
    """One line for ``attnscope info``: the coverage cells of the model's architecture."""
    found = row_for_model(model)
    if found is None:
        return "coverage: not in the coverage matrix (docs/architectures.md)"
    name, row = found
    cells = ", ".join(f"{column} {row['columns'][column].split(':', 1)[0]}" for column in COLUMNS)
    return f"coverage ({name}, {row['kind']}): {cells}"


__all__ = ["ARCHITECTURES", "COLUMNS", "KINDS", "PASS", "Architecture", "check_architecture", "check_row",
           "inputs_for", "load_matrix", "row_for_model", "summary_line"]
