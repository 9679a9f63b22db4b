"""Ablate heads on a live capture: run the same input again with the heads' outputs edited (``zero``, ``mean``,
``resample`` or ``uniform``, through ``attnscope.probes.interventions``) and measure what changed.

``mean`` and ``resample`` take the reference inputs ``attnscope ablate`` takes (``reference_set``): 64 items of
the model's default suite (a zoo organism's own task, else ``sentences``) drawn with the suite's seed + 1;
``mean`` replaces the head's output by its mean over every token of them, ``resample`` by the same head's output
on one of them (seed 0, as the CLI's default). A vision encoder's reference is 64 built-in shapes scenes; a
diffusion capture reruns its pipeline call (``live_media_ablation``: ``zero`` and ``uniform`` only).

What a researcher reads off it:
- ``change [layer, head]``: how far each head's attention moved, the mean over query rows of the total variation
  distance ``0.5 * sum_k |p_clean - p_ablated|`` (0 = unchanged, 1 = disjoint). Heads at or before the ablated
  layer stay at 0: an ablation only reaches later layers;
- ``token_change [token]``: the effect on the model's output per position: for language models the KL divergence
  ``KL(clean || ablated)`` of the next-token distribution, for encoders ``1 - cosine`` of the final hidden state
  (vision encoders too; an image classifier: of its last hidden state, with the class distribution's KL and top
  class in the summary); for a diffusion capture the change of the image's attention to each text key;
- ``summary``: one line (top next token before and after, the cosine of the mean-pooled sentence embedding or of
  the pooled image embedding, the mean absolute pixel change of a generated image).

Example:
    >>> import torch
    >>> from attnscope.dashboards.live_ablation import total_variation
    >>> clean = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]]).numpy()       # [layer, head, query, key]
    >>> total_variation(clean, clean[..., ::-1]).tolist()
    [[0.5]]
"""

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..probes.adapter import as_adapter, module_of, tokenizer_of
from ..probes.capturing import capture
from ..probes.interventions import InterventionPlan, apply_plan
from ..tasks.plans import build_plan
from ..tasks.references import ModelRef, SuiteRef
from ..tasks.suites import build_suite
from ..tasks.task_eval import EvalSpec, Evaluation, reference_inputs
from .ablation import compact_heads, parse_heads
from .live_media_ablation import ablate_diffusion, vision_plan
from .live_state import MODEL_LOCK, LiveCapture

LIVE_MODES = ("zero", "mean", "resample", "uniform")
REFERENCE_ITEMS = 64   # the CLI's default suite size (``attnscope ablate --n-items``)
RESAMPLE_SEED = 0      # the CLI's resample seed for a suite without a seed
_REFERENCES: dict[tuple[str, int], tuple[list[list[int]], str]] = {}
_REF_LOCK = threading.Lock()


def reference_set(handle: Any, name: str) -> tuple[list[list[int]], str]:
    """(token ids, description) of the reference inputs of mean / resample for model ``name``: what
    ``attnscope ablate --model NAME --mode mean`` draws (``tasks.task_eval.reference_inputs``), cached per model."""
    with _REF_LOCK:
        key = (name, id(handle))
        if key not in _REFERENCES:
            zoo_model = getattr(handle, "card", None) is not None and str(name).startswith("zoo:")
            model_ref = ModelRef("zoo", name[4:]) if zoo_model else ModelRef("source", str(name))
            suite_ref = SuiteRef("default" if zoo_model else "sentences")
            spec = EvalSpec(model_ref, suite_ref, n_items=REFERENCE_ITEMS)
            suite = build_suite(suite_ref, handle, n_items=REFERENCE_ITEMS)
            ids = reference_inputs(spec, Evaluation(handle, suite, [], None))
            source = "the organism's own task" if zoo_model else "the sentences suite"
            _REFERENCES[key] = (ids, f"{len(ids)} inputs of {source} ({suite.generator or suite.name}, "
                                     f"seed {(suite.seed or 0) + 1})")
        return _REFERENCES[key]


