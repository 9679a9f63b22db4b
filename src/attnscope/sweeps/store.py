"""The on-disk sweep: a partitioned parquet dataset with one folder per cell.

::

    OUT/_sweep.json                 the spec and the list of cells (rewritten by every run)
    OUT/cell=<id>/part.parquet      the cell's table + provenance (written atomically)
    OUT/cell=<id>/_error.json       the last failure of a cell that has no result yet
    OUT/cell=<id>/.lock             held (``fcntl.flock``) by the driver running the cell

Concurrent drivers on one folder share the work: a driver runs a cell only while it holds the cell's lock
(``claim``), so no cell runs twice; a lock dies with its process (``kill -9`` included), so nothing stays claimed.
Temporaries of a cell are deleted only by the driver holding its lock (another driver may be writing them).

A result is written to a hidden temporary file in the cell's folder and renamed over ``part.parquet`` with
``os.replace`` (atomic on POSIX and Windows), after an ``fsync``: a reader sees the whole file or none, never a
half-written one; a crash leaves at most a ``.part.parquet.*.tmp`` that nothing reads (and the next run deletes).
Names starting with ``.`` or ``_`` are also skipped by ``pyarrow.dataset`` discovery, so
``pyarrow.dataset.dataset(OUT, partitioning="hive")`` reads the same cells.

Columns differ between cells (each analysis writes its own; a cell may add columns another lacks), and generic
readers of the folder (``pd.read_parquet(OUT)``, ``pyarrow.dataset.dataset(OUT)``) take the schema of *one* file
(the first they discover) and silently drop the columns the other cells add (issue #21: 11 of 14 columns). That
is how pyarrow's dataset discovery works, not something a writer can fix without knowing every cell's columns in
advance. ``load_sweep`` reads each cell with its own schema and concatenates (every column, missing values where a
cell lacks one); to read the folder with pandas or pyarrow, pass the unified schema::

    pd.read_parquet(OUT, schema=sweep_schema(OUT))

Each ``part.parquet`` carries the ``ResultTable`` metadata key, so ``ResultTable.load(part)`` reads one cell, and
its rows carry the cell's labels (``cell_model, cell_suite, cell_analysis, cell_intervention, cell_seed``);
``load_sweep`` adds ``cell`` (the id, from the folder name, as hive partitioning does) and concatenates the cells
into one tidy table.
"""

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

from .._atomic import atomic_write, read_text
from ..errors import CorruptResultError
from ..results import ResultTable
from .spec import Cell

PART, ERROR, MANIFEST = "part.parquet", "_error.json", "_sweep.json"
LABEL_COLUMNS = ("cell", "cell_model", "cell_suite", "cell_analysis", "cell_intervention", "cell_seed")
_META_KEY = b"attnscope"
_RESULT_FORMAT = "attnscope.results/1"


def cell_dir(out: "str | Path", cid: str) -> Path:
    return Path(out) / f"cell={cid}"


def atomic_write_bytes(path: Path, write: Any) -> Path:
    """Write through ``write(tmp_path)`` to a unique temporary file beside ``path``, fsync it, ``os.replace`` it
    (``attnscope._atomic.atomic_write``)."""
    return atomic_write(path, write)


def _atomic_json(path: Path, data: Any) -> Path:
    text = json.dumps(data, indent=1, default=str)
    return atomic_write_bytes(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def is_done(out: "str | Path", cid: str) -> bool:
    """True when the cell's ``part.parquet`` exists and its footer reads (an unreadable one is moved aside)."""
    import pyarrow.parquet as pq

    part = cell_dir(out, cid) / PART
    if not part.is_file():
        return False
    try:
        pq.read_metadata(part)
        return True
    except Exception:
        part.replace(part.with_name(f"{PART}.corrupt-{int(time.time())}"))
        return False


def clean_temporaries(out: "str | Path", cid: str | None = None) -> int:
    """Delete temporaries left by a crashed writer (of one cell, or of all); returns how many.

    Only call it for cells whose lock you hold (``claim``): another driver may be writing the others."""
    count = 0
    for tmp in Path(out).glob(f"cell={cid if cid is not None else '*'}/.*.tmp"):
        tmp.unlink(missing_ok=True)
        count += 1
    return count


class CellClaim:
    """An exclusive lock on one cell (``OUT/cell=<id>/.lock``), held until ``release`` or the process ends."""

    def __init__(self, cid: str, handle: Any):
        self.cid, self._handle = cid, handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file drops the flock; the lock file stays (unlinking it would race)
            self._handle = None


def claim(out: "str | Path", cid: str) -> CellClaim | None:
    """The cell's lock if no other driver holds it, else None (never blocks)."""
    folder = cell_dir(out, cid)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".lock", "a+b")  # noqa: SIM115 - held open for as long as the claim
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one driver per folder
        return CellClaim(cid, handle)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return CellClaim(cid, handle)


