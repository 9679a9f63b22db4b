"""Ablation on image captures of the live page: the reference images of a vision encoder's ``mean`` / ``resample``,
and the ablation of a diffusion pipeline capture (the same pipeline call rerun with the heads edited).

Vision encoder: ``mean`` and ``resample`` take ``REFERENCE_SCENES`` built-in shapes scenes (the ``images`` suite,
seed ``REFERENCE_SEED``, as ``attnscope ablate`` does) at the model's input size, turned into ``pixel_values`` by the
same processor as the capture (``attnscope.probes.interventions`` ``reference_inputs``).

Diffusion pipeline: the capture's call (prompt, steps, guidance, seed: a fresh ``torch.Generator().manual_seed``) is
run again under ``apply_plan`` (heads numbered over the denoiser's attention layers, edited in its SDPA side
channel) and its cross / joint attention captured again. ``change [site, head]`` is the mean over steps and query
rows of the total variation between clean and ablated patterns of each captured site; ``attn_after`` holds, per
site, the ablated image -> text block averaged over steps; ``token_change [text key]`` is the change (ablated -
clean) of the attention mass the image queries give each text key (mean over sites, steps, heads, queries); the
summary gives the mean absolute pixel change of the generated image. ``mean`` / ``resample`` are refused there:
their reference would be the denoiser's inputs of other prompts at every step.

Example:
    >>> import numpy as np
    >>> from attnscope.dashboards.live_media_ablation import pixel_change
    >>> pixel_change(np.zeros((2, 2, 3)), np.full((2, 2, 3), 0.5))          # 0..1 images: on the 0..255 scale
    127.5
"""

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..datasets.image_suite import image_suite
from ..errors import InputError
from ..probes.capturing import capture
from ..probes.heads import HeadSet
from ..probes.interventions import InterventionPlan, apply_plan, resample_plan
from ..tasks.heatmap_job import image_of
from .live_state import LiveCapture

REFERENCE_SCENES = 64   # reference images of mean / resample on a vision encoder
REFERENCE_SEED = 1      # shapes_scenes seed of the reference (the page's example images use another seed)
DIFFUSION_MODES = ("zero", "uniform")
_REFERENCES: dict[int, torch.Tensor] = {}
_REF_LOCK = threading.Lock()


def vision_references(handle: Any) -> tuple[torch.Tensor, str]:
    """(``[REFERENCE_SCENES, 3, s, s]`` pixel values, description) of the reference images, cached per model: the
    ``images`` suite that ``attnscope ablate --mode mean`` draws on a vision encoder (seed 0 + 1)."""
    with _REF_LOCK:
        if id(handle) not in _REFERENCES:
            suite = image_suite(handle, REFERENCE_SCENES, seed=REFERENCE_SEED)
            _REFERENCES[id(handle)] = torch.cat([item.inputs["pixel_values"] for item in suite.items])
    return _REFERENCES[id(handle)], f"{REFERENCE_SCENES} shapes scenes (seed {REFERENCE_SEED})"


def vision_plan(handle: Any, heads: HeadSet, mode: str, seed: int) -> tuple[InterventionPlan, str]:
    """(plan, reference description) of ``mode`` on a vision encoder; ``mean`` / ``resample`` over the scenes."""
    if mode not in ("mean", "resample"):
        return InterventionPlan(heads, mode), ""
    pixels, what = vision_references(handle)
    references = {"pixel_values": pixels}
    if mode == "resample":
        return resample_plan(heads, references, seed=seed), what
    return InterventionPlan(heads, "mean", reference_inputs=references), what


@dataclass
class DiffusionChange:
    """What a diffusion ablation changed (see the module docstring)."""

    change: np.ndarray            # [site, head]
    attn_after: list[np.ndarray]  # per site: [head, image query, text key], mean over steps
    token_change: np.ndarray      # [text key]
    summary: str
    image_after: np.ndarray       # [H, W, 3] float32, as the pipeline returned it (0..1)


def pixel_change(before: np.ndarray, after: np.ndarray) -> float:
    """Mean absolute pixel change on the 0..255 scale (float images in 0..1 are scaled by 255)."""
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    scale = 255.0 if max(float(np.abs(before).max()), float(np.abs(after).max())) <= 1.0 else 1.0
    return float(np.abs(after - before).mean() * scale)


def image_text(record: Any) -> torch.Tensor:
    """``[head, image query, text key]`` of a cross (latent -> text) or joint (its image -> text block) record."""
    probs = record.block("image", "text") if record.meta.get("blocks") else record.probs
    return probs[0].float()


def _site_changes(clean: Any, after: Any, site: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(TV per head, ablated image->text block, clean and ablated text mass per key), each the mean over steps."""
    steps = clean.steps(site)
    tv, block, mass_before, mass_after = 0.0, 0.0, 0.0, 0.0
    for step in steps:
        p, q = clean.get(site, step).probs[0].float(), after.get(site, step).probs[0].float()
        tv = tv + 0.5 * (p - q).abs().sum(-1).mean(-1).double()
        before, now = image_text(clean.get(site, step)), image_text(after.get(site, step))
        block = block + now
        mass_before = mass_before + before.mean((0, 1)).double()
        mass_after = mass_after + now.mean((0, 1)).double()
    n = max(len(steps), 1)
    return ((tv / n).numpy(), (block / n).numpy(), (mass_before / n).numpy(), (mass_after / n).numpy())


def ablate_diffusion(handle: Any, cap: LiveCapture, heads: HeadSet, mode: str) -> DiffusionChange:
    """Rerun ``cap``'s pipeline call with ``heads`` ablated (``zero`` or ``uniform``) and measure the change.
    The caller holds the model lock."""
    if mode not in DIFFUSION_MODES:
        raise InputError("this ablation mode needs a reference set a diffusion capture does not have",
                         expected=DIFFUSION_MODES, got=mode,
                         fix="use zero or uniform (mean / resample would need the denoiser's inputs of other "
                             "prompts at every step)")
    media = cap.media
    inputs = {**cap.inputs, "generator": torch.Generator().manual_seed(int(media.seed))}
    with torch.no_grad(), apply_plan(handle, InterventionPlan(heads, mode)):
        after = capture(handle, inputs, sites=lambda s: s.kind in ("cross", "joint"))
    changes = [_site_changes(cap.trace, after, site) for site in media.sites]
    n_heads = max(c[0].shape[0] for c in changes)
    change = np.zeros((len(changes), n_heads), np.float32)
    for i, c in enumerate(changes):
        change[i, :c[0].shape[0]] = c[0]
    token_change = np.mean([c[3] - c[2] for c in changes], axis=0).astype(np.float32)
    clean_image, image = image_of(cap.trace.output), image_of(after.output)
    if image is None or clean_image is None:
        raise InputError("the pipeline returned no image", expected="an image output", got=type(after.output))
    moved = int(np.argmax(np.abs(token_change)))
    summary = (f"generated image: mean |Δ pixel| {pixel_change(clean_image, image):.3f} (0–255 scale); same "
               f"prompt, {media.steps} steps, seed {media.seed}; largest change of the image's attention to a text "
               f"key: key {moved} ({float(token_change[moved]):+.3g})")
    return DiffusionChange(change, [c[1].astype(np.float32) for c in changes], token_change, summary,
                           np.asarray(image, np.float32)[..., :3])


__all__ = ["DIFFUSION_MODES", "DiffusionChange", "REFERENCE_SCENES", "ablate_diffusion", "image_text",
           "pixel_change", "vision_plan", "vision_references"]
