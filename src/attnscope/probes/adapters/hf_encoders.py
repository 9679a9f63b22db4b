"""Adapters for transformers encoders fed by pixels or audio: ViT, DeiT, DINOv2, BEiT, Swin, CLIP / SigLIP vision
towers (``pixel_values``), Whisper-class speech encoder-decoders (``input_features``) and wav2vec2-class audio
encoders (``input_values``, tower ``audio``).

They share the HF route of ``hf_text`` (the model keeps its kernel; capture, edits and the eager reference go through
the attention function); what differs is the input. A vision trace records the patch ``grid`` and spans
(``special`` for [CLS] / register tokens, ``image`` for patches), so rollout and relevance draw over the image.

Example:
    >>> import torch, transformers, attnscope
    >>> cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                              intermediate_size=64, image_size=32, patch_size=8)
    >>> trace = attnscope.capture(transformers.ViTModel(cfg).eval(), torch.rand(1, 3, 32, 32))
    >>> trace.tokens.grid, [(s.modality, s.start, s.end) for s in trace.tokens.spans]
    ((4, 4), [('special', 0, 1), ('image', 1, 17)])
"""

from typing import Any

import torch
from torch import nn

from ...errors import InputError
from ..adapter import Prepared, register_adapter
from ..tokens import Span, TokenInfo
from ..device_map import input_device
from .hf_text import (HFTextAdapter, attention_modules, decoder_start, hf_sites, is_encoder_decoder, token_info,
                      tower_info)
from .hf_vlm import image_token_id, vision_or_text

PIXELS, AUDIO, WAVEFORM = "pixel_values", "input_features", "input_values"


def _main_input(module: Any) -> str:
    return str(getattr(module, "main_input_name", "input_ids"))


def _vision_config(module: nn.Module) -> Any:
    cfg = module.config
    return getattr(cfg, "vision_config", None) or cfg


def _as_kwargs(inputs: Any, name: str) -> dict[str, torch.Tensor]:
    if torch.is_tensor(inputs):
        return {name: inputs}
    if isinstance(inputs, dict) and torch.is_tensor(inputs.get(name)):
        return dict(inputs)
    raise InputError(f"this model takes {name}", expected=f"a {name} tensor or a dict with {name!r}",
                     got=type(inputs).__name__ if not isinstance(inputs, dict) else sorted(inputs),
                     fix=f"pass the {name} your model's processor makes (a torch tensor)")


def prefix_tokens(module: nn.Module) -> int:
    """Tokens before the patches: [CLS] (a ``cls_token`` / ``class_embedding`` parameter), a distillation token
    (DeiT) and register tokens (DINOv2 with registers)."""
    names = {n.rsplit(".", 1)[-1] for n, _ in module.named_parameters()}
    count = int(bool(names & {"cls_token", "class_embedding"})) + int("distillation_token" in names)
    return count + int(getattr(_vision_config(module), "num_register_tokens", 0) or 0)


def patch_grid(module: nn.Module, pixel_values: torch.Tensor) -> tuple[int, int]:
    patch = getattr(_vision_config(module), "patch_size", 16)
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return int(pixel_values.shape[-2]) // ph, int(pixel_values.shape[-1]) // pw


