"""``Site``: a typed key for one attention module of a model.

Example:
    >>> from attnscope.probes.site import Site
    >>> s = Site(layer=3, kind="self", tower="text")
    >>> str(s)
    'text.L3.self'
    >>> Site.from_dict(s.to_dict()) == s
    True
    >>> Site.parse("unet.up.1.L0.cross") == Site("unet.up.1", 0, "cross")   # the inverse of str()
    True
"""

import re
from dataclasses import asdict, dataclass

from ..errors import SiteError

SITE_KINDS = ("self", "cross", "joint")
_SITE = re.compile(r"^(?P<tower>.+)\.L(?P<layer>\d+)\.(?P<kind>[a-z]+)$")


@dataclass(frozen=True, order=True)
class Site:
    """One attention module: its tower (``text``, ``vision``, ``unet.down.0`` ...), layer index and kind.

    ``layer`` counts attention modules within the tower in forward order. ``kind`` is ``self`` (queries and keys
    from the same tokens), ``cross`` (keys from another stream, e.g. text conditioning) or ``joint`` (one softmax
    over two streams, as in SD3).
    """

    tower: str = "text"
    layer: int = 0
    kind: str = "self"

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise SiteError("unknown site kind", expected=f"one of {SITE_KINDS}", got=self.kind)
        if self.layer < 0:
            raise SiteError("negative layer index", expected="layer >= 0", got=self.layer)

    def __str__(self) -> str:
        return f"{self.tower}.L{self.layer}.{self.kind}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def parse(cls, text: str) -> "Site":
        """The site ``str(site)`` printed: ``TOWER.L<layer>.KIND`` (towers may contain dots)."""
        match = _SITE.match(str(text).strip())
        if not match:
            raise SiteError("malformed site", expected="TOWER.L<layer>.KIND, e.g. text.L3.self or unet.up.1.L0.cross",
                            got=repr(text), fix="copy a site from `attnscope info --model M`")
        return cls(match["tower"], int(match["layer"]), match["kind"])

    @classmethod
    def from_dict(cls, data: dict) -> "Site":
        return cls(tower=str(data["tower"]), layer=int(data["layer"]), kind=str(data["kind"]))
