"""Head Relevance Vectors (Park et al. 2024, arXiv 2412.02237; PAPERS.md 2.2) of a text-to-image pipeline.

At every cross-attention call (conditional CFG half), for every head: ``P = softmax(Q K_c^T / sqrt(d))`` over the
tokens of the concept words *jointly*, where ``K_c = to_k(ctx(emb))`` (+ ``norm_k``), ``emb`` = the text encoder's
embeddings of one sampled word per concept (each word encoded alone, start/end tokens dropped; the first word
keeps the start token when ``keep_start``), ``ctx`` = the denoiser's text projection (PixArt
``caption_projection``; UNet ``encoder_hid_proj`` if any). ``P`` is averaged over image queries, then over each
word's tokens; the argmax concept of each head gets a count. Counts are summed over steps, sites (head positions)
and prompts: ``counts[concept, head]``, heads = (site, head) over all cross-attention sites. ``vectors()``: each
head's counts normalised to sum 1 over concepts, then each concept's vector scaled to L1 norm = H.

Queries come from the capture side channel (the query handed to SDPA), so the model's processors run untouched.

SD3 / MMDiT joint attention (**our adaptation**, the paper covers UNet cross-attention only; details in
``attnscope.circuits.hrv_joint``): the heads are those of the joint blocks; the concept keys of block ``l`` at a
step are the text-stream keys (``add_k_proj`` + ``norm_added_k``) at block ``l`` of a *probe pass* of the
transformer at the same latent and timestep whose text conditioning is the concept-word sequence (one word per
concept joined by spaces, encoded by the pipeline's ``encode_prompt``, pooled projections included; a word's
tokens are its CLIP and T5 tokens, start/end/pad dropped). The queries are the latent rows of each joint block's
query in the generation pass. The probe is invisible to the generation (bit-identical outputs).

Example:
    >>> from attnscope.circuits.hrv import head_relevance
    >>> from attnscope.probes.adapters.diffusers_pipeline import tiny_sd_pipeline
    >>> hrv = head_relevance(tiny_sd_pipeline(), ["a cat"], {"colour": ["red", "blue"], "animal": ["dog"]},
    ...                      num_inference_steps=2)
    >>> hrv.counts.shape, float(hrv.counts.sum())   # 4 cross sites x 2 heads; 2 steps x 4 sites x 2 heads
    (torch.Size([2, 8]), 16.0)
"""

import contextlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..errors import AnalysisError, InputError
from ..probes.recorder import Recorder
from ..probes.request import CaptureRequest
from ..probes.site import Site
from ..results import ResultTable
from . import _diffusion as dx
from .registry import register_analysis

ORDERS = ("MoRHF", "LeRHF")


@dataclass
class HeadRelevance:
    """``counts[concept, head]`` over ``heads`` = (site, head) pairs; ``vectors()`` the normalised HRVs."""

    concepts: list[str]
    heads: list[tuple[Site, int]]
    counts: Float[Tensor, "concept head"]
    options: dict = field(default_factory=dict)

    def vectors(self) -> Float[Tensor, "concept head"]:
        per_head = self.counts / self.counts.sum(0, keepdim=True).clamp_min(1e-12)
        return per_head / per_head.sum(1, keepdim=True).clamp_min(1e-12) * len(self.heads)

    def ranking(self, concept: str, order: str = "MoRHF") -> list[tuple[Site, int]]:
        """Heads by the concept's HRV: most relevant first (``MoRHF``) or least relevant first (``LeRHF``)."""
        if concept not in self.concepts or order not in ORDERS:
            raise InputError("unknown concept or order", expected=(self.concepts, ORDERS), got=(concept, order))
        values = self.vectors()[self.concepts.index(concept)].tolist()
        sign = -1.0 if order == "MoRHF" else 1.0
        return [self.heads[i] for i in sorted(range(len(values)), key=lambda i: (sign * values[i], i))]

    def to_table(self) -> ResultTable:
        vectors, rows = self.vectors(), []
        for c, concept in enumerate(self.concepts):
            rank = {h: r for r, h in enumerate(self.ranking(concept))}
            for j, (site, head) in enumerate(self.heads):
                for metric, value in (("hrv", vectors[c, j]), ("count", self.counts[c, j])):
                    rows.append({"analysis": "hrv", "layer": site.layer, "head": head, "metric": metric,
                                 "value": float(value), "concept": concept, "site": str(site), "tower": site.tower,
                                 "rank": rank[(site, head)]})
        return ResultTable.from_records(rows, provenance={"hrv": self.options})


