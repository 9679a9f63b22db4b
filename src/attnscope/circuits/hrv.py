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
from collections.abc import Callable, Mapping, Sequence
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


def concept_embeddings(pipe: Any, words: Sequence[str], keep_start: bool = True,
                       cache: dict | None = None) -> tuple[Tensor, list[slice]]:
    """Text-encoder embeddings ``[1, tokens, d]`` of ``words`` (each encoded alone, concatenated) and each word's
    token slice. Start/end/pad tokens are dropped, except the first word's start token when ``keep_start``.
    ``cache``: a dict reused across calls (word -> its encoding), so that repeated words are encoded once."""
    tok, encoder = pipe.tokenizer, pipe.text_encoder
    special = set(tok.all_special_ids)
    pieces, slices, start = [], [], 0
    for i, word in enumerate(words):
        if cache is not None and word in cache:
            ids, hidden = cache[word]
        else:
            ids = tok(word)["input_ids"]
            with torch.no_grad():
                hidden = encoder(torch.tensor([ids], device=encoder.device))[0]
            if cache is not None:
                cache[word] = (ids, hidden)
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


class WordSampler:
    """One word per concept per ``draw()``, drawn as the reference does at every cross-attention call
    (``head_relevance_calculation.py`` L333: ``torch.randint(0, K, (n_concepts,))``), from a private CPU
    generator seeded ``seed``. Unequal word counts: one ``randint(0, K_c, (1,))`` per concept in concept order
    (the same stream as the vectorised draw when all ``K_c`` are equal)."""

    def __init__(self, concept_words: Mapping[str, Sequence[str]], seed: int = 0):
        self.words = [list(w) for w in concept_words.values()]
        self.generator = torch.Generator().manual_seed(int(seed))

    def draw(self) -> list[str]:
        sizes = {len(w) for w in self.words}
        if len(sizes) == 1:
            index = torch.randint(0, sizes.pop(), (len(self.words),), generator=self.generator).tolist()
        else:
            index = [int(torch.randint(0, len(w), (1,), generator=self.generator)) for w in self.words]
        return [w[i] for w, i in zip(self.words, index)]


class ConceptContext:
    """``words -> (context [1, token, d], slices)``: cached per-word encodings, joined, then the text projection."""

    def __init__(self, adapter: Any, keep_start: bool):
        self.pipe, self.denoiser, self.keep_start = adapter.module, adapter.inner.module, keep_start
        self.project, self._cache = _text_projection(self.denoiser), {}

    def __call__(self, words: Sequence[str]) -> tuple[Tensor, list[slice]]:
        emb, slices = concept_embeddings(self.pipe, words, self.keep_start, self._cache)
        with torch.no_grad():
            return self.project(emb.to(next(self.denoiser.parameters()).dtype)), slices


class HrvRecorder(Recorder):
    """Receives each cross-attention call's query (conditional half) and adds the argmax-concept counts.

    ``per_call``: None (fixed ``context``/``slices``) or ``() -> (context, slices)`` of ``n_concepts`` words,
    called at every cross-attention call, counted step or not (the reference's per-call word sampling)."""

    kind = "cross"

    def __init__(self, denoiser: nn.Module, heads: list[tuple[Site, int]], context: Tensor | None,
                 slices: list[slice], steps: Sequence[int] | None,
                 per_call: Callable[[], tuple[Tensor, list[slice]]] | None = None, n_concepts: int | None = None):
        kind = self.kind
        request_steps = None if per_call is not None else steps  # per call: every call draws, then filter
        super().__init__(CaptureRequest(sites=lambda s: s.kind == kind, patterns=False, steps=request_steps))
        self.denoiser, self.context, self.slices, self.per_call = denoiser, context, slices, per_call
        self.steps = None if steps is None else {int(s) for s in steps}
        self.offset = {site: i for i, (site, h) in reversed(list(enumerate(heads)))}
        self.counts = torch.zeros(len(slices) if n_concepts is None else n_concepts, len(heads))
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
        if not self.wants(site):
            return
        if self.per_call is not None:
            self.context, self.slices = self.per_call()
            self._keys = {}
        if step is not None and self.steps is not None and step not in self.steps:
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


def _advance(generator: torch.Generator, adapter: Any) -> None:
    """Set ``generator`` to the state the pipeline left its copy in (the adapter never advances the caller's)."""
    used = getattr(adapter, "_call_kwargs", {}).get("generator")
    if not isinstance(used, torch.Generator):
        raise AnalysisError("the pipeline's generator was not kept", expected="a torch.Generator in the call",
                            got=type(used).__name__, fix="use noise='per_prompt_seed'")
    generator.set_state(used.get_state())


def relevance_counts(model: Any, prompt: str, words: "Sequence[str] | WordSampler", *,
                     seed: int = 22, generator: torch.Generator | None = None, keep_start: bool | None = None,
                     steps: Sequence[int] | None = None, pipeline_kwargs: Mapping[str, Any] | None = None
                     ) -> tuple[Tensor, list[tuple[Site, int]], Any]:
    """One generation of ``prompt`` with HRV tracking: ``(counts [word, head], heads, pipeline output)``.

    ``words``: one concept word per concept, or a ``WordSampler`` that draws them again at every cross-attention
    call (the reference's per-call sampling; cross-attention only). ``generator``: the noise generator (default a
    fresh one seeded ``seed``), left in the state the generation left it, so the next call continues its stream.
    ``keep_start`` None: True for cross-attention (paper), False for joint attention. ``pipeline_kwargs`` go to
    the pipeline call (e.g. ``num_inference_steps``)."""
    from . import hrv_joint

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


def head_relevance(model: Any, prompts: Sequence[str], concept_words: Mapping[str, Sequence[str]], *,
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
