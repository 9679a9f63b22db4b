"""``CaptureRequest``: what a capture should keep (sites, heads, rows, full patterns, streaming statistics).

Example:
    >>> from attnscope.probes.request import CaptureRequest, RowSelection
    >>> RowSelection.parse("last:2").indices(5).tolist()
    [3, 4]
    >>> CaptureRequest(stats=("entropy",)).patterns
    False
"""

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from .heads import HeadSet
from .site import Site

STAT_NAMES = ("mass", "entropy", "topk")
_ROW_SPEC = re.compile(r"^(last|first):(\d+)$|^(\d*):(\d*)$|^all$")


@dataclass(frozen=True)
class RowSelection:
    """Query rows to keep: ``last:k``, ``first:k``, ``a:b`` (slice) or explicit positions."""

    mode: str = "all"
    count: int = 0
    start: int | None = None
    stop: int | None = None
    positions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, spec: "str | Sequence[int] | RowSelection | None") -> "RowSelection":
        if spec is None:
            return cls()
        if isinstance(spec, RowSelection):
            return spec
        if not isinstance(spec, str):
            return cls._positions(spec)
        match = _ROW_SPEC.match(spec.strip())
        if not match:
            raise InputError("malformed row spec", expected="'last:K', 'first:K', 'A:B' or 'all'", got=repr(spec),
                             fix="e.g. rows='last:4' (CLI --rows last:4)")
        if spec.strip() == "all":
            return cls()
        if match.group(1):
            if int(match.group(2)) < 1:
                raise InputError("empty row selection", expected=f"{match.group(1)}:K with K >= 1", got=repr(spec),
                                 fix=f"e.g. {match.group(1)}:1")
            return cls(mode=match.group(1), count=int(match.group(2)))
        start, stop = match.group(3), match.group(4)
        if start and stop and int(stop) <= int(start):
            raise InputError("empty row selection", expected="A:B with A < B (half-open, like a slice)",
                             got=repr(spec), fix=f"e.g. {stop}:{start}" if int(stop) < int(start) else "e.g. 0:4")
        return cls(mode="slice", start=int(start) if start else None, stop=int(stop) if stop else None)

    @classmethod
    def _positions(cls, spec: Any) -> "RowSelection":
        try:
            values = list(spec)
        except TypeError:
            raise InputError("malformed row selection", expected="a row spec string or a list of positions",
                             got=type(spec).__name__, fix="e.g. rows='last:4' or rows=[0, 3]") from None
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer))
               and not (torch.is_tensor(v) and v.ndim == 0 and not v.is_floating_point())]
        if bad or not values:
            raise InputError("malformed row positions", expected="a non-empty list of integer positions",
                             got=repr(bad[0] if bad else values)[:80], fix="e.g. rows=[0, 3] or rows='last:4'")
        return cls(mode="positions", positions=tuple(int(p) for p in values))

    def indices(self, n_query: int) -> torch.Tensor | None:
        """Query positions for a site with ``n_query`` rows, or None for all rows."""
        if self.mode == "all":
            return None
        if self.mode == "last":
            return torch.arange(max(0, n_query - self.count), n_query)
        if self.mode == "first":
            return torch.arange(0, min(self.count, n_query))
        if self.mode == "slice":  # may be empty at a site with fewer rows (``check_rows`` refuses all-empty)
            return torch.arange(n_query)[slice(self.start, self.stop)]
        bad = [p for p in self.positions if not -n_query <= p < n_query]
        if bad:
            raise InputError("query row out of range", expected=f"positions in [0, {n_query})", got=bad,
                             fix=f"the input has {n_query} query rows")
        return torch.tensor([p % n_query for p in self.positions], dtype=torch.long)


def _spans(spans: Any, required: bool = True) -> tuple[tuple[int, int], ...]:
    """``[(start, end), ...]`` as int pairs with ``0 <= start < end``; InputError otherwise."""
    fix = "pass mass_spans=[(0, 1)] (half-open key positions [start, end))"
    try:
        pairs = [tuple(span) for span in spans]
    except TypeError:
        raise InputError("malformed mass spans", expected="a list of (start, end) pairs", got=repr(spans)[:80],
                         fix=fix) from None
    out = []
    for pair in pairs:
        if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in pair):
            raise InputError("malformed mass span", expected="(start, end) integers", got=repr(pair)[:80], fix=fix)
        a, b = int(pair[0]), int(pair[1])
        if not 0 <= a < b:
            raise InputError("empty or negative mass span", expected="0 <= start < end", got=(a, b), fix=fix)
        out.append((a, b))
    if not out and required:
        raise InputError("no mass spans", expected="at least one (start, end) pair", got=[], fix=fix)
    return tuple(out)


