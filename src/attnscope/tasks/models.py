"""Resolve a model reference to its handle: ``attnscope.load`` is ``load_model``.

Example:
    >>> from attnscope.tasks.models import load_model
    >>> model = load_model("zoo:induction-2l")
    >>> model.name, model.family, model.card["data"]["generator"]
    ('zoo:induction-2l', 'hf-text', 'induction')
"""

import json
import os
from typing import Any

from .. import zoo
from ..models.loading import load
from ..probes.adapter import ModelAdapter, ModelLike
from .references import ModelRef
from .._progress import stage

_CACHE: dict[str, ModelAdapter] = {}  # cache=True: the last model loaded by reference, per process


def load_model(model: "str | ModelRef | ModelLike", *, attn_implementation: str | None = None, cache: bool = False,
               **kwargs: Any) -> ModelAdapter:
    """The handle of ``model``: ``"minilm"``, ``"zoo:NAME"``, a local folder, a hub name, a ``ModelRef``, a model
    object (HF, diffusers, TransformerBridge, nnsight; ``tokenizer=`` may come with it) or a handle (returned as it
    is). ``attn_implementation`` and the placement options (``device_map``, ``max_memory``, ``offload_folder``,
    ``dtype``) go to ``from_pretrained``. ``cache``: keep the last model loaded by reference and return it again
    for the same reference and options (sweep workers, the dashboard)."""
    ref = ModelRef.parse(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else model
    return load_ref(ref, attn_implementation=attn_implementation, cache=cache, **kwargs)


def load_ref(ref: "ModelRef | ModelLike", *, attn_implementation: str | None = None, cache: bool = False,
             **kwargs: Any) -> ModelAdapter:
    """``load_model`` of an already parsed reference (or a model object, or a handle)."""
    if isinstance(ref, ModelAdapter):
        return ref
    if cache:
        key = json.dumps([str(ref), attn_implementation, kwargs], sort_keys=True, default=str)
        if key not in _CACHE:
            _CACHE.clear()
            _CACHE[key] = load_ref(ref, attn_implementation=attn_implementation, **kwargs)
        return _CACHE[key]
    if not isinstance(ref, ModelRef):  # a model object
        return load(ref, attn_implementation=attn_implementation, **kwargs)
    stage(f"loading model {ref}")
    source = zoo.model_source(ref.name) if ref.kind == "zoo" else ref.name
    handle = load(source, attn_implementation=attn_implementation, **kwargs)
    handle.name = str(ref)
    if ref.kind == "zoo":
        handle.card = zoo.card_or_none(ref.name)
    return handle


def clear_model_cache() -> None:
    """Forget the model ``load_model(..., cache=True)`` keeps (the next call loads again)."""
    _CACHE.clear()
