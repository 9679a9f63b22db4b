"""Cached, memory-light reading of result files for the dashboard (paths must come from ``ResultsRoot.resolve``).

Tables are read whole (parquet). Traces can be large (a 4096-token pattern is 64 MiB per head), so
``trace_header`` reads only the safetensors header, and ``load_site`` reads one record's probabilities for one
batch item (``safe_open(...).get_slice``) into a one-record ``AttentionTrace`` that the figure builders take as is.
Caches are keyed by (path, modification time, size), so a rewritten file is read again.

Example:
    >>> import tempfile, os, torch
    >>> from attnscope.probes.site import Site
    >>> from attnscope.probes.trace import AttentionTrace, SiteRecord
    >>> from attnscope.dashboards.data import load_site, trace_header
    >>> rec = SiteRecord(site=Site("text", 1), probs=torch.rand(3, 2, 4, 4), n_query=4, n_key=4)
    >>> path = AttentionTrace([rec]).save(os.path.join(tempfile.mkdtemp(), "t.safetensors"))
    >>> [str(s) for s in trace_header(path).sites], trace_header(path).batch
    (['text.L1.self'], 3)
    >>> load_site(path, Site("text", 1), 0, batch=2).get(Site("text", 1)).probs.shape
    torch.Size([1, 2, 4, 4])
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CorruptResultError, SiteError
from ..probes.site import Site
from ..probes.tokens import TokenInfo
from ..probes.trace import FORMAT, AttentionTrace, SiteRecord
from ..results import ResultTable
from .file_cache import LRU, stamp


_TABLES, _HEADERS, _SITES = LRU(32), LRU(32), LRU(8)


def _stamp_or_refuse(path: Path) -> tuple:
    try:
        return stamp(path)
    except OSError as exc:
        raise CorruptResultError("result file cannot be read", expected="a readable file", got=f"{path.name} "
                                 f"({type(exc).__name__})", fix="rescan: the file may have been removed") from None


def _checked_table(path: Path) -> ResultTable:
    """``ResultTable.load`` plus what the views rely on: numeric ``layer`` and ``head``, a numeric ``value``."""
    import pandas as pd

    table = ResultTable.load(path)
    for column in ("layer", "head", "value"):
        if not pd.api.types.is_numeric_dtype(table.df[column]) or pd.api.types.is_bool_dtype(table.df[column]):
            raise CorruptResultError("result table has a non-numeric column", expected=f"numbers in {column!r}",
                                     got=f"{path.name}: {column} of type {table.df[column].dtype}",
                                     fix="write layer and head as integers and value as a number")
    return table


def load_table(path: Path) -> ResultTable:
    """A ResultTable (cached); CorruptResultError for a file the views cannot show."""
    return _TABLES.get(_stamp_or_refuse(path), lambda: _checked_table(path))




@dataclass
class TraceHeader:
    """What a trace file holds, without its tensors."""

    path: Path
    entries: list[dict]
    tokens: TokenInfo
    provenance: dict
    batch: int

    @property
    def sites(self) -> list[Site]:
        return sorted({Site.from_dict(e["site"]) for e in self.entries})

    def towers_kinds(self) -> list[tuple[str, str]]:
        return sorted({(s.tower, s.kind) for s in self.sites})

    def layers(self, tower: str, kind: str) -> list[int]:
        return sorted({s.layer for s in self.sites if s.tower == tower and s.kind == kind})

    def steps(self, site: Site) -> list[int]:
        return sorted(int(e["step"]) for e in self.entries if Site.from_dict(e["site"]) == site)

    def index(self, site: Site, step: int | None) -> int:
        matches = [i for i, e in enumerate(self.entries) if Site.from_dict(e["site"]) == site
                   and (step is None or int(e["step"]) == step)]
        if not matches:
            raise SiteError("site not in trace", expected=[str(s) for s in self.sites][:8], got=str(site),
                            fix="pick a layer the trace holds")
        return matches[0]


def _read_header(path: Path) -> TraceHeader:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {})["attnscope"])
            shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise KeyError("format")
        records = header["records"]  # every record names its site and step: the views index them
        if not isinstance(records, list) or not all(isinstance(e, dict) for e in records):
            raise TypeError("records")
        for entry in records:
            Site.from_dict(entry["site"]), int(entry["step"]), int(entry["n_query"]), int(entry["n_key"])
        tokens = TokenInfo.from_dict(header["tokens"])
        provenance = header.get("provenance", {})
        batch = max((shape[0] for key, shape in shapes.items() if key.endswith(".probs") and shape), default=0)
    except Exception as exc:  # noqa: BLE001 - any malformed header is a bad file, never a failed page
        raise CorruptResultError("not a readable attnscope trace", expected=f"a {FORMAT} safetensors file",
                                 got=f"{path.name} ({type(exc).__name__})", fix="re-run the capture") from None
    return TraceHeader(path, records, tokens, provenance if isinstance(provenance, dict) else {}, int(batch))


def trace_header(path: Path) -> TraceHeader:
    """The header of a trace file (cached)."""
    return _HEADERS.get(_stamp_or_refuse(path), lambda: _read_header(path))


def _item_tokens(tokens: TokenInfo, batch: int) -> TokenInfo:
    pick = (lambda rows: [rows[batch]] if rows and batch < len(rows) else None)
    return TokenInfo(ids=pick(tokens.ids), strings=pick(tokens.strings), spans=list(tokens.spans), grid=tokens.grid,
                     padding=pick(tokens.padding))


def _read_site(path: Path, site: Site, step: int | None, batch: int) -> AttentionTrace:
    from safetensors import safe_open

    header = trace_header(path)
    i = header.index(site, step)
    entry = header.entries[i]
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        if f"r{i}.probs" not in keys:
            raise SiteError("this site holds statistics only", expected="full patterns", got=str(site),
                            fix="capture with patterns=True")
        item = handle.get_slice(f"r{i}.probs")
        if not 0 <= batch < item.get_shape()[0]:
            raise SiteError("batch item out of range", expected=f"0..{item.get_shape()[0] - 1}", got=batch)
        probs = item[batch:batch + 1].float()
        extra: dict[str, Any] = {name: handle.get_tensor(f"r{i}.{name}") for name in ("query_index", "head_index")
                                 if f"r{i}.{name}" in keys}
    record = SiteRecord(site=site, step=int(entry["step"]), probs=probs, n_query=int(entry["n_query"]),
                        n_key=int(entry["n_key"]), meta=entry.get("meta", {}), **extra)
    return AttentionTrace([record], _item_tokens(header.tokens, batch), header.provenance)


def load_site(path: Path, site: Site, step: int | None = None, batch: int = 0) -> AttentionTrace:
    """A one-record trace holding one site's probabilities for batch item ``batch`` (as item 0), cached."""
    def read() -> AttentionTrace:
        try:
            return _read_site(path, site, step, batch)
        except (CorruptResultError, SiteError):
            raise
        except Exception as exc:  # noqa: BLE001 - tensors that do not match the header: a bad file
            raise CorruptResultError("trace site cannot be read", expected=f"a {FORMAT} safetensors file",
                                     got=f"{path.name} ({type(exc).__name__})", fix="re-run the capture") from None

    return _SITES.get(_stamp_or_refuse(path) + (site, step, batch), read)


def read_json(path: Path, limit: int = 200_000) -> Any:
    """A JSON result file (at most ``limit`` bytes are read); CorruptResultError for anything unreadable (not
    UTF-8, invalid, nested too deeply to parse)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(limit + 1)
    except UnicodeDecodeError:
        raise CorruptResultError("JSON file is not UTF-8 text", expected="a UTF-8 JSON file", got=path.name,
                                 fix="download it instead") from None
    except OSError as exc:
        raise CorruptResultError("JSON file cannot be read", expected="a readable file",
                                 got=f"{path.name} ({type(exc).__name__})", fix="check its permissions") from None
    if len(text) > limit:
        raise CorruptResultError("JSON file too large to show", expected=f"<= {limit} bytes", got=path.name,
                                 fix="download it instead")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptResultError("not valid JSON", expected="a JSON file", got=f"{path.name}: {exc}",
                                 fix="download it instead") from None
    except RecursionError:
        raise CorruptResultError("JSON nested too deeply to show", expected="a JSON file of moderate depth",
                                 got=path.name, fix="download it instead") from None


__all__ = ["TraceHeader", "load_site", "load_table", "read_json", "trace_header"]
