"""Images and diffusion on the live page: what kind of model a name is, the input images (built-in shapes scenes
or an uploaded PNG/JPEG, decoded with Pillow only), the captures of a VLM (image + question), of a vision encoder
(image only: ViT, DINOv2, CLIP/SigLIP vision towers) and of a diffusion pipeline (prompt + steps + seed), and the
maps the page draws from them.

A VLM capture is a ``LiveCapture`` of the language model's sequence (image tokens + question, so every text view
works on it) with ``media`` telling where the image tokens are. A diffusion capture keeps the cross-attention of
every step (``LiveCapture.trace``; layers = cross-attention sites) and the generated image; a word's map at a step
is ``attnscope.circuits.daam.daam_from_trace`` of that trace, the DAAM aggregation ``daam_maps`` uses. A vision
encoder capture is a ``LiveCapture`` of the ``vision`` tower: tokens ``[CLS]`` (when the model has one) and
``patch r,c``, ``pixel_values`` made by the model's image processor (else a ViT image processor, mean / std 0.5).

Example:
    >>> from attnscope.dashboards.live_media import decode_upload, patch_tokens, zoo_kind
    >>> zoo_kind("zoo:shapes-vlm"), zoo_kind("zoo:shapes-diffusion"), zoo_kind("minilm")
    ('vlm', 'diffusion', 'text')
    >>> patch_tokens((2, 2), 1)
    ['[CLS]', 'patch 0,0', 'patch 0,1', 'patch 1,0', 'patch 1,1']
    >>> decode_upload("data:image/png;base64,aGVsbG8=", "x.png")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    attnscope.errors.InputError: not a PNG or JPEG image: ...
"""

import base64
import binascii
import io
import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import zoo
from ..circuits._diffusion import word_positions
from ..circuits.attention_rollout import rollout
from ..circuits.daam import daam_from_trace
from ..datasets.image_suite import image_processor_for
from ..datasets.shapes import make_scene
from ..errors import InputError
from ..probes.adapter import as_adapter
from ..probes.adapters.diffusers_pipeline import PipelineAdapter
from ..probes.adapters.hf_encoders import HFVisionEncoderAdapter
from ..probes.adapters.hf_vlm import HFVisionLanguageAdapter
from ..probes.capturing import capture
from ..probes.site import Site
from ..tasks.heatmap_job import image_of
from ..viz.head_inputs import collect_layer_inputs
from ..viz.images import GridMap
from .live_state import MODEL_LOCK, LiveCapture, _capture

KINDS = ("text", "vlm", "vision", "diffusion")
ZOO_KINDS = {"AutoModelForImageTextToText": "vlm", "DiffusionPipeline": "diffusion"}
MAX_UPLOAD_BYTES = 5 * 2 ** 20
MAX_UPLOAD_SIDE = 2048
MAX_STEPS = 50
GUIDANCE = 3.0           # classifier-free guidance of the diffusion run (the shapes organism's sampling setting)
EXAMPLE_SEED = 7         # built-in images: shapes scenes (EXAMPLE_SEED, 0..N_EXAMPLES-1)
N_EXAMPLES = 4
MAP_KINDS = ("rollout", "head")
MAX_TEXT_CHARS = 400     # question / prompt


@dataclass
class MediaInfo:
    """What an image or diffusion capture adds to a ``LiveCapture``.

    kind: ``vlm``, ``vision`` or ``diffusion``; image: ``[H, W, 3]`` uint8 (the input image, or the generated one);
    label: where the image came from; image_positions: the image-token (patch) positions (row-major patch grid);
    grid: its ``(rows, cols)``; words: word -> text-key positions of the prompt (diffusion); sites: the
    cross-attention sites (the capture's "layers"); steps, seed: the diffusion run.
    """

    kind: str
    image: np.ndarray
    label: str
    image_positions: list[int] = field(default_factory=list)
    grid: tuple[int, int] = (0, 0)
    words: dict[str, list[int]] = field(default_factory=dict)
    sites: list[Site] = field(default_factory=list)
    steps: int = 0
    seed: int = 0


