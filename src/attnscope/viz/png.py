"""Heat maps over images as PNG files, drawn with Pillow (no browser, no plotly export engine needed).

``overlay_image`` blends a ``[height, width]`` map (upsampled to the image) over an RGB image with a perceptual
colour map (plotly's Inferno, interpolated); ``panel_png`` lays several labelled images side by side and saves.

Example:
    >>> import numpy as np
    >>> from attnscope.viz.png import overlay_image
    >>> out = overlay_image(np.eye(4), np.zeros((8, 8, 3), dtype=np.uint8), size=16)
    >>> out.size, out.mode
    ((16, 16), 'RGB')
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from jaxtyping import Float

from .._atomic import atomic_write, check_output
from .._extras import require
from ..errors import InputError


def colour_table(n: int = 256, scale: str = "Inferno") -> np.ndarray:
    """``[n, 3]`` uint8 RGB table of a plotly sequential colour scale, linearly interpolated."""
    import plotly.colors as pc

    stops = getattr(pc.sequential, scale, None)
    if stops is None:
        raise InputError("unknown colour scale", expected="a plotly.colors.sequential name, e.g. Inferno", got=scale)
    rgb = np.array([pc.hex_to_rgb(c) if c.startswith("#") else pc.unlabel_rgb(c) for c in stops], dtype=np.float64)
    x = np.linspace(0, 1, len(rgb))
    t = np.linspace(0, 1, n)
    return np.stack([np.interp(t, x, rgb[:, c]) for c in range(3)], -1).round().astype(np.uint8)


def _as_rgb(image: "np.ndarray | None", height: int, width: int) -> np.ndarray:
    if image is None:
        return np.zeros((height, width, 3), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, -1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise InputError("image of the wrong shape", expected="[height, width, 3]", got=tuple(array.shape))
    if array.dtype != np.uint8:
        array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return array[..., :3]


def overlay_image(values: Float[np.ndarray, "height width"], image: "np.ndarray | None" = None, *, size: int = 256,
                  alpha: float = 0.6, scale: str = "Inferno"):
    """A PIL image ``size`` pixels high: ``image`` (nearest-upsampled) with ``values`` (min-max scaled, bilinear)
    in colour over it (``alpha`` = heat opacity; without an image the heat map alone)."""
    require("PIL", "viz")
    from PIL import Image

    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise InputError("map of the wrong rank", expected="[height, width]", got=tuple(values.shape))
    base = _as_rgb(image, *values.shape)
    width = max(1, round(size * base.shape[1] / base.shape[0]))
    lo, hi = np.nanmin(values), np.nanmax(values)
    scaled = np.zeros_like(values) if hi <= lo else (values - lo) / (hi - lo)
    heat_small = Image.fromarray((np.nan_to_num(scaled) * 255).round().astype(np.uint8))
    heat = np.asarray(heat_small.resize((width, size), Image.BILINEAR))
    coloured = colour_table(256, scale)[heat]
    background = np.asarray(Image.fromarray(base).resize((width, size), Image.NEAREST), dtype=np.float64)
    weight = alpha if image is not None else 1.0
    blended = (1 - weight) * background + weight * coloured
    return Image.fromarray(blended.round().astype(np.uint8))


def panel_png(panels: Sequence, labels: Sequence[str], path: "str | Path", gap: int = 6) -> Path:
    """Save PIL images side by side with a label under each; returns the path."""
    require("PIL", "viz")
    from PIL import Image, ImageDraw, ImageFont

    if len(panels) != len(labels) or not panels:
        raise InputError("panels and labels differ", expected="one label per panel", got=(len(panels), len(labels)))
    font = ImageFont.load_default()
    height = max(p.size[1] for p in panels)
    width = sum(p.size[0] for p in panels) + gap * (len(panels) - 1)
    sheet = Image.new("RGB", (width, height + 22), "white")
    draw = ImageDraw.Draw(sheet)
    x = 0
    for panel, label in zip(panels, labels):
        sheet.paste(panel, (x, 0))
        draw.text((x + 4, height + 4), label, fill="black", font=font)
        x += panel.size[0] + gap

    path = check_output(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    return atomic_write(path, lambda tmp: sheet.save(tmp, format=fmt))


__all__ = ["colour_table", "overlay_image", "panel_png"]
