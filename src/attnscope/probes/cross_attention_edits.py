"""``apply_cross_attention_edits(pipe or denoiser, plan)``: run a ``CrossAttentionPlan`` during sampling.

While the context is open, every cross/joint attention module that some edit touches has an editing processor:
at a call where no edit is active it calls the module's original processor (outputs bit-identical); where an edit
is active it computes attention with materialised probabilities (diffusers' ``AttnProcessor`` path with our scores
for cross-attention, ``JointReferenceProcessor`` for SD3 joint attention), edits them and hands the edited
probabilities to a running ``attnscope.capture``. A forward pre-hook on the denoiser counts steps and finds the
conditional CFG half. Processors and the hook are restored in ``finally``, also after an error. An empty plan
changes nothing; a rescale by 1.0 goes through the eager path (equal to the SDPA output within float error).

Example:
    >>> import torch
    >>> from attnscope.probes.cross_attention_edits import apply_cross_attention_edits
    >>> from attnscope.probes.cross_attention_plan import CrossAttentionEdit, CrossAttentionPlan
    >>> from attnscope.probes.adapters.diffusers_pipeline import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> run = lambda: pipe("a red cat", num_inference_steps=2, output_type="latent",
    ...                    generator=torch.Generator().manual_seed(0)).images
    >>> plan = CrossAttentionPlan([CrossAttentionEdit("mask", positions=[2, 3, 4])])
    >>> with apply_cross_attention_edits(pipe, plan):
    ...     edited = run()
    >>> bool((edited - run()).abs().max() > 0)
    True
"""

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from ..errors import InputError, SiteError
from .adapter import ModelLike, as_adapter
from .adapters.diffusers_common import DenoiserState, DiffusersAdapter, JointReferenceProcessor, emit_probs
from .adapters.diffusers_pipeline import PipelineAdapter, _inner_adapter, denoiser_of
from .capturing import capture
from .cross_attention_plan import CrossAttentionEdit, CrossAttentionPlan
from .site import Site
from .text_columns import column_index, text_attention
from .trace import AttentionTrace


class EditContext:
    """What the editing processors share: the plan, the step state, the sources, the number of steps."""

    def __init__(self, plan: CrossAttentionPlan, state: DenoiserState, pipe: Any,
                 sources: Mapping[str, AttentionTrace]):
        self.plan, self.state, self.pipe, self.sources = plan, state, pipe, dict(sources)
        self.applied: list[tuple[Site, int]] = []

    def total_steps(self) -> int | None:
        if self.plan.num_steps is not None:
            return int(self.plan.num_steps)
        timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        return len(timesteps) if timesteps is not None else None

    def active(self, site: Site) -> list[CrossAttentionEdit]:
        step = self.state.step if self.state.step is not None else 0
        return [e for e in self.plan.edits if e.at_site(site) and e.at_step(step, self.total_steps())]

    def source(self, name: str) -> AttentionTrace:
        if name not in self.sources:
            if not name.endswith(".safetensors"):
                raise InputError("unknown replace source", expected=sorted(self.sources), got=name,
                                 fix="pass sources={name: trace} or a saved trace path")
            self.sources[name] = AttentionTrace.load(name)
        return self.sources[name]


def _region(shape: torch.Size, edit: CrossAttentionEdit, batch: Tensor | None, rows: slice, text: tuple[int, int],
            device: torch.device) -> Bool[Tensor, "batch head query key"]:
    b, h, q, k = shape
    start, n_text = text
    masks = [torch.zeros(n, dtype=torch.bool, device=device) for n in (b, h, q, k)]
    masks[0][batch.to(device) if edit.batch == "conditional" and batch is not None else slice(None)] = True
    if edit.heads is not None and any(not 0 <= x < h for x in edit.heads):
        raise SiteError("head out of range", expected=f"0..{h - 1}", got=edit.heads)
    masks[1][edit.heads if edit.heads is not None else slice(None)] = True
    masks[2][rows] = True
    positions = edit.positions if edit.positions is not None else list(range(n_text))
    if any(not 0 <= p < n_text for p in positions):
        raise InputError("text position out of range", expected=f"0..{n_text - 1}", got=positions)
    masks[3][[start + p for p in positions]] = True
    return masks[0][:, None, None, None] & masks[1][None, :, None, None] & masks[2][None, None, :, None] \
        & masks[3][None, None, None, :]


