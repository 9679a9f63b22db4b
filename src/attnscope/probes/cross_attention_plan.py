"""Cross-attention interventions of diffusion models as values: ``CrossAttentionPlan`` of ``CrossAttentionEdit``.

Each edit acts on the latent-query x text-key attention (cross-attention; for SD3 joint attention the text-key
columns of the latent-query rows) of some sites (None: every cross/joint site), heads (None: all) and text
positions (None: all text keys), at some steps (``steps`` indices and/or ``step_range`` fractions
``[start, end)`` of the sampling steps; neither: every step), on the conditional CFG half (``batch=
"conditional"``, as prompt-to-prompt and HRV do) or the whole batch (``"all"``). Modes:

- ``rescale``: probabilities times ``factor`` after the softmax (prompt-to-prompt reweighting; HRV weakening uses
  -2.0); ``renormalize=True`` divides each edited row by its new sum.
- ``mask``: -inf logits before the softmax (the tokens get exactly zero attention; rows still sum to 1).
- ``replace``: probabilities taken from a recorded run of another prompt (prompt-to-prompt word swap): ``source``
  names an ``AttentionTrace`` given to ``apply_cross_attention_edits(..., sources={name: trace})`` or a saved
  trace file; the record of the same (site, step) is used. ``renormalize`` as for rescale.

Edits are applied in order, masks on the logits first. Plans round-trip through JSON.

Example:
    >>> from attnscope.probes.cross_attention_plan import CrossAttentionEdit, CrossAttentionPlan
    >>> plan = CrossAttentionPlan([CrossAttentionEdit("rescale", positions=[2], heads=[0], factor=-2.0)])
    >>> CrossAttentionPlan.from_json(plan.to_json()) == plan
    True
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from .site import Site

EDIT_MODES = ("rescale", "mask", "replace")
PLAN_FORMAT = "attnscope.cross-attention-edits/1"


@dataclass
class CrossAttentionEdit:
    """One edit. See the module docstring for the fields' meaning."""

    mode: str
    positions: list[int] | None = None
    sites: list[Site] | None = None
    heads: list[int] | None = None
    factor: float = 1.0
    renormalize: bool = False
    source: str | None = None
    steps: list[int] | None = None
    step_range: tuple[float, float] | None = None
    batch: str = "conditional"

    def __post_init__(self) -> None:
        if self.mode not in EDIT_MODES:
            raise InputError("unknown cross-attention edit mode", expected=EDIT_MODES, got=self.mode)
        if self.mode == "replace" and not self.source:
            raise InputError("replace needs a source", expected="source='<name or trace path>'", got=None,
                             fix="record the source prompt's run with attnscope.capture and name it")
        if self.batch not in ("conditional", "all"):
            raise InputError("unknown batch selection", expected="'conditional' or 'all'", got=self.batch)
        if self.step_range is not None:
            start, end = (float(x) for x in self.step_range)
            if not 0.0 <= start <= end:
                raise InputError("bad step_range", expected="0 <= start <= end (fractions)", got=self.step_range)
            self.step_range = (start, end)
        for name in ("positions", "heads", "steps"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, [int(v) for v in value])
        if self.sites is not None:
            self.sites = list(self.sites)
            bad = [str(s) for s in self.sites if s.kind not in ("cross", "joint")]
            if bad:
                raise InputError("edits act on cross or joint attention sites", expected="kind cross/joint", got=bad)
        self.factor = float(self.factor)

    def at_site(self, site: Site) -> bool:
        return self.sites is None or site in self.sites

    def at_step(self, step: int, total: int | None) -> bool:
        """True when ``step`` is in ``steps`` or in ``step_range`` (fractions of ``total`` steps)."""
        if self.steps is None and self.step_range is None:
            return True
        if self.steps is not None and step in self.steps:
            return True
        if self.step_range is not None:
            if total is None:
                raise InputError("step_range needs the number of steps", expected="a pipeline or plan.num_steps",
                                 got=None, fix="set CrossAttentionPlan(num_steps=...) or use steps=[...]")
            start, end = self.step_range
            return start * total <= step < end * total
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "positions": self.positions, "heads": self.heads, "factor": self.factor,
                "sites": None if self.sites is None else [s.to_dict() for s in self.sites],
                "renormalize": self.renormalize, "source": self.source, "steps": self.steps,
                "step_range": None if self.step_range is None else list(self.step_range), "batch": self.batch}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CrossAttentionEdit":
        sites = data.get("sites")
        step_range = data.get("step_range")
        return cls(mode=data["mode"], positions=data.get("positions"), heads=data.get("heads"),
                   sites=None if sites is None else [Site.from_dict(s) for s in sites],
                   factor=float(data.get("factor", 1.0)), renormalize=bool(data.get("renormalize", False)),
                   source=data.get("source"), steps=data.get("steps"),
                   step_range=None if step_range is None else tuple(step_range), batch=data.get("batch",
                                                                                                "conditional"))


@dataclass
class CrossAttentionPlan:
    """Edits applied together; ``num_steps`` resolves ``step_range`` when no pipeline scheduler tells it."""

    edits: list[CrossAttentionEdit] = field(default_factory=list)
    num_steps: int | None = None
    metadata: dict = field(default_factory=dict)

    def sites(self, available: Sequence[Site]) -> list[Site]:
        """The sites of ``available`` that some edit touches."""
        return [s for s in available if s.kind in ("cross", "joint") and any(e.at_site(s) for e in self.edits)]

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "edits": [e.to_dict() for e in self.edits], "num_steps": self.num_steps,
                "metadata": dict(self.metadata)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CrossAttentionPlan":
        if data.get("format") != PLAN_FORMAT:
            raise InputError("not a cross-attention plan", expected=PLAN_FORMAT, got=data.get("format"))
        return cls([CrossAttentionEdit.from_dict(e) for e in data.get("edits", [])], data.get("num_steps"),
                   dict(data.get("metadata") or {}))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "CrossAttentionPlan":
        return cls.from_dict(json.loads(text))
