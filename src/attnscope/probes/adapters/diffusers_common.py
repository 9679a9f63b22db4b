"""Shared machinery of the diffusers adapters: the SDPA side channel, reference processors, the adapter base.

How capture works (``implementation="auto"``): the model's own attention processors keep computing the output.
A forward pre-hook on every attention module marks it active (thread-local) while its forward runs; during that
time the first call of ``torch.nn.functional.scaled_dot_product_attention`` (what every diffusers ``*2_0``
processor and the native backend of ``attention_dispatch`` call, looked up at call time) is forwarded unchanged
to the real SDPA, and its query, key, mask and scale go to ``Recorder.observe_qk`` on the side. The legacy
``AttnProcessor`` path is read from ``get_attention_scores``. Both patches pass through whenever no module is
active, are reference counted, and are removed in ``finally``: outputs are bit-identical.

``implementation="eager"`` swaps in materialising processors (diffusers' legacy ``AttnProcessor``; our
``JointReferenceProcessor`` for SD3-style joint attention and q/k-normed modules). That path is also the
independent reference ``validate`` compares against. Processors are restored in ``finally``.

Example:
    >>> import torch
    >>> from attnscope.probes.adapters.diffusers_common import latent_grid
    >>> latent_grid(12, (8, 6))  # a 2x-downsampled level of an 8x6 latent
    (4, 3)
"""

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import InputError, UnsupportedAttentionError
from ..adapter import ModelAdapter, Prepared
from ..model_info import ModelInfo, TowerInfo
from ..recorder import Recorder
from ..request import CaptureRequest
from ..site import Site
from ..tokens import Span, TokenInfo
from .source_check import method_mentions

_LOCAL = threading.local()
_LOCK = threading.Lock()
_PATCH: dict[str, Any] = {"count": 0, "sdpa": None, "scores": []}
_UNSUPPORTED = ("Sliced", "XFormers", "XLA", "NPU")
_SDPA_ARGS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


# --- per-call state ----------------------------------------------------------------------------------------------

