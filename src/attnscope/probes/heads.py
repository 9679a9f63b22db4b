"""``Head`` (one attention head: layer, head) and ``HeadSet`` (a typed set of them), with the ``L3H5,L7H*`` parser
the CLI uses. Strings appear only at the edges (CLI, JSON, tables' labels); inside, heads are these types.

A ``HeadSet`` holds *global* layer numbers: a model's editable attention layers in forward order
(``head_slices.output_projections``). A spec token may instead name a tower and kind, ``vision.L0H3``,
``text.L3H*``, ``decoder.cross.L1H0`` (kind ``self`` when left out): ``TowerHead`` tokens, read by ``parse_tokens``
and mapped to global layers against a model by ``attnscope.probes.tower_heads.resolve_heads``.

Example:
    >>> from attnscope.probes.heads import Head, HeadSet
    >>> Head.parse("L3H5"), str(Head(3, 5)), Head(3, 5) == (3, 5)
    (Head(layer=3, head=5), 'L3H5', True)
    >>> from attnscope.probes.heads import HeadSet
    >>> hs = HeadSet.parse("L0H1,L1H*", n_layers=2, n_heads=3)
    >>> sorted(hs) == [(0, 1), (1, 0), (1, 1), (1, 2)], sorted(hs)[0]
    (True, Head(layer=0, head=1))
    >>> str(hs)
    'L0H1,L1H0,L1H1,L1H2'
    >>> hs.heads_in_layer(1)
    [0, 1, 2]
    >>> [str(t) for t in parse_tokens("vision.L0H3,decoder.cross.L1H*,L2H0")]
    ['vision.L0H3', 'decoder.cross.L1H*', 'L2H0']
    >>> is_tower_spec("text.L3H*"), is_tower_spec("L3H*")
    (True, False)
"""

import re
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from ..errors import HeadSpecError

_TOKEN = re.compile(r"^L(\d+|\*)H(\d+|\*)$", re.IGNORECASE)
_TOWER_TOKEN = re.compile(r"^(?:(?P<prefix>[A-Za-z_][\w.]*)\.)?L(?P<layer>\d+|\*)H(?P<head>\d+|\*)$", re.IGNORECASE)
KINDS = ("self", "cross", "joint")
TOKEN_HELP = "L<layer>H<head> or TOWER[.KIND].L<layer>H<head> ('*' wildcard), comma separated"


class TowerHead(NamedTuple):
    """One spec token: ``tower`` (None: global numbering), ``kind``, ``layer`` and ``head`` (None: ``*``)."""

    tower: str | None
    kind: str
    layer: int | None
    head: int | None

    def __str__(self) -> str:
        star = lambda v: "*" if v is None else str(v)  # noqa: E731
        where = "" if self.tower is None else f"{self.tower}." + ("" if self.kind == "self" else f"{self.kind}.")
        return f"{where}L{star(self.layer)}H{star(self.head)}"


def parse_tokens(spec: str) -> list[TowerHead]:
    """The tokens of ``spec`` (``vision.L0H3,text.L1H*,L2H0``); HeadSpecError when one is malformed."""
    if not isinstance(spec, str) or not spec.strip():
        raise HeadSpecError("empty head spec", expected="e.g. 'L3H5,L7H*' or 'text.L3H5'", got=repr(spec))
    out = []
    for raw in spec.split(","):
        match = _TOWER_TOKEN.match(raw.strip())
        if not match:
            raise HeadSpecError("malformed head spec", expected=TOKEN_HELP, got=repr(raw.strip()),
                                fix="write e.g. 'L3H5,L7H*', 'vision.L0H3' or 'decoder.cross.L1H0'")
        tower, kind = match["prefix"], "self"
        if tower is not None and "." in tower and tower.rsplit(".", 1)[1].lower() in KINDS:
            tower, kind = tower.rsplit(".", 1)[0], tower.rsplit(".", 1)[1].lower()
        if tower is not None and tower.lower() in KINDS:
            raise HeadSpecError("a kind without a tower", expected=TOKEN_HELP, got=repr(raw.strip()),
                                fix="name the tower first, e.g. decoder.cross.L1H0")
        value = lambda part: None if part == "*" else int(part)  # noqa: E731
        out.append(TowerHead(tower, kind, value(match["layer"]), value(match["head"])))
    return out


def is_tower_spec(spec: str) -> bool:
    """Whether any token of ``spec`` names a tower (then only a model can resolve it)."""
    return any(token.tower is not None for token in parse_tokens(spec))


class Head(NamedTuple):
    """One attention head: ``(layer, head)``, printed ``L3H5``. A tuple, so ``(3, 5)`` works wherever it is taken."""

    layer: int
    head: int

    @classmethod
    def parse(cls, text: str) -> "Head":
        """``L3H5`` -> ``Head(3, 5)`` (no wildcards: that is ``HeadSet.parse``)."""
        match = _TOKEN.match(str(text).strip())
        if not match or "*" in match.group(0):
            raise HeadSpecError("malformed head", expected="L<layer>H<head>, e.g. L3H5", got=repr(text))
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}"


