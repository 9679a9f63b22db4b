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
            return cls(mode="positions", positions=tuple(int(p) for p in spec))
        match = _ROW_SPEC.match(spec.strip())
        if not match:
            raise InputError("malformed row spec", expected="'last:K', 'first:K', 'A:B' or 'all'", got=repr(spec))
        if spec.strip() == "all":
            return cls()
        if match.group(1):
            return cls(mode=match.group(1), count=int(match.group(2)))
        start, stop = match.group(3), match.group(4)
        return cls(mode="slice", start=int(start) if start else None, stop=int(stop) if stop else None)

    def indices(self, n_query: int) -> torch.Tensor | None:
        """Query positions for a site with ``n_query`` rows, or None for all rows."""
        if self.mode == "all":
            return None
        if self.mode == "last":
            return torch.arange(max(0, n_query - self.count), n_query)
        if self.mode == "first":
            return torch.arange(0, min(self.count, n_query))
        if self.mode == "slice":
            return torch.arange(n_query)[slice(self.start, self.stop)]
        bad = [p for p in self.positions if not -n_query <= p < n_query]
        if bad:
            raise InputError("query row out of range", expected=f"positions in [0, {n_query})", got=bad)
        return torch.tensor([p % n_query for p in self.positions], dtype=torch.long)


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
        self.stats = tuple(self.stats)
        unknown = [s for s in self.stats if s not in STAT_NAMES]
        if unknown:
            raise InputError("unknown statistic", expected=f"some of {STAT_NAMES}", got=unknown)
        if self.patterns is None:
            self.patterns = not self.stats
        self.rows = RowSelection.parse(self.rows)
        self.mass_spans = tuple((int(a), int(b)) for a, b in self.mass_spans)
        if self.topk < 1:
            raise InputError("topk must be positive", expected=">= 1", got=self.topk)

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