@dataclass
class CaptureRequest:
    """What to keep at each site.

    sites: None (all), a list of Sites, or a predicate on Site. towers: restrict to these towers.
    heads: restrict to these (layer, head) pairs (layer = site.layer). rows: query rows to keep.
    patterns: keep probabilities (default: True unless statistics were asked for).
    stats: any of ``mass`` (mass on ``mass_spans`` of key positions), ``entropy``, ``topk``.
    budget_mb: memory budget for the probabilities chunk computed at once (query rows are chunked to fit).
    steps: diffusion steps (or call indices) to keep; None keeps all.
    """

    sites: "Sequence[Site] | Callable[[Site], bool] | None" = None
    towers: Sequence[str] | None = None
    heads: HeadSet | None = None
    rows: RowSelection = field(default_factory=RowSelection)
    patterns: bool | None = None
    stats: tuple[str, ...] = ()
    mass_spans: tuple[tuple[int, int], ...] = ((0, 1),)
    topk: int = 5
    budget_mb: float = 64.0
    steps: Sequence[int] | None = None

    def __post_init__(self) -> None:
        try:
            self.stats = (self.stats,) if isinstance(self.stats, str) else tuple(self.stats)
        except TypeError:
            raise InputError("malformed statistics", expected=f"a list of {STAT_NAMES}", got=repr(self.stats)[:80],
                             fix="e.g. stats=('mass', 'entropy')") from None
        unknown = [s for s in self.stats if s not in STAT_NAMES]
        if unknown:
            raise InputError("unknown statistic", expected=f"some of {STAT_NAMES}", got=unknown,
                             fix="e.g. stats=('mass', 'entropy')")
        if self.patterns is None:
            self.patterns = not self.stats
        self.rows = RowSelection.parse(self.rows)
        self.mass_spans = _spans(self.mass_spans, required="mass" in self.stats)
        if isinstance(self.topk, bool) or not isinstance(self.topk, (int, np.integer)) or self.topk < 1:
            raise InputError("topk must be a positive integer", expected=">= 1", got=repr(self.topk),
                             fix="e.g. topk=5")
        if isinstance(self.towers, str):
            self.towers = [self.towers]
        if self.towers is not None and not all(isinstance(t, str) for t in self.towers):
            raise InputError("towers must be names", expected="e.g. ['text']", got=repr(self.towers)[:80],
                             fix="pass towers=['text'] (model.info().towers lists them)")

    def check_rows(self, n_query: int, selected: int) -> None:
        """InputError when a row slice selected no row at any site (``n_query``: the most rows a site had)."""
        if self.rows.mode == "slice" and selected == 0:
            start, stop = self.rows.start, self.rows.stop
            raise InputError("row selection outside the input", expected=f"rows inside [0, {n_query})",
                             got=f"{'' if start is None else start}:{'' if stop is None else stop}",
                             fix=f"the input has {n_query} query rows: pick A:B with A < {n_query}")

    def check_spans(self, n_key: int) -> None:
        """InputError when a mass span reaches beyond ``n_key`` keys (the longest key sequence of the capture: sites
        of other towers, e.g. a vision encoder's, may have fewer keys than the spans address)."""
        if "mass" not in self.stats:
            return
        bad = [f"{a}:{b}" for a, b in self.mass_spans if b > n_key]
        if bad:
            raise InputError("mass span beyond the keys", expected=f"spans inside [0, {n_key}]", got=bad,
                             fix=f"the input has {n_key} key positions: pick spans with END <= {n_key}")

    def wants(self, site: Site) -> bool:
        if self.towers is not None and site.tower not in self.towers:
            return False
        if self.sites is None:
            ok = True
        elif callable(self.sites):
            ok = bool(self.sites(site))
        else:
            ok = site in set(self.sites)
        if ok and self.heads is not None:
            ok = bool(self.heads.heads_in_layer(site.layer))
        return ok

    def wants_step(self, step: int) -> bool:
        return self.steps is None or step in set(self.steps)

    def head_index(self, site: Site, n_heads: int) -> torch.Tensor | None:
        if self.heads is None:
            return None
        heads = [h for h in self.heads.heads_in_layer(site.layer) if h < n_heads]
        return torch.tensor(heads, dtype=torch.long)
