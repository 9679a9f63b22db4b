"""Shared helpers of the diffusion cross-attention analyses (DAAM, concept maps, HRV).

Text-key positions: for UNet / PixArt cross-attention the keys are the text encoder's tokens; for SD3 joint
attention they are the text block ``[CLIP tokens; T5 tokens]`` of the joint sequence, and a "text position" counts
from the start of that block. ``text_attention(record)`` returns the latent-query x text-key probabilities of
either kind.

Example:
    >>> from attnscope.circuits._diffusion import find_subsequence
    >>> find_subsequence([0, 5, 6, 7, 5, 6], [5, 6])
    [1, 2, 4, 5]
"""

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import AnalysisError, InputError
from ..probes.adapter import ModelLike, as_adapter
from ..probes.adapters.diffusers_pipeline import PipelineAdapter
from ..probes.recorder import Recorder
from ..probes.request import CaptureRequest
from ..probes.site import Site
from ..probes.text_columns import TEXT_KINDS
from ..probes.trace import AttentionTrace, SiteRecord

Positions = list[dict[str, list[int]]]  # per batch item: word -> text-key positions


def pipeline_adapter(model: ModelLike) -> Any:
    """The ``PipelineAdapter`` of a pipeline, a ``model handle (``attnscope.load``)`` of one, or the adapter itself."""
    adapter = as_adapter(model)
    if not isinstance(adapter, PipelineAdapter):
        raise InputError("a diffusers pipeline is needed", expected="StableDiffusion/PixArt/SD3 pipeline",
                         got=type(adapter).__name__, fix="pass the pipeline (or attnscope.load of one)")
    return adapter


def find_subsequence(seq: Sequence[int], sub: Sequence[int]) -> list[int]:
    """Positions of every occurrence of ``sub`` in ``seq`` (all occurrences, as DAAM does)."""
    n, found = len(sub), []
    for i in range(len(seq) - n + 1) if n else []:
        if list(seq[i:i + n]) == list(sub):
            found.extend(range(i, i + n))
    return sorted(set(found))


def _word_ids(tokenizer: Any, word: str) -> list[int]:
    return [int(i) for i in tokenizer(word, add_special_tokens=False)["input_ids"]]


def word_positions(pipe: Any, prompt: str, word: str) -> list[int]:
    """Text-key positions of ``word`` in ``prompt`` (every occurrence; SD3: CLIP and T5 parts of the block; Flux:
    its T5 tokens, the only text in its joint attention: CLIP gives the pooled vector alone)."""
    if type(getattr(pipe, "transformer", None)).__name__ == "FluxTransformer2DModel":
        tok2 = pipe.tokenizer_2
        return find_subsequence(tok2(prompt)["input_ids"], _word_ids(tok2, word))
    tok = pipe.tokenizer
    positions = find_subsequence(tok(prompt)["input_ids"], _word_ids(tok, word))
    tok3 = getattr(pipe, "tokenizer_3", None)
    if getattr(pipe, "tokenizer_2", None) is not None:  # SD3: CLIP block padded to the tokenizer's length, then T5
        if tok3 is not None and getattr(pipe, "text_encoder_3", None) is not None:
            offset = int(tok.model_max_length)
            positions += [offset + p for p in find_subsequence(tok3(prompt)["input_ids"], _word_ids(tok3, word))]
    return positions


def prompt_positions(pipe: Any, prompts: Sequence[str], words: Sequence[str]) -> Positions:
    """Per prompt, word -> text positions. Raises when a word occurs in none of the prompts."""
    positions = [{w: word_positions(pipe, p, w) for w in words} for p in prompts]
    missing = [w for w in words if not any(item[w] for item in positions)]
    if missing:
        raise InputError("word not found in any prompt", expected="words of the prompts", got=missing,
                         fix="check spelling; words are matched on the tokenizer's ids")
    return positions


def as_positions(positions: "Positions | Mapping[str, Sequence[int]]", batch: int) -> Positions:
    """One mapping for every item, or one per item, as a per-item list."""
    if isinstance(positions, Mapping):
        return [{w: [int(p) for p in ps] for w, ps in positions.items()} for _ in range(batch)]
    if len(positions) != batch:
        raise InputError("one positions mapping per batch item", expected=batch, got=len(positions))
    return [{w: [int(p) for p in ps] for w, ps in item.items()} for item in positions]


def text_records(trace: AttentionTrace, sites: Sequence[Site] | None = None,
                 steps: Sequence[int] | None = None) -> list[SiteRecord]:
    """Records of cross/joint sites (all, or ``sites``) at ``steps`` (all when None), in (site, step) order."""
    chosen = [s for s in trace.sites if s.kind in TEXT_KINDS] if sites is None else list(sites)
    if not chosen:
        raise AnalysisError("trace has no cross/joint attention sites", expected=TEXT_KINDS,
                            got=sorted({s.kind for s in trace.sites}))
    out = []
    for site in chosen:
        for step in trace.steps(site):
            if steps is None or step in steps:
                out.append(trace.get(site, step))
    if not out:
        raise AnalysisError("no records at these steps", expected=trace.steps(chosen[0]), got=list(steps or []))
    return out


class TextColumnRecorder(Recorder):
    """Keeps only latent-query x text-key columns ``columns`` of cross/joint sites (memory: words, not 77 keys)."""

    def __init__(self, request: CaptureRequest, columns: Sequence[int] | None):
        super().__init__(request)
        self.columns = None if columns is None else sorted({int(c) for c in columns})

    def _keep(self, site, step, out, rows, heads, n_query, n_key, meta) -> None:
        probs, meta = out.get("probs"), dict(meta or {})
        if probs is not None and site.kind == "joint" and "blocks" in meta:
            (i0, i1), (t0, t1) = meta["blocks"]["image"], meta["blocks"]["text"]
            probs, meta["text_block"] = probs[:, :, i0:i1, t0:t1], True
        if probs is not None and self.columns is not None:
            probs, meta["key_positions"] = probs[..., self.columns], list(self.columns)
        out["probs"] = probs
        super()._keep(site, step, out, rows, heads, n_query, n_key, meta)


def capture_text_attention(adapter: Any, inputs: dict, columns: Sequence[int] | None,
                           steps: Sequence[int] | None = None) -> AttentionTrace:
    """Run the pipeline once; keep the text-attention columns of every cross/joint site at ``steps``."""
    request = CaptureRequest(sites=lambda s: s.kind in TEXT_KINDS, patterns=True, steps=steps)
    recorder = TextColumnRecorder(request, columns)
    prepared = adapter.prepare(inputs)
    with adapter.instrument(recorder):
        output = adapter.run(prepared)
    trace = AttentionTrace(recorder.records, tokens=prepared.tokens, provenance=adapter.provenance())
    trace.output = output
    return trace


def pipeline_inputs(prompts: "str | Sequence[str]", seed: int, kwargs: Mapping[str, Any]) -> dict:
    """Pipeline kwargs: prompts, a fresh generator from ``seed``, and the caller's other kwargs."""
    inputs = {"prompt": [prompts] if isinstance(prompts, str) else list(prompts),
              "generator": torch.Generator().manual_seed(seed)}
    inputs.update(kwargs)
    return inputs
