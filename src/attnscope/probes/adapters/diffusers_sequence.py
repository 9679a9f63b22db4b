"""Shared machinery of the diffusers adapters whose attention runs over one laid-out token sequence: Flux,
Wan, CogVideoX and HunyuanVideo (``diffusers_flux``, ``diffusers_wan``, ``diffusers_cogvideox``,
``diffusers_hunyuan_video``).

These models flatten latents to tokens before the blocks (2D patches, or frame x height x width patches for
video) and put text and latent tokens in one sequence in an order of their own (Flux / CogVideoX: ``[text;
latent]``, HunyuanVideo: ``[latent; text]``). Capture uses the SDPA side channel of ``diffusers_common`` (their
processors call ``torch.nn.functional.scaled_dot_product_attention`` directly or through ``dispatch_attention_fn``,
whose native backends call it); what this module adds:

- a forward pre-hook on the denoiser reads the layout of the call (``Layout``: text length, latent grid) from its
  inputs, and every record's ``meta`` says where the blocks are: ``meta["blocks"] = {"text": [a, b], "image": [c,
  d]}`` for joint sites (``image`` = the latent tokens, for video every frame's patches), ``meta["grid"]`` the
  latent grid ``[h, w]`` and, for video, ``meta["video_grid"] = [f, h, w]`` with ``meta["grid"] = [f * h, w]``:
  tokens are frame-major, so a 2D consumer lays a video out as a filmstrip of its frames, top to bottom;
- refusals where the side channel would see the wrong call or nothing: attention backends that do not call torch
  SDPA (flash, sage, xformers, flex ...), context parallelism;
- ``implementation="eager"`` swaps in the adapter's reference processors, written from each attention's
  definition (projections, q/k norms, the same rotary embedding, one softmax) with materialised probabilities:
  the reference ``validate`` compares against. ``edit_logits`` / ``edit_probs`` on them edit the scores / the
  probabilities (tests use them as the oracle of head edits).

Example:
    >>> import torch
    >>> from attnscope.probes.adapters.diffusers_sequence import grid_meta, rotate_pairs
    >>> grid_meta((2, 3, 4), 24)
    {'grid': [6, 4], 'video_grid': [2, 3, 4]}
    >>> x, angle = torch.tensor([[1.0, 0.0]]), torch.tensor([[torch.pi / 2, torch.pi / 2]])
    >>> rotate_pairs(x, angle.cos(), angle.sin()).round(decimals=6).abs()
    tensor([[0., 1.]])
"""

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import InputError, UnsupportedAttentionError
from ..recorder import Recorder
from ..site import Site
from ..tokens import Span, TokenInfo
from . import diffusers_common as dc
from .source_check import method_mentions

# diffusers attention backends that run torch.nn.functional.scaled_dot_product_attention (the side channel)
SDPA_BACKENDS = ("native", "_native_cudnn", "_native_efficient", "_native_flash", "_native_math")


# --- layout --------------------------------------------------------------------------------------------------------

@dataclass
class Layout:
    """What the denoiser's forward pre-hook reads from its inputs: text length, latent grid ``(h, w)`` or
    ``(f, h, w)`` (None where the inputs do not say)."""

    n_text: int | None = None
    grid: tuple[int, ...] | None = None


def grid_meta(grid: tuple[int, ...] | None, n_latent: int) -> dict:
    """``meta`` entries of a latent grid, only if it has ``n_latent`` tokens: ``grid`` ``[h, w]``; for video
    ``video_grid`` ``[f, h, w]`` and ``grid`` ``[f * h, w]`` (the frames stacked top to bottom)."""
    if not grid or math.prod(grid) != n_latent:
        return {}
    if len(grid) == 3:
        f, h, w = (int(g) for g in grid)
        return {"grid": [f * h, w], "video_grid": [f, h, w]}
    return {"grid": [int(grid[0]), int(grid[1])]}


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


# --- attention from its definition ----------------------------------------------------------------------------------

def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on interleaved pairs: ``(x[2i], x[2i+1])`` rotated by the angle of pair ``i``, whose cosine
    and sine sit at ``2i`` (and, repeated, ``2i + 1``) of ``cos`` / ``sin`` (broadcast against ``x``). In float32."""
    even, odd = x.float()[..., 0::2], x.float()[..., 1::2]
    c, s = cos.float()[..., 0::2], sin.float()[..., 0::2]
    return torch.stack([even * c - odd * s, even * s + odd * c], -1).flatten(-2).to(x.dtype)


def rope_table(freqs: Any) -> tuple[Tensor, Tensor]:
    """A model's rotary tables ``(cos, sin)`` as ``[1, 1, seq, d]`` (given as ``[seq, d]`` or ``[1, seq, 1, d]``)."""
    cos, sin = freqs
    return tuple(t.reshape(-1, t.shape[-1])[None, None] for t in (cos, sin))


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``[batch, seq, heads * d]`` -> ``[batch, head, seq, d]``."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``[batch, head, seq, d]`` -> ``[batch, seq, heads * d]``."""
    return x.transpose(1, 2).flatten(2)