def failed_since(out: "str | Path", cid: str, since: float) -> str | None:
    """The error another driver recorded for the cell after ``since`` (epoch seconds), else None."""
    path = cell_dir(out, cid) / ERROR
    try:
        if path.stat().st_mtime < since:
            return None
        return str(json.loads(path.read_text(encoding="utf-8")).get("error", "failed"))
    except (OSError, ValueError):
        return None


def write_manifest(out: "str | Path", spec_raw: dict, cells: list[Cell], name: str) -> Path:
    data = {"format": "attnscope.sweep/1", "name": name, "spec": spec_raw, "written_at": time.time(),
            "cells": [{"id": c.id, "labels": c.labels(), "identity": c.identity()} for c in cells]}
    return _atomic_json(Path(out) / MANIFEST, data)


def read_manifest(out: "str | Path") -> dict | None:
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    fix = "re-run the sweep (cells on disk are kept), or read them with load_sweep(out, all_cells=True)"
    text = read_text(path, "sweep manifest", "_sweep.json written by attnscope", error=CorruptResultError)
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise CorruptResultError("sweep manifest is not valid JSON", expected="_sweep.json written by attnscope",
                                 got=str(path), fix=fix) from None
    cells = data.get("cells") if isinstance(data, dict) else None
    if not isinstance(cells, list) or not all(isinstance(c, dict) and isinstance(c.get("id"), str) for c in cells):
        shape = f"keys {sorted(data)[:6]}" if isinstance(data, dict) else type(data).__name__
        raise CorruptResultError("malformed sweep manifest", expected="a JSON object with a list of cells {id: ...}",
                                 got=f"{path} ({shape})", fix=fix)
    return data


def cell_frame(cell: Cell, df: pd.DataFrame) -> pd.DataFrame:
    """The analysis table with the cell's labels in front (the id is the folder's ``cell=`` partition)."""
    labels = cell.labels()
    front = pd.DataFrame({"cell_model": labels["model"], "cell_suite": labels["suite"],
                          "cell_analysis": labels["analysis"], "cell_intervention": labels["intervention"],
                          "cell_seed": cell.seed}, index=df.index)
    clash = [c for c in LABEL_COLUMNS if c in df.columns]
    return pd.concat([front, df.drop(columns=clash)], axis=1)


def write_cell(out: "str | Path", cell: Cell, result: dict[str, Any], sweep: dict[str, Any]) -> Path:
    """Write a finished cell atomically; removes its ``_error.json``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    provenance = {"sweep": sweep, "cell": cell.to_dict(), "seed": cell.seed, "seconds": result.get("seconds"),
                  "worker": result.get("worker"), "written_at": time.time(), **result.get("provenance", {})}
    table = pa.Table.from_pandas(cell_frame(cell, result["df"]), preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[_META_KEY] = json.dumps({"format": _RESULT_FORMAT, "provenance": provenance}, default=str).encode()
    table = table.replace_schema_metadata(meta)
    folder = cell_dir(out, cell.id)
    path = atomic_write_bytes(folder / PART, lambda tmp: pq.write_table(table, tmp))
    (folder / ERROR).unlink(missing_ok=True)
    return path


def write_failure(out: "str | Path", cell: Cell, error: str, attempts: int | None = None) -> Path:
    return _atomic_json(cell_dir(out, cell.id) / ERROR, {"cell": cell.id, "labels": cell.labels(), "error": error,
                                                         "attempts": attempts, "at": time.time()})


def sweep_schema(out: "str | Path") -> Any:
    """The union of the schemas of every ``cell=*/part.parquet`` in ``out`` plus the ``cell`` partition column (a
    ``pyarrow.Schema``, without file metadata): pass it as ``schema=`` to ``pd.read_parquet(out)`` or
    ``pyarrow.dataset.dataset(out, partitioning="hive")`` so that no cell's columns are dropped. Only footers are
    read. CorruptResultError when a cell's footer is unreadable or two cells store one column with types that do
    not promote to one another (``load_sweep`` still reads those)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schemas = []
    for part in sorted(Path(out).glob(f"cell=*/{PART}")):
        try:
            schemas.append(pq.read_schema(part))
        except Exception as exc:
            raise CorruptResultError("unreadable cell result", expected="a parquet file written by attnscope",
                                     got=f"{part} ({type(exc).__name__})",
                                     fix="delete it and re-run the sweep") from None
    try:
        unified = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise CorruptResultError("cells store one column with incompatible types", expected="one type per column",
                                 got=str(exc)[:200], fix="read the sweep with attnscope.sweeps.load_sweep") from None
    if "cell" not in unified.names:
        unified = unified.append(pa.field("cell", pa.string()))
    return unified.remove_metadata()


