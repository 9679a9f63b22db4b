"""``attnscope heatmap``: DAAM heat maps of words of a prompt, from one seeded run of a diffusion pipeline.

``run_heatmap_job`` checks the output path (before any work), loads the pipeline, aggregates each word's
cross-attention the DAAM way (``attnscope.circuits.daam``) and writes the generated image with each word's map over
it: ``.png`` (Pillow), ``.html`` (plotly) or ``.parquet`` (the maps as a ResultTable).

Example:
    >>> from attnscope.tasks.heatmap_job import HeatmapRequest, run_heatmap_job
    >>> from attnscope.tasks.references import ModelRef
    >>> request = HeatmapRequest(ModelRef.parse("zoo:shapes-diffusion"), "red circle", ["circle"], "maps.txt")
    >>> run_heatmap_job(request)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    attnscope.errors.OutputError: unknown output format: expected .png | .html | .parquet, got .txt...

    With ``out="maps.parquet"`` (and ``steps=1``) it runs the pipeline once and writes the maps as a table.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._progress import stage
from .._atomic import atomic_write_text, check_output
from ..circuits.daam import DaamResult, daam_maps
from ..viz.png import overlay_image, panel_png
from .models import load_ref
from .references import ModelRef

FORMATS = (".png", ".html", ".parquet")


@dataclass(frozen=True)
class HeatmapRequest:
    """A prompt, the words to map, where the figure goes (``FORMATS``), the run (denoising ``steps``, ``guidance``,
    ``seed``) and the aggregation (``preset`` attnscope or daam, ``steps_kept``, ``heads``, ``upsample``, ``size``,
    ``normalize``; None: the preset's)."""

    model: ModelRef
    prompt: str
    words: list[str]
    out: "Path | str"
    steps: int = 20
    guidance: float | None = None
    seed: int = 0
    steps_kept: list[int] | None = None
    heads: list[int] | None = None
    preset: str = "attnscope"
    upsample: str | None = None
    size: str | None = None
    normalize: str | None = None


@dataclass
class HeatmapResult:
    """The request, the model's name, the maps and where the figure went."""

    request: HeatmapRequest
    model: str
    maps: DaamResult
    path: Path

    def summary(self) -> str:
        """What ``attnscope heatmap`` prints: where each word's heat peaks and how concentrated it is."""
        request, maps = self.request, self.maps.maps
        h, w = maps.shape[-2:]
        lines = [f"DAAM heat maps of {request.prompt!r} ({self.model}, {request.steps} steps, seed {request.seed}), "
                 f"{h}x{w}:"]
        for word, heat in zip(request.words, maps[0]):
            flat = heat.flatten()
            peak = int(flat.argmax())
            top = flat.sort(descending=True).values[: max(1, flat.numel() // 10)].sum() / flat.sum().clamp_min(1e-12)
            lines.append(f"  {word:>12s}: peak at (y={peak // w}, x={peak % w}), {float(top):.2f} of the heat in the "
                         "top 10% of pixels")
        return "\n".join([*lines, f"wrote {self.path}"])


def run_heatmap_job(request: HeatmapRequest) -> HeatmapResult:
    """Check the output path, load the pipeline, run it once and write the maps."""
    out = check_output(request.out, suffixes=FORMATS)
    model = load_ref(request.model)
    options: dict[str, Any] = {k: v for k, v in (("upsample", request.upsample), ("normalize", request.normalize))
                               if v is not None}
    if request.heads:
        options["heads"] = list(request.heads)
    if request.steps_kept:
        options["steps"] = list(request.steps_kept)
    size = request.size or ("daam" if request.preset == "daam" else "image")
    stage(f"generating and tracking {', '.join(request.words)} ({request.steps} steps)")
    result = daam_maps(model, [request.prompt], list(request.words), preset=request.preset, seed=request.seed,
                       size=size, num_inference_steps=request.steps, guidance_scale=request.guidance,
                       pipeline_kwargs={"output_type": "np"}, **options)
    image = image_of(getattr(result.trace, "output", None))
    write_maps(result, image, list(request.words), out)
    return HeatmapResult(request, model.name, result, out)


def image_of(output: Any) -> np.ndarray | None:
    """The first generated image of a pipeline's output as ``[height, width, channels]``; None when there is none."""
    images = getattr(output, "images", None)
    if images is None:
        return None
    first = images[0]
    array = np.asarray(first.detach().cpu().permute(1, 2, 0) if hasattr(first, "detach") else first)
    return array if array.ndim == 3 and array.shape[-1] in (3, 4) else None


def write_maps(result: DaamResult, image: np.ndarray | None, words: list[str], out: Path) -> None:
    """Write the maps of the first prompt as ``out``'s suffix says: .parquet, .png (panels) or .html (plotly)."""
    maps = result.maps[0].numpy()
    if out.suffix == ".parquet":
        result.to_table().save(out)
    elif out.suffix == ".png":
        panels = ([overlay_image(np.zeros_like(maps[0]), image, alpha=0.0)] if image is not None else [])
        panels += [overlay_image(m, image) for m in maps]
        panel_png(panels, (["image"] if image is not None else []) + words, out)
    else:
        from ..viz.images import image_overlay  # plotly: an optional extra

        parts = [image_overlay(m, image=image, title=f"DAAM: {w!r}").to_html(
            full_html=False, include_plotlyjs="cdn" if i else True) for i, (w, m) in enumerate(zip(words, maps))]
        atomic_write_text(out, "<html><body>" + "\n".join(parts) + "</body></html>")