@register_adapter
class HFVisionEncoderAdapter(HFTextAdapter):
    """Vision transformers that take ``pixel_values`` (no text tower in the same model)."""

    family = "hf-vision"
    priority = 11

    @classmethod
    def matches(cls, module: Any) -> bool:
        from transformers import PreTrainedModel

        return isinstance(module, PreTrainedModel) and _main_input(module) == PIXELS \
            and not hasattr(module.config, "text_config") and bool(attention_modules(module))

    def info(self):
        info = super().info()
        info.family = "vision-encoder"
        info.towers = [t if t.name != "text" else type(t)(**{**vars(t), "name": "vision"}) for t in info.towers]
        return info

    def _sites(self):
        return hf_sites(self.module, lambda name: "vision")

    def prepare(self, inputs: Any) -> Prepared:
        kwargs = _as_kwargs(inputs, PIXELS)
        pixels = kwargs[PIXELS]
        if pixels.ndim != 4:
            raise InputError("pixel_values must be [batch, channel, height, width]", expected="a 4-D tensor",
                             got=tuple(pixels.shape), fix="add the batch dimension: pixels[None]")
        device = input_device(self.module)
        kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        grid, n_prefix = patch_grid(self.module, pixels), prefix_tokens(self.module)
        spans = [Span("special", 0, n_prefix, "[CLS]")] if n_prefix else []
        spans.append(Span("image", n_prefix, n_prefix + grid[0] * grid[1]))
        return Prepared(kwargs, TokenInfo(spans=spans, grid=grid))

    def sample_inputs(self) -> Any:
        cfg = _vision_config(self.module)
        size = getattr(cfg, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        channels = int(getattr(cfg, "num_channels", 3))
        return torch.rand(2, channels, h, w, generator=torch.Generator().manual_seed(0))

    def causal_sites(self) -> set:
        return set()


@register_adapter
class HFSpeechAdapter(HFTextAdapter):
    """Speech encoder-decoders that take ``input_features`` (Whisper class): towers encoder and decoder."""

    family = "hf-speech"
    priority = 11

    @classmethod
    def matches(cls, module: Any) -> bool:
        from transformers import PreTrainedModel

        return isinstance(module, PreTrainedModel) and _main_input(module) == AUDIO and bool(attention_modules(module))

    def prepare(self, inputs: Any) -> Prepared:
        kwargs = _as_kwargs(inputs, AUDIO)
        features = kwargs[AUDIO]
        device = input_device(self.module)
        if "decoder_input_ids" not in kwargs and "labels" not in kwargs:
            start = torch.zeros(features.shape[0], 1, dtype=torch.long)
            kwargs["decoder_input_ids"] = decoder_start(self.module.config, start)[:, :1]
        kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        frames = int(features.shape[-1]) // 2  # Whisper's second convolution has stride 2
        ids = kwargs["decoder_input_ids"].tolist()
        return Prepared(kwargs, TokenInfo(ids=ids, spans=[Span("audio", 0, frames)]))

    def sample_inputs(self) -> Any:
        cfg = self.module.config
        frames = 2 * int(getattr(cfg, "max_source_positions", 1500))
        features = torch.randn(2, int(cfg.num_mel_bins), frames, generator=torch.Generator().manual_seed(0))
        start = decoder_start(cfg, torch.zeros(2, 1, dtype=torch.long))[:, :1]
        ids = torch.cat([start, torch.randint(0, int(cfg.vocab_size), (2, 3), generator=torch.Generator()
                                               .manual_seed(1))], 1)
        return {AUDIO: features, "decoder_input_ids": ids}


@register_adapter
class HFAudioEncoderAdapter(HFTextAdapter):
    """Audio encoders that take raw waveforms ``input_values`` ``[batch, samples]`` (wav2vec2, HuBERT, WavLM ...):
    tower ``audio``, one ``audio`` span over the feature frames the convolutional front end makes."""

    family = "hf-audio"
    priority = 11

    @classmethod
    def matches(cls, module: Any) -> bool:
        from transformers import PreTrainedModel

        return isinstance(module, PreTrainedModel) and _main_input(module) == WAVEFORM \
            and not is_encoder_decoder(module) and bool(attention_modules(module))

    def _sites(self):
        return hf_sites(self.module, lambda name: "audio")

    def info(self):
        info = super().info()
        info.family = "audio-encoder"
        return info

    def prepare(self, inputs: Any) -> Prepared:
        kwargs = _as_kwargs(inputs, WAVEFORM)
        if kwargs[WAVEFORM].ndim != 2:
            raise InputError("input_values must be [batch, samples]", expected="a 2-D waveform tensor",
                             got=tuple(kwargs[WAVEFORM].shape), fix="add the batch dimension: wave[None]")
        samples = int(kwargs[WAVEFORM].shape[-1])
        lengths = getattr(self.module, "_get_feat_extract_output_lengths", None)
        frames = int(lengths(torch.tensor(samples))) if lengths is not None else samples
        device = input_device(self.module)
        kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        return Prepared(kwargs, TokenInfo(spans=[Span("audio", 0, frames)]))

    def sample_inputs(self) -> Any:
        return torch.randn(2, 1600, generator=torch.Generator().manual_seed(0))

    def causal_sites(self) -> set:
        return set()


@register_adapter
class HFDualEncoderAdapter(HFTextAdapter):
    """Contrastive dual encoders (CLIP, SigLIP, ALIGN-style ``CLIPModel``): a text tower fed ``input_ids`` and a
    vision tower fed ``pixel_values`` in one forward, no image tokens in the text (towers ``text`` and ``vision``)."""

    family = "hf-dual"
    priority = 12
    runs_on_text_alone = False  # every forward needs images too: no token-only reference runs

    @classmethod
    def matches(cls, module: Any) -> bool:
        from transformers import PreTrainedModel

        cfg = getattr(module, "config", None)
        return isinstance(module, PreTrainedModel) and hasattr(cfg, "text_config") and hasattr(cfg, "vision_config") \
            and image_token_id(cfg) is None and bool(attention_modules(module))

    def _sites(self):
        return hf_sites(self.module, vision_or_text)

    def info(self):
        info = super().info()
        cfg = self.module.config
        info.family = "dual-encoder"
        info.towers = [tower_info(cfg.text_config if t.name == "text" else cfg.vision_config, t.name, t.n_layers,
                                  t.kinds) for t in info.towers]
        return info

    def prepare(self, inputs: Any) -> Prepared:
        if not (isinstance(inputs, dict) and torch.is_tensor(inputs.get("input_ids"))
                and torch.is_tensor(inputs.get(PIXELS))):
            raise InputError("a dual encoder takes text and images together", expected="a dict with input_ids and "
                             "pixel_values", got=sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__,
                             fix="pass {'input_ids': ids, 'pixel_values': pixels} (the model's processor makes both)")
        device = input_device(self.module)
        kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        tokens = token_info(kwargs["input_ids"], self.tokenizer, kwargs.get("attention_mask"))
        tokens.grid = patch_grid(self.module, kwargs[PIXELS])
        return Prepared(kwargs, tokens)

    def sample_inputs(self) -> Any:
        cfg = self.module.config
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, int(cfg.text_config.vocab_size), (2, 7), generator=gen)
        size = getattr(cfg.vision_config, "image_size", 224)
        pixels = torch.rand(2, int(getattr(cfg.vision_config, "num_channels", 3)), size, size, generator=gen)
        return {"input_ids": ids, PIXELS: pixels}
