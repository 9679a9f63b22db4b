"""Adapter for transformers text models: every decoder and encoder whose attention calls ``ALL_ATTENTION_FUNCTIONS``
(GPT-2, Llama/Qwen/Mistral with GQA and RoPE, GPT-NeoX, OPT, Falcon, Phi-3, DeepSeek MLA, GPT-OSS, BERT, ModernBERT
...) and encoder-decoders (T5, BART, Marian, Pegasus ...): towers ``encoder`` and ``decoder``, kinds ``self`` and
``cross``; given only encoder ids, the decoder gets the ids shifted right behind its start token (``decoder_start``).

Example:
    >>> import torch, transformers
    >>> from attnscope.probes.adapters.hf_text import HFTextAdapter
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2)
    >>> adapter = HFTextAdapter(transformers.LlamaForCausalLM(cfg).eval())
    >>> info = adapter.info()
    >>> (info.tower().n_layers, info.tower().n_heads, info.tower().n_kv_heads)
    (2, 4, 2)
"""

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ...errors import InputError, InputTooLongError
from ..adapter import ModelAdapter, Prepared, register_adapter
from ..device_map import input_device
from ..model_info import ModelInfo, TowerInfo
from ..recorder import Recorder
from ..shared_layers import expand_sites, split_calls
from ..site import Site
from ..tokens import Span, TokenInfo
from .hf_route import attention_modules, eager_reference, route_attention

SAMPLE_SENTENCES = ["The cat sat on the mat because it was warm.", "Attention is all you need."]


def is_cross_attention(name: str, module: nn.Module) -> bool:
    """Cross-attention (T5 ``EncDecAttention``, BART ``encoder_attn``, ``crossattention`` ...) from module and name."""
    flat = name.replace("_", "").lower()
    return bool(getattr(module, "is_cross_attention", False)) or "cross" in type(module).__name__.lower() \
        or "crossattention" in flat or flat.endswith(("encdecattention", "encoderattn"))


def encoder_decoder_tower(name: str) -> str:
    """``encoder`` or ``decoder`` from an attention module's qualified name (T5, BART, Whisper, Marian ...)."""
    parts = name.split(".")
    return "decoder" if "decoder" in parts else "encoder"


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def hf_sites(model: nn.Module, tower_of=lambda name: "text") -> dict[int, Site]:
    """id(attention module) -> Site, numbering layers per (tower, kind) in forward order."""
    counters: dict[tuple[str, str], int] = {}
    sites: dict[int, Site] = {}
    for name, module in attention_modules(model):
        tower, kind = tower_of(name), "cross" if is_cross_attention(name, module) else "self"
        layer = counters.get((tower, kind), 0)
        counters[(tower, kind)] = layer + 1
        sites[id(module)] = Site(tower=tower, layer=layer, kind=kind)
    return sites


def _widest(value: Any) -> int:
    """An int config field, or the largest of a per-stage list (Swin's ``num_heads``)."""
    return max(int(v) for v in value) if isinstance(value, (list, tuple)) else int(value or 0)


def tower_info(config: Any, name: str, n_layers: int, kinds: list[str]) -> TowerInfo:
    """Tower layout from the config; hierarchical models (Swin) give their widest stage's head count."""
    n_heads = _widest(getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", None)
                      or getattr(config, "n_head", 0))
    n_kv = _widest(getattr(config, "num_key_value_heads", None) or n_heads)
    hidden = _widest(getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0))
    d_head = int(getattr(config, "head_dim", None) or (hidden // max(n_heads, 1)))
    return TowerInfo(name=name, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, d_head=d_head, kinds=kinds)


def token_info(input_ids: torch.Tensor, tokenizer: Any, attention_mask: torch.Tensor | None) -> TokenInfo:
    """Ids, strings and special-token spans of a batch (spans from the first item)."""
    ids = input_ids.tolist()
    strings = [tokenizer.convert_ids_to_tokens(row) for row in ids] if tokenizer is not None else None
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    first = ids[0] if ids else []
    merged: list[Span] = []
    start = 0  # neighbouring text positions form one span
    for pos, tok in enumerate(first):
        if tok in special:
            if start < pos:
                merged.append(Span("text", start, pos))
            merged.append(Span("special", pos, pos + 1, strings[0][pos] if strings else ""))
            start = pos + 1
    if start < len(first):
        merged.append(Span("text", start, len(first)))
    padding = attention_mask.tolist() if attention_mask is not None else None
    return TokenInfo(ids=ids, strings=strings, spans=merged, padding=padding)


def tokenize(inputs: Any, tokenizer: Any, device: torch.device, max_positions: int | None) -> dict[str, torch.Tensor]:
    """Turn text, a list of texts, an id tensor or a dict of tensors into forward kwargs; check the length."""
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], str)):
        if tokenizer is None:
            raise InputError("text input needs a tokenizer", expected="token ids or a model loaded with a tokenizer",
                             got="text", fix="save a tokenizer with the model, or pass token ids (a tensor; "
                             "on the command line --ids 5,17,3)")
        kwargs = dict(tokenizer(inputs, return_tensors="pt", padding=True))
    elif torch.is_tensor(inputs):
        kwargs = {"input_ids": inputs if inputs.ndim == 2 else inputs[None]}
    elif isinstance(inputs, dict):
        kwargs = dict(inputs)
    else:
        raise InputError("unsupported input", expected="str, list[str], id tensor or dict of tensors",
                         got=type(inputs).__name__)
    length = kwargs["input_ids"].shape[-1] if "input_ids" in kwargs else None
    if max_positions and length and length > max_positions:
        raise InputTooLongError("input longer than the model's context", expected=f"<= {max_positions} tokens",
                                got=f"{length} tokens", fix="shorten the input or select a window")
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}


