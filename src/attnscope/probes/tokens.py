"""Token information carried by a trace: ids, strings, and modality spans.

Example:
    >>> from attnscope.probes.tokens import Span, TokenInfo
    >>> info = TokenInfo(ids=[[101, 7592, 102]], strings=[["[CLS]", "hello", "[SEP]"]],
    ...                  spans=[Span("special", 0, 1, "[CLS]"), Span("text", 1, 2), Span("special", 2, 3, "[SEP]")])
    >>> TokenInfo.from_dict(info.to_dict()) == info
    True
    >>> info.positions("special")
    [0, 2]
"""

from dataclasses import dataclass, field

MODALITIES = ("text", "image", "special", "latent", "audio")


@dataclass(frozen=True)
class Span:
    """Positions ``[start, end)`` of one modality (``text``, ``image``, ``special``, ``latent``) in a sequence."""

    modality: str
    start: int
    end: int
    label: str = ""

    def to_dict(self) -> dict:
        return {"modality": self.modality, "start": self.start, "end": self.end, "label": self.label}

    @classmethod
    def from_dict(cls, d: dict) -> "Span":
        return cls(str(d["modality"]), int(d["start"]), int(d["end"]), str(d.get("label", "")))


@dataclass
class TokenInfo:
    """Per batch item token ids and strings, plus spans shared by the batch.

    For diffusion models the query tokens are latent pixels: ``grid`` gives their ``(height, width)`` and the key
    tokens of cross-attention are the text tokens in ``strings``.
    """

    ids: list[list[int]] | None = None
    strings: list[list[str]] | None = None
    spans: list[Span] = field(default_factory=list)
    grid: tuple[int, int] | None = None
    padding: list[list[int]] | None = None

    def positions(self, modality: str) -> list[int]:
        """All positions covered by spans of the given modality."""
        return sorted({i for s in self.spans if s.modality == modality for i in range(s.start, s.end)})

    def to_dict(self) -> dict:
        return {
            "ids": self.ids, "strings": self.strings, "spans": [s.to_dict() for s in self.spans],
            "grid": list(self.grid) if self.grid else None, "padding": self.padding,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TokenInfo":
        grid = d.get("grid")
        return cls(ids=d.get("ids"), strings=d.get("strings"), spans=[Span.from_dict(s) for s in d.get("spans", [])],
                   grid=tuple(grid) if grid else None, padding=d.get("padding"))