def load_sweep(out: "str | Path", *, all_cells: bool = False) -> ResultTable:
    """Every finished cell of the sweep in ``out`` as one ``ResultTable`` (rows in cell-id order).

    Every column of every cell is kept (a cell lacking one gets missing values), unlike ``pd.read_parquet(out)``,
    which takes one file's schema (see the module docstring; ``sweep_schema`` makes it read them all).

    Only the cells of the last run's spec (``_sweep.json``) unless ``all_cells``: cells an earlier, different spec
    left in the same folder stay on disk (a later run may reuse them) but are not returned.

    Provenance: ``sweep`` (the manifest: spec and cells), ``cells`` (per cell: labels, identity, seed, versions,
    worker, seconds, the analysis' own provenance), ``missing`` (cells of the manifest without a result) and
    ``failed`` (cell id -> last error). Only ``cell=*/part.parquet`` files are read: temporaries never are.
    """
    import pyarrow.parquet as pq

    root = Path(out)
    if not root.is_dir():
        raise CorruptResultError("sweep folder not found", expected="a folder written by `attnscope sweep`",
                                 got=str(root))
    try:
        manifest = read_manifest(root)
    except CorruptResultError:
        if not all_cells:
            raise
        manifest = None  # every cell on disk was asked for: the manifest is not needed
    wanted = None if all_cells or manifest is None else {c["id"] for c in manifest["cells"]}
    frames, cells = [], {}
    for part in sorted(root.glob(f"cell=*/{PART}")):
        if wanted is not None and part.parent.name.removeprefix("cell=") not in wanted:
            continue
        try:
            table = pq.read_table(part)
        except Exception as exc:
            raise CorruptResultError("unreadable cell result", expected="a parquet file written by attnscope",
                                     got=f"{part} ({type(exc).__name__})",
                                     fix="delete it and re-run the sweep") from None
        meta = json.loads((table.schema.metadata or {}).get(_META_KEY, b"{}"))
        prov = meta.get("provenance", {})
        cid = part.parent.name.removeprefix("cell=")
        cells[cid] = {k: v for k, v in prov.items() if k != "sweep"}
        frame = table.to_pandas()
        frame.insert(0, "cell", cid)
        frames.append(frame)
    if not frames and manifest is None:
        raise CorruptResultError("no sweep results here", expected="cell=*/part.parquet or _sweep.json",
                                 got=str(root), fix="run `attnscope sweep SPEC --out DIR` first")
    columns = list(LABEL_COLUMNS) + ["analysis", "layer", "head", "metric", "value"]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    expected = [c["id"] for c in manifest["cells"]] if manifest else sorted(cells)
    failed = {}
    for err in root.glob(f"cell=*/{ERROR}"):
        cid = err.parent.name.removeprefix("cell=")
        if cid not in cells and (wanted is None or cid in wanted):
            try:
                failed[cid] = json.loads(err.read_text(encoding="utf-8")).get("error", "")
            except json.JSONDecodeError:
                failed[cid] = "unreadable error record"
    provenance = {"sweep": manifest, "cells": cells, "missing": [c for c in expected if c not in cells],
                  "failed": failed}
    return ResultTable(df, provenance)


__all__ = ["ERROR", "LABEL_COLUMNS", "MANIFEST", "PART", "CellClaim", "atomic_write_bytes", "cell_dir", "cell_frame",
           "claim", "clean_temporaries", "failed_since", "is_done", "load_sweep", "read_manifest", "sweep_schema",
           "write_cell", "write_failure", "write_manifest"]
