"""``run_ablation``: ablate heads on one text and report the metric and the output before and after.

Heads are ablated through ``attnscope.probes.interventions`` (``InterventionPlan`` + ``apply_plan``: modes ``zero``,
``mean``, ``resample``, ``uniform``, ``rescale``). ``mean`` and ``resample`` take their reference inputs from the
demo sentences plus the text itself.

What is measured:
- language models (token logits): ``log p`` of the clean model's top next token after the text (or, with
  ``answer``, the summed log-probability of the answer tokens, teacher-forced); the output is the top-5 next tokens;
- encoders (no logits): cosine similarity of the mean-pooled sentence embedding (non-padding tokens, as
  sentence-transformers pools MiniLM) to the clean one (1.0 before); the output lists the tokens whose final
  hidden state changed most.

Example:
    >>> import attnscope
    >>> from attnscope.dashboards.ablation import run_ablation
    >>> r = run_ablation(attnscope.load("minilm"), "L2H*", "zero", "The cat sat on the mat.")
    >>> r["metric_before"], r["metric_after"] < 1.0
    (1.0, True)
"""

import threading
import time
from typing import Any

import torch
from torch import nn

from ..datasets import PromptItem, PromptSuite
from ..errors import InputError
from ..probes.adapter import as_adapter
from ..probes.heads import HeadSet
from ..probes.interventions import apply_plan
from ..tasks.demo import DEMO_SENTENCES
from ..tasks.plans import build_plan

MODES = ("zero", "mean", "resample", "uniform", "rescale")
_LOCK = threading.Lock()  # hooks live on the shared model: one ablation at a time


def _projections(module: nn.Module) -> list[Any]:
    from ..probes.head_slices import output_projections

    return output_projections(module)


def parse_heads(heads: "str | HeadSet | list[tuple[int, int]]", module: nn.Module) -> HeadSet:
    """A HeadSet from ``L2H7,L3H*`` (validated against the model) or pairs."""
    projections = _projections(module)
    n_layers, n_heads = len(projections), max(p.n_heads for p in projections)
    if isinstance(heads, str):
        return HeadSet.parse(heads, n_layers=n_layers, n_heads=n_heads)
    return HeadSet(heads).validate(n_layers, n_heads)


def compact_heads(heads: HeadSet, module: nn.Module) -> str:
    """``L2H*,L3H1`` style: a layer whose every head is in the set is written with ``*``."""
    projections = _projections(module)
    parts = []
    for layer in heads.layers:
        chosen = heads.heads_in_layer(layer)
        if len(chosen) == projections[layer].n_heads:
            parts.append(f"L{layer}H*")
        else:
            parts += [f"L{layer}H{h}" for h in chosen]
    return ",".join(parts)


def _ablation_context(adapter: Any, heads: HeadSet, mode: str, text: str, scale: float | None):
    """(context manager, path) applying the ablation; mean / resample references: the demo sentences and ``text``
    (the plan comes from ``attnscope.tasks.build_plan``, as in sweeps)."""
    reference = PromptSuite("ablation reference", [PromptItem(text=t) for t in DEMO_SENTENCES + [text]])
    plan = build_plan(str(heads), mode, {"scale": scale} if mode == "rescale" else {}, adapter, reference)
    return apply_plan(adapter.module, plan), "interventions.apply_plan"


def _lm_measure(adapter: Any, output: Any, kwargs: dict, answer_ids: list[int] | None,
                target: int | None) -> tuple[float, str, int]:
    logits = output.logits.float()
    n = int(kwargs["input_ids"].shape[1]) - (len(answer_ids) if answer_ids else 0)
    logprobs = torch.log_softmax(logits[0], -1)
    tokenizer = adapter.tokenizer
    decode = (lambda i: tokenizer.decode([int(i)])) if tokenizer is not None else str
    top = torch.topk(logprobs[n - 1].exp(), 5)
    text = "next: " + ", ".join(f"{decode(i)!r} {float(p):.3f}" for p, i in zip(top.values, top.indices))
    if answer_ids:
        value = float(sum(logprobs[n - 1 + j, t] for j, t in enumerate(answer_ids)))
        return value, text, -1
    target = int(top.indices[0]) if target is None else target
    return float(logprobs[n - 1, target]), text, target


