"""Queries, keys and score terms of attention layers as their attention function receives them, in one forward.

``collect_layer_inputs(model, inputs, layers)`` instruments the model through its adapter (the same place a capture
reads attention: the routed attention function) with a recorder that keeps, for the wanted layers, the queries,
keys, mask, scaling, softcap and learned sinks instead of probabilities. The forward stops after the last wanted
layer. From a ``LayerInputs`` any block of probability rows of one head is then computed on demand with the
capture's own ``attention_from_qk`` (same masking, softcap and sink rules), so a 16k-token pattern is never held
whole, and ``sample(head)`` gives the ``QueryKeySample`` of the AttentionViz joint embedding.

Example:
    >>> import torch, transformers
    >>> from attnscope.viz.head_inputs import collect_layer_inputs
    >>> cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> got = collect_layer_inputs(model, torch.tensor([[1, 2, 3, 4, 5]]), layers=[1])
    >>> rows = got[1].probability_rows(head=3, start=1, stop=3, key_stop=5)  # query rows 1, 2; all keys
    >>> rows.shape, [round(float(s), 4) for s in rows.sum(-1)], float(rows[0, 2:].abs().max())  # causal
    (torch.Size([2, 5]), [1.0, 1.0], 0.0)
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError, UnsupportedModelError
from ..probes.adapter import ModelLike, as_adapter
from ..probes.capturing import check_inputs
from ..probes.recorder import Recorder
from ..probes.request import CaptureRequest
from ..probes.site import Site
from ..probes.statistics import attention_from_qk
from .embedding import QueryKeySample


class _Stop(Exception):
    """Raised inside the forward once the last wanted layer was seen (the rest of the model is not needed)."""


@dataclass
class LayerInputs:
    """What one attention layer's attention function received, for batch item 0.

    queries ``[head, query, d]`` and keys ``[kv_head, key, d]`` (float32, not scaled); ``mask``: the structural
    mask plus any additive score term, batch item 0 (``[1 or head, query, key]``, ``[key]`` padding) or None.
    """

    layer: int
    queries: Tensor
    keys: Tensor
    mask: Tensor | None
    scaling: float
    is_causal: bool
    softcap: float | None
    sinks: Tensor | None
    tokens: list[str]

    @property
    def n_heads(self) -> int:
        return int(self.queries.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.keys.shape[1])

    def _kv_head(self, head: int) -> int:
        if not 0 <= head < self.n_heads:
            raise InputError("head out of range", expected=f"0 <= head < {self.n_heads}", got=head,
                             fix=f"pick a head of layer {self.layer}")
        return head // (self.n_heads // self.keys.shape[0])

    def probability_rows(self, head: int, start: int, stop: int, key_stop: int | None = None) -> Tensor:
        """Attention probabilities ``[stop - start, key_stop]`` of query rows ``start:stop`` of ``head``.

        Under plain causal attention only keys ``< stop`` can be seen: ``key_stop`` defaults to that (the columns
        after it are zeros and are not computed); otherwise it defaults to every key.
        """
        n_query = int(self.queries.shape[1])
        if not 0 <= start < stop <= n_query:
            raise InputError("row range outside the input", expected=f"0 <= start < stop <= {n_query}",
                             got=(start, stop))
        q = self.queries[head, start:stop][None, None]
        plain_causal = self.is_causal and self.mask is None and n_query == self.n_tokens
        width = (stop if plain_causal else self.n_tokens) if key_stop is None else int(key_stop)
        k = self.keys[self._kv_head(head), :width][None, None]
        mask = self._mask_rows(head, start, stop, width)
        sinks = None if self.sinks is None else self.sinks[head:head + 1]
        if plain_causal and width >= stop:  # bottom-right alignment: rows start.. see keys <= their position
            out = attention_from_qk(q, k[..., :stop, :], None, scaling=self.scaling, is_causal=True,
                                    softcap=self.softcap, sinks=sinks)["probs"][0, 0]
            return torch.nn.functional.pad(out, (0, width - stop)) if width > stop else out
        if plain_causal:
            raise InputError("key_stop cuts visible keys", expected=f"key_stop >= {stop} under causal attention",
                             got=width, fix="leave key_stop out")
        return attention_from_qk(q, k, mask, scaling=self.scaling, is_causal=False, softcap=self.softcap,
                                 sinks=sinks)["probs"][0, 0]

    def _mask_rows(self, head: int, start: int, stop: int, width: int) -> Tensor | None:
        if self.mask is None:
            return None
        if self.mask.ndim == 1:  # padding [key]
            return self.mask[None, :width]
        m = self.mask[head if self.mask.shape[0] > 1 else 0]
        m = m[start:stop] if m.shape[0] > 1 else m
        return m[None, None, :, :width]

    def sample(self, head: int) -> QueryKeySample:
        """Queries (times the softmax scaling: ``q @ k`` is the logit) and keys of ``head`` for ``qk_embedding``."""
        k = self.keys[self._kv_head(head)].numpy()
        q = self.queries[head].numpy() * self.scaling
        n = len(k)
        return QueryKeySample(q, k, list(self.tokens), np.arange(n), np.zeros(n, dtype=int), self.layer, head)


class _Keeper(Recorder):
    """A recorder that keeps the attention function's inputs of the wanted sites and stops after the last one."""

    def __init__(self, sites: list[Site]):
        super().__init__(CaptureRequest(sites=sites))
        self.kept: dict[int, LayerInputs] = {}
        self.last = max(s.layer for s in sites)

    def observe_qk(self, site: Site, query: Tensor, key: Tensor, mask: Tensor | None, *, scaling: float,
                   is_causal: bool, softcap: float | None = None, step: int | None = None,
                   batch_index: Tensor | None = None, meta: dict | None = None, sinks: Tensor | None = None) -> None:
        if not self.wants(site) or site.layer in self.kept:
            return
        if mask is not None:
            mask = mask[0] if mask.ndim == 4 else mask[0] if mask.ndim == 2 else mask
        self.kept[site.layer] = LayerInputs(
            site.layer, query[0].detach().float().cpu(), key[0].detach().float().cpu(),
            None if mask is None else mask.detach().cpu(), float(scaling), bool(is_causal), softcap,
            None if sinks is None else sinks.detach().float().cpu(), [])
        if site.layer == self.last and len(self.kept) == len(self.request.sites):
            raise _Stop

    def observe_probs(self, site: Site, probs: Tensor, **kwargs: Any) -> None:
        if self.wants(site):
            raise UnsupportedModelError("this model hands over finished probabilities, not queries and keys",
                                        expected="a model whose attention runs through the routed attention "
                                        "function (transformers text models)", got=site.tower,
                                        fix="use the pattern view of a capture for this model")