class HeadSet:
    """An immutable, sorted set of ``(layer, head)`` pairs."""

    def __init__(self, pairs: Iterable[tuple[int, int]] = ()):
        cleaned = set()
        for layer, head in pairs:
            if int(layer) < 0 or int(head) < 0:
                raise HeadSpecError("negative head index", expected="layer, head >= 0", got=(layer, head))
            cleaned.add((int(layer), int(head)))
        self._pairs = frozenset(cleaned)

    @classmethod
    def parse(cls, spec: str, n_layers: int | None = None, n_heads: int | None = None) -> "HeadSet":
        """Parse ``L3H5,L7H*`` (``*`` = every layer or head; needs ``n_layers`` / ``n_heads``).

        Raises HeadSpecError for a malformed token or an index outside ``n_layers`` x ``n_heads``.
        """
        pairs: list[tuple[int, int]] = []
        for token, match in cls._tokens(spec):
            layers = cls._expand(match.group(1), n_layers, "layer", token)
            heads = cls._expand(match.group(2), n_heads, "head", token)
            pairs.extend((layer, head) for layer in layers for head in heads)
        return cls(pairs)

    @classmethod
    def check_spec(cls, spec: str) -> str:
        """``spec`` unchanged when it is well formed (wildcards allowed: no model size needed), else
        HeadSpecError; for specs read before the model is known (a sweep spec). Tower-qualified tokens
        (``vision.L0H3``) are accepted: they are resolved against the model later."""
        parse_tokens(spec)
        return spec

    @classmethod
    def spec_layers(cls, spec: str) -> list[int]:
        """The layers ``spec`` names, sorted (``L2H*,L2H5`` -> ``[2]``); a wildcard layer is refused here."""
        layers = set()
        for token, match in cls._tokens(spec):
            if match.group(1) == "*":
                raise HeadSpecError("a wildcard layer names no layer", expected="L<layer>H...", got=token,
                                    fix="name the layer, e.g. L2H*")
            layers.add(int(match.group(1)))
        return sorted(layers)

    @staticmethod
    def _tokens(spec: str) -> "list[tuple[str, re.Match[str]]]":
        if not isinstance(spec, str) or not spec.strip():
            raise HeadSpecError("empty head spec", expected="e.g. 'L3H5,L7H*'", got=repr(spec))
        out = []
        for raw in spec.split(","):
            token = raw.strip()
            match = _TOKEN.match(token)
            if not match and _TOWER_TOKEN.match(token):
                raise HeadSpecError(
                    "a tower-qualified head needs the model to be resolved", expected="L<layer>H<head> here",
                    got=repr(token), fix="write L<layer>H<head> here (per-tower names are taken by head edits: "
                    "`attnscope ablate`, sweeps, plans; in Python attnscope.probes.tower_heads.resolve_heads)")
            if not match:
                raise HeadSpecError(
                    "malformed head spec", expected="L<layer>H<head> with '*' as wildcard, comma separated",
                    got=repr(token), fix="write e.g. 'L3H5,L7H*'",
                )
            out.append((token, match))
        return out

    @staticmethod
    def _expand(part: str, limit: int | None, name: str, token: str) -> list[int]:
        if part == "*":
            if limit is None:
                raise HeadSpecError(f"wildcard {name} needs the model's size", expected=f"a known number of {name}s",
                                    got=token, fix="pass n_layers/n_heads or name the index")
            return list(range(limit))
        value = int(part)
        if limit is not None and value >= limit:
            raise HeadSpecError(f"{name} index out of range in {token!r}", expected=f"{name} < {limit}", got=value,
                                fix=f"the model has {limit} {name}s, numbered from 0")
        return [value]

    @classmethod
    def all(cls, n_layers: int, n_heads: int) -> "HeadSet":
        return cls((layer, head) for layer in range(n_layers) for head in range(n_heads))

    def heads_in_layer(self, layer: int) -> list[int]:
        return sorted(h for (l, h) in self._pairs if l == layer)

    @property
    def layers(self) -> list[int]:
        return sorted({l for (l, _) in self._pairs})

    def validate(self, n_layers: int, n_heads: int) -> "HeadSet":
        """Raise HeadSpecError unless every pair fits a model of ``n_layers`` x ``n_heads``."""
        for layer, head in self:
            if layer >= n_layers or head >= n_heads:
                raise HeadSpecError("head out of range", expected=f"layer < {n_layers}, head < {n_heads}",
                                    got=f"L{layer}H{head}", fix="check `attnscope info --model M`")
        return self

    def __iter__(self) -> Iterator[Head]:
        return iter(Head(layer, head) for layer, head in sorted(self._pairs))

    def __len__(self) -> int:
        return len(self._pairs)

    def __contains__(self, item: object) -> bool:
        return item in self._pairs

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HeadSet) and self._pairs == other._pairs

    def __hash__(self) -> int:
        return hash(self._pairs)

    def __or__(self, other: "HeadSet") -> "HeadSet":
        return HeadSet(self._pairs | other._pairs)

    def __str__(self) -> str:
        return ",".join(f"L{l}H{h}" for l, h in self)

    def __repr__(self) -> str:
        return f"HeadSet({str(self)!r})"
