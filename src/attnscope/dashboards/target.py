"""Which site, layer and heads a pattern or map request names (shared by the pattern and the map views).

A request comes from the browser as: a trace path, a site value (a ``Site`` as ``str`` prints it, e.g.
``text.L0.self``: its tower and kind pick the stack), a batch item, a heads spec
(``L2H7``, ``L2H*``) and/or a clicked grid cell. ``resolve_target`` checks all of it (the path through
``ResultsRoot.resolve``) and returns a ``Target``; nothing else is read.

Example:
    >>> import os, tempfile, torch
    >>> from attnscope.probes.site import Site
    >>> from attnscope.probes.trace import AttentionTrace, SiteRecord
    >>> from attnscope.dashboards.files import ResultsRoot
    >>> from attnscope.dashboards.target import resolve_target, target_heads
    >>> d = tempfile.mkdtemp()
    >>> rec = SiteRecord(site=Site("text", 1), probs=torch.rand(1, 2, 4, 4), n_query=4, n_key=4)
    >>> _ = AttentionTrace([rec]).save(os.path.join(d, "t.safetensors"))
    >>> t = resolve_target(ResultsRoot(d), "t.safetensors", None, 0, "L1H1", None)
    >>> (t.tower, t.kind, t.layer, t.spec), target_heads(t, held=[0, 1])
    (('text', 'self', 1, 'L1H1'), [1])
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..probes.heads import HeadSet
from ..probes.site import Site
from .data import TraceHeader, trace_header
from .files import ResultsRoot


@dataclass
class Target:
    """A checked request: the trace file, its header, the site (tower, kind, layer), the batch item, and the
    heads (None: the first head the record holds) or the heads ``spec`` to parse against the record."""

    path: Path
    header: TraceHeader
    tower: str
    kind: str
    layer: int
    batch: int
    heads: list[int] | None
    spec: str | None


def site_value(header: Any, tower: str, kind: str) -> str:
    """The browser's value for a stack: its first site, spelled as ``str(Site)`` (``Site.parse`` reads it back)."""
    return str(Site(tower, header.layers(tower, kind)[0], kind))


def site_of(value: str | None, header: Any) -> tuple[str, str]:
    """(tower, kind) of a site value when the trace has that stack, else the default stack of the trace."""
    options = header.towers_kinds()
    site = Site.parse(value) if value else None
    if site is not None and (site.tower, site.kind) in options:
        return site.tower, site.kind
    if not options:
        raise InputError("trace has no sites", expected="a trace with patterns", got=str(header.path.name))
    return ("text", "self") if ("text", "self") in options else options[0]


def heads_of(spec: str, layer: int, n_heads: int) -> list[int]:
    """The heads of ``spec`` (all in ``layer``)."""
    heads = HeadSet.parse(spec, n_heads=n_heads)
    if heads.layers != [layer]:
        raise InputError("a fused pattern needs heads of one layer", expected=f"heads of layer {layer}",
                         got=str(heads), fix="write e.g. L2H1,L2H5 or L2H*")
    return heads.heads_in_layer(layer)


def resolve_target(root: ResultsRoot, trace: str, site_value: str | None, item: Any, spec: str | None,
                   click: tuple[int, int] | None) -> Target:
    """The site, layer and heads of a request (a click wins over ``spec``; neither: first layer, first head)."""
    path = root.resolve(trace, ("trace",))
    header = trace_header(path)
    tower, kind = site_of(site_value, header)
    layers = header.layers(tower, kind)
    try:
        batch = int(item or 0)
    except (TypeError, ValueError):
        raise InputError("batch item must be a number", expected="an integer >= 0", got=repr(item)) from None
    heads: list[int] | None = None
    if click is not None:
        layer, heads = int(click[0]), [int(click[1])]
    elif spec and spec.strip():
        named = HeadSet.spec_layers(spec)
        if len(named) != 1:
            raise InputError("heads of one layer expected", expected="e.g. L2H7, L2H1,L2H5 or L2H*", got=spec,
                             fix="name one layer; the grid shows every layer")
        layer = named[0]
    else:
        layer, spec = layers[0], None
    if layer not in layers:
        raise InputError("layer not in this trace", expected=f"layers {layers}", got=layer,
                         fix="pick another trace or site")
    return Target(path, header, tower, kind, layer, batch, heads, spec if heads is None else None)


def target_heads(target: Target, held: list[int]) -> list[int]:
    """The heads to draw, given the heads the loaded record holds."""
    if target.heads is not None:
        return target.heads
    return heads_of(target.spec, target.layer, max(held) + 1) if target.spec else held[:1]


__all__ = ["Target", "heads_of", "resolve_target", "site_of", "site_value", "target_heads"]
