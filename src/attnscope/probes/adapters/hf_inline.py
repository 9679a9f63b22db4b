"""Adapter for transformers models whose attention computes its scores inline: BLOOM (ALiBi), GPT-Neo (no scaling,
local windows) and DeBERTa-v2/v3 (disentangled relative attention).

Their attention modules are routed like every other family (``hf_route``): inside a capture, an edit or an eager
reference, each module's forward is swapped for a faithful re-implementation (``hf_bloom``, ``hf_gpt_neo``,
``hf_deberta``, registered in ``inline_attention``) that computes the same scores and calls the routed attention
function, so capture, statistics and every head edit live in the one place they live for the others; the original
forward is restored on exit, also on error. The independent reference of ``validate`` is the model's own eager
``output_attentions`` from its untouched forward. Other inline families (e.g. DeBERTa v1, XLNet) stay refused.

Example:
    >>> import torch, transformers, attnscope
    >>> cfg = transformers.BloomConfig(vocab_size=32, hidden_size=16, n_layer=2, n_head=2)
    >>> handle = attnscope.load(transformers.BloomForCausalLM(cfg).eval())
    >>> handle.family, handle.info().family, attnscope.probes.validate(handle).ok
    ('hf-inline', 'causal-lm', True)
"""

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ...errors import CaptureError
from ..adapter import Prepared, register_adapter
from ..model_info import ModelInfo
from ..recorder import Recorder
from ..site import Site
from . import hf_bloom, hf_deberta, hf_gpt_neo  # noqa: F401  (register the re-implementations)
from .hf_route import attention_modules, route_attention
from .hf_text import HFTextAdapter
from .inline_attention import inline_spec


def inline_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of ``model`` that attnscope routes through a registered re-implementation."""
    return [m for _, m in attention_modules(model) if inline_spec(m) is not None]


@register_adapter
class HFInlineAdapter(HFTextAdapter):
    """transformers text models with BLOOM, GPT-Neo or DeBERTa-v2 attention (scores computed inline)."""

    family = "hf-inline"
    priority = 11

    @classmethod
    def matches(cls, module: Any) -> bool:
        from transformers import PreTrainedModel

        return isinstance(module, PreTrainedModel) and not hasattr(module.config, "vision_config") \
            and bool(inline_modules(module))

    def _specs(self) -> dict[int, Any]:
        return {id(m): inline_spec(m) for m in inline_modules(self.module)}

    def info(self) -> ModelInfo:
        info = super().info()
        if info.family != "encoder-decoder" and any(spec.causal for spec in self._specs().values()):
            info.family = "causal-lm"
        return info

    @contextlib.contextmanager
    def instrument(self, recorder: Recorder, implementation: str = "auto") -> Iterator[None]:
        with route_attention(self.module, recorder, self._sites(), implementation) as path:
            specs = self._specs()
            names = sorted({type(m).__name__ for m in inline_modules(self.module)})
            terms = sorted({spec.terms for spec in specs.values()})
            self.attention_path = f"{', '.join(names)} re-implemented by attnscope ({'; '.join(terms)})" + \
                (f", config {path}" if path else "")
            yield

    def reference_patterns(self, prepared: Prepared) -> dict[Site, list[torch.Tensor]]:
        """The model's own eager weights (``output_attentions=True``, its untouched forward), one per layer."""
        with torch.no_grad():
            output = self.module(**prepared.kwargs, output_attentions=True)
        weights = getattr(output, "attentions", None)
        sites = sorted(self._sites().values())
        if not weights or len(weights) != len(sites) or not all(torch.is_tensor(w) for w in weights):
            raise CaptureError("the model did not return one attention tensor per layer",
                               expected=f"{len(sites)} tensors in output.attentions",
                               got=f"{len(weights) if weights else 0}", fix="call validate on the base model class")
        return {site: [w.detach().float().cpu()] for site, w in zip(sites, weights)}

    def causal_sites(self) -> set[Site]:
        specs = self._specs()
        return {site for mid, site in self._sites().items() if specs.get(mid) is not None and specs[mid].causal}
