"""The capture columns of the coverage matrix: ``capture``, ``patterns``, ``validate``, ``statistics``, ``outputs``.

References are independent of attnscope's capture path: the model's own attention weights
(``output_attentions=True`` with every config switched to ``"eager"``) wherever the model returns them for a
site, else the adapter's ``reference_patterns`` (diffusers' materialising processors, or the eager route for
sites such as VLM vision towers whose weights the model does not return).
"""

from typing import Any

import torch
from torch import nn

from ..adapter import as_adapter
from ..capturing import capture
from ..fidelity import validate
from ..site import Site
from ..statistics import statistics_from_probs
from .outcome import Verdict, fail, magnitude, max_diff, tensors

ATOL = 1e-5
STATS = ("entropy", "mass", "topk")
SPANS = [(0, 1), (1, 3)]  # within the shortest key range (Whisper's 4 decoder tokens)
TOPK = 3


def attention_configs(model: nn.Module) -> list[Any]:
    """Every distinct config object held by the model's modules (composite models have one per tower)."""
    seen: dict[int, Any] = {}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in seen:
            seen[id(cfg)] = cfg
            for key in getattr(cfg, "sub_configs", {}) or {}:
                sub = getattr(cfg, key, None)
                if sub is not None and hasattr(sub, "_attn_implementation"):
                    seen.setdefault(id(sub), sub)
    return list(seen.values())


def implementation_state(model: nn.Module) -> list[Any]:
    """What must be unchanged after a capture: every config's attention implementation (transformers), or every
    attention processor (diffusers)."""
    configs = attention_configs(model)
    if configs:
        return [(id(cfg), cfg._attn_implementation) for cfg in configs]
    return [(name, id(m.processor)) for name, m in model.named_modules() if hasattr(m, "processor")]


class switched:
    """Context manager: every config's ``_attn_implementation`` set to ``name`` directly, restored on exit."""

    def __init__(self, model: nn.Module, name: str):
        self.configs = attention_configs(model)
        self.name = name
        self.saved: list[tuple[Any, Any]] = []

    def __enter__(self) -> "switched":
        self.saved = [(cfg, cfg._attn_implementation) for cfg in self.configs]
        for cfg in self.configs:
            cfg._attn_implementation = self.name
        return self

    def __exit__(self, *exc: Any) -> bool:
        for cfg, impl in self.saved:
            cfg._attn_implementation = impl
        return False


class Subject:
    """One architecture under test: the model, its inputs, and the results the columns share (computed once,
    errors included)."""

    def __init__(self, name: str, model: nn.Module, inputs: dict[str, Any]):
        self.name, self.model, self.inputs = name, model, inputs
        self.state_before = implementation_state(model)
        self._memo: dict[str, Any] = {}
        self.reference_source = ""
        self.returned_layers: dict[tuple[str, str], int] = {}  # (tower, kind) -> layers of weights the model returned

    def memo(self, key: str, compute) -> Any:
        if key not in self._memo:
            try:
                self._memo[key] = (True, compute())
            except Exception as error:  # noqa: BLE001 - replayed to every column that needs it
                self._memo[key] = (False, error)
        ok, value = self._memo[key]
        if not ok:
            raise value
        return value

    @property
    def adapter(self) -> Any:
        return self.memo("adapter", lambda: as_adapter(self.model))

    @property
    def prepared(self) -> Any:
        return self.memo("prepared", lambda: self.adapter.prepare(self.inputs))

    @property
    def base_output(self) -> Any:
        return self.memo("base", lambda: self.adapter.run(self.prepared))

    @property
    def trace(self) -> Any:
        self.base_output  # noqa: B018 - the uncaptured run comes first
        return self.memo("trace", lambda: capture(self.adapter, self.inputs))

    @property
    def reference(self) -> dict[Site, list[torch.Tensor]]:
        """Site -> reference weights per call (step) of that site in one forward."""
        return self.memo("reference", self._reference)

    def _reference(self) -> dict[Site, list[torch.Tensor]]:
        sites = self.trace.sites
        own = model_attentions(self.model, self.prepared.kwargs, sites, self.returned_layers)
        missing = [s for s in sites if s not in own]
        ref = {site: [weights] for site, weights in own.items()}
        if missing:
            adapter_ref = self.adapter.reference_patterns(self.prepared)
            for site in missing:
                ref[site] = [w.detach().float().cpu() if w is not None else None for w in adapter_ref.get(site) or []]
        self.reference_source = "model" if not missing else "adapter" if not own else "model+adapter"
        return ref

    def reference_at(self, site: Site, step: int) -> torch.Tensor:
        steps = self.reference.get(site) or []
        if step >= len(steps) or steps[step] is None:
            raise fail(f"no reference weights for {site} (call {step})")
        return steps[step]


