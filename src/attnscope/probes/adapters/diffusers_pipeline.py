"""Adapter for diffusers pipelines whose denoiser (``unet`` or ``transformer``) has a diffusers adapter.

Capture runs the whole pipeline on ``inputs`` = a dict of pipeline kwargs (``prompt``, ``num_inference_steps``,
``guidance_scale``, ``generator`` ...; a bare prompt string also works). A forward pre-hook on the denoiser
counts denoising steps: every record's ``step`` is the step index (``capture(..., steps=[0, 5])`` keeps only those
steps) and ``meta["timestep"]`` the scheduler's timestep. Under classifier-free guidance only the conditional half
of the batch is recorded (diffusers concatenates ``[unconditional, conditional]``). A second denoiser call at the
same timestep (e.g. SD3 skip-layer guidance) is not recorded. ``generator`` is snapshotted at ``prepare`` so that
repeated runs (``validate``) draw the same noise; the caller's generator is never advanced.

Token spans: for UNet, DiT and SD3 pipelines they are predicted from the prompt (SD3: ``[latent; CLIP; T5]``).
Sequence denoisers (Flux, Wan, CogVideoX, HunyuanVideo) order and size their joint sequence themselves (Flux and
CogVideoX put the text first), so their spans and grid come from the denoiser's first call during the run
(``inner.token_info``); the text positions are named by the one tokenizer whose text encoder is as wide as the
denoiser's text input, and stay unnamed when that is ambiguous or the lengths differ.

Example:
    >>> import attnscope, tempfile
    >>> from attnscope.probes.adapters.diffusers_pipeline import PipelineAdapter, tiny_sd_pipeline
    >>> adapter = PipelineAdapter(tiny_sd_pipeline())
    >>> trace = attnscope.capture(adapter, adapter.sample_inputs(), stats=("entropy",))
    >>> site = attnscope.Site("unet.up.1", 0, "cross")
    >>> trace.steps(site), trace.get(site, 1).stats["entropy"].shape[0]   # 2 steps, conditional half of batch 2
    ([0, 1], 1)
"""

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..._extras import require
from ...errors import InputError
from ..adapter import ModelAdapter, Prepared, register_adapter, registered_adapters
from ..model_info import ModelInfo
from ..recorder import Recorder
from ..site import Site
from ..tokens import Span, TokenInfo
from .diffusers_common import DenoiserState, DiffusersAdapter, reference_by_step
from .diffusers_unet import tiny_unet
from .hf_text import token_info

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def denoiser_of(pipe: Any) -> nn.Module | None:
    for attr in ("unet", "transformer"):
        module = getattr(pipe, attr, None)
        if isinstance(module, nn.Module):
            return module
    return None


def _inner_adapter(pipe: Any) -> DiffusersAdapter | None:
    denoiser = denoiser_of(pipe)
    if denoiser is None:
        return None
    for cls in registered_adapters():
        if issubclass(cls, DiffusersAdapter) and cls.matches(denoiser):
            return cls(denoiser)
    return None


@dataclass(frozen=True)
class _GeneratorSnapshot:
    device: str
    state: torch.Tensor

    @classmethod
    def take(cls, gen: Any) -> Any:
        if isinstance(gen, (list, tuple)):
            return [cls.take(g) for g in gen]
        return cls(str(gen.device), gen.get_state()) if isinstance(gen, torch.Generator) else gen

    @staticmethod
    def fresh(snap: Any) -> Any:
        if isinstance(snap, list):
            return [_GeneratorSnapshot.fresh(s) for s in snap]
        if isinstance(snap, _GeneratorSnapshot):
            gen = torch.Generator(device=snap.device)
            gen.set_state(snap.state)
            return gen
        return snap


def _call_default(pipe: Any, name: str) -> Any:
    param = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