def decoder_start(config: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced decoder ids for an encoder-decoder given only encoder ids: the inputs shifted right behind the
    decoder start token (T5's and BART's ``shift_right``), so every decoder and cross-attention site runs."""
    start = getattr(config, "decoder_start_token_id", None)
    for fallback in ("bos_token_id", "pad_token_id"):
        start = getattr(config, fallback, None) if start is None else start
    if start is None:
        raise InputError("encoder-decoder input without decoder ids", expected="decoder_input_ids, or a config with "
                         "decoder_start_token_id", got=sorted(vars(config))[:0] or "neither",
                         fix="pass {'input_ids': ..., 'decoder_input_ids': ...}")
    column = torch.full_like(input_ids[:, :1], int(start))
    return torch.cat([column, input_ids[:, :-1]], 1)


def max_positions_of(config: Any) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if value:
            return int(value)
    return None


def _module_by_id(model: nn.Module, mid: int) -> nn.Module | None:
    return next((m for m in model.modules() if id(m) == mid), None)


def _is_causal(model: nn.Module) -> bool:
    return any(getattr(m, "is_causal", False) for _, m in attention_modules(model))


@register_adapter
class HFTextAdapter(ModelAdapter):
    """transformers causal LMs and encoders whose attention dispatches through ``AttentionInterface``."""

    family = "hf-text"
    priority = 10

    @classmethod
    def matches(cls, module: Any) -> bool:
        from transformers import PreTrainedModel

        if not isinstance(module, PreTrainedModel) or hasattr(module.config, "vision_config"):
            return False
        return bool(attention_modules(module))

    def _sites(self) -> dict[int, Site]:
        if is_encoder_decoder(self.module):  # towers encoder / decoder; kinds self / cross
            return hf_sites(self.module, encoder_decoder_tower)
        return hf_sites(self.module)

    def info(self) -> ModelInfo:
        sites = expand_sites(self.module, sorted(self._sites().values()))  # ALBERT: one site per application
        cfg = self.module.config
        towers = []
        for tower in dict.fromkeys(s.tower for s in sites):
            mine = [s for s in sites if s.tower == tower]
            n_layers = sum(1 for s in mine if s.kind == "self")
            towers.append(tower_info(cfg, tower, n_layers, sorted({s.kind for s in mine})))
        family = "encoder-decoder" if is_encoder_decoder(self.module) else \
            "causal-lm" if _is_causal(self.module) else "encoder"
        return ModelInfo(family=family, adapter=type(self).__name__, towers=towers, sites=sites,
                         attn_implementation=str(cfg._attn_implementation), max_positions=max_positions_of(cfg),
                         name=self.name or getattr(cfg, "_name_or_path", ""))

    def prepare(self, inputs: Any) -> Prepared:
        device = input_device(self.module)
        kwargs = tokenize(inputs, self.tokenizer, device, max_positions_of(self.module.config))
        if is_encoder_decoder(self.module) and "decoder_input_ids" not in kwargs and "labels" not in kwargs:
            kwargs["decoder_input_ids"] = decoder_start(self.module.config, kwargs["input_ids"])
        return Prepared(kwargs, token_info(kwargs["input_ids"], self.tokenizer, kwargs.get("attention_mask")))

    @contextlib.contextmanager
    def instrument(self, recorder: Recorder, implementation: str = "auto") -> Iterator[None]:
        with route_attention(self.module, recorder, self._sites(), implementation) as path:
            self.attention_path = path
            yield

    def sample_inputs(self) -> Any:
        if self.tokenizer is not None:
            return list(SAMPLE_SENTENCES)
        vocab = int(getattr(self.module.config, "vocab_size", 50))
        ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0  # a padded second item exercises the masks
        return {"input_ids": ids, "attention_mask": mask}

    def reference_patterns(self, prepared: Prepared) -> dict[Site, list[torch.Tensor]]:
        with eager_reference(self.module, self._sites()) as collected:
            self.run(prepared)
        return split_calls(self.module, collected)

    def causal_sites(self) -> set[Site]:
        return {site for mid, site in self._sites().items()
                if getattr(_module_by_id(self.module, mid), "is_causal", False) and site.kind == "self"}
