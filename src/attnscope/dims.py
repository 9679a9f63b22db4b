"""Dimension names used across attnscope, and jaxtyping aliases for public tensor functions.

Names: ``layer batch head kv_head query key d_head step``. A probability tensor of one site is
``Float[Tensor, "batch head query key"]``; a stack of layers is ``Float[Tensor, "layer batch head query key"]``.
"""

from jaxtyping import Bool, Float, Int
from torch import Tensor

DIM_NAMES = ("layer", "batch", "head", "kv_head", "query", "key", "d_head", "step")

Probs = Float[Tensor, "batch head query key"]
LayerProbs = Float[Tensor, "layer batch head query key"]
QueryStates = Float[Tensor, "batch head query d_head"]
KeyStates = Float[Tensor, "batch kv_head key d_head"]
Mask = Float[Tensor, "batch #head query key"] | Bool[Tensor, "batch #head query key"]
TokenIds = Int[Tensor, "batch seq"]

__all__ = ["DIM_NAMES", "Probs", "LayerProbs", "QueryStates", "KeyStates", "Mask", "TokenIds"]