class ReferenceProcessor:
    """Base of the reference processors: ``attend`` computes ``softmax(q k^T / sqrt(d) + mask) v`` with the
    probabilities materialised and handed to the recorder. ``edit_logits`` / ``edit_probs``: optional callables
    ``(attn, tensor [batch, head, query, key]) -> tensor`` applied before / after the softmax."""

    def __init__(self, edit_logits: Callable | None = None, edit_probs: Callable | None = None):
        self.edit_logits, self.edit_probs = edit_logits, edit_probs

    def attend(self, attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
               emit: bool = True) -> Tensor:
        """``[batch, head, seq, d]`` inputs; ``mask`` bool (True = attend) or additive, ``[batch, key]`` or
        broadcastable to ``[batch, head, query, key]``. Returns ``[batch, head, query, d]``."""
        logits = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
        if mask is not None:
            mask = mask[:, None, None, :] if mask.ndim == 2 and mask.shape[-1] == k.shape[-2] else mask
            logits = logits.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else logits + mask.float()
        if emit and self.edit_logits is not None:
            logits = self.edit_logits(attn, logits)
        probs = torch.softmax(logits, dim=-1)
        if emit and self.edit_probs is not None:
            probs = self.edit_probs(attn, probs)
        if emit:
            dc.emit_probs(attn, probs)
        return probs.to(v.dtype) @ v


def uniform_logits(attn: nn.Module, logits: Tensor, heads: list[int]) -> Tensor:
    """``edit_logits`` helper: the given heads' scores set to 0 where they were finite (uniform over allowed keys)."""
    logits = logits.clone()
    logits[:, heads] = torch.where(torch.isfinite(logits[:, heads]), 0.0, logits[:, heads])
    return logits


# --- routing -------------------------------------------------------------------------------------------------------

@dataclass
class _Skipping(dc._Active):
    """An active entry that lets the module's first ``skip`` SDPA calls pass unrecorded (e.g. Wan I2V's image-context
    attention, which runs before the text cross-attention inside the same processor)."""

    skip: int = 0

    def observe_sdpa(self, query: Tensor, key: Tensor, *args: Any, **kwargs: Any) -> None:
        if self.skip > 0:
            self.skip -= 1
            self.done = False  # re-armed: the next SDPA call of this module is the site's attention
            return
        super().observe_sdpa(query, key, *args, **kwargs)


def _backend_of(processor: Any) -> str:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    backend = getattr(processor, "_attention_backend", None) or _AttentionBackendRegistry.get_active_backend()[0]
    return str(getattr(backend, "value", backend))


def _check_auto(modules: list[nn.Module]) -> None:
    hidden = sorted({type(m.processor).__name__ for m in modules if not dc._observable(m.processor)})
    if hidden:
        raise UnsupportedAttentionError(
            "attention processor hides its attention from capture", expected="SDPA-based processors", got=hidden,
            fix="capture with implementation='eager', or restore the model's default processors")
    dispatched = [m for m in modules if method_mentions(type(m.processor), "__call__", ("dispatch_attention_fn",))]
    backends = sorted({_backend_of(m.processor) for m in dispatched} - set(SDPA_BACKENDS))
    if backends:
        raise UnsupportedAttentionError(
            "diffusers attention backend does not call torch SDPA, so capture cannot see it",
            expected=f"one of {SDPA_BACKENDS}", got=backends,
            fix="model.set_attention_backend('native') (or unset DIFFUSERS_ATTN_BACKEND) while capturing")
    if any(getattr(m.processor, "_parallel_config", None) is not None for m in modules):
        raise UnsupportedAttentionError("context-parallel attention splits each softmax across devices",
                                        expected="no parallel_config", got="context parallelism",
                                        fix="capture on one device (no enable_parallelism)")