def _replacement(probs: Tensor, edit: CrossAttentionEdit, ctx: EditContext, site: Site, batch: Tensor | None,
                 rows: slice, text: tuple[int, int]) -> Tensor:
    step = ctx.state.step if ctx.state.step is not None else 0
    rec = ctx.source(edit.source).get(site, step)
    source = text_attention(rec).to(probs.device, probs.dtype)
    start, n_text = text
    positions = edit.positions if edit.positions is not None else list(range(n_text))
    cols = column_index(rec, positions)
    full = probs.clone()
    items = batch if edit.batch == "conditional" and batch is not None else torch.arange(probs.shape[0])
    for p, c in zip(positions, cols):
        full[items, :, rows, start + p] = source[..., c].expand(len(items), *source.shape[1:3])
    return full


def edit_attention(tensor: Float[Tensor, "batch head query key"], phase: str, edits: Sequence[CrossAttentionEdit],
                   ctx: EditContext, site: Site, rows: slice,
                   text: tuple[int, int]) -> Float[Tensor, "batch head query key"]:
    """Apply the ``mask`` edits (``phase="logits"``) or the ``rescale``/``replace`` edits (``"probs"``)."""
    batch = ctx.state.batch_index
    for edit in edits:
        if (edit.mode == "mask") != (phase == "logits"):
            continue
        region = _region(tensor.shape, edit, batch, rows, text, tensor.device)
        if edit.mode == "mask":
            tensor = tensor.masked_fill(region, float("-inf"))
            if bool(torch.isneginf(tensor).all(-1).any()):
                raise InputError("mask removes every key of some rows", expected="some keys left per row",
                                 got=f"{site}: positions {edit.positions}", fix="mask fewer positions")
            continue
        new = tensor * edit.factor if edit.mode == "rescale" else _replacement(tensor, edit, ctx, site, batch, rows,
                                                                                  text)
        tensor = torch.where(region, new, tensor)
        if edit.renormalize:
            touched = region.any(-1, keepdim=True)
            tensor = torch.where(touched, tensor / tensor.sum(-1, keepdim=True), tensor)
    if phase == "probs":
        ctx.applied.append((site, ctx.state.step if ctx.state.step is not None else 0))
    return tensor


class CrossEditProcessor:
    """Cross-attention (UNet / PixArt ``attn2``) with edits: diffusers' ``AttnProcessor`` with edited scores."""

    def __init__(self, original: Any, site: Site, ctx: EditContext):
        self.original, self.site, self.ctx = original, site, ctx

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
        from diffusers.models.attention_processor import AttnProcessor

        edits = self.ctx.active(self.site)
        if not edits or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        attn.get_attention_scores = self._scores(attn, edits, encoder_hidden_states.shape[1])
        try:
            return AttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        finally:
            del attn.get_attention_scores

    def _scores(self, attn: nn.Module, edits: list[CrossAttentionEdit], n_text: int) -> Callable:
        def get_attention_scores(query: Tensor, key: Tensor, attention_mask: Tensor | None = None) -> Tensor:
            dtype = query.dtype  # as diffusers' Attention.get_attention_scores, with edits around the softmax
            if attn.upcast_attention:
                query, key = query.float(), key.float()
            base = attention_mask if attention_mask is not None else torch.empty(
                query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype, device=query.device)
            scores = torch.baddbmm(base, query, key.transpose(-1, -2), beta=0 if attention_mask is None else 1,
                                   alpha=attn.scale)
            scores = scores.float() if attn.upcast_softmax else scores
            scores = scores.view(-1, attn.heads, *scores.shape[1:])
            where = (self.site, slice(None), (0, n_text))
            probs = edit_attention(scores, "logits", edits, self.ctx, *where).softmax(dim=-1)
            probs = edit_attention(probs, "probs", edits, self.ctx, *where)
            emit_probs(attn, probs)
            return probs.reshape(-1, *probs.shape[2:]).to(dtype)

        return get_attention_scores


