"""The spec labels of ``attnscope sweep`` cells (``cell=<id>/part.parquet``), read from the parquet footer only and
cached. Light (no torch, no pandas: pyarrow is imported when a footer is read), so the results browser that
``attnscope --help`` imports can name sweep cells at module level.

Example:
    >>> from pathlib import Path
    >>> from attnscope.dashboards.sweep_cells import SweepCell, sweep_cell
    >>> SweepCell("ab12", {"model": "minilm", "suite": "sentences", "analysis": "sinks"}).label
    'minilm · sentences · sinks'
    >>> sweep_cell(Path("results/not-a-cell.parquet")) is None
    True
"""

import json
from dataclasses import dataclass
from pathlib import Path

from .file_cache import LRU, stamp

SWEEP_PART = "part.parquet"  # attnscope.sweeps.store.PART (not imported: the store pulls in the sweep spec)
CELL_AXES = ("model", "suite", "analysis", "intervention")
_CELLS = LRU(4096)


@dataclass(frozen=True)
class SweepCell:
    """A cell of an ``attnscope sweep`` folder (``cell=<id>/part.parquet``): its id and its spec labels."""

    id: str
    labels: dict[str, str]
    seed: int | None = None

    @property
    def label(self) -> str:
        """The readable name, e.g. ``minilm · sentences · sinks · zero:L1H*`` (the spec entries' labels)."""
        return " · ".join(self.labels[axis] for axis in CELL_AXES if self.labels.get(axis))


def _read_sweep_cell(path: Path) -> SweepCell | None:
    import pyarrow.parquet as pq

    try:
        meta = json.loads((pq.read_schema(path).metadata or {}).get(b"attnscope", b"{}"))
        cell = meta["provenance"]["cell"]
        labels = {axis: str(cell["labels"][axis]) for axis in CELL_AXES if cell["labels"].get(axis) is not None}
        seed = cell.get("seed")
        return SweepCell(str(cell.get("id") or path.parent.name.removeprefix("cell=")), labels,
                         int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else None)
    except Exception:  # noqa: BLE001 - a cell without readable labels is listed by its folder name
        return None


def sweep_cell(path: Path) -> SweepCell | None:
    """The labels of a sweep cell's ``part.parquet`` (only its footer is read; cached), None for any other file
    or a cell whose metadata cannot be read."""
    if path.name != SWEEP_PART or not path.parent.name.startswith("cell="):
        return None
    try:
        key = stamp(path)
    except OSError:
        return None
    return _CELLS.get(key, lambda: _read_sweep_cell(path))


__all__ = ["CELL_AXES", "SWEEP_PART", "SweepCell", "sweep_cell"]