class SequenceAdapter(dc.DiffusersAdapter):
    """Base of the Flux / Wan / CogVideoX / HunyuanVideo adapters. Subclasses set ``classes``, ``joint_order``
    and implement ``locate``, ``read_layout`` and ``reference_processor``.

    ``joint_order``: ``("text", "image")`` or ``("image", "text")``, the order of the two streams in a joint
    sequence. ``text_towers``: towers whose queries are text tokens (no latent grid). ``skip_calls(module)``:
    SDPA calls of a module that come before its site's attention.
    """

    joint_order: tuple[str, str] = ("text", "image")
    text_towers: tuple[str, ...] = ()

    def read_layout(self, args: tuple, kwargs: dict) -> Layout:
        """The layout of one denoiser call from its forward arguments."""
        raise NotImplementedError

    def reference_processor(self, module: nn.Module) -> Any:
        """A materialising processor computing ``module``'s attention from its definition."""
        raise NotImplementedError

    def skip_calls(self, module: nn.Module) -> int:
        return 0

    def patch_size(self) -> int:  # video models have (t, h, w) patches; grids come from read_layout instead
        return 1

    def site_meta(self, site: Site, hidden: Any, context: Any, layout: Layout) -> dict:
        """Per-call ``meta``: the latent grid of the queries and, for joint sites, where text and latent tokens sit.
        A joint call gets either both streams (``hidden`` latent, ``context`` text) or the concatenated sequence in
        ``hidden`` (then the text length comes from the layout)."""
        if not torch.is_tensor(hidden) or site.tower in self.text_towers:
            return {}
        n = int(hidden.shape[1])
        if site.kind != "joint":
            return grid_meta(layout.grid, n)
        if torch.is_tensor(context):
            sizes = {"image": n, "text": int(context.shape[1])}
        elif layout.n_text is not None and layout.n_text <= n:
            sizes = {"image": n - layout.n_text, "text": layout.n_text}
        else:
            return {}
        first, second = self.joint_order
        blocks = {first: [0, sizes[first]], second: [sizes[first], sizes[first] + sizes[second]]}
        return {**grid_meta(layout.grid, sizes["image"]), "blocks": blocks}

    def _arm(self, recorder: Recorder, site: Site, state: dc.DenoiserState, static: dict, layout: Layout,
             skip: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            dc._LOCAL.active = None
            skip_step = state.step is not None and not recorder.request.wants_step(state.step)
            if state.repeat or skip_step or not recorder.wants(site):
                return
            meta = {**static, **self.site_meta(site, _arg(args, kwargs, 0, "hidden_states"),
                                               _arg(args, kwargs, 1, "encoder_hidden_states"), layout)}
            if state.timestep is not None:
                meta["timestep"] = state.timestep
            dc._LOCAL.active = _Skipping(recorder, module, site, state, meta, skip=skip) if skip else \
                dc._Active(recorder, module, site, state, meta)
        return hook

    @contextlib.contextmanager
    def instrument(self, recorder: Recorder, implementation: str = "auto",
                   state: dc.DenoiserState | None = None) -> Iterator[None]:
        """auto: the model's processors run untouched (SDPA side channel); eager: the reference processors.
        Hooks, swapped processors and the global patches are removed in ``finally``."""
        if implementation not in ("auto", "eager"):
            raise InputError("unknown attention implementation", expected="'auto' or 'eager'", got=implementation)
        sites, metas = self._routing()
        modules = [m for m in self.module.modules() if id(m) in sites]
        if implementation == "auto":
            _check_auto(modules)
        state = state or dc.DenoiserState()
        layout = Layout()

        def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
            state.on_call(args, kwargs)
            new = self.read_layout(args, kwargs)
            layout.n_text, layout.grid = new.n_text, new.grid

        swapped: list[tuple[nn.Module, Any]] = []
        handles = []
        dc._install()
        try:
            path = dc.processor_names(modules)
            if implementation == "eager":
                for m in modules:
                    swapped.append((m, m.processor))
                    m.set_processor(self.reference_processor(m))
                path = f"{dc.processor_names(modules)} (eager reference; model ran {path})"
            self.attention_path = path
            handles.append(self.module.register_forward_pre_hook(on_call, with_kwargs=True))
            for m in modules:
                skip = self.skip_calls(m) if implementation == "auto" else 0
                handles.append(m.register_forward_pre_hook(
                    self._arm(recorder, sites[id(m)], state, metas[id(m)], layout, skip), with_kwargs=True))
                handles.append(m.register_forward_hook(dc._disarm, always_call=True))
            yield
        finally:
            for h in handles:
                h.remove()
            for m, processor in reversed(swapped):
                m.set_processor(processor)
            dc._LOCAL.active = None
            dc._uninstall()

    def token_info(self, kwargs: dict) -> TokenInfo:
        """Spans of the joint sequence in the model's order (or the text keys of cross-attention models), the latent
        grid (video: ``(f * h, w)``, frames stacked) and the text padding mask."""
        layout = self.read_layout((), kwargs)
        grid = grid_meta(layout.grid, math.prod(layout.grid) if layout.grid else 0).get("grid")
        n_img = math.prod(layout.grid) if layout.grid else 0
        context = kwargs.get("encoder_hidden_states")
        n_txt = int(context.shape[1]) if torch.is_tensor(context) else int(layout.n_text or 0)
        if any(s.kind == "joint" for _, _, s in self._table()):
            sizes = {"image": ("latent", n_img), "text": ("text", n_txt)}
            (first, n_first), (second, n_second) = (sizes[b] for b in self.joint_order)
            spans = [Span(first, 0, n_first), Span(second, n_first, n_first + n_second)]
        else:
            spans = [Span("text", 0, n_txt)] if n_txt else [Span("latent", 0, n_img)]
        mask = kwargs.get("encoder_attention_mask")
        padding = mask.long().tolist() if torch.is_tensor(mask) and mask.ndim == 2 else None
        return TokenInfo(spans=[s for s in spans if s.end > s.start], grid=tuple(grid) if grid else None,
                         padding=padding)