# ---- the model's own eager attention weights ----------------------------------------------------------------------

def _groups(output: Any, sites: list[Site], config: Any = None) -> dict[tuple[str, str], Any]:
    """(tower, kind) -> the tuple of per-layer weights the model returned for it. Mllama returns its text self- and
    cross-attention layers in one tuple: the ``cross_attention_layers`` of its text config are split off."""
    get = output.get if hasattr(output, "get") else (lambda key, default=None: getattr(output, key, default))
    cross = getattr(getattr(config, "text_config", None), "cross_attention_layers", None)
    if cross and get("attentions") is not None:
        weights = get("attentions")
        return {("text", "self"): tuple(w for i, w in enumerate(weights) if i not in set(cross)),
                ("text", "cross"): tuple(w for i, w in enumerate(weights) if i in set(cross))}
    if get("encoder_attentions") is not None or get("decoder_attentions") is not None:
        return {("encoder", "self"): get("encoder_attentions"), ("decoder", "self"): get("decoder_attentions"),
                ("decoder", "cross"): get("cross_attentions")}
    towers = sorted({s.tower for s in sites})
    tower = towers[0] if len(towers) == 1 else "text"
    return {(tower, "self"): get("attentions")}


def model_attentions(model: nn.Module, kwargs: dict[str, Any], sites: list[Site],
                     counts: dict[tuple[str, str], int] | None = None) -> dict[Site, torch.Tensor]:
    """Site -> weights ``[batch, head, query, key]`` the model itself returns under eager attention, for each
    (tower, kind) whose returned layers match the trace's sites one to one; ``{}`` for non-transformers models.
    ``counts`` receives how many layers of each (tower, kind) the model returned."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return {}
    with switched(model, "eager"), torch.no_grad():
        try:
            output = model(**kwargs, output_attentions=True)
        except Exception:  # noqa: BLE001 - the model cannot return its weights: the adapter's reference is used
            return {}
    found: dict[Site, torch.Tensor] = {}
    for (tower, kind), weights in _groups(output, sites, model.config).items():
        if not weights or not all(torch.is_tensor(w) for w in weights):
            continue
        if counts is not None:
            counts[(tower, kind)] = len(weights)
        mine = sorted(s for s in sites if s.tower == tower and s.kind == kind)
        if len(weights) == len(mine):
            found.update({site: w.detach().float().cpu() for site, w in zip(mine, weights)})
    return found


# ---- columns ------------------------------------------------------------------------------------------------------

def check_capture(subject: Subject) -> None:
    """Capture runs, records every site the adapter lists once, each record holds finite probabilities, and a
    (tower, kind) whose weights the model itself returns has as many sites as the model returns layers."""
    trace = subject.trace
    expected, got = set(subject.adapter.info().sites), set(trace.sites)
    if expected != got:
        missing, extra = sorted(map(str, expected - got)), sorted(map(str, got - expected))
        raise fail(f"sites missing {missing[:3]}, unexpected {extra[:3]}")
    for (site, step), rec in sorted(trace.records.items()):
        if step:
            raise fail(f"one forward recorded {len(trace.steps(site))} calls of {site} (each application of a "
                       "shared module must be its own layer)")
        if rec.probs is None or rec.probs.ndim != 4:
            raise fail(f"no [batch, head, query, key] probabilities at {site}")
        if not bool(torch.isfinite(rec.probs).all()):
            raise fail(f"non-finite probabilities at {site}")
    try:
        subject.reference  # noqa: B018 - learns how many layers of weights the model itself returns
    except Exception:  # noqa: BLE001 - a reference that cannot be made is the patterns column's failure
        return
    for (tower, kind), n in sorted(subject.returned_layers.items()):
        mine = sum(1 for s in trace.sites if s.tower == tower and s.kind == kind)
        if mine != n:
            raise fail(f"the model returns {n} layers of {tower} {kind}-attention weights, the trace has {mine} sites")


def _compare_probs(subject: Subject, site: Site, step: int, got: torch.Tensor) -> float:
    want = subject.reference_at(site, step)
    if tuple(want.shape) != tuple(got.shape):
        raise fail(f"{site}: shape {tuple(got.shape)} vs reference {tuple(want.shape)}")
    return float((got.float() - want).abs().max())


def check_patterns(subject: Subject) -> None:
    """Captured probabilities equal the reference weights within ``ATOL`` at every site."""
    worst, where = 0.0, None
    for (site, step), rec in sorted(subject.trace.records.items()):
        diff = _compare_probs(subject, site, step, rec.probs)
        if diff > worst:
            worst, where = diff, site
    if worst > ATOL:
        raise fail(f"probabilities differ from the {subject.reference_source} reference by {magnitude(worst)} "
                   f"(worst at {where})")


def check_validate(subject: Subject) -> None:
    report = validate(subject.adapter)
    if not report.ok:
        raise fail("; ".join(report.failures))


def check_statistics(subject: Subject) -> None:
    """Streaming entropy, span mass and top-k equal ``statistics_from_probs`` of the reference weights."""
    trace = capture(subject.adapter, subject.inputs, stats=STATS, topk=TOPK, mass_spans=SPANS)
    if set(trace.records) != set(subject.trace.records):
        raise fail(f"statistics recorded {len(trace.records)} (site, call) pairs, patterns "
                   f"{len(subject.trace.records)}")
    for (site, step), rec in sorted(trace.records.items()):
        want_probs = subject.reference_at(site, step)
        want = statistics_from_probs(want_probs.float(), STATS, SPANS, TOPK)
        for key in ("entropy", "mass", "topk_weight"):
            if key not in rec.stats:
                raise fail(f"{site}: statistic {key} not captured")
            got = rec.stats[key].float()
            if got.shape != want[key].shape:
                raise fail(f"{site} {key}: shape {tuple(got.shape)} vs {tuple(want[key].shape)}")
            diff = float((got - want[key]).abs().max()) if got.numel() else 0.0
            if diff > ATOL:
                raise fail(f"{site} {key} differs from the reference by {magnitude(diff)}")
        index = rec.stats["topk_index"].long()  # ties make indices ambiguous: compare the weights they point at
        picked = want_probs.float().gather(-1, index.clamp(0, want_probs.shape[-1] - 1))
        if bool((index < 0).any()) or float((picked - want["topk_weight"]).abs().max()) > ATOL:
            raise fail(f"{site} topk_index does not point at the top-{TOPK} reference weights")


def check_outputs(subject: Subject) -> None:
    """Outputs with capture are bit-identical to outputs without; attention implementations are unchanged."""
    base, captured = tensors(subject.base_output), tensors(subject.trace.output)
    diff = max_diff(base, captured)
    if not all(torch.equal(a, b) for a, b in zip(base, captured)):
        raise fail(f"outputs not bit-identical under capture (max diff {magnitude(diff)})")
    if implementation_state(subject.model) != subject.state_before:
        raise fail("the model's attention implementation changed after capture")


CAPTURE_CHECKS = {"capture": check_capture, "patterns": check_patterns, "validate": check_validate,
                  "statistics": check_statistics, "outputs": check_outputs}
__all__ = ["ATOL", "CAPTURE_CHECKS", "Subject", "Verdict", "attention_configs", "model_attentions", "switched"]