def concept_embeddings(pipe: Any, words: Sequence[str], keep_start: bool = True) -> tuple[Tensor, list[slice]]:
    """Text-encoder embeddings ``[1, tokens, d]`` of ``words`` (each encoded alone, concatenated) and each word's
    token slice. Start/end/pad tokens are dropped, except the first word's start token when ``keep_start``."""
    tok, encoder = pipe.tokenizer, pipe.text_encoder
    special = set(tok.all_special_ids)
    pieces, slices, start = [], [], 0
    for i, word in enumerate(words):
        ids = tok(word)["input_ids"]
        with torch.no_grad():
            hidden = encoder(torch.tensor([ids], device=encoder.device))[0]
        keep = [j for j, t in enumerate(ids) if t not in special]
        if not keep:
            raise InputError("concept word has no tokens", expected="a word the tokenizer knows", got=word)
        lead = [0] if i == 0 and keep_start and ids[0] in special and ids[0] == tok.bos_token_id else []
        pieces.append(hidden[:, lead + keep])
        slices.append(slice(start + len(lead), start + len(lead) + len(keep)))
        start += len(lead) + len(keep)
    return torch.cat(pieces, 1), slices


def _text_projection(denoiser: nn.Module) -> Any:
    """What the denoiser applies to the text embeddings before its cross-attention (identity for SD 1.x/2.x)."""
    proj = getattr(denoiser, "caption_projection", None)
    if proj is not None:
        return proj
    proj = getattr(denoiser, "encoder_hid_proj", None)
    if proj is None:
        return lambda x: x
    if isinstance(proj, nn.Linear):
        return proj
    raise AnalysisError("unsupported text projection", expected="none, caption_projection or a Linear",
                        got=type(proj).__name__, fix="HRV needs the cross-attention keys of plain text embeddings")


def concept_keys(module: nn.Module, context: Float[Tensor, "1 token d_model"]) -> Float[Tensor, "head token d_head"]:
    """``K_c`` of one cross-attention module: ``to_k`` (+ ``norm_k``) split into heads."""
    key = module.to_k(context.to(module.to_k.weight.dtype))
    key = key.view(1, key.shape[1], module.heads, -1).transpose(1, 2)
    norm = getattr(module, "norm_k", None)
    return (norm(key) if norm is not None else key)[0]


class HrvRecorder(Recorder):
    """Receives each cross-attention call's query (conditional half) and adds the argmax-concept counts."""

    kind = "cross"

    def __init__(self, denoiser: nn.Module, heads: list[tuple[Site, int]], context: Tensor | None,
                 slices: list[slice], steps: Sequence[int] | None):
        kind = self.kind
        super().__init__(CaptureRequest(sites=lambda s: s.kind == kind, patterns=False, steps=steps))
        self.denoiser, self.context, self.slices = denoiser, context, slices
        self.offset = {site: i for i, (site, h) in reversed(list(enumerate(heads)))}
        self.counts = torch.zeros(len(slices), len(heads))
        self._keys: dict[str, Tensor] = {}

    def _vote(self, site: Site, probs: Float[Tensor, "batch head token"]) -> None:
        """Mean over each word's tokens, argmax over concepts, one count per (item, head)."""
        per_word = torch.stack([probs[..., sl].mean(-1) for sl in self.slices], -1)  # [batch, head, concept]
        one_hot = torch.nn.functional.one_hot(per_word.argmax(-1), len(self.slices)).sum(0).T.float().cpu()
        start = self.offset[site]
        self.counts[:, start:start + one_hot.shape[1]] += one_hot

    def observe_qk(self, site: Site, query: Tensor, key: Tensor, mask: Tensor | None, *, scaling: float,
                   is_causal: bool, softcap: float | None = None, step: int | None = None,
                   batch_index: Tensor | None = None, meta: dict | None = None) -> None:
        if not self.wants(site) or (step is not None and not self.request.wants_step(step)):
            return
        name = (meta or {})["module"]
        if name not in self._keys:
            with torch.no_grad():
                self._keys[name] = concept_keys(self.denoiser.get_submodule(name), self.context).float()
        q = query if batch_index is None else query.index_select(0, batch_index.to(query.device))
        keys = self._keys[name].to(q.device)
        self._vote(site, torch.softmax(torch.einsum("bhqd,htd->bhqt", q.float(), keys) * scaling, -1).mean(2))

    def observe_probs(self, site: Site, probs: Tensor, **kwargs: Any) -> None:
        if self.wants(site):
            raise AnalysisError("HRV needs the query states", expected="SDPA attention processors",
                                got="materialised probabilities only", fix="use the default AttnProcessor2_0")


def cross_heads(adapter: Any) -> list[tuple[Site, int]]:
    """Every (site, head) of the cross-attention sites (joint sites for SD3-style models), in site order."""
    info = adapter.inner.info()
    sites = [s for s in info.sites if s.kind == "cross"] or [s for s in info.sites if s.kind == "joint"]
    if not sites:
        raise AnalysisError("HRV needs cross- or joint-attention sites", expected="UNet/PixArt cross or SD3 joint",
                            got=sorted({s.kind for s in info.sites}), fix="HRV needs text keys in the attention")
    n_heads = {id(m): m.heads for _, m, _ in adapter.inner._table()}
    per_site = {site: n_heads[id(m)] for _, m, site in adapter.inner._table()}
    return [(site, h) for site in sites for h in range(per_site[site])]


