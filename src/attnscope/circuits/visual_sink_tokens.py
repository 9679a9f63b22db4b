"""Visual attention sinks (Kang et al., ICLR 2025, "See What You Are Told"): sink dimensions, visual sink tokens,
per-head attention to sink vs non-sink image tokens, image-centric heads, and (option) the effect of VAR.

- **Sink dimensions** ``D_sink``: the dimensions with the largest ``|RMSNorm(h)_d|`` at the first token (BOS), taken
  over every decoder layer's input hidden state (max over layers, mean over examples), ``n_sink_dims`` of them
  (model-specific: LLaMA-2-7B {1415, 2533}); or pass ``sink_dims``. ``sink_position`` (default 0) must be the BOS
  position: prompts that start with the image need explicit ``sink_dims``.
- **Sink tokens** of layer ``l``: tokens whose layer input ``x`` has ``phi(x) = max_{d in D_sink} |RMSNorm(x)_d|
  > tau`` (default 20). Visual sink tokens are the image tokens among them. Note ``phi <= sqrt(d_model)``: tiny
  models need a smaller ``tau``.
- **Per head** (mean over the query rows, ``after_image`` by default, then over examples): ``visual_attention``
  (sum over image tokens), ``visual_sink_attention``, ``visual_nonsink_attention``, ``sink_ratio`` (sink share of
  the visual attention, rows without visual attention count 0), ``image_centric_fraction`` (share of (query, head)
  rows with visual attention >= ``min_visual`` = 0.2 and sink share <= ``rho`` = 0.5) and ``image_centric`` (1 when
  the head's mean values meet both conditions).
- **Per layer** (``head = -1``): ``visual_sink_count``, ``text_sink_count``; one ``visual_sink_token`` row per found
  visual sink (``position``, ``patch`` columns, value ``phi``). ``sink_dim`` rows (``layer = head = -1``).
- ``var=True``: run each example again under VAR (``var_intervention``) and report ``var_top1_agreement`` with the
  unedited next-token prediction, ``var_max_logit_change``, ``var_answer_prob_delta`` (with answer ids) and per
  layer ``var_selected_fraction`` (edited rows among the eligible ones).

Example:
    >>> from attnscope.probes.adapters.hf_vlm import HFVisionLanguageAdapter, tiny_llava
    >>> from attnscope.circuits.visual_sink_tokens import visual_sinks
    >>> adapter = HFVisionLanguageAdapter(tiny_llava())
    >>> table = visual_sinks(adapter, adapter.sample_inputs(), tau=20.0)
    >>> float(table.df[table.df.metric == "visual_sink_count"].value.sum())  # phi <= sqrt(32) < 20
    0.0
"""

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..datasets.vlm_example_batches import VLMExample, vlm_examples
from ..probes.adapter import ModelLike
from ..probes.capturing import capture
from ..probes.heads import HeadSet
from ..results import ResultTable
from ._vlm import image_positions, mean, patch_positions, select_queries, text_self_sites, to_device, vlm_adapter
from .registry import register_analysis
from .var_intervention import VARSettings, image_centric, sink_phi, visual_attention_redistribution


def _layer_inputs(adapter: Any, inputs: dict[str, Tensor]) -> tuple[Any, list[Tensor]]:
    """Model output and the input hidden state of every decoder layer (``[seq, d_model]`` of item 0)."""
    with torch.no_grad():
        out = adapter.module(**to_device(inputs, adapter), output_hidden_states=True)
    states = out.hidden_states
    return out, [h[0].float().cpu() for h in states[:len(states) - 1]]


def find_sink_dims(model: ModelLike, examples: Any, n_dims: int = 2, position: int = 0) -> list[tuple[int, float]]:
    """``(dim, score)`` of the ``n_dims`` sink dimensions: largest ``|RMSNorm(h)_d|`` at ``position``, max over
    the decoder layers' inputs, mean over examples."""
    adapter = vlm_adapter(model)
    scores = []
    for ex in vlm_examples(examples):
        _, hidden = _layer_inputs(adapter, ex.inputs())
        at = torch.stack([h[position].float() for h in hidden])  # [layer, d_model]
        scores.append((at / at.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()).abs().amax(0))
    score = torch.stack(scores).mean(0)
    values, dims = score.topk(min(int(n_dims), score.numel()))
    return [(int(d), float(v)) for d, v in zip(dims, values)]


