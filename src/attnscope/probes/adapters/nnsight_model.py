"""Adapter for nnsight 0.8 models (``nnsight.NNsight(model)``, ``TransformersModel``, ``LanguageModel``) wrapping a
transformers model. The capture runs INSIDE an nnsight trace, so the same plan can run on a remote nnsight backend.

Inside ``envoy.trace(...)`` we visit the attention modules in execution order and read, per module:

- eager attention: ``attn.output[1]``, the weights the model computed (``observe_probs`` after the trace);
- SDPA and other kernels: the inputs of the module's ``attention_interface(...)`` call through ``attn.source``
  (query, key, mask, scaling, causality), saved and fed to ``observe_qk`` after the trace, which computes the
  probabilities (or only the requested rows, heads and statistics) in query chunks. With
  ``reduce_in_trace=True`` the softmax probabilities are computed inside the trace instead and only they leave it.

The kernel is untouched, so outputs stay bit-identical. Structure, inputs and the eager reference come from the
adapter of the wrapped model (``HFTextAdapter`` or ``HFVisionLanguageAdapter``). Within ``capture(...)`` used as a
context manager, where the caller runs the model (or their own trace) directly, attention is recorded through the
``hf_route`` fallback instead; it is switched off while our own trace runs.

Example:
    >>> import nnsight, transformers, attnscope
    >>> cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    >>> wrapped = nnsight.NNsight(transformers.GPT2LMHeadModel(cfg).eval())
    >>> attnscope.probes.validate(wrapped).ok
    True
"""

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ...errors import CaptureError
from ..adapter import ModelAdapter, Prepared, adapter_for, register_adapter
from ..model_info import ModelInfo
from ..recorder import Recorder
from ..site import Site
from ..statistics import attention_from_qk
from .hf_route import PREFIX, attention_modules, extra_terms
from .inline_attention import inline_spec

_CALL = "attention_interface("


def _is_nnsight(obj: Any) -> bool:
    return any(c.__module__.startswith("nnsight") and c.__name__ in ("NNsight", "Envoy") for c in type(obj).__mro__)


def _wrapped(obj: Any) -> Any:
    return getattr(obj, "_module", None)


def attention_call_op(envoy: Any) -> str | None:
    """Name of the ``attention_interface(...)`` call in the module's ``.source`` (e.g. ``attention_interface_1``)."""
    compiled = envoy.source.compiled
    lines = compiled.source.split("\n")
    for name in compiled.names:
        line = compiled.lines.get(name, 0)
        if name.startswith("attention_interface_") and 0 < line <= len(lines) and _CALL in lines[line - 1]:
            return name
    return None


def qk_payload(args: tuple, kwargs: dict) -> dict[str, Any]:
    """What ``observe_qk`` needs, read from an ``attention_interface(module, q, k, v, mask, ...)`` call."""
    module, query, key = args[0], args[1], args[2]
    mask = args[4] if len(args) > 4 else kwargs.get("attention_mask")
    extra = args[5:]
    scaling = kwargs.get("scaling", extra[1] if len(extra) > 1 else None)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    mask = mask.detach() if torch.is_tensor(mask) else None
    causal_flag = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
    is_causal = causal_flag and (mask is None or mask.ndim == 2)
    softcap = kwargs.get("softcap")
    terms = {k: v.detach() for k, v in kwargs.items() if torch.is_tensor(v)}  # bias, sinks ... (hf_route.extra_terms)
    return {"query": query.detach(), "key": key.detach(), "mask": mask, "scaling": float(scaling),
            "is_causal": is_causal, "softcap": None if softcap is None else float(softcap), "terms": terms,
            "owner": type(module).__name__}


def probs_in_trace(payload: dict[str, Any]) -> dict[str, Any]:
    """Softmax probabilities from a q/k payload, computed where the payload lives (inside the trace); a payload with
    a position bias or sinks stays whole (the client adds those terms)."""
    if "position_bias" in payload["terms"] or "s_aux" in payload["terms"]:
        return payload
    out = attention_from_qk(payload["query"], payload["key"], payload["mask"], scaling=payload["scaling"],
                            is_causal=payload["is_causal"], softcap=payload["softcap"], want_probs=True)
    return {"probs": out["probs"]}


def weights_payload(output: Any) -> dict[str, Any]:
    weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    return {"probs": weights.detach() if torch.is_tensor(weights) else None}


class _Gate:
    """Recorder stand-in for the ``hf_route`` fallback: forwards only while open."""

    def __init__(self, recorder: Recorder):
        self.recorder, self.open = recorder, True

    def observe_qk(self, *args: Any, **kwargs: Any) -> None:
        if self.open:
            self.recorder.observe_qk(*args, **kwargs)

    def observe_probs(self, *args: Any, **kwargs: Any) -> None:
        if self.open:
            self.recorder.observe_probs(*args, **kwargs)