def _pooled(output: Any, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    weights = mask[..., None].to(hidden.dtype)
    return (hidden * weights).sum(1)[0] / weights.sum(1)[0].clamp_min(1), hidden[0]


def _encoder_text(strings: list[str], before: torch.Tensor, after: torch.Tensor, n: int) -> str:
    change = 1 - torch.nn.functional.cosine_similarity(before[:n], after[:n], dim=-1)
    order = torch.argsort(change, descending=True)[:5]
    return "most changed tokens: " + ", ".join(f"{strings[int(i)]!r} {float(change[i]):.3f}" for i in order)


def run_ablation(model: Any, heads: "str | HeadSet | list[tuple[int, int]]", mode: str, text: str, *,
                 scale: float | None = None, answer: str | None = None) -> dict[str, Any]:
    """Run ``text`` clean and with ``heads`` ablated (``mode``); returns a dict with ``metric_before``,
    ``metric_after``, ``output_before``, ``output_after``, ``metric`` (its name), ``heads``, ``mode``, ``path``
    (how the ablation was applied) and ``seconds``."""
    if mode not in MODES:
        raise InputError("unknown ablation mode", expected=", ".join(MODES), got=mode)
    if not isinstance(text, str) or not text.strip():
        raise InputError("no input text", expected="a non-empty text", got=repr(text))
    if mode == "rescale" and scale is None:
        raise InputError("rescale needs a scale", expected="a number (1 = unchanged, 0 = zero ablation)", got=None)
    adapter = as_adapter(model)
    headset = parse_heads(heads, adapter.module)
    if not len(list(headset)):
        raise InputError("no heads to ablate", expected="e.g. L2H7 or L3H*", got=str(heads))
    start = time.perf_counter()
    with _LOCK, torch.no_grad():
        return _measure(adapter, headset, mode, text, scale, answer) | {"seconds": time.perf_counter() - start}


def _measure(adapter: Any, heads: HeadSet, mode: str, text: str, scale: float | None,
             answer: str | None) -> dict[str, Any]:
    answer_ids = None
    if answer:
        tokenizer = adapter.tokenizer
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] if tokenizer is not None else None
    prepared = adapter.prepare([text + (answer or "")] if answer_ids else [text])
    kwargs = prepared.kwargs
    context, path = _ablation_context(adapter, heads, mode, text, scale)
    clean = adapter.module(**kwargs)
    with context:
        ablated = adapter.module(**kwargs)
    result = {"heads": compact_heads(heads, adapter.module), "mode": mode, "path": path}
    if getattr(clean, "logits", None) is not None and clean.logits.ndim == 3:
        before, out_before, target = _lm_measure(adapter, clean, kwargs, answer_ids, None)
        after, out_after, _ = _lm_measure(adapter, ablated, kwargs, answer_ids, target)
        name = "log p(answer)" if answer_ids else "log p(clean top next token)"
        return result | {"metric": name, "metric_before": before, "metric_after": after,
                         "output_before": out_before, "output_after": out_after}
    mask = kwargs.get("attention_mask", torch.ones_like(kwargs["input_ids"]))
    (emb_b, hid_b), (emb_a, hid_a) = _pooled(clean, mask), _pooled(ablated, mask)
    cosine = float(torch.nn.functional.cosine_similarity(emb_b, emb_a, dim=0))
    strings = prepared.tokens.strings[0] if prepared.tokens.strings else [str(i) for i in range(hid_b.shape[0])]
    n = int(mask[0].sum())
    return result | {"metric": "embedding cosine to clean", "metric_before": 1.0, "metric_after": cosine,
                     "output_before": f"sentence embedding norm {float(emb_b.norm()):.3f}",
                     "output_after": f"norm {float(emb_a.norm()):.3f}; " + _encoder_text(strings, hid_b, hid_a, n)}


__all__ = ["MODES", "compact_heads", "parse_heads", "run_ablation"]
