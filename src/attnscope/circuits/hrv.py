"""Head Relevance Vectors (Park et al. 2024, arXiv 2412.02237; PAPERS.md 2.2) of a text-to-image pipeline.

At every cross-attention call (conditional CFG half), for every head: ``P = softmax(Q K_c^T / sqrt(d))`` over the
tokens of the concept words *jointly*, where ``K_c = to_k(ctx(emb))`` (+ ``norm_k``), ``emb`` = the text encoder's
embeddings of one sampled word per concept (each word encoded alone, start/end tokens dropped; the first word
keeps the start token when ``keep_start``), ``ctx`` = the denoiser's text projection (PixArt
``caption_projection``; UNet ``encoder_hid_proj`` if any). ``P`` is averaged over image queries, then over each
word's tokens; the argmax concept of each head gets a count. Counts are summed over steps, sites (head positions)
and prompts: ``counts[concept, head]``, heads = (site, head) over all cross-attention sites. ``vectors()``: each
head's counts normalised to sum 1 over concepts, then each concept's vector scaled to L1 norm = H.

Reference protocol (SNU-DRL/HRV ``head_relevance_calculation.py``, commit 414122f), the defaults here:

- noise ``"shared_generator"``: ONE ``torch.Generator().manual_seed(22)`` made before the prompt loop (L466) and
  passed to every generation (L469), whose ``init_latent`` draws ``torch.randn`` from it (L222-227): prompt ``i``
  gets the ``i``-th draw. We continue the generator as the pipeline left it (the same, unless a stochastic
  scheduler also draws step noise from it). ``"per_prompt_seed"`` (our earlier default): a fresh generator
  seeded ``seed`` for each prompt, so every prompt gets the same noise.
- word sampling ``"per_call"``: at EVERY cross-attention call (every site, step and prompt: L331-336) one word per
  concept, ``torch.randint(0, words_per_concept, (n_concepts,))`` (L333) from torch's *global* CPU generator,
  which the script never seeds (its draws cannot be reproduced). We draw the same way, in call order, from a
  private ``torch.Generator`` seeded ``sample_seed`` that lives for the whole prompt loop (``WordSampler``); draws
  happen at every call, also at steps that ``steps`` leaves out. ``"per_prompt"`` (our earlier default): one
  word per concept per prompt by ``random.Random(sample_seed).choice`` (kept bit-for-bit). Joint attention only
  has ``"per_prompt"`` (a probe pass per call would be needed).
- tokens (L338-349): first word keeps SOT (L341), EOT dropped (L345); ``K_c = to_k(...)`` (L351); softmax of the
  conditional-half queries (L353, ``query[query.shape[0] // 2:]`` of the CFG batch L204-205) over all concept
  tokens; mean over image queries (L354); mean over each word's tokens, the first word's SOT excluded (L357-365);
  argmax over concepts, one-hot per head (L367-368); stored per step and site (L133-135, L375) and summed over
  prompts, steps and sites with per-head normalisation in ``extract_head_relevance_vectors.ipynb``.
- Known difference: the reference counts every UNet call; SD v1.4's PNDM scheduler runs one timestep twice (the
  store has ``steps + 1`` entries, L158). Our pipeline adapter does not record a second call at the same
  timestep, so with PNDM (or Heun) we count fewer calls; with DDIM, Euler and the like the calls are the same.

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
from torch import Tensor

from ..errors import AnalysisError, InputError
from ..probes.adapter import ModelLike
from ..probes.site import Site
from ..results import ResultTable
from . import _diffusion as dx, hrv_joint
from .hrv_recorder import concept_keys  # (re-exported)
from .hrv_recorder import ConceptContext, HrvRecorder, WordSampler, concept_embeddings  # noqa: F401
from .registry import register_analysis

ORDERS = ("MoRHF", "LeRHF")
NOISE = ("shared_generator", "per_prompt_seed")
WORD_SAMPLING = ("per_call", "per_prompt")


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


def _advance(generator: torch.Generator, adapter: Any) -> None:
    """Set ``generator`` to the state the pipeline left its copy in (the adapter never advances the caller's)."""
    used = getattr(adapter, "_call_kwargs", {}).get("generator")
    if not isinstance(used, torch.Generator):
        raise AnalysisError("the pipeline's generator was not kept", expected="a torch.Generator in the call",
                            got=type(used).__name__, fix="use noise='per_prompt_seed'")
    generator.set_state(used.get_state())


def relevance_counts(model: ModelLike, prompt: str, words: "Sequence[str] | WordSampler", *,
                     seed: int = 22, generator: torch.Generator | None = None, keep_start: bool | None = None,
                     steps: Sequence[int] | None = None, pipeline_kwargs: Mapping[str, Any] | None = None
                     ) -> tuple[Tensor, list[tuple[Site, int]], Any]:
    """One generation of ``prompt`` with HRV tracking: ``(counts [word, head], heads, pipeline output)``.

    ``words``: one concept word per concept, or a ``WordSampler`` that draws them again at every cross-attention
    call (the reference's per-call sampling; cross-attention only). ``generator``: the noise generator (default a
    fresh one seeded ``seed``), left in the state the generation left it, so the next call continues its stream.
    ``keep_start`` None: True for cross-attention (paper), False for joint attention. ``pipeline_kwargs`` go to
    the pipeline call (e.g. ``num_inference_steps``)."""
    adapter = dx.pipeline_adapter(model)
    heads = cross_heads(adapter)
    joint = heads[0][0].kind == "joint"
    keep = (not joint) if keep_start is None else bool(keep_start)
    kwargs = {"output_type": "latent", **dict(pipeline_kwargs or {})}
    if joint and isinstance(words, WordSampler):
        raise InputError("per-call word sampling needs cross-attention", expected="fixed words per prompt",
                         got="a word sampler", fix="use word_sampling='per_prompt' for joint attention")
    if joint:
        recorder = hrv_joint.joint_recorder(adapter, heads, words, keep, steps, kwargs)
    else:
        encode, denoiser = ConceptContext(adapter, keep), adapter.inner.module
        if isinstance(words, WordSampler):
            recorder = HrvRecorder(denoiser, heads, None, [], steps, per_call=lambda: encode(words.draw()),
                                   n_concepts=len(words.words))
        else:
            recorder = HrvRecorder(denoiser, heads, *encode(words), steps)
    inputs = dx.pipeline_inputs(prompt, seed, kwargs)
    if generator is not None:
        inputs["generator"] = generator
    prepared = adapter.prepare(inputs)
    with adapter.instrument(recorder):
        tracking = hrv_joint.joint_tracking(adapter, recorder) if joint else contextlib.nullcontext()
        with tracking:
            output = adapter.run(prepared)
    if generator is not None:
        _advance(generator, adapter)
    return recorder.counts, heads, output


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise InputError(f"unknown {name}", expected=allowed, got=value)
    return value


def head_relevance(model: ModelLike, prompts: Sequence[str], concept_words: Mapping[str, Sequence[str]], *,
                   num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 22, sample_seed: int = 0,
                   noise: str = "shared_generator", word_sampling: str | None = None,
                   keep_start: bool | None = None, steps: Sequence[int] | None = None,
                   pipeline_kwargs: Mapping[str, Any] | None = None) -> HeadRelevance:
    """HRV counts over ``prompts`` (paper: 50 steps, CFG 7.5, seed 22), by the reference protocol by default.

    ``noise``: ``"shared_generator"`` (reference L466-469: one generator seeded ``seed`` for all prompts) or
    ``"per_prompt_seed"`` (the same noise for every prompt). ``word_sampling``: ``"per_call"`` (reference
    L331-336: new words at every cross-attention call, ``WordSampler(sample_seed)``) or ``"per_prompt"``
    (``random.Random(sample_seed)``, once per prompt); None: per_call for cross-attention, per_prompt for joint
    attention. Cross-attention (UNet, PixArt) as in the paper; SD3 joint attention by our probe-pass adaptation
    (module docstring). ``keep_start`` None: True for cross-attention, False for joint attention."""
    adapter = dx.pipeline_adapter(model)
    concepts = list(concept_words)
    if not concepts or any(not concept_words[c] for c in concepts):
        raise InputError("each concept needs words", expected="{concept: [word, ...]}", got=dict(concept_words))
    heads = cross_heads(adapter)
    joint = heads[0][0].kind == "joint"
    noise = _choice("noise", noise, NOISE)
    sampling = _choice("word_sampling", word_sampling or ("per_prompt" if joint else "per_call"), WORD_SAMPLING)
    if joint and sampling == "per_call":
        raise InputError("per-call word sampling needs cross-attention", expected="word_sampling='per_prompt'",
                         got=sampling, fix="joint attention samples once per prompt (probe-pass adaptation)")
    generator = torch.Generator().manual_seed(seed) if noise == "shared_generator" else None
    rng, sampler = random.Random(sample_seed), WordSampler(concept_words, sample_seed)
    counts = torch.zeros(len(concepts), len(heads))
    kwargs = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
              **dict(pipeline_kwargs or {})}
    for prompt in prompts:
        words = sampler if sampling == "per_call" else [rng.choice(list(concept_words[c])) for c in concepts]
        counts += relevance_counts(adapter, prompt, words, seed=seed, generator=generator, keep_start=keep_start,
                                   steps=steps, pipeline_kwargs=kwargs)[0]
    keep = not joint if keep_start is None else bool(keep_start)
    options = {"prompts": len(prompts), "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
               "seed": seed, "sample_seed": sample_seed, "noise": noise, "word_sampling": sampling,
               "keep_start": keep, "attention": heads[0][0].kind,
               "concept_words": {c: list(w) for c, w in concept_words.items()}}
    return HeadRelevance(concepts, heads, counts, options)


@register_analysis("hrv", takes="model", description="Head Relevance Vectors of cross-attention heads (Park 2024)")
def hrv_table(model: ModelLike, suite: Any, concept_words: Mapping[str, Sequence[str]], *, heads: Any = None,
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
