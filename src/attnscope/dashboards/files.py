"""The only way the dashboard touches the disk: result files inside one results directory.

A request names a file by its path *relative to the results directory*. It is refused, before anything is read,
when it is absolute, contains ``..``, resolves (``Path.resolve()``, following symlinks) outside the directory,
is not a result file type (``.parquet``, ``.safetensors``, ``.json``; images ``.png``/``.jpg`` only where the
caller asks for kind ``image``), is hidden (a component starting with ``.``), is longer than ``MAX_PATH_CHARS``, or
does not exist. Nothing is unpickled:
parquet is read by pyarrow, safetensors by safetensors, JSON by ``json``.

Example:
    >>> import tempfile, pathlib
    >>> from attnscope.dashboards.files import ResultsRoot
    >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "run").mkdir(); _ = (d / "run" / "t.json").write_text("{}")
    >>> root = ResultsRoot(d)
    >>> root.resolve("run/t.json").name
    't.json'
    >>> root.resolve("../../etc/passwd")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    attnscope.dashboards.files.PathRefused: path refused: expected a path inside the results directory ...
"""

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import InputError
from .sweep_cells import SWEEP_PART, sweep_cell

RESULT_TYPES = {".parquet": "table", ".safetensors": "trace", ".json": "json"}
IMAGE_TYPES = {".png": "image", ".jpg": "image", ".jpeg": "image"}  # drawn under maps; never listed
MAX_FILES = 5000
MAX_DEPTH = 8


MAX_PATH_CHARS = 1024  # longer requests are refused before the file system sees them (ENAMETOOLONG)


class PathRefused(InputError):
    """A path outside the results directory, or not a result file, was requested. ``status`` is the HTTP status
    the download route answers with: 403 (refused), 404 (no such result file), 400 (malformed, too long)."""

    status = 403


@dataclass
class Run:
    """One folder of the results directory (``""`` for the directory itself) and its result files by kind."""

    path: str
    tables: list[str] = field(default_factory=list)
    traces: list[str] = field(default_factory=list)
    json: list[str] = field(default_factory=list)
    cell: Any = None  # a sweep cell folder (``cell=<id>``): its ``sweep_cells.SweepCell`` (spec labels), else None
    display: str = ""  # the readable name ``ResultsRoot.runs`` gives a sweep cell

    @property
    def label(self) -> str:
        """What the run picker shows: a sweep cell's labels (``minilm · sentences · sinks · zero:L1H*``, after
        its sweep folder), else the folder."""
        return self.display or self.path or "(results directory)"

    @property
    def tooltip(self) -> str:
        """The folder (for a sweep cell, with its ``cell=<id>`` hash)."""
        return self.path or "(results directory)"

    def option(self) -> dict[str, str]:
        """A run picker option: ``label``, ``value`` (the folder) and ``title`` (the hover text)."""
        return {"label": self.label, "value": self.path, "title": self.tooltip}

    def files(self) -> list[str]:
        return sorted(self.tables + self.traces + self.json)

    def table_options(self) -> list[dict[str, str]]:
        """Options of the table pickers (result table, compare with): a sweep cell's result is named by the cell's
        labels, like the run picker; every other table by its path. The value (and hover) is the path."""
        return [{"label": self.display if self.display and PurePosixPath(t).name == SWEEP_PART else t, "value": t,
                 "title": t} for t in self.tables]