def zoo_kind(name: str) -> str:
    """``vlm`` / ``diffusion`` for a zoo organism of that kind, else ``text`` (no model is loaded)."""
    if not str(name).startswith("zoo:"):
        return "text"
    try:
        organisms = {o["name"]: o for o in zoo.list_organisms()}
    except Exception:  # noqa: BLE001 - a broken zoo folder must not break the page
        return "text"
    return ZOO_KINDS.get(str(organisms.get(str(name)[4:], {}).get("auto_class")), "text")


def model_kind(handle: Any) -> str:
    """``vlm``, ``vision`` (an encoder reading ``pixel_values`` only), ``diffusion`` or ``text`` for a loaded
    model handle."""
    adapter = as_adapter(handle)
    if isinstance(adapter, HFVisionLanguageAdapter):
        return "vlm"
    if isinstance(adapter, HFVisionEncoderAdapter) and getattr(adapter.module, "main_input_name", "") == "pixel_values":
        return "vision"
    return "diffusion" if isinstance(adapter, PipelineAdapter) else "text"


def media_zoo_names() -> list[str]:
    """``zoo:NAME`` of the trained VLM and diffusion organisms."""
    try:
        return [f"zoo:{o['name']}" for o in zoo.list_organisms()
                if o.get("trained") and o.get("auto_class") in ZOO_KINDS]
    except Exception:  # noqa: BLE001
        return []


def example_images() -> list[dict[str, str]]:
    """Dropdown options of the built-in images: shapes scenes, labelled with their captions."""
    return [{"label": f"scene {i}: {make_scene(EXAMPLE_SEED, i).caption}", "value": f"example:{i}"}
            for i in range(N_EXAMPLES)]