@dataclass
class LiveAblation:
    """The result of ablating ``heads`` (``mode``) on capture ``key``."""

    key: str
    heads: str
    mode: str
    change: np.ndarray
    attn_after: np.ndarray
    token_change: np.ndarray
    token_metric: str
    summary: str
    seconds: float
    reference: str = ""
    image_after: np.ndarray | None = None  # diffusion: the ablated run's generated image [H, W, 3] (pipeline's floats)


def total_variation(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Mean over query rows of ``0.5 * sum_k |before - after|``: ``[..., query, key]`` -> ``[...]``."""
    return 0.5 * np.abs(np.asarray(before, np.float64) - np.asarray(after, np.float64)).sum(-1).mean(-1)


def _decode(handle: Any, index: int) -> str:
    tokenizer = tokenizer_of(handle)
    return repr(tokenizer.decode([int(index)])) if tokenizer is not None else f"id {int(index)}"


def output_change(handle: Any, clean: Any, ablated: Any, vision: bool = False) -> tuple[np.ndarray, str, str]:
    """(per-position change, its name, a one-line summary) between two outputs of the same input (``vision``: of
    a vision encoder)."""
    logits = getattr(clean, "logits", None)
    if vision:
        return _vision_change(handle, clean, ablated)
    if logits is not None and logits.ndim == 3:
        p = torch.log_softmax(clean.logits[0].double(), -1)
        q = torch.log_softmax(ablated.logits[0].double(), -1)
        kl = (p.exp() * (p - q)).sum(-1).clamp_min(0)
        top = int(p[-1].argmax())
        after = int(q[-1].argmax())
        summary = (f"next token after the input: {_decode(handle, top)} p={float(p[-1, top].exp()):.3f} → "
                   f"{float(q[-1, top].exp()):.3f} (ablated top: {_decode(handle, after)}); "
                   f"KL at the last position {float(kl[-1]):.4f}")
        return kl.float().numpy(), "KL(clean ‖ ablated) of the next-token distribution", summary
    hidden_b = clean.last_hidden_state[0] if hasattr(clean, "last_hidden_state") else clean[0][0]
    hidden_a = ablated.last_hidden_state[0] if hasattr(ablated, "last_hidden_state") else ablated[0][0]
    per_token = 1 - torch.nn.functional.cosine_similarity(hidden_b.double(), hidden_a.double(), dim=-1)
    pooled = float(torch.nn.functional.cosine_similarity(hidden_b.double().mean(0), hidden_a.double().mean(0),
                                                         dim=0))
    summary = f"sentence embedding (mean-pooled) cosine to clean: {pooled:.4f}; most changed token: " \
              f"position {int(per_token.argmax())} ({float(per_token.max()):.4f})"
    return per_token.float().numpy(), "1 − cosine of the final hidden state to clean", summary


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def _labels(handle: Any) -> dict[int, str]:
    return dict(getattr(getattr(as_adapter(handle).module, "config", None), "id2label", None) or {})


def _vision_change(handle: Any, clean: Any, ablated: Any) -> tuple[np.ndarray, str, str]:
    """Headless: ``1 - cosine`` of ``last_hidden_state`` per token and the pooled embedding's cosine (the model's
    ``pooler_output``, else the token mean). Classifier (``logits [1, classes]``): ``1 - cosine`` of the last
    hidden state per token, the KL of the class distribution and the top class before / after."""
    logits = getattr(clean, "logits", None)
    hidden = getattr(clean, "last_hidden_state", None)
    if hidden is None:
        states = getattr(clean, "hidden_states", None)
        if logits is None or logits.ndim != 2 or not states:
            raise InputError("no output to compare", expected="last_hidden_state, or logits with hidden states",
                             got=type(clean).__name__, fix="capture with output_hidden_states=True")
        before, after = states[-1][0], ablated.hidden_states[-1][0]
        p, q = torch.log_softmax(logits[0].double(), -1), torch.log_softmax(ablated.logits[0].double(), -1)
        kl = float((p.exp() * (p - q)).sum().clamp_min(0))
        top, now, labels = int(p.argmax()), int(q.argmax()), _labels(handle)
        summary = (f"class distribution: KL(clean ‖ ablated) {kl:.4f}; top class {labels.get(top, top)!r} "
                   f"p={float(p[top].exp()):.3f} → {float(q[top].exp()):.3f} (ablated top: {labels.get(now, now)!r})")
        per_token = 1 - _cosine(before, after)
        return per_token.float().numpy(), "1 − cosine of the last hidden state to clean", summary
    before, after = hidden[0], ablated.last_hidden_state[0]
    per_token = 1 - _cosine(before, after)
    pooled_b, pooled_a = getattr(clean, "pooler_output", None), getattr(ablated, "pooler_output", None)
    how = "pooler output"
    if pooled_b is None or pooled_a is None:
        pooled_b, pooled_a, how = before.mean(0, keepdim=True), after.mean(0, keepdim=True), "token mean"
    pooled = float(_cosine(pooled_b.reshape(-1), pooled_a.reshape(-1)))
    summary = (f"pooled image embedding cosine to clean ({how}): {pooled:.4f}; most changed token: position "
               f"{int(per_token.argmax())} ({float(per_token.max()):.4f})")
    return per_token.float().numpy(), "1 − cosine of the final hidden state to clean", summary


def ablate(handle: Any, cap: LiveCapture, spec: str, mode: str = "zero") -> LiveAblation:
    """Ablate the heads of ``spec`` (``L2H3``, ``L2H*,L4H1``; parsed with ``HeadSet.parse``) on ``cap``'s input."""
    if mode not in LIVE_MODES:
        raise InputError("unknown ablation mode", expected=LIVE_MODES, got=mode)
    if not cap.dense:
        raise InputError("ablation needs the dense capture", expected="an input of at most 512 tokens",
                         got=f"{cap.n_tokens} tokens", fix="capture a shorter input")
    module = module_of(handle)
    heads = parse_heads(spec or "", module)
    start = time.perf_counter()
    if cap.kind == "diffusion":
        return _ablate_diffusion(handle, cap, heads, mode, start)
    media_reference = cap.kind == "vision" or mode not in ("mean", "resample")
    reference, what = reference_set(handle, cap.model_name) if not media_reference else (None, "")
    with MODEL_LOCK, torch.no_grad():
        if cap.kind == "vision":
            plan, what = vision_plan(handle, heads, mode, RESAMPLE_SEED)
        else:
            plan = (build_plan(str(heads), mode, {"seed": RESAMPLE_SEED}, handle, reference_ids=reference)
                    if reference is not None else InterventionPlan(heads, mode))
        with apply_plan(handle, plan):
            after = capture(handle, cap.inputs)
    attn_after = after.stack(tower=cap.tower)[:, 0].float().numpy()
    change = total_variation(cap.attn(), attn_after)
    values, metric, summary = output_change(handle, cap.trace.output, after.output, vision=cap.kind == "vision")
    if what:
        summary = f"{mode} over the reference: {what}\n{summary}"
    return LiveAblation(cap.key, compact_heads(heads, module), mode, change.astype(np.float32), attn_after,
                        values, metric, summary, time.perf_counter() - start, what)


def _ablate_diffusion(handle: Any, cap: LiveCapture, heads: Any, mode: str, start: float) -> LiveAblation:
    """A diffusion capture: ``change [site, head]``, per site ``attn_after [head, image query, text key]``."""
    with MODEL_LOCK:
        found = ablate_diffusion(handle, cap, heads, mode)
    sites = ", ".join(f"{i}: {site}" for i, site in enumerate(cap.media.sites))
    return LiveAblation(cap.key, compact_heads(heads, module_of(handle)), mode, found.change, found.attn_after,
                        found.token_change, "change of the attention mass the image gives each text key "
                        "(ablated − clean)", f"{found.summary}\nchange rows = captured sites ({sites})",
                        time.perf_counter() - start, image_after=found.image_after)


__all__ = ["LIVE_MODES", "LiveAblation", "ablate", "output_change", "reference_set", "total_variation"]
