"""Adapter for transformers vision-language models of the LLaVA class (vision tower + projector + language model).

Sites: the language model's self-attention (tower ``text``) and the vision tower's attention (tower ``vision``,
CLIP/SigLIP attention, which in transformers 5 dispatches through ``ALL_ATTENTION_FUNCTIONS`` like the text
layers). Both go through ``hf_route``, so SDPA stays the kernel and outputs stay bit-identical. Image-token
positions (``input_ids == config.image_token_id``) are marked as ``image`` spans in the trace's ``TokenInfo``.

Example:
    >>> import transformers
    >>> from attnscope.probes.adapters.hf_vlm import HFVisionLanguageAdapter, tiny_llava
    >>> adapter = HFVisionLanguageAdapter(tiny_llava())
    >>> [(t.name, t.n_layers) for t in adapter.info().towers]
    [('text', 2), ('vision', 2)]
    >>> prepared = adapter.prepare(adapter.sample_inputs())
    >>> [(s.start, s.end) for s in prepared.tokens.spans if s.modality == "image"]
    [(2, 18)]
"""

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ...errors import InputError
from ..adapter import ModelAdapter, ModelInfo, Prepared, register_adapter
from ..recorder import Recorder
from ..site import Site
from ..tokens import Span, TokenInfo
from .hf_route import attention_modules, eager_reference, route_attention
from .hf_text import hf_sites, max_positions_of, tower_info

_VISION_PARTS = ("vision_tower", "vision_model", "visual", "image_encoder")


def vision_or_text(name: str) -> str:
    """Tower of an attention module from its qualified name."""
    return "vision" if any(part in name.split(".") for part in _VISION_PARTS) else "text"


def image_token_id(config: Any) -> int | None:
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def tiny_llava(image_size: int = 16, patch_size: int = 4, vocab_size: int = 64, seed: int = 0) -> nn.Module:
    """A random-init LLaVA (CLIP vision tower, Llama text model with GQA) that builds on CPU in well under a second."""
    import transformers

    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    text = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    bos_token_id=2, eos_token_id=3, pad_token_id=1)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab_size - 1,
                                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    return transformers.LlavaForConditionalGeneration(config).eval()


