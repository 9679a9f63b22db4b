"""Head Relevance Vectors for SD3-class joint attention (MMDiT): **our adaptation**, not in Park et al. 2024.

The paper (PAPERS.md 2.2) defines HRV for UNet cross-attention, where every layer attends to the same text
embeddings, so ``K_c = to_k(emb)`` of the concept words is fixed. In an MMDiT joint block the text keys come
from a text *stream* that the blocks update one after the other (and that depends on the latent and the
timestep through the AdaLN modulation), so there is no fixed ``K_c`` per block. What we do instead:

- **Concept sequence.** One sampled word per concept, joined by spaces (``"red dog circle"``), is encoded as a
  prompt by the pipeline's own ``encode_prompt`` (CLIP-L/G + T5, pooled projections included, no CFG, the
  generation's ``max_sequence_length``). Its text positions are the word tokens of the CLIP part and of the T5
  part of the text block ``[CLIP (tokenizer_max_length); T5]``; start, end and padding tokens are dropped (with
  ``keep_start`` the CLIP start token joins the softmax but no word). A word's tokens = its CLIP and T5 tokens.
- **Probe pass.** At every denoising step (conditional CFG half; repeated calls at the same timestep, e.g.
  skip-layer guidance, are not counted), before the generation's transformer call, the transformer is run once
  more at the *same latent and timestep* with the concept sequence as its text conditioning. The concept keys of
  joint block ``l`` are that pass's text-stream keys at block ``l`` (``add_k_proj`` + ``norm_added_k``, head
  split: exactly the text part of the key the block hands to SDPA, read from the capture side channel).
- **Vote.** The generation pass gives the latent (image) queries of each joint block (the image rows of the
  joint query, side channel); ``softmax(Q_img K_c^T * scale)`` over the concept tokens jointly, mean over image
  queries, mean over each word's tokens, argmax over concepts: one count per (block, head) and step, as for
  cross-attention. Normalisation (``HeadRelevance.vectors``) is unchanged.

Isolation: during the probe every forward hook of the transformer's modules is set aside (and the capture's
active-module slot saved), so that no recorder, step counter or edit hook sees the probe; the probe only reads.
The generation's outputs are bit-identical with and without HRV tracking. Limits: torch *global* module hooks
still see the probe; a probe inside ``apply_cross_attention_edits`` would go through the editing processors.

Example:
    >>> from attnscope.circuits.hrv import head_relevance
    >>> from attnscope.probes.adapters.tiny_pipelines import tiny_sd3_pipeline
    >>> hrv = head_relevance(tiny_sd3_pipeline(), ["a cat"], {"colour": ["red"], "animal": ["dog"]},
    ...                      num_inference_steps=2, pipeline_kwargs={"height": 16, "width": 16,
    ...                                                          "max_sequence_length": 8})
    >>> [str(s) for s, h in hrv.heads][::2], float(hrv.counts.sum())   # 3 joint blocks x 2 heads x 2 steps
    (['mmdit.L0.joint', 'mmdit.L1.joint', 'mmdit.L2.joint'], 12.0)
"""

import contextlib
import inspect
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..errors import AnalysisError, InputError
from ..probes.adapter import tokenizer_of
from ..probes.adapters import diffusers_common as dc
from ..probes.recorder import Recorder
from ..probes.request import CaptureRequest
from ..probes.site import Site
from .hrv_recorder import HrvRecorder


