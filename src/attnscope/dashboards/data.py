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
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from threading import Lock
from typing import Any

from ..errors import CorruptResultError, SiteError
from ..probes.site import Site
from ..probes.tokens import TokenInfo
from ..probes.trace import FORMAT, AttentionTrace, SiteRecord
from ..results import ResultTable


class _LRU:
    """A small thread-safe LRU cache keyed by (path, mtime, size, extra)."""

    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict(), Lock()

    def get(self, key: tuple, make):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = make()
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


_TABLES, _HEADERS, _SITES = _LRU(32), _LRU(32), _LRU(8)


def _stamp(path: Path) -> tuple:
    stat = path.stat()
    return str(path), stat.st_mtime_ns, stat.st_size


def load_table(path: Path) -> ResultTable:
    """A ResultTable (cached)."""
    return _TABLES.get(_stamp(path), lambda: ResultTable.load(path))


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
        if header.get("format") != FORMAT:
            raise KeyError("format")
    except Exception as exc:
        raise CorruptResultError("not a readable attnscope trace", expected=f"a {FORMAT} safetensors file",
                                 got=f"{path.name} ({type(exc).__name__})", fix="re-run the capture") from None
    batch = max((shape[0] for key, shape in shapes.items() if key.endswith(".probs")), default=0)
    return TraceHeader(path, header["records"], TokenInfo.from_dict(header["tokens"]), header.get("provenance", {}),
                       int(batch))


def trace_header(path: Path) -> TraceHeader:
    """The header of a trace file (cached)."""
    return _HEADERS.get(_stamp(path), lambda: _read_header(path))


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
    return _SITES.get(_stamp(path) + (site, step, batch), lambda: _read_site(path, site, step, batch))


def read_json(path: Path, limit: int = 200_000) -> Any:
    """A JSON result file (at most ``limit`` bytes are read)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read(limit + 1)
    if len(text) > limit:
        raise CorruptResultError("JSON file too large to show", expected=f"<= {limit} bytes", got=path.name,
                                 fix="download it instead")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptResultError("not valid JSON", expected="a JSON file", got=f"{path.name}: {exc}") from None


__all__ = ["TraceHeader", "load_site", "load_table", "read_json", "trace_header"]
