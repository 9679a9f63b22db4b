"""HRV's recorder: concept keys from the text encoder, and per cross-attention call the vote of every head for the
concept its query attends to most (Park et al., "Cross-Attention Head Position Patterns Can Align with Human
Visual Concepts in Text-to-Image Generative Models"; reference SNU-DRL/HRV). ``attnscope.circuits.hrv`` runs it;
``hrv_joint`` extends it to joint attention.

Example:
    >>> from attnscope.circuits.hrv_recorder import WordSampler
    >>> sampler = WordSampler({"colour": ["red", "blue"], "shape": ["circle", "square"]}, seed=0)
    >>> len(sampler.draw())
    2
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..errors import AnalysisError, InputError
from ..probes.recorder import Recorder
from ..probes.request import CaptureRequest
from ..probes.site import Site


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