def collect_layer_inputs(model: ModelLike, inputs: Any, layers: Sequence[int], *, tower: str = "text",
                         kind: str = "self") -> dict[int, LayerInputs]:
    """``{layer: LayerInputs}`` of ``layers`` for ``inputs`` (text, ids or forward kwargs; batch item 0)."""
    adapter = as_adapter(model)
    known = {s.layer for s in adapter.sites() if s.tower == tower and s.kind == kind}
    wanted = sorted({int(layer) for layer in layers})
    if not wanted or any(layer not in known for layer in wanted):
        raise InputError("layer not in the model", expected=f"layers of {tower}/{kind}: 0..{max(known, default=-1)}",
                         got=wanted, fix="pick layers the model has")
    check_inputs(adapter, inputs)
    prepared = adapter.prepare(inputs)
    keeper = _Keeper([Site(tower, layer, kind) for layer in wanted])
    try:
        with torch.no_grad(), adapter.instrument(keeper):
            adapter.run(prepared)
    except _Stop:
        pass
    if len(keeper.kept) != len(wanted):
        raise UnsupportedModelError("the attention function of a wanted layer was not called",
                                    expected=f"layers {wanted}", got=sorted(keeper.kept),
                                    fix="a transformers model whose attention dispatches through AttentionInterface")
    ids = prepared.kwargs["input_ids"][0].tolist() if "input_ids" in prepared.kwargs else []
    strings = prepared.tokens.strings[0] if prepared.tokens.strings else [str(i) for i in ids]
    for got in keeper.kept.values():
        got.tokens = list(strings)[:got.n_tokens] if len(strings) >= got.n_tokens else \
            [str(i) for i in range(got.n_tokens)]
    return keeper.kept


__all__ = ["LayerInputs", "collect_layer_inputs"]
