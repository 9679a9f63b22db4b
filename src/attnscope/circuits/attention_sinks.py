"""Attention sinks over a prompt suite: per-head sink scores, the fraction of sink heads, massive activations and
value norms of sink tokens.

- **Sink score** (StreamingLLM, Xiao et al. 2023; Gu et al. 2025): per head and key position ``k``,
  ``sink(k) = mean_{t >= k} A[t, k]`` over the (non-padding) queries that can see ``k``; ``k`` is position 0, any
  given positions, and the model's special tokens (``[CLS]``, ``[SEP]``, BOS ...). Captured with streaming ``mass``
  statistics on one-token key spans: no n-by-n pattern is formed. ``queries="auto"`` uses ``t >= k`` for causal
  models and every query for encoders (where every query sees every key). The suite score is the mean over items.
  ``sink_score:other`` is the baseline: the mean mass one non-sink key gets (``1/n`` under uniform attention).
- **Sink fraction** (Gu et al., ICLR 2025): the fraction of heads whose sink score exceeds ``threshold``
  (default 0.3), per layer (``head = -1``) and over the model (``layer = head = -1``). ``layer_mean:<label>``
  (``head = -1``) is the mean sink score of a layer's heads: the dominant sink of a layer is its largest label.
- **Massive activations** (Sun et al. 2024): per layer output (``output_hidden_states=True``), the largest
  ``|h[t, d]|`` with their position and dimension, against the median magnitude of the hidden state. The paper calls
  an activation massive when it exceeds ``abs_threshold`` = 100 and ``ratio_threshold`` = 1000 x the median.
  Also the sink dimensions of Kang et al. (ICLR 2025): the largest ``|RMSNorm(h)|`` dimensions at ``sink_position``.
- **Value norms** (Guo et al. 2024): per layer and KV head, the mean norm of the value vectors (a forward hook on
  the value projection) of sink tokens against the other tokens.

Example:
    >>> import attnscope
    >>> from attnscope.circuits.attention_sinks import sink_scores
    >>> from attnscope.datasets import needle_text
    >>> table = sink_scores(attnscope.load("minilm"), needle_text(2, context_length=30), progress=False)
    >>> layer2 = table.df[(table.df.metric == "sink_score:[CLS]") & (table.df.layer == 2)]
    >>> bool(layer2.value.mean() > 0.3)
    True
"""

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..datasets.input_suite import InputSuite
from ..datasets.suite import PromptSuite
from ..errors import AnalysisError, InputError
from ..probes import attention_modules, hf_sites
from ..probes.adapter import ModelLike, as_adapter
from ..probes.capturing import capture
from ..results import ResultTable
from .detectors import Encoded, batches, encode_suite, pad_id_for, parse_heads, progress_bar, self_sites
from .registry import register_analysis
from .task_metrics import require_token_model

QUERIES = ("auto", "from_key", "all")


def _special_ids(adapter: Any, suite: PromptSuite) -> dict[int, str]:
    """Special token id -> label: the tokenizer's specials (not padding), or the suite's bos/cls/sep ids."""
    tok = adapter.tokenizer
    if tok is not None and getattr(tok, "all_special_ids", None):
        pad = getattr(tok, "pad_token_id", None)
        return {int(i): str(tok.convert_ids_to_tokens(int(i))) for i in tok.all_special_ids if i != pad}
    out = {}
    for name in ("bos_id", "cls_id", "sep_id"):
        value = suite.params.get(name)
        if value is not None:
            out[int(value)] = name[:-3]
    return out


def sink_keys(enc: Encoded, positions: Sequence[int], specials: dict[int, str]) -> dict[str, list[int]]:
    """Label -> key positions of one item: ``pos<k>`` for the given positions, the token label for specials."""
    keys = {f"pos{k}": [int(k)] for k in positions if 0 <= int(k) < len(enc.ids)}
    for pos, tok in enumerate(enc.ids):
        if tok in specials:
            keys.setdefault(specials[tok], []).append(pos)
    return keys


def _item_sink_scores(mass: Tensor, keys: dict[str, list[int]], span_of: dict[int, int], n: int,
                      from_key: bool) -> dict[str, Tensor]:
    """mass ``[head, query, span]`` of one item -> label -> ``[head]`` sink score (plus the ``other`` baseline)."""
    out = {}
    for label, ps in keys.items():
        per_pos = [mass[:, (p if from_key else 0):n, span_of[p]].mean(-1) for p in ps]
        out[label] = torch.stack(per_pos).mean(0)
    sink_pos = sorted({p for ps in keys.values() for p in ps})
    cols = [span_of[p] for p in sink_pos]
    rows = torch.arange(n)
    visible = (rows + 1) if from_key else torch.full((n,), n)
    n_sinks_seen = torch.tensor([sum(1 for p in sink_pos if p <= t or not from_key) for t in range(n)])
    others = (visible - n_sinks_seen).clamp_min(0)
    rest = 1.0 - mass[:, :n, cols].sum(-1) if cols else torch.ones(mass.shape[0], n)
    ok = others > 0
    if ok.any():
        out["other"] = (rest[:, ok] / others[ok]).mean(-1)
    return out