@register_adapter
class NNsightAdapter(ModelAdapter):
    """nnsight-wrapped transformers models; attention read inside ``envoy.trace``."""

    family = "nnsight"
    priority = 40
    reduce_in_trace = False  # True: compute probabilities inside the trace instead of shipping q/k out

    def __init__(self, module: Any, tokenizer: Any = None, name: str = ""):
        self.envoy = module
        hf = _wrapped(module)
        tokenizer = tokenizer if tokenizer is not None else (getattr(module, "processor", None)
                                                             or getattr(module, "tokenizer", None))
        super().__init__(hf, tokenizer=tokenizer, name=name)
        self.inner = adapter_for(hf, tokenizer=tokenizer, name=name)
        self._recorder: Recorder | None = None
        self._gate: _Gate | None = None
        self._implementation = "auto"

    @classmethod
    def matches(cls, module: Any) -> bool:
        from transformers import PreTrainedModel

        hf = _wrapped(module)
        found = attention_modules(hf) if _is_nnsight(module) and isinstance(hf, PreTrainedModel) else []
        # inline attention (BLOOM, GPT-Neo, DeBERTa-v2; hf_inline) is not read through nnsight yet: refused (no adapter)
        return bool(found) and not any(inline_spec(m) is not None for _, m in found)

    # -- delegated structure ----------------------------------------------------------------------------------------

    def info(self) -> ModelInfo:
        info = self.inner.info()
        info.family, info.adapter = f"nnsight/{info.family}", type(self).__name__
        return info

    def prepare(self, inputs: Any) -> Prepared:
        return self.inner.prepare(inputs)

    def sample_inputs(self) -> Any:
        return self.inner.sample_inputs()

    def causal_sites(self) -> set[Site]:
        return self.inner.causal_sites()

    def reference_patterns(self, prepared: Prepared) -> dict[Site, list[torch.Tensor]]:
        return self.inner.reference_patterns(prepared)

    def provenance(self) -> dict:
        import nnsight

        prov = super().provenance()
        prov["nnsight"] = getattr(nnsight, "__version__", "unknown")
        return prov

    # -- capture ----------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def instrument(self, recorder: Recorder, implementation: str = "auto") -> Iterator[None]:
        gate = _Gate(recorder)
        try:
            with self.inner.instrument(gate, implementation=implementation):
                self._recorder, self._gate, self._implementation = recorder, gate, implementation
                self.attention_path = f"hf_route fallback ({self.inner.attention_path}); nnsight trace via capture()"
                yield
        finally:
            self._recorder, self._gate = None, None

    def _plan(self) -> list[tuple[Site, str, str, str | None]]:
        """(site, envoy path, 'weights' or 'qk', source op) in execution order, for the sites the recorder wants."""
        sites = self.inner._sites()
        plan = []
        for name, module in attention_modules(self.module):
            site = sites.get(id(module))
            if site is None or not self._recorder.wants(site):
                continue
            impl = str(getattr(module.config, "_attn_implementation", None) or "eager").removeprefix(PREFIX)
            if impl == "eager":
                plan.append((site, name, "weights", None))
                continue
            op = attention_call_op(self.envoy.get(name))
            if op is None:
                raise CaptureError("no attention_interface(...) call in the module's source", expected="a "
                                   "transformers attention module", got=type(module).__name__,
                                   fix="capture with implementation='eager' (weights from attn.output[1])")
            plan.append((site, name, "qk", op))
        return plan

    def _describe(self, plan: list) -> str:
        kinds = {kind for _, _, kind, _ in plan}
        impls = sorted({str(getattr(m.config, "_attn_implementation", "")).removeprefix(PREFIX)
                        for _, m in attention_modules(self.module)})
        parts = []
        if "weights" in kinds:
            parts.append("eager weights from attn.output[1]")
        if "qk" in kinds:
            where = "probabilities computed in the trace" if self.reduce_in_trace else "probabilities computed after"
            parts.append(f"{'/'.join(i for i in impls if i != 'eager')} q/k from attention_interface inputs ({where})")
        return "nnsight in-trace: " + "; ".join(parts)

    def _traced(self, prepared: Prepared, plan: list) -> tuple[Any, list[dict]]:
        import nnsight

        payloads: list[dict] = []
        result: dict[str, Any] = {}
        reduce = self.reduce_in_trace
        with self.envoy.trace(**prepared.kwargs):
            for _site, path, kind, op in plan:
                envoy = self.envoy.get(path)
                if kind == "weights":
                    payloads.append(nnsight.save(weights_payload(envoy.output)))
                else:
                    args, kwargs = getattr(envoy.source, op).inputs
                    payload = qk_payload(args, kwargs)
                    payloads.append(nnsight.save(probs_in_trace(payload) if reduce else payload))
            result["output"] = nnsight.save(self.envoy.output)
        return result["output"], payloads

    def run(self, prepared: Prepared) -> Any:
        if self._recorder is None:
            return super().run(prepared)
        recorder, gate = self._recorder, self._gate
        plan = self._plan()
        if self._implementation == "eager" and any(kind != "weights" for _, _, kind, _ in plan):
            raise CaptureError("eager capture requested but a module still runs another kernel", expected="eager",
                               got=[p for _, p, kind, _ in plan if kind != "weights"])
        gate.open = False
        try:
            with torch.no_grad():
                output, payloads = self._traced(prepared, plan)
        finally:
            gate.open = True
        self.attention_path = self._describe(plan)
        for (site, path, _kind, _op), payload in zip(plan, payloads):
            if payload.get("probs") is not None:  # eager weights: learned sinks already took their mass
                sinks = isinstance(getattr(self.module.get_submodule(path), "sinks", None), torch.nn.Parameter)
                recorder.observe_probs(site, payload["probs"], meta={"attention_sinks": True} if sinks else None)
            elif "query" in payload:
                mask, sinks = extra_terms(payload["owner"], payload["mask"], payload["terms"])
                recorder.observe_qk(site, payload["query"], payload["key"], mask, scaling=payload["scaling"],
                                    is_causal=payload["is_causal"], softcap=payload["softcap"], sinks=sinks)
            else:
                raise CaptureError("nnsight trace returned no attention", expected="weights or q/k", got=str(site))
        return output