def _example_rows(adapter: Any, ex: VLMExample, dims: Sequence[int], opts: dict) -> tuple[dict, list[dict], Any]:
    image = image_positions(ex, adapter)
    rows = select_queries(opts["queries"], n=len(ex.input_ids), image=image)
    with capture(adapter, towers=("text",), rows=rows) as cap:
        out, hidden = _layer_inputs(adapter, ex.inputs())
    values: dict[tuple[int, int, str], float] = {}
    tokens: list[dict] = []
    patches = patch_positions(adapter, image) if len(image) == adapter.tokens_per_image() else []
    image_t = torch.tensor(image)
    for site in text_self_sites(cap.trace):
        probs = cap.trace[site].probs[0].float()  # [head, rows, key]
        phi = sink_phi(hidden[site.layer], dims)
        sinks = phi > opts["tau"]
        visual = torch.zeros(probs.shape[-1], dtype=torch.bool)
        visual[image_t] = True
        vis = (probs * visual).sum(-1)  # [head, rows]
        sink_vis = (probs * (visual & sinks)).sum(-1)
        ratio = torch.where(vis > 0, sink_vis / vis.clamp_min(1e-30), torch.zeros_like(vis))
        centric = image_centric(probs, sinks.expand_as(probs), visual.expand_as(probs), opts["rho"],
                                opts["min_visual"])
        per_head = {"visual_attention": vis.mean(-1), "visual_sink_attention": sink_vis.mean(-1),
                    "visual_nonsink_attention": (vis - sink_vis).mean(-1), "sink_ratio": ratio.mean(-1),
                    "image_centric_fraction": centric.float().mean(-1)}
        for metric, v in per_head.items():
            for h, x in enumerate(v.tolist()):
                values[(site.layer, h, metric)] = x
        values[(site.layer, -1, "visual_sink_count")] = float(sinks[image_t].sum())
        values[(site.layer, -1, "text_sink_count")] = float(sinks.sum() - sinks[image_t].sum())
        tokens += [{"analysis": "visual_sinks", "layer": site.layer, "head": -1, "metric": "visual_sink_token",
                    "value": float(phi[p]), "position": int(p),
                    "patch": patches.index(p) if p in patches else -1} for p in image if sinks[p]]
    return values, tokens, out


def _var_values(adapter: Any, ex: VLMExample, out: Any, settings: VARSettings) -> dict[tuple[int, int, str], float]:
    record: dict = {}
    with torch.no_grad(), visual_attention_redistribution(adapter, settings, record=record):
        edited = adapter.module(**to_device(ex.inputs(), adapter))
    base, new = out.logits[0, -1].float(), edited.logits[0, -1].float()
    values = {(-1, -1, "var_top1_agreement"): float(base.argmax() == new.argmax()),
              (-1, -1, "var_max_logit_change"): float((base - new).abs().max())}
    if ex.answer_id is not None:
        values[(-1, -1, "var_answer_prob_delta")] = float(new.softmax(-1)[ex.answer_id] -
                                                          base.softmax(-1)[ex.answer_id])
    image = set(image_positions(ex, adapter))
    eligible = [t for t in range(min(image) + 1, len(ex.input_ids)) if t not in image]
    for layer, rec in record.items():
        sel = rec["selected"][0][:, eligible]
        values[(layer, -1, "var_selected_fraction")] = float(sel.float().mean()) if sel.numel() else 0.0
    return values


def _head_flags(collected: dict, rho: float, min_visual: float) -> list[dict]:
    heads = sorted({(l, h) for l, h, m in collected if m == "sink_ratio"})
    return [{"analysis": "visual_sinks", "layer": l, "head": h, "metric": "image_centric",
             "value": float(mean(collected[(l, h, "sink_ratio")]) <= rho
                            and mean(collected[(l, h, "visual_attention")]) >= min_visual)} for l, h in heads]


@register_analysis("visual-sinks", description="visual attention sinks (Kang et al. 2025): sink dims, visual sink "
                   "tokens, per-head sink vs non-sink image attention, image-centric heads, VAR effect")
def visual_sinks(model: ModelLike, examples: Any, *, sink_dims: Sequence[int] | None = None, n_sink_dims: int = 2,
                 sink_position: int = 0, tau: float = 20.0, rho: float = 0.5, min_visual: float = 0.2,
                 queries: "str | Sequence[int]" = "after_image", var: bool = False, p: float = 0.6,
                 include_text_sinks: bool = True, heads: "HeadSet | str | None" = None, **_: Any) -> ResultTable:
    """Sink dimensions, visual sink tokens and per-head sink attention of a LLaVA-class VLM (see module doc)."""
    adapter = vlm_adapter(model)
    items = vlm_examples(examples)
    found = find_sink_dims(adapter, items, n_sink_dims, sink_position) if sink_dims is None else [(int(d), float("nan"))
                                                                                   for d in sink_dims]
    dims = [d for d, _ in found]
    opts = {"queries": queries, "tau": float(tau), "rho": float(rho), "min_visual": float(min_visual)}
    if isinstance(heads, str):
        heads = HeadSet.parse(heads)
    settings = VARSettings(dims, tau, p, rho, min_visual, include_text_sinks, heads)
    collected: dict[tuple[int, int, str], list[float]] = defaultdict(list)
    token_rows: list[dict] = []
    for i, ex in enumerate(items):
        values, tokens, out = _example_rows(adapter, ex, dims, opts)
        if var:
            values.update(_var_values(adapter, ex, out, settings))
        for key, value in values.items():
            collected[key].append(value)
        token_rows += [dict(r, example=i) for r in tokens]
    records = [{"analysis": "visual_sinks", "layer": -1, "head": -1, "metric": "sink_dim", "value": score,
                "dim": d, "rank": r + 1} for r, (d, score) in enumerate(found)]
    records += [{"analysis": "visual_sinks", "layer": l, "head": h, "metric": m, "value": mean(v), "n_items": len(v)}
                for (l, h, m), v in sorted(collected.items())]
    records += _head_flags(collected, rho, min_visual) + token_rows
    table = ResultTable.from_records(records, provenance=adapter.provenance())
    table.provenance.update({"analysis": "visual-sinks", "sink_dims": dims, "tau": tau, "rho": rho,
                             "min_visual": min_visual, "p": p, "var": var, "n_examples": len(items),
                             "queries": queries if isinstance(queries, str) else list(queries),
                             "main_metric": "visual_sink_attention"})
    return table