def _layout(tok: Any, words: Sequence[str], length: int, offset: int) -> list[list[int]]:
    """Text-block positions of each word's tokens in ``" ".join(words)`` (tokenizer ``tok``, block at ``offset``)."""
    text = " ".join(words)
    pieces = [[int(i) for i in tok(w, add_special_tokens=False)["input_ids"]] for w in words]
    joined = [int(i) for i in tok(text)["input_ids"]]
    lead = 0
    while lead < len(joined) and joined[lead] in set(tok.all_special_ids):
        lead += 1
    flat = [i for p in pieces for i in p]
    if any(not p for p in pieces) or joined[lead:lead + len(flat)] != flat:
        raise AnalysisError("concept words do not tokenize separably", expected="each word's tokens in the "
                            "joined sequence", got=text, fix="use single words the tokenizer knows")
    if lead + len(flat) > length:
        raise InputError("concept sequence longer than the text encoder", expected=f"<= {length} tokens",
                         got=lead + len(flat), fix="fewer concepts or shorter words (or a larger max_sequence_length)")
    out, start = [], offset + lead
    for p in pieces:
        out.append(list(range(start, start + len(p))))
        start += len(p)
    return out


def concept_sequence(pipe: Any, words: Sequence[str], max_sequence_length: int,
                     keep_start: bool = False) -> tuple[list[int], list[slice]]:
    """Text-block positions used as concept keys (per word: CLIP tokens then T5 tokens) and each word's slice.

    With ``keep_start`` the CLIP start token (position 0) comes first and belongs to no word."""
    clip_len = int(getattr(pipe, "tokenizer_max_length", pipe.tokenizer.model_max_length))
    per_word = _layout(pipe.tokenizer, words, clip_len, 0)
    if getattr(pipe, "text_encoder_3", None) is not None:
        t5 = _layout(pipe.tokenizer_3, words, int(max_sequence_length), clip_len)
        per_word = [a + b for a, b in zip(per_word, t5)]
    positions, slices = ([0] if keep_start else []), []
    for group in per_word:
        slices.append(slice(len(positions), len(positions) + len(group)))
        positions += group
    return positions, slices


def encode_concepts(pipe: Any, words: Sequence[str], max_sequence_length: int) -> \
        tuple[Float[Tensor, "1 text d_text"], Float[Tensor, "1 d_pooled"]]:
    """``(prompt_embeds [1, text, d], pooled [1, p])`` of the concept sequence by the pipeline's ``encode_prompt``."""
    text = " ".join(words)
    device = next(pipe.transformer.parameters()).device
    with torch.no_grad():
        emb, _, pooled, _ = pipe.encode_prompt(text, text, text, device=device, do_classifier_free_guidance=False,
                                               max_sequence_length=int(max_sequence_length))
    return emb, pooled


class _ProbeKeys(Recorder):
    """Keeps the concept-token text keys ``[batch, head, token, d]`` of every joint site of one probe pass."""

    def __init__(self, positions: Sequence[int]):
        super().__init__(CaptureRequest(sites=lambda s: s.kind == "joint", patterns=False))
        self.positions, self.keys = list(positions), {}

    def observe_qk(self, site: Site, query: Tensor, key: Tensor, mask: Tensor | None, **kwargs: Any) -> None:
        meta = kwargs.get("meta") or {}
        if site.kind == "joint" and "blocks" in meta:
            t0 = meta["blocks"]["text"][0]
            self.keys[meta["module"]] = key[:, :, [t0 + p for p in self.positions]].detach().float()

    def observe_probs(self, site: Site, probs: Tensor, **kwargs: Any) -> None:
        raise AnalysisError("HRV needs the key states", expected="SDPA attention processors",
                            got="materialised probabilities only", fix="use the default JointAttnProcessor2_0")


@contextlib.contextmanager
def hooks_set_aside(module: nn.Module) -> Iterator[None]:
    """Every forward (pre-)hook of ``module`` and its submodules set aside, and no active capture module."""
    saved = [(m, m._forward_pre_hooks, m._forward_hooks) for m in module.modules()]
    active = getattr(dc._LOCAL, "active", None)
    dc._LOCAL.active = None
    try:
        for m, _, _ in saved:
            m._forward_pre_hooks, m._forward_hooks = OrderedDict(), OrderedDict()
        yield
    finally:
        for m, pre, post in saved:
            m._forward_pre_hooks, m._forward_hooks = pre, post
        dc._LOCAL.active = active


