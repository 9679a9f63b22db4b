"""Tiny random-init vision encoders, speech models and vision-language models of the coverage matrix, and the
inputs the VLMs need (their image-token counts depend on the config).

Images are 16x16 with 4x4 patches (a 4x4 grid) unless a family needs more; text models are 2 layers x 4 heads.
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .text_models import DECODER, VOCAB, hf

IMAGE = 16
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE,
              patch_size=4)
IMAGE_TOKEN = VOCAB - 1  # the last id of every tiny VLM vocabulary
GEMMA_TEXT = dict(DECODER, head_dim=8)
QWEN_TEXT = dict(DECODER, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})


def _build(model: str, make_config: Callable[[], Any]) -> Callable[[], nn.Module]:
    """A builder of ``transformers.<model>(make_config())``, seeded, in eval mode."""
    def build() -> nn.Module:
        cfg = make_config()
        torch.manual_seed(0)
        return _tf(model)(cfg).eval()
    build.__qualname__ = f"build({model})"
    return build


def _tf(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


VISION_ENCODERS: dict[str, Callable[[], nn.Module]] = {
    "vit": hf("ViTConfig", "ViTModel", **VISION),
    "deit": hf("DeiTConfig", "DeiTModel", **VISION),
    "dinov2": hf("Dinov2Config", "Dinov2Model", **VISION),
    "dinov2_registers": hf("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", num_register_tokens=4, **VISION),
    "beit": hf("BeitConfig", "BeitModel", use_relative_position_bias=True, **VISION),
    "clip_vision": hf("CLIPVisionConfig", "CLIPVisionModel", **VISION),
    "siglip_vision": hf("SiglipVisionConfig", "SiglipVisionModel", **VISION),
    "swin": hf("SwinConfig", "SwinModel", image_size=IMAGE, patch_size=2, embed_dim=16, depths=[1, 1],
               num_heads=[2, 4], window_size=4),
}

SPEECH: dict[str, Callable[[], nn.Module]] = {
    "whisper": hf("WhisperConfig", "WhisperForConditionalGeneration", vocab_size=VOCAB, d_model=32, encoder_layers=2,
                  decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                  decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16, max_target_positions=16,
                  pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2, suppress_tokens=[],
                  begin_suppress_tokens=[]),
    "wav2vec2": hf("Wav2Vec2Config", "Wav2Vec2Model", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, conv_dim=(16, 16), conv_stride=(4, 2), conv_kernel=(8, 4),
                   num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, vocab_size=VOCAB),
}


def _llava(config_name: str, model_name: str, **extra: Any) -> Callable[[], nn.Module]:
    def config() -> Any:
        return _tf(config_name)(vision_config=_tf("CLIPVisionConfig")(**VISION), text_config=_tf("LlamaConfig")(
            **DECODER), image_token_id=IMAGE_TOKEN, vision_feature_layer=-1,
            vision_feature_select_strategy="default", **extra)
    return _build(model_name, config)


def _paligemma() -> Any:
    return _tf("PaliGemmaConfig")(vision_config=_tf("SiglipVisionConfig")(**VISION),
                                  text_config=_tf("GemmaConfig")(**GEMMA_TEXT), image_token_id=IMAGE_TOKEN,
                                  projection_dim=32)


def _gemma3() -> Any:
    return _tf("Gemma3Config")(vision_config=_tf("SiglipVisionConfig")(**VISION),
                               text_config=_tf("Gemma3TextConfig")(**GEMMA_TEXT, sliding_window=4,
                                                                   query_pre_attn_scalar=8),
                               mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN, boi_token_index=VOCAB - 3,
                               eoi_token_index=VOCAB - 2)


def _qwen2_vl() -> Any:
    vision = _tf("Qwen2VLVisionConfig")(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=4,
                                        spatial_merge_size=2, temporal_patch_size=2)
    return _tf("Qwen2VLConfig")(text_config=QWEN_TEXT, vision_config=vision.to_dict(), image_token_id=IMAGE_TOKEN,
                                video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3,
                                vision_end_token_id=VOCAB - 4)


def _qwen2_5_vl() -> Any:
    vision = _tf("Qwen2_5_VLVisionConfig")(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4,
                                           spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                                           out_hidden_size=32, fullatt_block_indexes=[1])
    return _tf("Qwen2_5_VLConfig")(text_config=QWEN_TEXT, vision_config=vision.to_dict(),
                                   image_token_id=IMAGE_TOKEN, video_token_id=VOCAB - 2,
                                   vision_start_token_id=VOCAB - 3, vision_end_token_id=VOCAB - 4)


def _idefics(prefix: str) -> Callable[[], Any]:
    def config() -> Any:
        return _tf(f"{prefix}Config")(vision_config=_tf(f"{prefix}VisionConfig")(**VISION).to_dict(),
                                      text_config=_tf("LlamaConfig")(**DECODER).to_dict(),
                                      image_token_id=IMAGE_TOKEN, scale_factor=2)
    return config


def _mllama() -> Any:
    vision = _tf("MllamaVisionConfig")(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                                       intermediate_size=64, vision_output_dim=64, image_size=IMAGE, patch_size=4,
                                       max_num_tiles=1, intermediate_layers_indices=[0],
                                       supported_aspect_ratios=[[1, 1]])
    text = _tf("MllamaTextConfig")(**{**DECODER, "num_hidden_layers": 3}, cross_attention_layers=[1])
    return _tf("MllamaConfig")(vision_config=vision.to_dict(), text_config=text.to_dict(),
                               image_token_index=IMAGE_TOKEN)


def _clip_dual() -> Any:
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return _tf("CLIPConfig")(text_config=text, vision_config=dict(VISION), projection_dim=16)


VLMS: dict[str, Callable[[], nn.Module]] = {
    "llava": _llava("LlavaConfig", "LlavaForConditionalGeneration"),
    "llava_next": _llava("LlavaNextConfig", "LlavaNextForConditionalGeneration", image_grid_pinpoints=[[16, 16]]),
    "paligemma": _build("PaliGemmaForConditionalGeneration", _paligemma),
    "gemma3": _build("Gemma3ForConditionalGeneration", _gemma3),
    "qwen2_vl": _build("Qwen2VLForConditionalGeneration", _qwen2_vl),
    "qwen2_5_vl": _build("Qwen2_5_VLForConditionalGeneration", _qwen2_5_vl),
    "idefics3": _build("Idefics3ForConditionalGeneration", _idefics("Idefics3")),
    "smolvlm": _build("SmolVLMForConditionalGeneration", _idefics("SmolVLM")),
    "mllama": _build("MllamaForConditionalGeneration", _mllama),
    "clip": _build("CLIPModel", _clip_dual),
}


def _ids_with_images(gen: torch.Generator, n_image: int, before: list[int] = (), after: list[int] = ()
                     ) -> dict[str, torch.Tensor]:
    """``[t t (before) IMG*n (after) t t t t]`` for a batch of 2, the second row padded by 2 (text ids 4..59)."""
    text = torch.randint(4, VOCAB - 4, (2, 6), generator=gen)
    middle = torch.tensor(list(before) + [IMAGE_TOKEN] * n_image + list(after)).expand(2, -1)
    ids = torch.cat([text[:, :2], middle, text[:, 2:]], 1)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _llava_next_tokens(model: nn.Module, pixels: torch.Tensor, sizes: torch.Tensor) -> int:
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes)
    feats = getattr(feats, "pooler_output", feats)
    return int(feats[0].shape[0])


def vlm_inputs(name: str, model: nn.Module) -> dict[str, Any]:
    """Forward kwargs (text with image tokens, pixels and what else the family needs) of the tiny VLM ``name``."""
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=gen)
    grid = (IMAGE // 4) ** 2
    if name in ("llava", "paligemma"):
        return {**_ids_with_images(gen, grid), "pixel_values": pixels}
    if name == "gemma3":
        return {**_ids_with_images(gen, 4), "pixel_values": pixels}
    if name == "llava_next":
        tiles, sizes = torch.randn(2, 2, 3, IMAGE, IMAGE, generator=gen), torch.tensor([[IMAGE, IMAGE]] * 2)
        n = _llava_next_tokens(model, tiles, sizes)
        return {**_ids_with_images(gen, n), "pixel_values": tiles, "image_sizes": sizes}
    if name in ("qwen2_vl", "qwen2_5_vl"):
        patches = torch.randn(2 * grid, 3 * 2 * 4 * 4, generator=gen)  # [image * patches, channel * t * p * p]
        ids = _ids_with_images(gen, grid // 4, before=[VOCAB - 3], after=[VOCAB - 4])
        types = (ids["input_ids"] == IMAGE_TOKEN).long()  # the processor's mm_token_type_ids: 1 = image
        return {**ids, "pixel_values": patches, "image_grid_thw": torch.tensor([[1, 4, 4]] * 2),
                "mm_token_type_ids": types}
    if name in ("idefics3", "smolvlm"):
        return {**_ids_with_images(gen, grid // 4), "pixel_values": pixels[:, None]}
    if name == "mllama":
        ids = _ids_with_images(gen, 1)
        return {**ids, "pixel_values": pixels[:, None, None], "aspect_ratio_ids": torch.tensor([[1], [1]]),
                "aspect_ratio_mask": torch.ones(2, 1, 1, dtype=torch.long),
                "cross_attention_mask": torch.ones(2, ids["input_ids"].shape[1], 1, 1, dtype=torch.long)}
    if name == "clip":
        ids = torch.randint(4, VOCAB - 4, (2, 8), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    raise KeyError(name)
