"""The text columns of a cross- or joint-attention record: latent queries x text keys, and where given text
positions sit among the kept key columns (a capture may keep only some).

Example:
    >>> import torch
    >>> from attnscope.probes.site import Site
    >>> from attnscope.probes.trace import SiteRecord
    >>> from attnscope.probes.text_columns import column_index, text_attention
    >>> rec = SiteRecord(site=Site("unet", 0, "cross"), probs=torch.full((1, 1, 4, 3), 1 / 3), n_query=4, n_key=3,
    ...                  meta={"key_positions": [0, 2, 5]})
    >>> text_attention(rec).shape, column_index(rec, [2, 5])
    (torch.Size([1, 1, 4, 3]), [1, 2])
"""

from collections.abc import Sequence

from jaxtyping import Float
from torch import Tensor

from ..errors import AnalysisError
from .trace import SiteRecord

TEXT_KINDS = ("cross", "joint")


def text_attention(record: SiteRecord) -> Float[Tensor, "batch head query key"]:
    """Latent-query x text-key probabilities of a cross or joint record (columns as captured)."""
    if record.probs is None:
        raise AnalysisError("record holds no probabilities", expected="patterns=True at capture",
                            got=str(record.site), fix="capture with full patterns")
    if record.site.kind == "joint" and not record.meta.get("text_block"):
        return record.block("image", "text")
    if record.site.kind not in TEXT_KINDS:
        raise AnalysisError("not a text-attention site", expected=TEXT_KINDS, got=record.site.kind)
    return record.probs


def column_index(record: SiteRecord, positions: Sequence[int]) -> list[int]:
    """Columns of ``text_attention(record)`` holding text positions (records may keep only some columns)."""
    kept = record.meta.get("key_positions")
    if kept is None:
        return list(positions)
    lookup = {int(p): i for i, p in enumerate(kept)}
    missing = [p for p in positions if p not in lookup]
    if missing:
        raise AnalysisError("positions not kept at capture", expected=sorted(lookup), got=missing)
    return [lookup[int(p)] for p in positions]