@dataclass
class DenoiserState:
    """What the denoiser's forward pre-hook learns: latent size, and for pipelines the step and CFG half."""

    patch: int = 1
    base_hw: tuple[int, int] | None = None
    step: int | None = None
    batch_index: Tensor | None = None
    timestep: float | None = None
    calls: int = 0
    repeat: bool = False
    track_steps: bool = False
    cfg: Callable[[], bool] | None = None

    def on_call(self, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if torch.is_tensor(sample) and sample.ndim == 4:
            self.base_hw = (sample.shape[-2] // self.patch, sample.shape[-1] // self.patch)
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        last, self.timestep = self.timestep, float(t.flatten()[0]) if torch.is_tensor(t) and t.numel() else None
        if not self.track_steps:
            return
        # a second call at the same timestep (e.g. skip-layer guidance) belongs to the same step: not recorded
        self.repeat = bool(self.calls) and self.timestep is not None and self.timestep == last
        if not self.repeat:
            self.step, self.calls = self.calls, self.calls + 1
        batch = sample.shape[0] if torch.is_tensor(sample) else 0
        use_cfg = bool(self.cfg()) if self.cfg is not None else False
        # diffusers pipelines concatenate [unconditional, conditional]: keep the second half
        self.batch_index = torch.arange(batch // 2, batch) if use_cfg and batch % 2 == 0 and batch else None


def latent_grid(n_tokens: int, base_hw: tuple[int, int] | None) -> tuple[int, int] | None:
    """(h, w) of a level with ``n_tokens`` latent tokens: ``base_hw`` halved (rounding up) until it matches."""
    if base_hw is None:
        return None
    h, w = base_hw
    for _ in range(12):
        if h * w == n_tokens:
            return (int(h), int(w))
        if h * w < n_tokens or (h == 1 and w == 1):
            break
        h, w = (h + 1) // 2, (w + 1) // 2
    return None


@dataclass
class _Active:
    """One attention module's forward in flight: where its attention goes."""

    recorder: Recorder
    module: nn.Module
    site: Site
    state: DenoiserState
    meta: dict = field(default_factory=dict)
    done: bool = False

    def observe_sdpa(self, query: Tensor, key: Tensor, *args: Any, **kwargs: Any) -> None:
        opts = dict(zip(_SDPA_ARGS[1:], args[1:]))  # args[0] is value
        opts.update({k: v for k, v in kwargs.items() if k in _SDPA_ARGS})
        if query.ndim != 4:
            return
        mask = opts.get("attn_mask")
        if mask is not None and mask.ndim < 4:
            mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
        if opts.get("is_causal"):  # torch aligns the causal mask top-left
            causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
            mask = causal if mask is None else (mask & causal if mask.dtype == torch.bool
                                                else mask.masked_fill(~causal, -math.inf))
        scale = opts.get("scale")
        self.recorder.observe_qk(self.site, query, key, mask, is_causal=False, step=self.state.step,
                                 scaling=float(scale if scale is not None else query.shape[-1] ** -0.5),
                                 batch_index=self.state.batch_index, meta=self.meta)

    def observe_probs(self, probs: Tensor) -> None:
        self.recorder.observe_probs(self.site, probs, step=self.state.step, batch_index=self.state.batch_index,
                                    meta=self.meta)


def _take_active(module: nn.Module | None = None) -> _Active | None:
    """The active entry of this thread if it has not observed yet (and belongs to ``module`` when given)."""
    active = getattr(_LOCAL, "active", None)
    if active is None or active.done or (module is not None and active.module is not module):
        return None
    active.done = True
    return active


def emit_probs(module: nn.Module, probs: Tensor) -> None:
    """Hand materialised probabilities ``[batch, head, query, key]`` of ``module`` to the active recorder."""
    active = _take_active(module)
    if active is not None:
        active.observe_probs(probs)


# --- global patches ----------------------------------------------------------------------------------------------

def _patched_sdpa(query: Tensor, key: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    out = _PATCH["sdpa"](query, key, *args, **kwargs)
    active = _take_active()
    if active is not None:
        active.observe_sdpa(query, key, *args, **kwargs)
    for edit in getattr(_LOCAL, "edits", None) or ():  # head edits (diffusers_edits) of the module in flight,
        if not edit.done and query.ndim == 4:  # nested ones (a plan and a sweep's edit) in the order they were armed
            out = edit.apply(query, key, args, kwargs, out)
    return out


def _scores_patch(original: Callable) -> Callable:
    def get_attention_scores(self, query: Tensor, key: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        probs = original(self, query, key, attention_mask)
        if probs.shape[0] % self.heads == 0:
            emit_probs(self, probs.reshape(-1, self.heads, *probs.shape[1:]))
        return probs

    return get_attention_scores


def _attention_classes() -> list[type]:
    from diffusers.models import attention, attention_processor

    return [c for c in (attention_processor.Attention, getattr(attention, "AttentionModuleMixin", None)) if c]


def _install() -> None:
    with _LOCK:
        if _PATCH["count"] == 0:
            _PATCH["sdpa"] = torch.nn.functional.scaled_dot_product_attention
            torch.nn.functional.scaled_dot_product_attention = _patched_sdpa
            for cls in _attention_classes():
                if "get_attention_scores" in cls.__dict__:
                    original = cls.__dict__["get_attention_scores"]
                    _PATCH["scores"].append((cls, original))
                    cls.get_attention_scores = _scores_patch(original)
        _PATCH["count"] += 1


def _uninstall() -> None:
    with _LOCK:
        _PATCH["count"] -= 1
        if _PATCH["count"] == 0:
            torch.nn.functional.scaled_dot_product_attention = _PATCH["sdpa"]
            for cls, original in _PATCH["scores"]:
                cls.get_attention_scores = original
            _PATCH["scores"] = []


# --- processors --------------------------------------------------------------------------------------------------

class JointReferenceProcessor:
    """Attention from its definition with materialised probabilities: the reference for SD3-style joint blocks.

    ``softmax(q k^T / sqrt(d))`` over the concatenated ``[image; text]`` keys, with image queries/keys
    ``norm_q(to_q(x))``, ``norm_k(to_k(x))`` and text ones ``norm_added_q(add_q_proj(c))``,
    ``norm_added_k(add_k_proj(c))``; without ``encoder_hidden_states`` it is (q/k-normed) self-attention.
    Returns what ``JointAttnProcessor2_0`` returns. ``edit_logits`` / ``edit_probs`` (optional callables
    ``(attn, tensor [batch, head, query, key]) -> tensor``) edit the scores before / after the softmax.
    """

    def __init__(self, edit_logits: Callable | None = None, edit_probs: Callable | None = None):
        self.edit_logits, self.edit_probs = edit_logits, edit_probs

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        batch, n_img = hidden_states.shape[:2]

        def heads(x: Tensor, norm: nn.Module | None = None) -> Tensor:
            x = x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return norm(x) if norm is not None else x

        q = heads(attn.to_q(hidden_states), attn.norm_q)
        k = heads(attn.to_k(hidden_states), attn.norm_k)
        v = heads(attn.to_v(hidden_states))
        if encoder_hidden_states is not None:
            c = encoder_hidden_states
            q = torch.cat([q, heads(attn.add_q_proj(c), getattr(attn, "norm_added_q", None))], 2)
            k = torch.cat([k, heads(attn.add_k_proj(c), getattr(attn, "norm_added_k", None))], 2)
            v = torch.cat([v, heads(attn.add_v_proj(c))], 2)
        logits = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
        probs = torch.softmax(logits if self.edit_logits is None else self.edit_logits(attn, logits), dim=-1)
        probs = probs if self.edit_probs is None else self.edit_probs(attn, probs)
        emit_probs(attn, probs)
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(batch, -1, attn.heads * v.shape[-1])
        context = None
        if encoder_hidden_states is not None:
            out, context = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if context is None else (out, context)


def is_joint(module: nn.Module) -> bool:
    return getattr(module, "add_q_proj", None) is not None


def reference_processor(module: nn.Module) -> Any:
    """Materialising processor for ``module``: ours for joint or q/k-normed attention, else the legacy one."""
    from diffusers.models.attention_processor import AttnProcessor

    if is_joint(module) or getattr(module, "norm_q", None) is not None:
        return JointReferenceProcessor()
    return AttnProcessor()


def _observable(processor: Any) -> bool:
    """True when the processor's attention goes through SDPA or ``get_attention_scores`` (so we can see it)."""
    cls = type(processor)
    return not any(u in cls.__name__ for u in _UNSUPPORTED) and method_mentions(
        cls, "__call__", ("scaled_dot_product_attention", "get_attention_scores", "dispatch_attention_fn"))


def processor_names(modules: list[nn.Module]) -> str:
    return ", ".join(sorted({type(m.processor).__name__ for m in modules}))


# --- routing -----------------------------------------------------------------------------------------------------

def _site_meta(site: Site, hidden: Any, context: Any, state: DenoiserState, static: dict) -> dict:
    meta = dict(static)
    if torch.is_tensor(hidden):
        grid = tuple(hidden.shape[-2:]) if hidden.ndim == 4 else latent_grid(hidden.shape[1], state.base_hw)
        if grid:
            meta["grid"] = [int(grid[0]), int(grid[1])]
        if site.kind == "joint" and torch.is_tensor(context):
            n_img = int(hidden.shape[1])
            meta["blocks"] = {"image": [0, n_img], "text": [n_img, n_img + int(context.shape[1])]}
    if state.timestep is not None:
        meta["timestep"] = state.timestep
    return meta


def _arm(recorder: Recorder, site: Site, state: DenoiserState, static: dict) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        _LOCAL.active = None
        skip_step = state.step is not None and not recorder.request.wants_step(state.step)
        if state.repeat or skip_step or not recorder.wants(site):
            return
        hidden = args[0] if args else kwargs.get("hidden_states")
        context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        _LOCAL.active = _Active(recorder, module, site, state, _site_meta(site, hidden, context, state, static))

    return hook


def _disarm(module: nn.Module, args: tuple, output: Any) -> None:
    _LOCAL.active = None


@contextlib.contextmanager
def route_attention(denoiser: nn.Module, sites: dict[int, Site], metas: dict[int, dict], recorder: Recorder,
                    state: DenoiserState, implementation: str = "auto") -> Iterator[str]:
    """Send the attention of every module in ``sites`` (id(module) -> Site) to ``recorder``; yield the path.

    auto: the model's processors run untouched (SDPA side channel). eager: materialising reference processors.
    Hooks, swapped processors and the global patches are all removed in ``finally``, even when the forward raises.
    """
    modules = [m for m in denoiser.modules() if id(m) in sites]
    if implementation not in ("auto", "eager"):
        raise InputError("unknown attention implementation", expected="'auto' or 'eager'", got=implementation)
    hidden = sorted({type(m.processor).__name__ for m in modules if not _observable(m.processor)})
    if implementation == "auto" and hidden:
        raise UnsupportedAttentionError(
            "attention processor hides its attention from capture", expected="SDPA or AttnProcessor-based", got=hidden,
            fix="capture with implementation='eager', or model.set_attn_processor(AttnProcessor2_0())")
    swapped: list[tuple[nn.Module, Any]] = []
    handles = []
    _install()
    try:
        path = processor_names(modules)
        if implementation == "eager":
            for m in modules:
                swapped.append((m, m.processor))
                m.set_processor(reference_processor(m))
            path = f"{processor_names(modules)} (eager reference; model ran {path})"
        handles.append(denoiser.register_forward_pre_hook(lambda mod, a, kw: state.on_call(a, kw), with_kwargs=True))
        for m in modules:
            handles.append(m.register_forward_pre_hook(_arm(recorder, sites[id(m)], state, metas[id(m)]),
                                                       with_kwargs=True))
            handles.append(m.register_forward_hook(_disarm, always_call=True))
        yield path
    finally:
        for h in handles:
            h.remove()
        for m, processor in reversed(swapped):
            m.set_processor(processor)
        _LOCAL.active = None
        _uninstall()


# --- adapter base ------------------------------------------------------------------------------------------------

def _to_device(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if torch.is_tensor(value):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    if isinstance(value, dict):
        return {k: _to_device(v, device, dtype) for k, v in value.items()}
    return value


class DiffusersAdapter(ModelAdapter):
    """Base of the diffusers denoiser adapters. Subclasses set ``classes`` and implement ``locate``.

    Sites are the diffusers ``Attention`` modules; ``layer`` counts them per (tower, kind) in forward order unless
    ``locate`` gives the block index. ``meta`` of every record: ``module`` (qualified name), ``order`` (rank in
    forward order over all sites), ``grid`` (latent ``[h, w]`` of the queries), ``timestep`` and, for joint
    sites, ``blocks``.
    """

    family = "diffusers"
    priority = 20
    classes: tuple[str, ...] = ()
    sample_key = "hidden_states"

    @classmethod
    def matches(cls, module: Any) -> bool:
        return isinstance(module, nn.Module) and any(c.__name__ in cls.classes for c in type(module).__mro__)

    def locate(self, name: str, module: nn.Module) -> tuple[str, str, int | None]:
        """(tower, kind, layer or None to number in forward order) of one attention module."""
        raise NotImplementedError

    def forward_rank(self, name: str) -> tuple:
        return ()

    def patch_size(self) -> int:
        return int(getattr(self.module.config, "patch_size", None) or 1)

    def _table(self) -> list[tuple[str, nn.Module, Site]]:
        classes = tuple(_attention_classes())
        found = [(n, m) for n, m in self.module.named_modules() if isinstance(m, classes) and hasattr(m, "processor")]
        found = [x for _, x in sorted(enumerate(found), key=lambda e: (self.forward_rank(e[1][0]), e[0]))]
        counters: dict[tuple[str, str], int] = {}
        table = []
        for name, m in found:
            tower, kind, layer = self.locate(name, m)
            if layer is None:
                layer = counters.get((tower, kind), 0)
                counters[(tower, kind)] = layer + 1
            table.append((name, m, Site(tower=tower, layer=layer, kind=kind)))
        return table

    def _routing(self) -> tuple[dict[int, Site], dict[int, dict]]:
        sites, metas = {}, {}
        for order, (name, m, site) in enumerate(self._table()):
            sites[id(m)] = site
            metas[id(m)] = {"module": name, "order": order}
            if site.kind == "joint" and getattr(m, "context_pre_only", False):
                metas[id(m)]["context_pre_only"] = True
        return sites, metas

    def info(self) -> ModelInfo:
        table = self._table()
        towers: dict[str, TowerInfo] = {}
        for _, m, site in table:
            d_head = m.to_q.out_features // m.heads
            t = towers.setdefault(site.tower, TowerInfo(
                name=site.tower, n_layers=0, n_heads=m.heads, n_kv_heads=m.to_k.out_features // d_head,
                d_head=d_head, kinds=[]))
            t.n_layers = max(t.n_layers, site.layer + 1)
            t.kinds = sorted(set(t.kinds) | {site.kind})
        cfg = self.module.config
        return ModelInfo(family=self.family, adapter=type(self).__name__, towers=list(towers.values()),
                         sites=sorted(s for _, _, s in table), max_positions=None,
                         attn_implementation=processor_names([m for _, m, _ in table]),
                         name=self.name or str(getattr(cfg, "_name_or_path", "") or type(self.module).__name__))

    def prepare(self, inputs: Any) -> Prepared:
        if not isinstance(inputs, dict):
            raise InputError("diffusers models take a dict of forward kwargs", expected="dict",
                             got=type(inputs).__name__,
                             fix=f"pass e.g. {{'{self.sample_key}': latents, 'timestep': t, ...}}")
        param = next(self.module.parameters())
        kwargs = {k: _to_device(v, param.device, param.dtype) for k, v in inputs.items()}
        return Prepared(kwargs, self.token_info(kwargs))

    def token_info(self, kwargs: dict) -> TokenInfo:
        """Latent grid of the input; spans of the text (cross keys) or of the joint ``[latent; text]`` sequence."""
        sample = kwargs.get(self.sample_key)
        p = self.patch_size()
        grid = (sample.shape[-2] // p, sample.shape[-1] // p) if torch.is_tensor(sample) and sample.ndim == 4 else None
        n_img = grid[0] * grid[1] if grid else 0
        context = kwargs.get("encoder_hidden_states")
        n_txt = int(context.shape[1]) if torch.is_tensor(context) else 0
        if any(s.kind == "joint" for _, _, s in self._table()):
            spans = [Span("latent", 0, n_img), Span("text", n_img, n_img + n_txt)]
        else:
            spans = [Span("text", 0, n_txt)] if n_txt else [Span("latent", 0, n_img)]
        mask = kwargs.get("encoder_attention_mask")
        padding = mask.long().tolist() if torch.is_tensor(mask) and mask.ndim == 2 else None
        return TokenInfo(spans=[s for s in spans if s.end > s.start], grid=grid, padding=padding)

    @contextlib.contextmanager
    def instrument(self, recorder: Recorder, implementation: str = "auto",
                   state: DenoiserState | None = None) -> Iterator[None]:
        sites, metas = self._routing()
        state = state or DenoiserState()
        state.patch = self.patch_size()
        with route_attention(self.module, sites, metas, recorder, state, implementation) as path:
            self.attention_path = path
            yield

    def reference_patterns(self, prepared: Prepared) -> dict[Site, list[Tensor]]:
        return reference_by_step(self, prepared)

    def provenance(self) -> dict:
        import diffusers

        return {**super().provenance(), "diffusers": diffusers.__version__}


def reference_by_step(adapter: ModelAdapter, prepared: Prepared) -> dict[Site, list[Tensor]]:
    """Probabilities per site, indexed by step, from the eager (materialising) path of ``adapter``."""
    recorder = Recorder(CaptureRequest(patterns=True))
    with adapter.instrument(recorder, implementation="eager"):
        adapter.run(prepared)
    collected: dict[Site, dict[int, Tensor]] = {}
    for rec in recorder.records:
        collected.setdefault(rec.site, {})[rec.step] = rec.probs
    return {site: [steps.get(i) for i in range(max(steps) + 1)] for site, steps in collected.items()}
