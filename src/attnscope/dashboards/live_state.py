"""Server-side state of the live page: the models it may run (loaded once, cached in the app process), the last
few captures (an LRU keyed by a short id the browser holds), and what each view needs from a capture.

A capture of at most ``DENSE_LIMIT`` tokens keeps every layer's full pattern (an ``AttentionTrace``) and the
queries and keys of every layer (``LayerInputs``, one extra forward); a longer input keeps only its tokens: the
long-sequence view computes its block pattern from one layer's queries and keys on demand, row chunk by row chunk.
Every forward of a shared model holds ``MODEL_LOCK`` (the ablation panel's lock: its hooks live on the model).
Image + question (VLM), image only (vision encoder) and prompt + steps (diffusion) captures come from
``LiveSession.media_capture``, a hook the media callbacks install (``live_media``); their ``LiveCapture.media``
says what they hold.

Example:
    >>> from attnscope.dashboards.live_state import parse_ids
    >>> parse_ids("101, 2023 2003\\n102").tolist()
    [[101, 2023, 2003, 102]]
"""

import itertools
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import zoo
from ..errors import InputError
from ..probes.adapter import as_adapter, tokenizer_of
from ..probes.capturing import capture
from ..probes.trace import AttentionTrace
from ..tasks.models import load_model
from ..viz.head_inputs import LayerInputs, collect_layer_inputs
from .ablation import _LOCK as MODEL_LOCK  # one lock for every forward of a shared model (hooks live on it)

DENSE_LIMIT = 512      # tokens: above this only the long-sequence view is drawn
MAX_CAPTURES = 6       # captures kept in memory (oldest dropped first)
MAX_INPUT_CHARS = 400_000
INPUT_MODES = ("text", "ids")
TEXT_ZOO_CLASSES = ("AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModelForMaskedLM",
                    "AutoModel")
MEDIA_ZOO_CLASSES = ("AutoModelForImageTextToText", "DiffusionPipeline")  # live_media: image and diffusion input
_IDS = re.compile(r"[\s,]+")


def parse_ids(text: str) -> torch.Tensor:
    """``[1, n]`` token ids from integers separated by spaces, commas or newlines; InputError otherwise."""
    parts = [p for p in _IDS.split(text.strip()) if p]
    bad = [p for p in parts if not p.isdigit()]
    if not parts or bad:
        raise InputError("token ids must be non-negative integers", expected="e.g. 101 2023 2003 102",
                         got=repr(bad[0] if bad else text)[:60], fix="separate the ids by spaces or commas")
    return torch.tensor([[int(p) for p in parts]], dtype=torch.long)


@dataclass
class LiveCapture:
    """One captured input: tokens, the full trace (short inputs) and per-layer queries and keys (on demand)."""

    key: str
    model_name: str
    inputs: Any
    tokens: list[str]
    n_layers: int
    n_heads: int
    causal: bool
    trace: AttentionTrace | None
    seconds: float
    layers: dict[int, LayerInputs] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds, e.g. "forward to L1" (shown in the page)
    _attn: np.ndarray | None = None
    media: Any = None  # live_media.MediaInfo of an image or diffusion capture, None for text
    tower: str = "text"  # the self-attention tower the input's tokens feed (encoder-decoders: "encoder")

    @property
    def kind(self) -> str:
        """``text``, ``vlm``, ``vision`` or ``diffusion``."""
        return self.media.kind if self.media is not None else "text"

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def dense(self) -> bool:
        return self.trace is not None

    def attn(self) -> np.ndarray:
        """``[layer, head, query, key]`` float32 of the capture (dense captures only)."""
        if self.trace is None:
            raise InputError("input too long for the dense views", expected=f"<= {DENSE_LIMIT} tokens",
                             got=self.n_tokens, fix="use the long-sequence view")
        if self._attn is None:
            self._attn = self.trace.stack(tower=self.tower)[:, 0].float().numpy()
        return self._attn

    def check_head(self, layer: int, head: int) -> tuple[int, int]:
        if not (0 <= int(layer) < self.n_layers and 0 <= int(head) < self.n_heads):
            raise InputError("head out of range", expected=f"L0..L{self.n_layers - 1}, H0..H{self.n_heads - 1}",
                             got=f"L{layer}H{head}", fix="click a thumbnail of the model view")
        return int(layer), int(head)


