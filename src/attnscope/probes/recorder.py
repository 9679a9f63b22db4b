"""``Recorder``: receives attention at each site from an adapter and keeps what the request asks for.

Adapters call ``observe_qk`` (they have queries and keys, e.g. under SDPA) or ``observe_probs`` (the model
already computed probabilities, e.g. eager attention or a TransformerLens ``hook_pattern``).
"""

from collections.abc import Callable

import torch
from torch import Tensor

from .request import CaptureRequest
from .site import Site
from .statistics import attention_from_qk, select_probs
from .trace import SiteRecord


class Recorder:
    """Collects ``SiteRecord`` objects for one capture.

    ``step`` defaults to the number of earlier calls of the same site in this capture (decode steps, repeated
    forwards); diffusion adapters pass the denoising step. ``batch_index`` keeps only some batch items (e.g. the
    conditional half of a classifier-free-guidance batch). ``rename`` (set by ``capture`` for models whose layers
    share one attention module, ``shared_layers``) turns the module's site into the current application's.
    """

    def __init__(self, request: CaptureRequest):
        self.request = request
        self.records: list[SiteRecord] = []
        self._calls: dict[Site, int] = {}
        self.enabled = True
        self.rename: "Callable[[Site], Site] | None" = None

    def wants(self, site: Site) -> bool:
        return self.enabled and self.request.wants(site)

    def _next_step(self, site: Site, step: int | None) -> int:
        count = self._calls.get(site, 0)
        self._calls[site] = count + 1
        return count if step is None else step

    def _keep(self, site: Site, step: int, out: dict[str, Tensor], rows: Tensor | None, heads: Tensor | None,
              n_query: int, n_key: int, meta: dict | None) -> None:
        probs = out.pop("probs", None)
        self.records.append(SiteRecord(
            site=site, step=step, probs=probs, query_index=rows, head_index=heads,
            stats={k: v.detach().cpu() if v.device.type != "cpu" else v.detach() for k, v in out.items()},
            mass_spans=list(self.request.mass_spans) if "mass" in self.request.stats else [],
            n_query=n_query, n_key=n_key, meta=dict(meta or {}),
        ))
        if probs is not None:
            self.records[-1].probs = probs.detach().cpu()

    def observe_qk(self, site: Site, query: Tensor, key: Tensor, mask: Tensor | None, *, scaling: float,
                   is_causal: bool, softcap: float | None = None, step: int | None = None,
                   batch_index: Tensor | None = None, meta: dict | None = None, sinks: Tensor | None = None) -> None:
        """Record from ``query [batch, head, query, d]`` and ``key [batch, kv_head, key, d]``.

        sinks: learned sink logits ``[head]`` (GPT-OSS): an extra softmax column that takes mass and is dropped, so
        the recorded rows sum to ``1 - sink mass`` as in the model's own eager attention.
        """
        site = self.rename(site) if self.rename is not None else site
        if not self.wants(site):
            return
        step = self._next_step(site, step)
        if not self.request.wants_step(step):
            return
        with torch.no_grad():
            if batch_index is not None:
                query, key = query.index_select(0, batch_index), key.index_select(0, batch_index)
                if mask is not None and mask.shape[0] > 1:
                    mask = mask.index_select(0, batch_index.to(mask.device))
            n_query, n_key = query.shape[-2], key.shape[-2]
            rows = self.request.rows.indices(n_query)
            heads = self.request.head_index(site, query.shape[1])
            out = attention_from_qk(query, key, mask, scaling=scaling, is_causal=is_causal, softcap=softcap,
                                    rows=rows, heads=heads, want_probs=bool(self.request.patterns),
                                    stats=self.request.stats, mass_spans=self.request.mass_spans,
                                    topk=self.request.topk, budget_mb=self.request.budget_mb, sinks=sinks)
        if sinks is not None:
            meta = dict(meta or {}, attention_sinks=True)
        self._keep(site, step, out, rows, heads, n_query, n_key, meta)

    def observe_probs(self, site: Site, probs: Tensor, *, step: int | None = None,
                      batch_index: Tensor | None = None, meta: dict | None = None) -> None:
        """Record from probabilities ``[batch, head, query, key]`` the model computed itself."""
        site = self.rename(site) if self.rename is not None else site
        if not self.wants(site):
            return
        step = self._next_step(site, step)
        if not self.request.wants_step(step):
            return
        with torch.no_grad():
            if batch_index is not None:
                probs = probs.index_select(0, batch_index.to(probs.device))
            n_query, n_key = probs.shape[-2], probs.shape[-1]
            rows = self.request.rows.indices(n_query)
            heads = self.request.head_index(site, probs.shape[1])
            out = select_probs(probs, rows=rows, heads=heads, want_probs=bool(self.request.patterns),
                               stats=self.request.stats, mass_spans=self.request.mass_spans, topk=self.request.topk)
        self._keep(site, step, out, rows, heads, n_query, n_key, meta)