def _argument(fn: Any, args: tuple, kwargs: dict, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    params = list(inspect.signature(fn).parameters)
    return args[params.index(name)] if name in params and params.index(name) < len(args) else None


class JointHrvRecorder(HrvRecorder):
    """HRV votes of joint sites: generation queries (side channel) against the keys of the step's probe pass."""

    kind = "joint"

    def __init__(self, adapter: Any, heads: list[tuple[Site, int]], embeddings: tuple[Tensor, Tensor],
                 positions: list[int], slices: list[slice], steps: Sequence[int] | None):
        super().__init__(adapter.inner.module, heads, None, slices, steps)
        self.adapter, self.embeddings, self.positions = adapter, embeddings, positions

    def probe(self, denoiser: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the denoiser (after the step counter's): run the probe pass, keep its keys."""
        self._keys = {}
        state = self.adapter._state
        if state is None or state.repeat or (state.step is not None and not self.request.wants_step(state.step)):
            return
        sample = _argument(denoiser.forward, args, kwargs, "hidden_states")
        timestep = _argument(denoiser.forward, args, kwargs, "timestep")
        idx = state.batch_index
        latent = sample if idx is None else sample.index_select(0, idx.to(sample.device))
        if torch.is_tensor(timestep) and timestep.ndim and timestep.shape[0] == sample.shape[0] and idx is not None:
            timestep = timestep.index_select(0, idx.to(timestep.device))
        emb, pooled = self.embeddings
        batch = latent.shape[0]
        keys = _ProbeKeys(self.positions)
        with hooks_set_aside(denoiser), torch.no_grad(), self.adapter.inner.instrument(keys):
            denoiser(hidden_states=latent, encoder_hidden_states=emb.expand(batch, *emb.shape[1:]),
                     pooled_projections=pooled.expand(batch, *pooled.shape[1:]), timestep=timestep,
                     return_dict=False)
        self._keys = keys.keys

    def observe_qk(self, site: Site, query: Tensor, key: Tensor, mask: Tensor | None, *, scaling: float,
                   is_causal: bool, softcap: float | None = None, step: int | None = None,
                   batch_index: Tensor | None = None, meta: dict | None = None) -> None:
        if not self.wants(site) or (step is not None and not self.request.wants_step(step)):
            return
        meta = meta or {}
        keys = self._keys.get(meta.get("module"))
        if keys is None or "blocks" not in meta:
            return
        i0, i1 = meta["blocks"]["image"]
        q = query if batch_index is None else query.index_select(0, batch_index.to(query.device))
        logits = torch.einsum("bhqd,bhtd->bhqt", q[:, :, i0:i1].float(), keys.to(q.device)) * scaling
        self._vote(site, torch.softmax(logits, -1).mean(2))


@contextlib.contextmanager
def joint_tracking(adapter: Any, recorder: JointHrvRecorder) -> Iterator[None]:
    """Install ``recorder.probe`` as a forward pre-hook of the denoiser (enter inside ``adapter.instrument``)."""
    handle = adapter.inner.module.register_forward_pre_hook(recorder.probe, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def joint_recorder(adapter: Any, heads: list[tuple[Site, int]], words: Sequence[str], keep_start: bool,
                   steps: Sequence[int] | None, pipeline_kwargs: dict) -> JointHrvRecorder:
    """The recorder of one prompt: the concept sequence of ``words`` encoded and laid out."""
    pipe = adapter.module
    if not hasattr(pipe, "encode_prompt") or tokenizer_of(pipe) is None:
        raise AnalysisError("joint-attention HRV needs an SD3-style pipeline", expected="encode_prompt and tokenizers",
                            got=type(pipe).__name__)
    param = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
    max_seq = pipeline_kwargs.get("max_sequence_length", param.default if param is not None else 256)
    positions, slices = concept_sequence(pipe, words, max_seq, keep_start)
    return JointHrvRecorder(adapter, heads, encode_concepts(pipe, words, max_seq), positions, slices, steps)
