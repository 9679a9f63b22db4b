"""Atomic file writes and output-path checks, shared by every writer (traces, tables, sweep cells, JSON state).

``atomic_write(path, write)`` calls ``write(tmp)`` on a uniquely named hidden temporary file in ``path``'s folder
(``tempfile.mkstemp``: ``.NAME.<random>.tmp``), fsyncs it and ``os.replace``s it over ``path``. Two writers of the
same path never share a temporary file, a reader sees the old file or the new one, never half of one, and a failed
write removes its temporary file and leaves ``path`` as it was. OS errors become ``OutputError``. ``read_text``
reads a UTF-8 input file, with an ``InputError`` for a missing, unreadable or non-UTF-8 one.

``check_output(path)`` validates an output path *before* any work starts: not empty, not an existing directory,
not under a file, in a folder that exists (or can be created) and is writable.

Example:
    >>> import tempfile, pathlib
    >>> from attnscope._atomic import atomic_write_text, check_output
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write_text(d / "a.json", "{}").read_text()
    '{}'
    >>> sorted(p.name for p in d.iterdir())
    ['a.json']
    >>> check_output(d)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    attnscope.errors.OutputError: output path is a directory: ...
"""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import AttnscopeError, InputError, OutputError

TMP_SUFFIX = ".tmp"


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_MODE = 0o666 & ~_read_umask()  # mkstemp creates 0600; a written result gets the usual permissions


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported (Windows): the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _output_error(what: str, path: Any, exc: BaseException | None = None, fix: str | None = None) -> OutputError:
    got = str(path) if exc is None else f"{path} ({type(exc).__name__}: {getattr(exc, 'strerror', None) or exc})"
    return OutputError(what, expected="a writable file path", got=got[:300], fix=fix)


def check_output(path: "str | os.PathLike[str] | None", *, folder: bool = False,
                 suffixes: tuple[str, ...] | None = None) -> Path:
    """``path`` as a Path if a result can be written there, else ``OutputError`` (nothing is created).

    folder: the output is a folder (``prune --out``, ``sweep --out``): it may exist as a directory, but not as a
    file. suffixes: allowed file suffixes (e.g. ``(".parquet",)``); None allows any.
    """
    if path is None or not str(path).strip():
        raise OutputError("empty output path", expected="a file path, e.g. --out results/out.parquet",
                          got=repr(path if path is None else str(path)))
    if "\x00" in str(path):
        raise OutputError("output path holds a NUL byte", expected="a file path", got=repr(str(path)))
    target = Path(path).expanduser()
    if folder:
        if target.exists() and not target.is_dir():
            raise OutputError("output folder is a file", expected="a folder (existing or new)", got=str(target),
                              fix="pass --out a folder path, or remove the file")
    else:
        if target.is_dir():
            raise OutputError("output path is a directory", expected="a file path", got=str(target),
                              fix=f"name a file inside it, e.g. {target / ('out' + (suffixes or ('',))[0])}")
        if suffixes and target.suffix.lower() not in suffixes:
            raise OutputError("unknown output format", expected=" | ".join(suffixes), got=target.suffix or str(path),
                              fix=f"end --out with {suffixes[0]}")
        if target.name in (".", "..") or str(path).endswith(("/", os.sep)):
            raise OutputError("output path names a folder", expected="a file path", got=str(path))
    existing = target if folder and target.is_dir() else target.parent
    while not existing.exists():  # the first folder that exists: the rest is created when writing
        if existing.is_symlink():
            raise OutputError("output folder is a dangling link", expected="a writable folder", got=str(existing))
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError("output path is under a file", expected="a path whose folders are folders",
                          got=f"{target} ({existing} is a file)", fix="pick a path in a folder, not under a file")
    if not os.access(existing, os.W_OK | os.X_OK) or not _can_create_in(existing):
        raise OutputError("output folder is not writable", expected="a folder you can write to", got=str(existing),
                          fix="pick another --out, or change the folder's permissions")
    return target


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (permission bits do not tell for root, read-only mounts, /proc):
    creates and removes a hidden empty probe file."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".attnscope-probe-", suffix=TMP_SUFFIX)
    except OSError:
        return False
    os.close(fd)
    try:
        os.unlink(name)
    except OSError:
        pass
    return True


def atomic_write(path: "str | os.PathLike[str]", write: Callable[[Path], Any], *, fsync: bool = True) -> Path:
    """Write ``path`` atomically through ``write(tmp_path)``; returns ``path`` (see the module docstring)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as exc:
        raise _output_error("cannot write the output", path, exc) from None
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, _MODE)
        write(tmp)
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, AttnscopeError):
            raise _output_error("cannot write the output", path, exc) from None
        raise
    if fsync:
        _fsync_dir(path.parent)
    return path


def read_text(path: "str | os.PathLike[str]", what: str = "input file", expected: str = "a UTF-8 text file",
              error: type = None) -> str:
    """The UTF-8 text of ``path``; ``error`` (default InputError) for a missing, unreadable or non-UTF-8 file."""
    error = error or InputError
    target = Path(path).expanduser()
    if not target.is_file():
        raise error(f"{what} not found", expected=expected, got=str(path),
                    fix="check the path" + (" (it is a folder)" if target.is_dir() else ""))
    try:
        return target.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not UTF-8 text", expected=expected,
                    got=f"{target.name}: undecodable byte {exc.object[exc.start:exc.start + 1]!r} at {exc.start}",
                    fix="save the file as UTF-8") from None
    except OSError as exc:
        raise error(f"cannot read the {what}", expected=expected,
                    got=f"{target} ({type(exc).__name__}: {exc.strerror or exc})",
                    fix="check the file's permissions") from None


def atomic_write_text(path: "str | os.PathLike[str]", text: str, *, fsync: bool = True) -> Path:
    """``atomic_write`` of a UTF-8 text."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=fsync)


__all__ = ["TMP_SUFFIX", "atomic_write", "atomic_write_text", "check_output", "read_text"]
