"""What an adapter says about its model: ``ModelInfo`` (family, towers, sites, attention implementation) and one
``TowerInfo`` per attention stack (layers, heads, KV heads, head size, kinds). ``attnscope info`` prints it.

Example:
    >>> from attnscope.probes.model_info import ModelInfo, TowerInfo
    >>> info = ModelInfo("hf-text", "HFTextAdapter", [TowerInfo("text", 2, 4, 2, 8)], [], "sdpa")
    >>> info.tower().n_kv_heads, info.to_dict()["towers"][0]["kinds"]
    (2, ['self'])
"""

from dataclasses import asdict, dataclass, field

from .site import Site


@dataclass
class TowerInfo:
    """One attention stack: its layers, heads, KV heads and head size."""

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    kinds: list[str] = field(default_factory=lambda: ["self"])


@dataclass
class ModelInfo:
    """What ``attnscope info`` prints: family, adapter, towers, attention implementation, context length."""

    family: str
    adapter: str
    towers: list[TowerInfo]
    sites: list[Site]
    attn_implementation: str
    max_positions: int | None = None
    name: str = ""

    def tower(self, name: str = "text") -> TowerInfo:
        for t in self.towers:
            if t.name == name:
                return t
        return self.towers[0]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sites"] = [str(s) for s in self.sites]
        return d