def sink_scores(model: ModelLike, suite: PromptSuite, *, positions: Sequence[int] = (0,), special_tokens: bool = True,
                threshold: float = 0.3, queries: str = "auto", heads: Any = None, batch_size: int = 8,
                add_special_tokens: bool = True, progress: bool = True, tower: str = "text") -> ResultTable:
    """Per head sink scores (metric ``sink_score:<label>``) and sink fractions (``sink_fraction:<label>``)."""
    if queries not in QUERIES:
        raise InputError("unknown query selection", expected=QUERIES, got=queries)
    adapter = as_adapter(model)
    from_key = queries == "from_key" or (queries == "auto" and adapter.info().family == "causal-lm")
    specials = _special_ids(adapter, suite) if special_tokens else {}
    encoded = encode_suite(suite, adapter.tokenizer, add_special_tokens)
    collected: dict[tuple[int, int, str], list[float]] = {}
    provenance: dict = {}
    bar = progress_bar(batches(encoded, batch_size, pad_id_for(suite, adapter.tokenizer)),
                       -(-len(encoded) // int(batch_size)), "sinks", progress)
    for chunk, inputs in bar:
        keys = [sink_keys(e, positions, specials) for e in chunk]
        union = sorted({p for k in keys for ps in k.values() for p in ps})
        span_of = {p: i for i, p in enumerate(union)}
        trace = capture(adapter, inputs, stats=("mass",), mass_spans=[(p, p + 1) for p in union],
                        heads=parse_heads(model, heads))
        provenance = dict(trace.provenance)
        for site in self_sites(trace, tower):
            rec = trace.get(site)
            for b, enc in enumerate(chunk):
                scores = _item_sink_scores(rec.stats["mass"][b], keys[b], span_of, len(enc.ids), from_key)
                for label, values in scores.items():
                    for h, v in zip(rec.heads(), values.tolist()):
                        collected.setdefault((site.layer, h, label), []).append(v)
    records = [{"analysis": "sinks", "layer": l, "head": h, "metric": f"sink_score:{label}", "value": float(np.mean(v)),
                "n_items": len(v)} for (l, h, label), v in sorted(collected.items())]
    table = ResultTable.from_records(records + layer_means(records) + sink_fractions(records, threshold),
                                     provenance=provenance)
    table.provenance.update({"analysis": "sinks", "suite": suite.name, "suite_params": suite.params,
                             "queries": "from_key" if from_key else "all", "threshold": threshold,
                             "main_metric": "sink_score:pos0" if 0 in positions else records[0]["metric"]})
    return table


def layer_means(records: list[dict]) -> list[dict]:
    """Per layer (head -1) and label, the mean sink score over heads (``layer_mean:<label>``)."""
    groups: dict[tuple[int, str], list[float]] = {}
    for r in records:
        groups.setdefault((r["layer"], r["metric"].split(":", 1)[1]), []).append(r["value"])
    return [{"analysis": "sinks", "layer": layer, "head": -1, "metric": f"layer_mean:{label}",
             "value": float(np.mean(v))} for (layer, label), v in sorted(groups.items())]


def sink_fractions(records: list[dict], threshold: float = 0.3) -> list[dict]:
    """Fraction of heads with a sink score above ``threshold``, per layer (head -1) and overall (layer -1)."""
    out = []
    by_metric: dict[str, list[dict]] = {}
    for r in records:
        if r["metric"].startswith("sink_score:") and r["metric"] != "sink_score:other":
            by_metric.setdefault(r["metric"], []).append(r)
    for metric, rows in by_metric.items():
        label = metric.split(":", 1)[1]
        for layer in sorted({r["layer"] for r in rows}) + [-1]:
            sel = [r["value"] > threshold for r in rows if layer in (-1, r["layer"])]
            out.append({"analysis": "sinks", "layer": layer, "head": -1, "metric": f"sink_fraction:{label}",
                        "value": float(np.mean(sel)), "threshold": float(threshold)})
    return out


# ---- massive activations -----------------------------------------------------------------------------------------


def _hidden_states(adapter: Any, inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
    prepared = adapter.prepare(inputs)
    with torch.no_grad():
        out = adapter.module(**prepared.kwargs, output_hidden_states=True)
    states = getattr(out, "hidden_states", None)
    if not states:
        raise AnalysisError("model returned no hidden states", expected="output_hidden_states support",
                            got=type(out).__name__)
    return states


def _rms_normalise(h: Tensor, eps: float = 1e-6) -> Tensor:
    return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def massive_activations(model: ModelLike, suite: PromptSuite, *, top: int = 3, abs_threshold: float = 100.0,
                        ratio_threshold: float = 1000.0, sink_position: int = 0, n_sink_dims: int = 2,
                        batch_size: int = 8, add_special_tokens: bool = True, progress: bool = True) -> ResultTable:
    """Per layer output: the ``top`` largest magnitudes (mean over items, modal dim and position), the median
    magnitude, the fraction of items where the top activation is massive, and the sink dimensions at
    ``sink_position`` (largest unweighted-RMSNorm magnitudes)."""
    adapter = as_adapter(model)
    encoded = encode_suite(suite, adapter.tokenizer, add_special_tokens)
    per_layer: dict[int, list[dict]] = {}
    bar = progress_bar(batches(encoded, batch_size, pad_id_for(suite, adapter.tokenizer)),
                       -(-len(encoded) // int(batch_size)), "massive activations", progress)
    for chunk, inputs in bar:
        states = _hidden_states(adapter, inputs)[1:]  # output of each layer
        for layer, hs in enumerate(states):
            for b, enc in enumerate(chunk):
                h = hs[b, :len(enc.ids)].float()
                mag = h.abs()
                values, flat = mag.flatten().topk(min(top, mag.numel()))
                sink = _rms_normalise(h[min(sink_position, len(enc.ids) - 1)]).abs()
                sv, sd = sink.topk(min(n_sink_dims, sink.numel()))
                per_layer.setdefault(layer, []).append({
                    "values": values.tolist(), "pos": (flat // h.shape[-1]).tolist(),
                    "dim": (flat % h.shape[-1]).tolist(), "median": float(mag.median()),
                    "sink_values": sv.tolist(), "sink_dims": sd.tolist(), "tokens": enc.ids})
    records = []
    for layer, items in sorted(per_layer.items()):
        records += _massive_rows(layer, items, abs_threshold, ratio_threshold)
    return ResultTable.from_records(records, provenance={
        "analysis": "massive_activations", "suite": suite.name, "abs_threshold": abs_threshold,
        "ratio_threshold": ratio_threshold, "sink_position": sink_position, "main_metric": "top1_magnitude"})


def _massive_rows(layer: int, items: list[dict], abs_threshold: float, ratio_threshold: float) -> list[dict]:
    median = float(np.mean([it["median"] for it in items]))
    rows = [{"analysis": "massive_activations", "layer": layer, "head": -1, "metric": "median_magnitude",
             "value": median}]
    for rank in range(len(items[0]["values"])):
        vals = [it["values"][rank] for it in items]
        ratios = [it["values"][rank] / max(it["median"], 1e-12) for it in items]
        massive = [v > abs_threshold and r > ratio_threshold for v, r in zip(vals, ratios)]
        dim = Counter(it["dim"][rank] for it in items).most_common(1)[0][0]
        pos = Counter(it["pos"][rank] for it in items).most_common(1)[0][0]
        rows.append({"analysis": "massive_activations", "layer": layer, "head": -1,
                     "metric": f"top{rank + 1}_magnitude", "value": float(np.mean(vals)), "dim": int(dim),
                     "position": int(pos), "ratio_to_median": float(np.mean(ratios)),
                     "massive_fraction": float(np.mean(massive))})
    for rank in range(len(items[0]["sink_dims"])):
        dim = Counter(it["sink_dims"][rank] for it in items).most_common(1)[0][0]
        rows.append({"analysis": "massive_activations", "layer": layer, "head": -1, "metric": f"sink_dim{rank + 1}",
                     "value": float(np.mean([it["sink_values"][rank] for it in items])), "dim": int(dim)})
    return rows


# ---- value norms -------------------------------------------------------------------------------------------------


def value_projections(adapter: Any) -> list[tuple[int, Any, slice | None]]:
    """(layer, value-producing module, slice of its output that holds V) for every self-attention layer."""
    sites = hf_sites(adapter.module)
    hidden = adapter.info().tower().n_heads * adapter.info().tower().d_head
    out = []
    for _, m in attention_modules(adapter.module):
        site = sites.get(id(m))
        if site is None or site.kind != "self":
            continue
        if hasattr(m, "v_proj"):
            out.append((site.layer, m.v_proj, None))
        elif hasattr(m, "value"):
            out.append((site.layer, m.value, None))
        elif hasattr(m, "c_attn"):
            out.append((site.layer, m.c_attn, slice(2 * hidden, 3 * hidden)))
        else:
            raise AnalysisError("no value projection found", expected="v_proj, value or c_attn",
                                got=type(m).__name__, fix="value norms support GPT-2, Llama-class and BERT-class")
    return out


@contextlib.contextmanager
def _record_values(adapter: Any) -> Iterator[dict[int, Tensor]]:
    store: dict[int, Tensor] = {}
    handles = []

    def hook_for(layer: int, part: slice | None):
        def hook(module, args, output):
            store[layer] = (output if part is None else output[..., part]).detach().float()
        return hook
    try:
        for layer, module, part in value_projections(adapter):
            handles.append(module.register_forward_hook(hook_for(layer, part)))
        yield store
    finally:
        for h in handles:
            h.remove()


def value_norms(model: ModelLike, suite: PromptSuite, *, positions: Sequence[int] = (0,), special_tokens: bool = True,
                batch_size: int = 8, add_special_tokens: bool = True, progress: bool = True) -> ResultTable:
    """Per layer and KV head: mean value norm of each sink label, of the other tokens, and their ratio."""
    adapter = as_adapter(model)
    tower = adapter.info().tower()
    specials = _special_ids(adapter, suite) if special_tokens else {}
    encoded = encode_suite(suite, adapter.tokenizer, add_special_tokens)
    collected: dict[tuple[int, int, str], list[float]] = {}
    bar = progress_bar(batches(encoded, batch_size, pad_id_for(suite, adapter.tokenizer)),
                       -(-len(encoded) // int(batch_size)), "value norms", progress)
    for chunk, inputs in bar:
        with _record_values(adapter) as store:
            adapter.run(adapter.prepare(inputs))
        for layer, v in store.items():
            norms = v.reshape(*v.shape[:2], tower.n_kv_heads, -1).norm(dim=-1)  # [batch, token, kv_head]
            for b, enc in enumerate(chunk):
                keys = sink_keys(enc, positions, specials)
                sink_pos = {p for ps in keys.values() for p in ps}
                other = [p for p in range(len(enc.ids)) if p not in sink_pos]
                groups = dict(keys, other=other) if other else dict(keys)
                for label, ps in groups.items():
                    for h, value in enumerate(norms[b, ps].mean(0).tolist()):
                        collected.setdefault((layer, h, label), []).append(value)
    records = [{"analysis": "value_norms", "layer": l, "head": h, "metric": f"value_norm:{label}",
                "value": float(np.mean(v)), "head_kind": "kv"} for (l, h, label), v in sorted(collected.items())]
    for (l, h, label), v in sorted(collected.items()):
        if label != "other" and (l, h, "other") in collected:
            records.append({"analysis": "value_norms", "layer": l, "head": h, "metric": f"value_norm_ratio:{label}",
                            "value": float(np.mean(v) / max(np.mean(collected[(l, h, "other")]), 1e-12)),
                            "head_kind": "kv"})
    return ResultTable.from_records(records, provenance={"analysis": "value_norms", "suite": suite.name,
                                                         "main_metric": "value_norm_ratio:pos0"})


@register_analysis("sinks", description="attention sinks: per-head sink scores (position 0, special tokens), sink "
                   "fraction, massive activations, value norms")
def sinks(model: ModelLike, suite: PromptSuite, *, positions: Sequence[int] = (0,), special_tokens: bool = True,
          threshold: float = 0.3, queries: str = "auto", heads: Any = None, batch_size: int = 8,
          massive: bool = True, values: bool = True, progress: bool = True, **options: Any) -> ResultTable:
    """Everything above in one table (``analysis`` column: sinks, massive_activations, value_norms).

    ``options`` are ``massive_activations``' own (``top``, ``abs_threshold`` ...); anything else is refused."""
    if isinstance(suite, InputSuite):
        raise InputError("sinks scores token prompt suites (special tokens, per-token activations)",
                         expected="a token prompt suite", got=suite.name, fix="head-stats gives each head's sink "
                         "mass (attention on position 0) on images and latents")
    require_token_model(model, "sinks")
    unknown = sorted(set(options) - set(_MASSIVE_OPTIONS))
    if unknown:
        raise AnalysisError("unknown options for sinks", expected=f"its named options or {list(_MASSIVE_OPTIONS)}",
                            got=unknown, fix="check the option names (`attnscope score --help`)")
    table = sink_scores(model, suite, positions=positions, special_tokens=special_tokens, threshold=threshold,
                        queries=queries, heads=heads, batch_size=batch_size, progress=progress)
    parts = [table]
    if massive:
        parts.append(massive_activations(model, suite, batch_size=batch_size, progress=progress,
                                         **{k: v for k, v in options.items() if k in _MASSIVE_OPTIONS}))
    if values:
        parts.append(value_norms(model, suite, positions=positions, special_tokens=special_tokens,
                                 batch_size=batch_size, progress=progress))
    out = ResultTable.concat(parts)
    out.provenance.update(table.provenance)
    return out


_MASSIVE_OPTIONS = ("top", "abs_threshold", "ratio_threshold", "sink_position", "n_sink_dims")