class JointEditProcessor:
    """SD3 joint attention with edits on the text-key columns of the latent-query rows."""

    def __init__(self, original: Any, site: Site, ctx: EditContext):
        self.original, self.site, self.ctx = original, site, ctx

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        edits = self.ctx.active(self.site)
        # unedited calls run the original processor (scaled_dot_product_attention: capture sees them there);
        # edited calls materialise the probabilities and hand them to capture through emit_probs
        if not edits or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        n_img, n_text = hidden_states.shape[1], encoder_hidden_states.shape[1]
        where = (self.site, slice(0, n_img), (n_img, n_text))
        reference = JointReferenceProcessor(
            edit_logits=lambda _, x: edit_attention(x, "logits", edits, self.ctx, *where),
            edit_probs=lambda _, x: edit_attention(x, "probs", edits, self.ctx, *where))
        return reference(attn, hidden_states, encoder_hidden_states, attention_mask)


def record_source(model: ModelLike, inputs: Any, steps: Sequence[int] | None = None) -> AttentionTrace:
    """Record a run's text attention (every cross/joint site, full probabilities) as a ``replace`` source."""
    return capture(model, inputs, sites=lambda s: s.kind in ("cross", "joint"), patterns=True, steps=steps)


def _resolve(model: ModelLike) -> tuple[Any, nn.Module, Any]:
    """(pipeline or None, denoiser, its DiffusersAdapter) of a pipeline, adapter, model handle (``attnscope.load``) or denoiser."""
    if denoiser_of(model) is not None:
        return model, denoiser_of(model), _inner_adapter(model)
    adapter = as_adapter(model)
    if isinstance(adapter, PipelineAdapter):
        return adapter.module, adapter.inner.module, adapter.inner
    if isinstance(adapter, DiffusersAdapter):
        return None, adapter.module, adapter
    raise InputError("cross-attention edits need a diffusers pipeline or denoiser", expected="UNet/PixArt/SD3",
                     got=type(model).__name__)


def _guidance(pipe: Any, guidance: bool | None) -> Callable[[], bool]:
    if guidance is not None or pipe is None:
        return lambda: bool(guidance)
    if isinstance(getattr(type(pipe), "do_classifier_free_guidance", None), property):
        return lambda: bool(pipe.do_classifier_free_guidance)
    default = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    scale = default.default if default is not None else None
    return lambda: scale is not None and scale is not inspect.Parameter.empty and float(scale) > 1.0


@contextlib.contextmanager
def apply_cross_attention_edits(model: ModelLike, plan: CrossAttentionPlan,
                                sources: Mapping[str, AttentionTrace] | None = None,
                                guidance: bool | None = None) -> Iterator[EditContext]:
    """Swap in editing processors for the sites ``plan`` touches; restore them in ``finally``.

    guidance: whether the denoiser batch is a CFG ``[unconditional, conditional]`` pair (None: the pipeline's
    ``do_classifier_free_guidance`` or its default guidance scale > 1; pass it for PixArt at guidance <= 1).
    Yields the ``EditContext`` (``.applied`` lists the (site, step) calls that were edited).
    """
    pipe, denoiser, adapter = _resolve(model)
    table = adapter._table()
    known = {site for _, _, site in table}
    unknown = [str(s) for e in plan.edits for s in (e.sites or []) if s not in known]
    if unknown:
        raise SiteError("edit names a site the model lacks", expected=sorted(str(s) for s in known), got=unknown)
    state = DenoiserState(patch=adapter.patch_size(), track_steps=True, cfg=_guidance(pipe, guidance))
    ctx = EditContext(plan, state, pipe, sources or {})
    touched = set(plan.sites(sorted(known)))
    swapped: list[tuple[nn.Module, Any]] = []
    handle = denoiser.register_forward_pre_hook(lambda m, a, kw: state.on_call(a, kw), with_kwargs=True)
    try:
        for _, module, site in table:
            if site in touched:
                swapped.append((module, module.processor))
                cls = JointEditProcessor if site.kind == "joint" else CrossEditProcessor
                module.set_processor(cls(module.processor, site, ctx))
        yield ctx
    finally:
        handle.remove()
        for module, processor in reversed(swapped):
            module.set_processor(processor)