@register_adapter
class PipelineAdapter(ModelAdapter):
    """Any diffusers pipeline with a ``unet``/``transformer`` that one of the diffusers adapters handles."""

    family = "diffusers-pipeline"
    priority = 20

    @classmethod
    def matches(cls, module: Any) -> bool:
        return hasattr(module, "components") and callable(module) and _inner_adapter(module) is not None

    def __init__(self, module: Any, tokenizer: Any = None, name: str = ""):
        super().__init__(module, tokenizer or getattr(module, "tokenizer", None), name)
        inner = _inner_adapter(module)
        if inner is None:
            raise InputError("pipeline has no supported denoiser", expected="unet or transformer of a known family",
                             got=type(denoiser_of(module)).__name__)
        self.inner: DiffusersAdapter = inner
        self._call_kwargs: dict[str, Any] = {}
        self._state: DenoiserState | None = None
        self._first_call: dict[str, Any] | None = None  # the denoiser's first forward kwargs of a run

    def info(self) -> ModelInfo:
        info = self.inner.info()
        info.family, info.adapter = f"{self.family}/{self.inner.family}", type(self).__name__
        info.name = self.name or str(getattr(self.module, "name_or_path", "") or type(self.module).__name__)
        return info

    def prepare(self, inputs: Any) -> Prepared:
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], str)):
            inputs = {"prompt": inputs}
        if not isinstance(inputs, dict):
            raise InputError("pipelines take a dict of pipeline kwargs", expected="dict or prompt string",
                             got=type(inputs).__name__, fix="pass e.g. {'prompt': 'a cat', 'num_inference_steps': 4}")
        kwargs = dict(inputs)
        if "generator" in kwargs:
            kwargs["generator"] = _GeneratorSnapshot.take(kwargs["generator"])
        return Prepared(kwargs, self._tokens(kwargs, self._predicted_grid(kwargs)))

    def run(self, prepared: Prepared) -> Any:
        kwargs = dict(prepared.kwargs)
        if "generator" in kwargs:
            kwargs["generator"] = _GeneratorSnapshot.fresh(kwargs["generator"])
        self._call_kwargs = kwargs
        with torch.no_grad():
            output = self.module(**kwargs)
        measured = self._state.base_hw if self._state is not None else None
        if self._sequence_denoiser():
            if self._first_call is not None:
                prepared.tokens.__dict__.update(self._sequence_tokens(kwargs, self._first_call).__dict__)
        elif measured is not None and measured != prepared.tokens.grid:  # e.g. resolution binning changed the size
            prepared.tokens.__dict__.update(self._tokens(kwargs, measured).__dict__)
        return output

    @contextlib.contextmanager
    def instrument(self, recorder: Recorder, implementation: str = "auto") -> Iterator[None]:
        self._state = DenoiserState(track_steps=True, cfg=self._cfg_active)
        self._first_call = None
        remember = self.inner.module.register_forward_pre_hook(self._remember_call, with_kwargs=True)
        try:
            with self.inner.instrument(recorder, implementation, state=self._state):
                self.attention_path = self.inner.attention_path
                yield
        finally:
            remember.remove()
            self._state = None

    def _remember_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._first_call is None and not args:
            self._first_call = dict(kwargs)

    def _sequence_denoiser(self) -> bool:
        return hasattr(self.inner, "joint_order")

    def _sequence_tokens(self, kwargs: dict, call: dict) -> TokenInfo:
        """Spans and grid of the denoiser's own sequence; text strings where one tokenizer reproduces its text."""
        info = self.inner.token_info(call)
        context = call.get("encoder_hidden_states")
        text = [s for s in info.spans if s.modality == "text"]
        if not torch.is_tensor(context) or len(text) != 1 or text[0].end - text[0].start != context.shape[1]:
            return info
        named = self._sequence_text(kwargs, int(context.shape[1]), int(context.shape[-1]))
        if named is None:
            return info
        n_total = max(s.end for s in info.spans)
        offset = text[0].start
        strings = [""] * n_total
        strings[offset:offset + len(named.strings[0])] = named.strings[0]
        spans = [s for s in info.spans if s.modality != "text"]
        spans += [Span(s.modality, s.start + offset, s.end + offset, s.label) for s in named.spans]
        info.strings, info.spans = [strings], sorted(spans, key=lambda s: s.start)
        return info

    def _sequence_text(self, kwargs: dict, length: int, width: int) -> TokenInfo | None:
        """Token strings of the prompt from the one tokenizer whose text encoder is ``width`` wide, padded to
        ``length`` as the pipeline pads it; None when that tokenizer is not unique or a prompt template applies."""
        prompt = kwargs.get("prompt")
        if not isinstance(prompt, str) or _call_default(self.module, "prompt_template") is not None:
            return None
        found = []
        for suffix in ("", "_2", "_3"):
            tok, enc = getattr(self.module, "tokenizer" + suffix, None), getattr(self.module, "text_encoder" + suffix,
                                                                                  None)
            cfg = getattr(getattr(enc, "config", None), "text_config", None) or getattr(enc, "config", None)
            if tok is not None and (getattr(cfg, "d_model", None) or getattr(cfg, "hidden_size", None)) == width:
                found.append(tok)
        if len(found) != 1:
            return None
        ids = found[0](prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return token_info(ids["input_ids"][:, :length], found[0], None) if ids["input_ids"].shape[1] >= length \
            else None

    def _cfg_active(self) -> bool:
        if isinstance(getattr(type(self.module), "do_classifier_free_guidance", None), property):
            with contextlib.suppress(AttributeError):
                return bool(self.module.do_classifier_free_guidance)
        scale = self._call_kwargs.get("guidance_scale", _call_default(self.module, "guidance_scale"))
        return scale is not None and float(scale) > 1.0

    def _predicted_grid(self, kwargs: dict) -> tuple[int, int] | None:
        size = getattr(self.inner.module.config, "sample_size", None)
        if size is None:
            return None
        size_h, size_w = (size, size) if isinstance(size, int) else tuple(size)
        vsf = int(getattr(self.module, "vae_scale_factor", 8))
        h = kwargs["height"] // vsf if kwargs.get("height") else size_h
        w = kwargs["width"] // vsf if kwargs.get("width") else size_w
        p = self.inner.patch_size()
        return (h // p, w // p)

    def _text_tokens(self, kwargs: dict) -> TokenInfo:
        """Tokens of the conditional prompt as the text encoder sees them (padded to the encoder's length)."""
        tok, prompt = self.tokenizer, kwargs.get("prompt")
        if tok is None or prompt is None:
            return TokenInfo()
        max_seq = kwargs.get("max_sequence_length", _call_default(self.module, "max_sequence_length"))
        two_stage = getattr(self.module, "tokenizer_2", None) is not None
        length = int(tok.model_max_length) if two_stage or not max_seq else int(max_seq)
        ids = tok(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt")["input_ids"]
        info = token_info(ids, tok, None)
        if two_stage and max_seq:  # SD3: [CLIP tokens; T5 tokens]; T5 positions are unnamed here
            extra = int(max_seq)
            info.ids = [row + [-1] * extra for row in info.ids or []]
            info.strings = [row + [""] * extra for row in info.strings or []]
            info.spans.append(Span("text", length, length + extra, "t5"))
        return info

    def _tokens(self, kwargs: dict, grid: tuple[int, int] | None) -> TokenInfo:
        """Text tokens (cross/joint keys), the latent grid of the queries; joint spans are ``[latent; text]``.
        Sequence denoisers: nothing is predicted (their run measures it, ``_sequence_tokens``)."""
        if self._sequence_denoiser():
            return TokenInfo()
        info = self._text_tokens(kwargs)
        info.grid = grid
        if any(s.kind == "joint" for s in self.inner.info().sites):
            n_img = grid[0] * grid[1] if grid else 0
            shifted = [Span(s.modality, s.start + n_img, s.end + n_img, s.label) for s in info.spans]
            info.spans = [Span("latent", 0, n_img)] + shifted if n_img else shifted
        return info

    def sample_inputs(self) -> Any:
        inputs: dict[str, Any] = {"prompt": "a red cat", "num_inference_steps": 2, "guidance_scale": 5.0,
                                  "output_type": "latent", "generator": torch.Generator().manual_seed(0)}
        if _call_default(self.module, "use_resolution_binning") is not None:
            inputs["use_resolution_binning"] = False
        return inputs

    def reference_patterns(self, prepared: Prepared) -> dict[Site, list[torch.Tensor]]:
        return reference_by_step(self, prepared)

    def causal_sites(self) -> set[Site]:
        return set()

    def provenance(self) -> dict:
        return {**self.inner.provenance(), "model": self.name or type(self.module).__name__,
                "adapter": type(self).__name__, "family": self.family, "attention_path": self.attention_path,
                "denoiser": type(self.inner.module).__name__}


def tiny_clip_tokenizer(max_length: int = 16) -> Any:
    """A character-level CLIPTokenizer (lower-case letters, start/end tokens) built in memory, no files."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _LETTERS:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_sd_pipeline(seed: int = 0) -> Any:
    """A random-init StableDiffusionPipeline: tiny CLIP text encoder, UNet and VAE, DDIM scheduler (~0.1 s)."""
    require("diffusers", "diffusion")
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel


    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=56, hidden_size=12, intermediate_size=24, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=16).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tiny_clip_tokenizer(), unet=tiny_unet(seed),
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