class LiveSession:
    """Models and captures of one app process. ``model`` is the handle the app was started with (or None)."""

    def __init__(self, model: Any = None, model_name: str | None = None):
        self.default = (model_name or getattr(model, "name", None) or "model") if model is not None else None
        self._models: dict[str, Any] = {self.default: model} if model is not None else {}
        self._captures: "OrderedDict[str, LiveCapture]" = OrderedDict()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        # (handle, name, raw text, media inputs) -> LiveCapture, or None for a text model (set by live_media)
        self.media_capture: Callable[[Any, str, str, Any], "LiveCapture | None"] | None = None

    def choices(self) -> list[str]:
        """Models the page offers: the app's model, MiniLM, the zoo's trained text, VLM and diffusion organisms."""
        names = [self.default] if self.default else []
        names.append("minilm")
        try:
            names += [f"zoo:{o['name']}" for o in zoo.list_organisms()
                      if o.get("trained") and o.get("auto_class") in TEXT_ZOO_CLASSES + MEDIA_ZOO_CLASSES]
        except Exception:  # noqa: BLE001 - a broken zoo folder must not break the page
            pass
        return list(dict.fromkeys(names))

    def model(self, name: str | None) -> Any:
        """The handle of ``name`` (one of ``choices()``), loaded on first use and kept."""
        name = name or self.default or "minilm"
        if name not in self.choices():
            raise InputError("model not offered by this page", expected=self.choices(), got=str(name)[:80],
                             fix="start the dashboard with --model NAME_OR_FOLDER for another model")
        with self._lock:
            if name not in self._models:
                self._models[name] = load_model(name)
            return self._models[name]

    def get(self, key: str | None) -> LiveCapture:
        with self._lock:
            if key not in self._captures:
                raise InputError("capture not in memory", expected="a capture of this page", got=str(key)[:40],
                                 fix="press capture again (only the last few captures are kept)")
            self._captures.move_to_end(key)
            return self._captures[key]

    def capture(self, name: str | None, raw: str, mode: str = "text", media: Any = None) -> LiveCapture:
        """Run the model on ``raw`` (text, or ids with ``mode="ids"``) and keep what the views need. ``media``:
        the image / diffusion controls, for ``media_capture`` (VLMs and diffusion pipelines)."""
        handle = self.model(name)
        name = name or self.default or "minilm"
        start = time.perf_counter()
        cap = self.media_capture(handle, name, raw, media) if self.media_capture is not None else None
        if cap is None:
            inputs = _inputs(handle, raw, mode)
            start = time.perf_counter()
            with MODEL_LOCK:
                cap = _capture(handle, inputs, name)
        cap.seconds = time.perf_counter() - start
        with self._lock:
            cap.key = f"c{next(self._ids)}"
            self._captures[cap.key] = cap
            while len(self._captures) > MAX_CAPTURES:
                self._captures.popitem(last=False)
        return cap

    def layer_inputs(self, cap: LiveCapture, layer: int) -> LayerInputs | None:
        """Queries and keys of ``layer`` for ``cap`` (one forward up to that layer, then cached); None for a
        diffusion capture (its views say what they show instead)."""
        if cap.kind == "diffusion":
            return None
        if layer not in cap.layers:
            handle = self.model(cap.model_name)
            with MODEL_LOCK:
                start = time.perf_counter()
                cap.layers.update(collect_layer_inputs(handle, cap.inputs, [layer], tower=cap.tower))
                cap.timings[f"forward to L{layer}"] = time.perf_counter() - start
        return cap.layers[layer]


def _inputs(handle: Any, raw: Any, mode: str) -> Any:
    if mode not in INPUT_MODES:
        raise InputError("unknown input mode", expected=INPUT_MODES, got=mode)
    if not isinstance(raw, str) or not raw.strip():
        raise InputError("nothing to capture", expected="a sentence (or token ids)", got=repr(raw)[:40],
                         fix="type a sentence in the box")
    if len(raw) > MAX_INPUT_CHARS:
        raise InputError("input too long", expected=f"<= {MAX_INPUT_CHARS} characters", got=len(raw))
    if mode == "ids":
        return parse_ids(raw)
    if tokenizer_of(handle) is None:
        raise InputError("this model has no tokenizer", expected="token ids", got="text",
                         fix="switch the input to ids and type token ids")
    return raw


def _capture(handle: Any, inputs: Any, name: str) -> LiveCapture:
    adapter = as_adapter(handle)
    towers = [t.name for t in adapter.info().towers]
    tower = adapter.info().tower("text" if "text" in towers else "encoder")  # what the tokens feed
    causal = any(site.tower == tower.name for site in adapter.causal_sites())
    prepared = adapter.prepare(inputs)
    ids = prepared.kwargs["input_ids"][0].tolist()
    tokens = prepared.tokens.strings[0] if prepared.tokens.strings else [str(i) for i in ids]
    trace, layers = None, {}
    if len(tokens) <= DENSE_LIMIT:
        trace = capture(handle, inputs)
        layers = collect_layer_inputs(handle, inputs, range(tower.n_layers), tower=tower.name)
    return LiveCapture("", name, inputs, list(tokens), tower.n_layers, tower.n_heads, causal, trace, 0.0, layers,
                       tower=tower.name)


__all__ = ["DENSE_LIMIT", "INPUT_MODES", "LiveCapture", "LiveSession", "MODEL_LOCK", "parse_ids"]