def decode_upload(contents: str, filename: str | None = None) -> np.ndarray:
    """``[H, W, 3]`` uint8 of an uploaded PNG/JPEG (a ``dcc.Upload`` data URL); InputError for anything else.

    Size limits: ``MAX_UPLOAD_BYTES`` of file, ``MAX_UPLOAD_SIDE`` pixels a side. Decoded by Pillow only.
    """
    from PIL import Image, UnidentifiedImageError

    name = repr(str(filename or "upload"))[:60]
    if not isinstance(contents, str) or "," not in contents:
        raise InputError("upload not readable", expected="a PNG or JPEG file", got=name, fix="upload an image")
    try:
        data = base64.b64decode(contents.split(",", 1)[1], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError("upload not readable", expected="a PNG or JPEG file", got=name) from exc
    if len(data) > MAX_UPLOAD_BYTES:
        raise InputError("image file too large", expected=f"<= {MAX_UPLOAD_BYTES // 2 ** 20} MB",
                         got=f"{len(data) / 2 ** 20:.1f} MB", fix="upload a smaller image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ("PNG", "JPEG"):
                raise InputError("not a PNG or JPEG image", expected="PNG | JPEG", got=f"{img.format} ({name})")
            if max(img.size) > MAX_UPLOAD_SIDE:
                raise InputError("image too large", expected=f"<= {MAX_UPLOAD_SIDE} px a side",
                                 got=f"{img.size[0]}x{img.size[1]}", fix="upload a smaller image")
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InputError("not a PNG or JPEG image", expected="PNG | JPEG", got=name,
                         fix="upload a .png or .jpg file") from exc


class Uploads:
    """Decoded uploads of this app process, by a short key the image dropdown holds (the last few kept)."""

    def __init__(self, keep: int = 8):
        self._images: "OrderedDict[str, tuple[np.ndarray, str]]" = OrderedDict()
        self._lock, self._ids, self._keep = threading.Lock(), itertools.count(1), keep

    def add(self, image: np.ndarray, name: str) -> str:
        with self._lock:
            key = f"upload:u{next(self._ids)}"
            self._images[key] = (image, name)
            while len(self._images) > self._keep:
                self._images.popitem(last=False)
            return key

    def get(self, key: str) -> tuple[np.ndarray, str]:
        with self._lock:
            if key not in self._images:
                raise InputError("uploaded image not in memory", expected="a recent upload", got=key[:40],
                                 fix="upload the image again")
            return self._images[key]


def resolve_image(value: Any, uploads: Uploads) -> tuple[np.ndarray, str]:
    """(image, label) of the image dropdown's value: ``example:I`` or an upload key."""
    value = str(value or "")
    if value.startswith("upload:"):
        image, name = uploads.get(value)
        return image, f"upload {name}"
    if value.startswith("example:") and value[8:].isdigit() and int(value[8:]) < N_EXAMPLES:
        index = int(value[8:])
        return make_scene(EXAMPLE_SEED, index).image, f"example scene {index}"
    raise InputError("no image picked", expected="an example image or an upload", got=value[:40] or "nothing picked",
                     fix="pick an image in the image list (or upload a PNG/JPEG)")


def image_size(handle: Any) -> int:
    """The square input size of a VLM's vision tower or a vision encoder (``config.image_size``; 0 if none)."""
    config = getattr(getattr(as_adapter(handle), "module", None), "config", None)
    size = getattr(getattr(config, "vision_config", None) or config, "image_size", 0) or 0
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def fit_image(image: np.ndarray, handle: Any) -> np.ndarray:
    """``image`` resized (Pillow, bilinear) to the model's input size when it differs."""
    from PIL import Image

    size = image_size(handle)
    if not size or image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def capture_media(uploads: Uploads, handle: Any, name: str, raw: Any, media: Any) -> LiveCapture | None:
    """The capture of a VLM (question ``raw`` on the picked image), a vision encoder (the picked image; ``raw``
    unused) or a diffusion pipeline (prompt ``raw``); None for a text model. ``media``: (image dropdown value,
    steps, seed) from the page."""
    kind = model_kind(handle)
    if kind == "text":
        return None
    if kind == "vision":
        return capture_vision(uploads, handle, name, (list(media or []) + [None])[0])
    what = "question" if kind == "vlm" else "prompt"
    if not isinstance(raw, str) or not raw.strip() or len(raw) > MAX_TEXT_CHARS:
        raise InputError(f"no usable {what}", expected=f"a {what} of 1..{MAX_TEXT_CHARS} characters",
                         got=repr(raw)[:40], fix=f"type the {what} in the text box")
    image_value, steps, seed = (list(media or []) + [None] * 3)[:3]
    if kind == "diffusion":
        with MODEL_LOCK:
            return capture_diffusion(handle, name, raw.strip(), steps, seed)
    image, label = resolve_image(image_value, uploads)
    image = fit_image(image, handle)
    with MODEL_LOCK:
        cap = _capture(handle, (raw.strip(), image), name)
    cap.media = vlm_media(cap, image, label)
    return cap


def pixel_values(handle: Any, image: np.ndarray) -> torch.Tensor:
    """``[1, 3, s, s]`` pixel values of ``image`` for a vision encoder: its own image processor when the handle
    has one, else a ViT image processor at the model's size (``datasets.image_suite.image_processor_for``)."""
    processor = image_processor_for(handle, image_size(handle) or image.shape[0])  # what the images suite uses
    return processor(images=[image], return_tensors="pt")["pixel_values"].to(torch.float32)


def patch_tokens(grid: tuple[int, int], n_prefix: int) -> list[str]:
    """``[CLS]`` (and ``[REG i]`` for further prefix tokens) then ``patch r,c`` row-major."""
    prefix = ["[CLS]"] + [f"[REG {i}]" for i in range(1, n_prefix)] if n_prefix else []
    return prefix + [f"patch {r},{c}" for r in range(grid[0]) for c in range(grid[1])]


def capture_vision(uploads: Uploads, handle: Any, name: str, image_value: Any) -> LiveCapture:
    """The capture of a vision encoder on the picked image (no text): every layer of the ``vision`` tower."""
    image, label = resolve_image(image_value, uploads)
    image = fit_image(image, handle)
    adapter = as_adapter(handle)
    tower = adapter.info().tower("vision")
    inputs = {"pixel_values": pixel_values(handle, image), "output_hidden_states": True}
    with MODEL_LOCK:
        trace = capture(handle, inputs)
        layers = collect_layer_inputs(handle, inputs, range(tower.n_layers), tower="vision")
    spans = {s.modality: s for s in trace.tokens.spans}
    grid, patches = trace.tokens.grid, spans.get("image")
    if not grid or patches is None or patches.end - patches.start != grid[0] * grid[1]:
        raise InputError("the encoder's tokens do not form a patch grid", expected="[CLS] + rows x cols patches",
                         got=trace.tokens.spans, fix="use a ViT-class encoder (ViT, DeiT, DINOv2, CLIP/SigLIP vision)")
    tokens = patch_tokens(tuple(grid), patches.start)
    cap = LiveCapture("", name, inputs, tokens, tower.n_layers, tower.n_heads, False, trace, 0.0, layers,
                      tower="vision")
    cap.media = MediaInfo("vision", image, label, list(range(patches.start, patches.end)), tuple(grid))
    return cap


def vlm_media(cap: LiveCapture, image: np.ndarray, label: str) -> MediaInfo:
    """The image-token positions of a VLM capture (a square patch grid) as ``MediaInfo``."""
    positions = cap.trace.tokens.positions("image")
    side = int(round(len(positions) ** 0.5))
    if not positions or side * side != len(positions):
        raise InputError("image tokens do not form a square patch grid", expected="n x n image tokens",
                         got=len(positions), fix="use a LLaVA-class model with one image")
    return MediaInfo("vlm", image, label, positions, (side, side))


def capture_diffusion(handle: Any, name: str, prompt: str, steps: Any, seed: Any) -> LiveCapture:
    """Run the pipeline once (``steps`` denoising steps, ``seed``) and keep every step's cross-attention."""
    steps, seed = _int(steps, "steps", 1, MAX_STEPS), _int(seed, "seed", 0, 2 ** 31 - 1)
    adapter = as_adapter(handle)
    inputs = {"prompt": [prompt], "num_inference_steps": steps, "guidance_scale": GUIDANCE,
              "generator": torch.Generator().manual_seed(seed), "output_type": "np"}
    trace = capture(handle, inputs, sites=lambda s: s.kind in ("cross", "joint"))
    image = image_of(trace.output)
    if image is None:
        raise InputError("the pipeline returned no image", expected="an image output", got=type(trace.output))
    sites = sorted({s for s in trace.sites})
    words = {w: word_positions(adapter.module, prompt, w) for w in dict.fromkeys(prompt.split())}
    words = {w: p for w, p in words.items() if p}
    if not words:
        raise InputError("no word of the prompt found in the tokenizer's tokens", expected="words of the prompt",
                         got=prompt[:60])
    strings = trace.tokens.strings[0] if trace.tokens.strings else []
    n_heads = max(len(trace.get(s, 0).heads()) for s in sites)
    media = MediaInfo("diffusion", _uint8(image), f"generated, {steps} steps, seed {seed}", words=words,
                      sites=sites, steps=steps, seed=seed)
    return LiveCapture("", name, inputs, list(strings), len(sites), n_heads, False, trace, 0.0, media=media)


def _int(value: Any, what: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not low <= number <= high:
        raise InputError(f"bad {what}", expected=f"an integer {low}..{high}", got=repr(value)[:30])
    return number


def _uint8(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image, dtype=np.float32)
    if array.max() <= 1.0:
        array = array * 255.0
    return np.clip(np.round(array), 0, 255).astype(np.uint8)[..., :3]


def readout_query(cap: LiveCapture) -> tuple[int, str]:
    """(position, description) of the query the image maps read: the first token ([CLS]) of a vision encoder,
    the last token of a VLM."""
    if cap.kind == "vision":
        return 0, f"the first token {cap.tokens[0]!r}"
    return cap.n_tokens - 1, f"the last token {cap.tokens[-1]!r}"


def vlm_image_map(cap: LiveCapture, how: str, layer: int, head: int) -> GridMap:
    """The image-grid map of a VLM or vision-encoder capture: ``rollout`` (Abnar & Zuidema, after the last layer,
    read out at ``readout_query``) or ``head`` (the selected head's attention from that query), on the patches."""
    media = cap.media
    query, what = readout_query(cap)
    if how == "rollout":
        values = np.asarray(rollout(cap.attn(), readout=query))[-1]
        grid = values[media.image_positions].reshape(media.grid)
        return GridMap(grid, f"attention rollout from {what} to the image patches")
    if how != "head":
        raise InputError("unknown image map", expected=MAP_KINDS, got=how)
    layer, head = cap.check_head(layer, head)
    return GridMap(vlm_head_maps(cap, layer)[head], f"L{layer} H{head}: attention from {what} to the image patches")


def vlm_head_maps(cap: LiveCapture, layer: int) -> np.ndarray:
    """``[head, rows, cols]``: every head of ``layer``, readout query (last token; [CLS] of an encoder) ->
    image patches (the query's pattern row at ``media.image_positions``, row-major)."""
    query = readout_query(cap)[0]
    rows = cap.attn()[int(layer), :, query][:, cap.media.image_positions]
    return rows.reshape(len(rows), *cap.media.grid)


def check_word_step(cap: LiveCapture, word: Any, step: Any) -> tuple[str, list[int] | None]:
    """(word, steps) for ``daam_from_trace``: ``step`` ``"all"`` (summed, as DAAM does) or one step index."""
    media = cap.media
    if word not in media.words:
        raise InputError("word not in the prompt", expected=list(media.words), got=str(word)[:40])
    if step in (None, "all"):
        return str(word), None
    return str(word), [_int(step, "step", 0, media.steps - 1)]


def daam_map(cap: LiveCapture, word: Any, step: Any) -> np.ndarray:
    """DAAM map ``[H, W]`` (image size) of ``word`` at ``step`` (or summed over all steps)."""
    word, steps = check_word_step(cap, word, step)
    size = tuple(cap.media.image.shape[:2])
    result = daam_from_trace(cap.trace, {word: cap.media.words[word]}, steps=steps, size=size)
    return result.maps[0, 0].numpy()


def daam_head_maps(cap: LiveCapture, site_index: Any, word: Any, step: Any) -> np.ndarray:
    """``[head, H, W]``: DAAM of ``word`` at ``step`` restricted to one site and one head at a time."""
    word, steps = check_word_step(cap, word, step)
    site = cap.media.sites[_int(site_index, "site", 0, len(cap.media.sites) - 1)]
    size = tuple(cap.media.image.shape[:2])
    return np.stack([daam_from_trace(cap.trace, {word: cap.media.words[word]}, steps=steps, sites=[site],
                                     heads=[h], size=size).maps[0, 0].numpy() for h in range(cap.n_heads)])


def token_mass(cap: LiveCapture) -> np.ndarray:
    """Per prompt token: its cross-attention averaged over latent pixels, heads, sites and steps."""
    total, count = None, 0
    for site in cap.media.sites:
        for step in cap.trace.steps(site):
            probs = cap.trace.get(site, step).probs[0].float()  # [head, query, key]
            mean = probs.mean(dim=(0, 1)).numpy()
            total = mean if total is None else total + mean
            count += 1
    return total / max(count, 1)


__all__ = ["GUIDANCE", "KINDS", "MAP_KINDS", "MAX_STEPS", "MAX_UPLOAD_BYTES", "MAX_UPLOAD_SIDE", "MediaInfo",
           "Uploads", "capture_diffusion", "capture_media", "capture_vision", "daam_head_maps", "daam_map",
           "decode_upload", "example_images", "fit_image", "image_size", "media_zoo_names", "model_kind",
           "patch_tokens", "pixel_values", "readout_query", "resolve_image", "token_mass", "vlm_head_maps",
           "vlm_image_map", "vlm_media", "zoo_kind"]