@register_adapter
class HFVisionLanguageAdapter(ModelAdapter):
    """LLaVA-class transformers VLMs: ``config.vision_config`` + ``config.text_config`` + an image token id."""

    family = "vlm"
    priority = 15

    @classmethod
    def matches(cls, module: Any) -> bool:
        from transformers import PreTrainedModel

        if not isinstance(module, PreTrainedModel):
            return False
        cfg = module.config
        ok = hasattr(cfg, "vision_config") and hasattr(cfg, "text_config") and image_token_id(cfg) is not None
        return ok and bool(attention_modules(module))

    # -- structure --------------------------------------------------------------------------------------------------

    def _sites(self) -> dict[int, Site]:
        return hf_sites(self.module, tower_of=vision_or_text)

    def info(self) -> ModelInfo:
        sites = sorted(self._sites().values())
        cfg = self.module.config
        towers = []
        for name, sub in (("text", cfg.text_config), ("vision", cfg.vision_config)):
            tower_sites = [s for s in sites if s.tower == name]
            if tower_sites:
                kinds = sorted({s.kind for s in tower_sites})
                towers.append(tower_info(sub, name, sum(1 for s in tower_sites if s.kind == "self"), kinds))
        impls = {n: str(getattr(sub, "_attn_implementation", None)) for n, sub in
                 (("text", cfg.text_config), ("vision", cfg.vision_config))}
        impl = impls["text"] if len(set(impls.values())) == 1 else ", ".join(f"{k}={v}" for k, v in impls.items())
        return ModelInfo(family="vlm", adapter=type(self).__name__, towers=towers, sites=sites,
                         attn_implementation=impl, max_positions=max_positions_of(cfg.text_config),
                         name=self.name or getattr(cfg, "_name_or_path", ""))

    def causal_sites(self) -> set[Site]:
        modules = {id(m): m for _, m in attention_modules(self.module)}
        return {site for mid, site in self._sites().items()
                if site.tower == "text" and site.kind == "self" and getattr(modules.get(mid), "is_causal", False)}

    def tokens_per_image(self) -> int:
        """Image tokens the language model expects per image."""
        cfg, vcfg = self.module.config, self.module.config.vision_config
        strategy = getattr(cfg, "vision_feature_select_strategy", None)
        if strategy in ("default", "full") and hasattr(vcfg, "image_size") and hasattr(vcfg, "patch_size"):
            return (vcfg.image_size // vcfg.patch_size) ** 2 + (1 if strategy == "full" else 0)
        size = int(getattr(vcfg, "image_size", 224))
        pixels = torch.zeros(1, int(getattr(vcfg, "num_channels", 3)), size, size, dtype=self._dtype())
        with torch.no_grad():
            feats = self.module.get_image_features(pixel_values=pixels.to(self._device()))
        feats = getattr(feats, "pooler_output", feats)
        feats = feats[0] if isinstance(feats, (list, tuple)) else feats
        return int(feats.shape[-2])

    def _device(self) -> torch.device:
        return next(self.module.parameters()).device

    def _dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    # -- inputs -----------------------------------------------------------------------------------------------------

    def _processor(self) -> Any:
        proc = self.tokenizer
        if proc is None or not hasattr(proc, "image_processor"):
            raise InputError("(text, image) input needs the model's processor", expected="a model loaded with a "
                             "processor (attnscope.load on a saved folder)", got=type(proc).__name__,
                             fix="pass a dict with input_ids, pixel_values and attention_mask")
        return proc

    def _from_text_and_image(self, text: Any, images: Any) -> dict[str, Any]:
        proc = self._processor()
        texts = [text] if isinstance(text, str) else list(text)
        marker = getattr(proc, "image_token", "<image>")
        texts = [t if marker in t else f"{marker} {t}" for t in texts]
        return dict(proc(text=texts, images=images, return_tensors="pt", padding=True))

    def _check_image_tokens(self, kwargs: dict[str, Any]) -> None:
        if "input_ids" not in kwargs or "pixel_values" not in kwargs:
            raise InputError("VLM input incomplete", expected="input_ids and pixel_values",
                             got=sorted(kwargs), fix="use (text, image) with a processor, or give both tensors")
        n_images = int(kwargs["pixel_values"].shape[0])
        found = int((kwargs["input_ids"] == image_token_id(self.module.config)).sum())
        expected = n_images * self.tokens_per_image()
        if found != expected:
            raise InputError("image tokens do not match the images", expected=f"{expected} image tokens "
                             f"({n_images} image(s) x {self.tokens_per_image()})", got=f"{found} image tokens",
                             fix="put config.image_token_id exactly that many times per image in input_ids")

    def prepare(self, inputs: Any) -> Prepared:
        if isinstance(inputs, tuple) and len(inputs) == 2:
            kwargs = self._from_text_and_image(*inputs)
        elif isinstance(inputs, dict) and ("text" in inputs or "images" in inputs):
            kwargs = self._from_text_and_image(inputs.get("text", ""), inputs.get("images"))
        elif isinstance(inputs, dict):
            kwargs = dict(inputs)
        else:
            raise InputError("unsupported VLM input", expected="dict(input_ids, pixel_values, attention_mask) or "
                             "(text, image)", got=type(inputs).__name__)
        self._check_image_tokens(kwargs)
        limit = max_positions_of(self.module.config.text_config)
        if limit and kwargs["input_ids"].shape[-1] > limit:
            from ...errors import InputTooLongError

            raise InputTooLongError("input longer than the model's context", expected=f"<= {limit} tokens",
                                    got=f"{kwargs['input_ids'].shape[-1]} tokens", fix="shorten the text")
        device, dtype = self._device(), self._dtype()
        kwargs = {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) if torch.is_tensor(v) else v
                  for k, v in kwargs.items()}
        return Prepared(kwargs, self.token_info(kwargs["input_ids"], kwargs.get("attention_mask")))

    def token_info(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> TokenInfo:
        """Ids, strings, and spans of the first item: ``image`` runs of image tokens, ``special``, ``text``."""
        tokenizer = getattr(self.tokenizer, "tokenizer", self.tokenizer)
        ids = input_ids.tolist()
        strings = [tokenizer.convert_ids_to_tokens(row) for row in ids] if tokenizer is not None else None
        image_id = image_token_id(self.module.config)
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        spans: list[Span] = []
        n_images = 0
        for pos, tok in enumerate(ids[0] if ids else []):
            modality = "image" if tok == image_id else "special" if tok in special else "text"
            if spans and spans[-1].modality == modality and modality != "special" and spans[-1].end == pos:
                spans[-1] = Span(modality, spans[-1].start, pos + 1, spans[-1].label)
                continue
            label = f"image{n_images}" if modality == "image" else (strings[0][pos] if strings and
                                                                   modality == "special" else "")
            n_images += modality == "image"
            spans.append(Span(modality, pos, pos + 1, label))
        padding = attention_mask.tolist() if attention_mask is not None else None
        return TokenInfo(ids=ids, strings=strings, spans=spans, padding=padding)

    def sample_inputs(self) -> Any:
        cfg, vcfg = self.module.config, self.module.config.vision_config
        gen = torch.Generator().manual_seed(0)
        image_id, n_img = image_token_id(cfg), self.tokens_per_image()
        vocab = int(cfg.text_config.vocab_size)
        text = torch.randint(0, vocab - 1, (2, 6), generator=gen)
        text[text == image_id] = (image_id + 1) % vocab if image_id is not None else 0
        ids = torch.cat([text[:, :2], torch.full((2, n_img), image_id), text[:, 2:]], dim=1)
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0  # a padded second item exercises the masks
        size = int(getattr(vcfg, "image_size", 224))
        pixels = torch.randn(2, int(getattr(vcfg, "num_channels", 3)), size, size, generator=gen)
        return {"input_ids": ids, "pixel_values": pixels, "attention_mask": mask}

    # -- capture ----------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def instrument(self, recorder: Recorder, implementation: str = "auto") -> Iterator[None]:
        with route_attention(self.module, recorder, self._sites(), implementation) as path:
            self.attention_path = path
            yield

    def reference_patterns(self, prepared: Prepared) -> dict[Site, list[torch.Tensor]]:
        with eager_reference(self.module, self._sites()) as collected:
            self.run(prepared)
        return collected
