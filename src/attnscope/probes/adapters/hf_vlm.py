"""Adapter for transformers vision-language models: a vision tower + a language model, images entering the text
as runs of an image token (LLaVA, LLaVA-NeXT, PaliGemma, Gemma 3, Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM) or
through cross-attention layers (Mllama).

Sites: the language model's attention (tower ``text``; Mllama's cross-attention layers are kind ``cross``) and the
vision tower's attention (tower ``vision``). Layers are numbered per (tower, kind) in forward order: Mllama's text
self-attention layers are 0, 1, ... skipping its cross-attention layers, which are numbered on their own, and its
vision layers run on from the local transformer into the global one. Every site goes through ``hf_route``, so
SDPA stays the kernel and outputs stay bit-identical. Vision towers that pack all images into one sequence
(Qwen2-VL) are recorded as one block-diagonal ``[1, head, token, token]`` call per forward (``hf_vlm_packed``).

Image-token positions (``input_ids == config.image_token_id``) are marked as ``image`` spans in the trace's
``TokenInfo``. Each family's recipe (``hf_vlm_inputs``) says which image inputs its forward needs, fills what its
processor would have derived (Qwen's ``mm_token_type_ids``, Mllama's ``cross_attention_mask``), computes how many
image tokens the model's image path produces, and builds a small valid input (``sample_inputs``).

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

from ...errors import InputError, InputTooLongError
from ..adapter import ModelAdapter, Prepared, register_adapter
from ..model_info import ModelInfo, TowerInfo
from ..recorder import Recorder
from ..site import Site
from ..tokens import Span, TokenInfo
from .hf_route import attention_modules, eager_reference, route_attention
from .hf_text import hf_sites, max_positions_of, tower_info
from .hf_vlm_inputs import check_image_tokens, image_token_of, llava_tokens_per_image, recipe_for
from .hf_vlm_packed import PackedRecorder, packed_modules, packed_reference

_VISION_PARTS = ("vision_tower", "vision_model", "visual", "image_encoder")


def vision_or_text(name: str) -> str:
    """Tower of an attention module from its qualified name."""
    return "vision" if any(part in name.split(".") for part in _VISION_PARTS) else "text"


def image_token_id(config: Any) -> int | None:
    """The token id that stands for image positions in ``input_ids`` (None when the config names none)."""
    return image_token_of(config)


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


def _tower(config: Any, name: str, modules: list[nn.Module], n_layers: int, kinds: list[str]) -> TowerInfo:
    """Tower info from its config, with heads and head size read off its attention modules where they say (a
    Qwen2-VL vision config's ``hidden_size`` is the language model's width, not the tower's)."""
    info = tower_info(config, name, n_layers, kinds)
    module = modules[0] if modules else None
    heads = getattr(module, "num_heads", None) or getattr(module, "num_attention_heads", None)
    if isinstance(heads, int) and heads > 0:
        info.n_heads = heads
        kv = getattr(module, "num_key_value_heads", None)
        groups = getattr(module, "num_key_value_groups", None)
        info.n_kv_heads = kv if isinstance(kv, int) else heads // groups if isinstance(groups, int) and groups \
            else info.n_kv_heads
    d_head = getattr(module, "head_dim", None)
    if isinstance(d_head, int) and d_head > 0:
        info.d_head = d_head
    return info


@register_adapter
class HFVisionLanguageAdapter(ModelAdapter):
    """transformers VLMs: ``config.vision_config`` + ``config.text_config`` + an image token id."""

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

    @property
    def recipe(self) -> Any:
        """The family's input recipe (``hf_vlm_inputs``)."""
        return recipe_for(self.module)

    # -- structure --------------------------------------------------------------------------------------------------

    def _sites(self) -> dict[int, Site]:
        return hf_sites(self.module, tower_of=vision_or_text)

    def info(self) -> ModelInfo:
        site_of = self._sites()
        sites = sorted(site_of.values())
        modules = {id(m): m for _, m in attention_modules(self.module)}
        cfg = self.module.config
        towers = []
        for name, sub in (("text", cfg.text_config), ("vision", cfg.vision_config)):
            tower_sites = [s for s in sites if s.tower == name]
            if tower_sites:
                kinds = sorted({s.kind for s in tower_sites})
                own = [modules[mid] for mid, s in site_of.items() if s.tower == name and s.kind == "self"]
                n_layers = sum(1 for s in tower_sites if s.kind == "self")
                towers.append(_tower(sub, name, own, n_layers, kinds))
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
        """Image tokens the language model expects per image (LLaVA class: a fixed count per image)."""
        if self.recipe.name != "llava":
            raise InputError("this family has no fixed number of image tokens per image", expected="a LLaVA-class "
                             "VLM", got=f"{type(self.module).__name__} ({self.recipe.name} inputs)",
                             fix="count an input's image tokens: adapter.prepare(inputs).tokens.positions('image')")
        return llava_tokens_per_image(self.module)

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
        check_image_tokens(self.module, self.recipe, kwargs)

    def prepare(self, inputs: Any) -> Prepared:
        if isinstance(inputs, tuple) and len(inputs) == 2:
            kwargs = self._from_text_and_image(*inputs)
        elif isinstance(inputs, dict) and ("text" in inputs or "images" in inputs):
            kwargs = self._from_text_and_image(inputs.get("text", ""), inputs.get("images"))
        elif isinstance(inputs, dict):
            kwargs = dict(inputs)
        else:
            raise InputError("unsupported VLM input", expected="dict(input_ids, pixel_values, attention_mask, ...) "
                             "or (text, image)", got=type(inputs).__name__)
        kwargs = self.recipe.complete(self.module, kwargs)
        self._check_image_tokens(kwargs)
        limit = max_positions_of(self.module.config.text_config)
        if limit and kwargs["input_ids"].shape[-1] > limit:
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
        """Two items (the second padded) with images in the family's layout and the matching image tokens."""
        return self.recipe.sample(self.module)

    def run(self, prepared: Prepared) -> Any:
        try:
            return super().run(prepared)
        except ValueError as error:  # the model's own placeholder check, for families no recipe counts for
            message = str(error)
            if "do not match" not in message or "image" not in message.lower():
                raise
            raise InputError("image tokens do not match the images", expected="as many image tokens in input_ids as "
                             "the model's image features", got=message,
                             fix=f"put token id {image_token_id(self.module.config)} that many times in input_ids "
                                 "(the model's processor does)") from error

    # -- capture ----------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def instrument(self, recorder: Recorder, implementation: str = "auto") -> Iterator[None]:
        sites = self._sites()
        packed = packed_modules(self.module, sites)
        with contextlib.ExitStack() as stack:
            if packed:
                recorder = PackedRecorder(recorder, packed, sites)
                stack.enter_context(recorder.hooks())
            path = stack.enter_context(route_attention(self.module, recorder, sites, implementation))
            self.attention_path = path
            yield

    def reference_patterns(self, prepared: Prepared) -> dict[Site, list[torch.Tensor]]:
        sites = self._sites()
        with eager_reference(self.module, sites) as collected:
            with packed_reference(packed_modules(self.module, sites), sites, collected):
                self.run(prepared)
        return collected