def _cross_recorder(adapter: Any, heads: list[tuple[Site, int]], words: Sequence[str], keep_start: bool,
                    steps: Sequence[int] | None) -> HrvRecorder:
    emb, slices = concept_embeddings(adapter.module, words, keep_start)
    with torch.no_grad():
        context = _text_projection(adapter.inner.module)(emb.to(next(adapter.inner.module.parameters()).dtype))
    return HrvRecorder(adapter.inner.module, heads, context, slices, steps)


def relevance_counts(model: Any, prompt: str, words: Sequence[str], *, seed: int = 22,
                     keep_start: bool | None = None, steps: Sequence[int] | None = None,
                     pipeline_kwargs: Mapping[str, Any] | None = None) -> tuple[Tensor, list[tuple[Site, int]], Any]:
    """One generation of ``prompt`` with HRV tracking: ``(counts [word, head], heads, pipeline output)``.

    ``words``: one concept word per concept. ``keep_start`` None: True for cross-attention (paper), False for
    joint attention. ``pipeline_kwargs`` go to the pipeline call (e.g. ``num_inference_steps``)."""
    from . import hrv_joint

    adapter = dx.pipeline_adapter(model)
    heads = cross_heads(adapter)
    joint = heads[0][0].kind == "joint"
    keep = (not joint) if keep_start is None else bool(keep_start)
    kwargs = {"output_type": "latent", **dict(pipeline_kwargs or {})}
    if joint:
        recorder = hrv_joint.joint_recorder(adapter, heads, words, keep, steps, kwargs)
    else:
        recorder = _cross_recorder(adapter, heads, words, keep, steps)
    prepared = adapter.prepare(dx.pipeline_inputs(prompt, seed, kwargs))
    with adapter.instrument(recorder):
        tracking = hrv_joint.joint_tracking(adapter, recorder) if joint else contextlib.nullcontext()
        with tracking:
            output = adapter.run(prepared)
    return recorder.counts, heads, output


def head_relevance(model: Any, prompts: Sequence[str], concept_words: Mapping[str, Sequence[str]], *,
                   num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 22, sample_seed: int = 0,
                   keep_start: bool | None = None, steps: Sequence[int] | None = None,
                   pipeline_kwargs: Mapping[str, Any] | None = None) -> HeadRelevance:
    """HRV counts over ``prompts`` (paper: 50 steps, CFG 7.5, seed 22; one word per concept sampled per prompt).

    Cross-attention (UNet, PixArt) as in the paper; SD3 joint attention by our probe-pass adaptation (module
    docstring). ``keep_start`` None: True for cross-attention, False for joint attention."""
    adapter = dx.pipeline_adapter(model)
    concepts = list(concept_words)
    if not concepts or any(not concept_words[c] for c in concepts):
        raise InputError("each concept needs words", expected="{concept: [word, ...]}", got=dict(concept_words))
    heads, rng = cross_heads(adapter), random.Random(sample_seed)
    counts = torch.zeros(len(concepts), len(heads))
    kwargs = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
              **dict(pipeline_kwargs or {})}
    for prompt in prompts:
        words = [rng.choice(list(concept_words[c])) for c in concepts]
        counts += relevance_counts(adapter, prompt, words, seed=seed, keep_start=keep_start, steps=steps,
                                   pipeline_kwargs=kwargs)[0]
    keep = heads[0][0].kind != "joint" if keep_start is None else bool(keep_start)
    options = {"prompts": len(prompts), "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
               "seed": seed, "sample_seed": sample_seed, "keep_start": keep, "attention": heads[0][0].kind,
               "concept_words": {c: list(w) for c, w in concept_words.items()}}
    return HeadRelevance(concepts, heads, counts, options)


@register_analysis("hrv", takes="model", description="Head Relevance Vectors of cross-attention heads (Park 2024)")
def hrv_table(model: Any, suite: Any, concept_words: Mapping[str, Sequence[str]], *, heads: Any = None,
              batch_size: int | None = None, progress: bool = False, **options: Any) -> ResultTable:
    """``head_relevance`` as a table; ``suite``: the prompts (a list of strings or an object with ``prompts``).

    ``batch_size`` and ``progress`` (the CLI's common options) do not apply: one pipeline run per prompt."""
    dx.pipeline_adapter(model)  # a clear error for non-pipelines before the suite is read
    if heads is not None:
        raise InputError("hrv scores every cross-attention head", expected="no head restriction", got=str(heads),
                         fix="drop --heads; select heads from the table afterwards")
    prompts = getattr(suite, "prompts", suite)
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise InputError("hrv needs text prompts", expected="a list of prompts (or an object with .prompts)",
                         got=type(suite).__name__, fix="pass captions, e.g. --suite shapes with a pipeline")
    prompts = list(prompts)
    return head_relevance(model, prompts, concept_words, **options).to_table()