class ResultsRoot:
    """A results directory and the path rule: only result files inside it, by relative path."""

    def __init__(self, root: "str | os.PathLike[str]"):
        path = Path(root).expanduser()
        if not path.is_dir():
            raise InputError("results directory not found", expected="an existing directory", got=str(root),
                             fix="run `attnscope demo --out DIR` or pass a folder holding result files")
        self.root = path.resolve()

    def _refuse(self, why: str, relative: object, fix: str = "pick a file listed by the dashboard",
                status: int = 403) -> PathRefused:
        refused = PathRefused("path refused", expected=why, got=repr(relative)[:200], fix=fix)
        refused.status = status
        return refused

    def resolve(self, relative: object, kinds: tuple[str, ...] = ("table", "trace", "json")) -> Path:
        """The absolute path of a result file inside the root, or PathRefused (nothing is read).

        Also refused: hidden files and folders (a component starting with ``.``, which the listing never shows)
        and paths longer than ``MAX_PATH_CHARS``."""
        if not isinstance(relative, str) or not relative.strip() or "\x00" in relative:
            raise self._refuse("a relative path of a result file", relative, status=400)
        if len(relative) > MAX_PATH_CHARS:
            raise self._refuse(f"a path of at most {MAX_PATH_CHARS} characters", f"{relative[:40]}... "
                               f"({len(relative)} characters)", status=400)
        text = relative.replace("\\", "/")
        pure = PurePosixPath(text)
        if pure.is_absolute() or Path(relative).is_absolute() or text.startswith("~"):
            raise self._refuse("a path relative to the results directory, not an absolute one", relative)
        if ".." in pure.parts:
            raise self._refuse("a path inside the results directory without '..'", relative)
        if any(part.startswith(".") for part in pure.parts):
            raise self._refuse("a listed result file (hidden files and folders are never served)", relative)
        kind = (RESULT_TYPES | IMAGE_TYPES).get(pure.suffix.lower())
        if kind is None or kind not in kinds:
            allowed = sorted(s for s, k in (RESULT_TYPES | IMAGE_TYPES).items() if k in kinds)
            raise self._refuse(f"a result file ({', '.join(allowed)})", relative)
        try:
            full = (self.root / pure).resolve()
            inside = full.is_relative_to(self.root)
            exists = inside and full.is_file()
        except (OSError, RuntimeError, ValueError):  # a name too long for the file system, a symlink loop
            raise self._refuse("a path the file system can resolve", relative, status=400) from None
        if not inside:
            raise self._refuse("a file inside the results directory (this one leaves it through a symlink)",
                               relative)
        if not exists:
            raise self._refuse("an existing result file", relative, fix="rescan: the file may have been removed",
                               status=404)
        return full

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def runs(self) -> list[Run]:
        """Every folder (the root and its subfolders, symlinked folders not followed) holding result files."""
        runs: list[Run] = []
        seen = 0
        for folder, dirs, files in os.walk(self.root, followlinks=False):
            here = Path(folder)
            depth = len(here.relative_to(self.root).parts)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < MAX_DEPTH else []
            run = Run("" if here == self.root else here.relative_to(self.root).as_posix())
            for name in sorted(files):
                kind = RESULT_TYPES.get(Path(name).suffix.lower())
                if kind is None or name.startswith("."):
                    continue
                rel = PurePosixPath(run.path, name).as_posix() if run.path else name
                try:
                    self.resolve(rel)
                except PathRefused:
                    continue  # e.g. a symlink pointing out of the directory: never listed, never read
                getattr(run, {"table": "tables", "trace": "traces", "json": "json"}[kind]).append(rel)
                seen += 1
            if run.files():
                runs.append(run)
            if seen >= MAX_FILES:
                break
        return _label_cells(self.root, runs)

    def run(self, path: str) -> Run:
        """The run of one folder (``""`` = the root); PathRefused for an unknown folder."""
        for run in self.runs():
            if run.path == path:
                return run
        raise self._refuse("a folder of the results directory that holds result files", path)


def _label_cells(root: Path, runs: list[Run]) -> list[Run]:
    """Name each sweep cell folder (``cell=<id>`` holding ``part.parquet``) by the labels stored in its result:
    ``SWEEP › model · suite · analysis · intervention`` (``SWEEP`` only when the sweep is not the results
    directory itself). Cells whose names collide (e.g. an earlier spec's cells left in the folder) get their short
    id appended; a cell without readable labels keeps its folder name."""
    for run in runs:
        folder = PurePosixPath(run.path)
        part = (folder / SWEEP_PART).as_posix()
        if not folder.name.startswith("cell=") or part not in run.tables:
            continue
        run.cell = sweep_cell(root / part)
        if run.cell is not None and run.cell.label:
            sweep = folder.parent.as_posix()
            run.display = run.cell.label if sweep == "." else f"{sweep} › {run.cell.label}"
    counts = Counter(run.display for run in runs if run.display)
    for run in runs:
        if run.display and counts[run.display] > 1:
            run.display += f" ({run.cell.id[:8]})"
    return runs


__all__ = ["IMAGE_TYPES", "MAX_FILES", "PathRefused", "RESULT_TYPES", "ResultsRoot", "Run"]
