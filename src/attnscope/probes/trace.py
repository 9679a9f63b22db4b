"""``AttentionTrace``: what a capture returns, saved as one safetensors file with its JSON metadata inside.

A trace holds one ``SiteRecord`` per (site, step): the probabilities ``[batch, head, query, key]`` that were asked
for (possibly only some heads or query rows) and/or streaming statistics, plus token info and provenance.

Example:
    >>> import torch, tempfile, os
    >>> from attnscope.probes.trace import AttentionTrace, SiteRecord
    >>> from attnscope.probes.site import Site
    >>> rec = SiteRecord(site=Site("text", 0, "self"), probs=torch.full((1, 2, 3, 3), 1 / 3), n_query=3, n_key=3)
    >>> trace = AttentionTrace([rec])
    >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
    >>> _ = trace.save(path)
    >>> torch.equal(AttentionTrace.load(path)[Site("text", 0, "self")].probs, rec.probs)
    True
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .._atomic import atomic_write, check_output
from .._display import render
from ..errors import CorruptResultError, InputError, SiteError
from .site import Site
from .tokens import TokenInfo

FORMAT = "attnscope.trace/1"
_TENSOR_FIELDS = ("probs", "query_index", "head_index")


@dataclass
class SiteRecord:
    """What was captured at one site and step.

    probs: ``[batch, head, query, key]`` float32, or None when only statistics were asked for. When only some heads
    or rows were captured, ``head_index`` / ``query_index`` give the model's head numbers / query positions.
    stats: streaming statistics, each with leading dims ``[batch, head, query]``: ``entropy`` ``[b, h, q]``,
    ``mass`` ``[b, h, q, span]`` (mass on each of ``mass_spans``), ``topk_index`` / ``topk_weight`` ``[b, h, q, k]``.
    meta: free JSON (e.g. ``{"blocks": {"image": [0, 64], "text": [64, 77]}}`` for joint attention).
    """

    site: Site
    step: int = 0
    probs: Tensor | None = None
    query_index: Tensor | None = None
    head_index: Tensor | None = None
    stats: dict[str, Tensor] = field(default_factory=dict)
    mass_spans: list[tuple[int, int]] = field(default_factory=list)
    n_query: int = 0
    n_key: int = 0
    meta: dict = field(default_factory=dict)

    def heads(self, n_heads: int | None = None) -> list[int]:
        """Model head numbers held by this record, in storage order."""
        if self.head_index is not None:
            return [int(h) for h in self.head_index]
        size = self._head_dim_size()
        return list(range(size if size is not None else (n_heads or 0)))

    def rows(self) -> list[int]:
        """Query positions held by this record, in storage order."""
        if self.query_index is not None:
            return [int(q) for q in self.query_index]
        return list(range(self.n_query))

    def _head_dim_size(self) -> int | None:
        if self.probs is not None:
            return self.probs.shape[1]
        for value in self.stats.values():
            return value.shape[1]
        return None

    def block(self, query_block: str, key_block: str) -> Tensor:
        """Sub-matrix of joint attention between named blocks, e.g. ``block("image", "text")``."""
        blocks = self.meta.get("blocks")
        if not blocks or self.probs is None:
            raise SiteError("record has no named blocks with probabilities", expected="a joint-attention site",
                            got=str(self.site))
        for name in (query_block, key_block):
            if name not in blocks:
                raise SiteError("unknown block", expected=sorted(blocks), got=name)
        qs, qe = blocks[query_block]
        ks, ke = blocks[key_block]
        return self.probs[:, :, qs:qe, ks:ke]


class AttentionTrace:
    """Records per (site, step), token info and provenance. Index with a ``Site``: ``trace[site].probs``."""

    def __init__(self, records: list[SiteRecord] | None = None, tokens: TokenInfo | None = None,
                 provenance: dict | None = None):
        self.records: dict[tuple[Site, int], SiteRecord] = {}
        for rec in records or []:
            self.add(rec)
        self.tokens = tokens or TokenInfo()
        self.provenance: dict = dict(provenance or {})
        self.output = None  # the model's output from the capture run; not saved

    def add(self, record: SiteRecord) -> None:
        self.records[(record.site, record.step)] = record

    @property
    def sites(self) -> list[Site]:
        return sorted({site for site, _ in self.records})

    def steps(self, site: Site) -> list[int]:
        return sorted(step for s, step in self.records if s == site)

    def get(self, site: Site, step: int | None = None) -> SiteRecord:
        steps = self.steps(site)
        if not steps:
            raise SiteError("site not in trace", expected=[str(s) for s in self.sites][:8], got=str(site),
                            fix="capture this site or pick one listed")
        if step is None:
            if len(steps) > 1:
                raise SiteError("site has several steps", expected="step=<int>", got=f"steps {steps}")
            step = steps[0]
        if (site, step) not in self.records:
            raise SiteError("step not in trace", expected=steps, got=step)
        return self.records[(site, step)]

    def __getitem__(self, site: Site) -> SiteRecord:
        return self.get(site)

    def __len__(self) -> int:
        return len(self.records)

    def towers(self) -> list[str]:
        return sorted({s.tower for s in self.sites})

    def stack(self, tower: str | None = None, kind: str = "self", step: int | None = None) -> Tensor:
        """Probabilities of every layer of one tower and kind: ``[layer, batch, head, query, key]``.

        tower: None takes the trace's only tower of that kind (``text`` where there are several and one is text).
        """
        sites = self._tower_sites(tower, kind)
        probs = [self.get(s, step).probs for s in sites]
        if any(p is None for p in probs):
            raise SiteError("trace holds no full patterns for these sites", expected="patterns=True at capture",
                            got="statistics only", fix="capture again with full patterns")
        return torch.stack(probs)

    def stat(self, name: str, tower: str | None = None, kind: str = "self", step: int | None = None) -> Tensor:
        """One statistic over every layer of a tower: ``[layer, batch, head, query, ...]``."""
        sites = self._tower_sites(tower, kind)
        values = [self.get(s, step).stats.get(name) for s in sites]
        if any(v is None for v in values):
            raise SiteError("statistic not captured", expected=name, got=sorted(self.get(sites[0], step).stats),
                            fix=f"capture with stats including {name!r}")
        return torch.stack(values)

    def _tower_sites(self, tower: str | None, kind: str) -> list[Site]:
        if tower is None:
            towers = sorted({s.tower for s in self.sites if s.kind == kind})
            tower = towers[0] if len(towers) == 1 else "text"
        sites = [s for s in self.sites if s.tower == tower and s.kind == kind]
        if not sites:
            raise SiteError("no sites of this tower/kind", expected=sorted({f"{s.tower}/{s.kind}" for s in self.sites}),
                            got=f"{tower}/{kind}", fix="pass tower= and kind= as strings, e.g. tower='text'")
        return sites

    # --- persistence -------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write one ``.safetensors`` file; tensors by record, everything else as JSON in its metadata."""
        from safetensors.torch import save_file

        tensors: dict[str, Tensor] = {}
        entries = []
        for i, rec in enumerate(self.records.values()):
            for name in _TENSOR_FIELDS:
                value = getattr(rec, name)
                if value is not None:
                    tensors[f"r{i}.{name}"] = value.detach().cpu().contiguous()
            for name, value in rec.stats.items():
                tensors[f"r{i}.stat.{name}"] = value.detach().cpu().contiguous()
            entries.append({"site": rec.site.to_dict(), "step": rec.step, "stats": sorted(rec.stats),
                            "mass_spans": [list(s) for s in rec.mass_spans], "n_query": rec.n_query,
                            "n_key": rec.n_key, "meta": rec.meta})
        header = {"format": FORMAT, "records": entries, "tokens": self.tokens.to_dict(),
                  "provenance": self.provenance}

        path = check_output(path)
        try:
            metadata = {"attnscope": json.dumps(header)}
        except (TypeError, ValueError) as exc:
            raise InputError("trace metadata cannot be stored as JSON", expected="plain JSON values in provenance "
                             "and record meta", got=f"{type(exc).__name__}: {exc}"[:240],
                             fix="convert the values to str, numbers, lists or dicts") from None
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @classmethod
    def load(cls, path: str | Path) -> "AttentionTrace":
        """Read a file written by ``save``. Raises CorruptResultError for anything else."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CorruptResultError("trace file not found", expected="an existing .safetensors file", got=str(path))
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = json.loads((handle.metadata() or {})["attnscope"])
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            if header.get("format") != FORMAT:
                raise KeyError("format")
            records = []
            for i, entry in enumerate(header["records"]):
                rec = SiteRecord(site=Site.from_dict(entry["site"]), step=int(entry["step"]),
                                 mass_spans=[tuple(s) for s in entry["mass_spans"]], n_query=int(entry["n_query"]),
                                 n_key=int(entry["n_key"]), meta=entry.get("meta", {}))
                for name in _TENSOR_FIELDS:
                    setattr(rec, name, tensors.get(f"r{i}.{name}"))
                rec.stats = {name: tensors[f"r{i}.stat.{name}"] for name in entry["stats"]}
                records.append(rec)
            return cls(records, TokenInfo.from_dict(header["tokens"]), header.get("provenance", {}))
        except CorruptResultError:
            raise
        except Exception as exc:  # safetensors, JSON and key errors all mean the same to the user
            raise CorruptResultError("not a readable attnscope trace", expected=f"a {FORMAT} safetensors file",
                                     got=f"{path.name} ({type(exc).__name__}: {exc})"[:300],
                                     fix="re-run the capture that wrote it") from None

    def show(self, view: str | None = None, **options):
        """A plotly figure of this trace: pattern, heads or image (the plotting backend's ``show_trace``, by default
        ``attnscope.viz.notebook.show_trace``; see ``attnscope._display``)."""
        return render("trace", self, view, **options)

    def __repr__(self) -> str:
        kinds = "probs" if any(r.probs is not None for r in self.records.values()) else "stats"
        return f"AttentionTrace({len(self.sites)} sites, {len(self.records)} records, {kinds})"
