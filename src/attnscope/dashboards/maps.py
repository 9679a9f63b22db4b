"""Image views of the dashboard: the pattern panel's "map" mode and the Maps card of heat-map tables.

- ``map_view``: one head (or fused heads) of a trace site laid out on its image grid by
  ``viz.images.attention_map``: diffusion cross-attention = the column of one text token over the latent pixels
  (default: the token with the most mass); VLM language model = the row of one query (default: the last token)
  over the ``image`` tokens; vision tower = the [CLS] row over the patches; latent self-attention = the mean
  attention each pixel receives.
- ``maps_view``: a heat-map table (columns ``word``, ``y``, ``x``; e.g. DAAM's ``analysis="daam"``, metric
  ``heat``) as the map of one word and batch item.
- Both draw the run's image under the map when the folder of the trace / table holds one: ``<stem>_<item>.png``,
  ``image_<item>.png``, then (item 0, or a one-item file) ``<stem>.png``, ``image.png`` (``.jpg`` too). The image
  path goes through ``ResultsRoot.resolve`` (kind ``image``) like every other path, is read by Pillow (size
  checked before decoding), shrunk to at most ``MAX_SIDE`` pixels and sent to the browser as one PNG.

Example:
    >>> import numpy as np, pandas as pd
    >>> from attnscope.dashboards.maps import is_map_table, table_grid
    >>> df = pd.DataFrame({"analysis": "daam", "layer": -1, "head": -1, "metric": "heat", "batch": 0,
    ...                    "word": "cat", "y": [0, 0, 1, 1], "x": [0, 1, 0, 1], "value": [1.0, 2.0, 3.0, 4.0]})
    >>> is_map_table(df), table_grid(df, "cat", 0).tolist()
    (True, [[1.0, 2.0], [3.0, 4.0]])
"""

import base64
import io
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from jaxtyping import Float

from .._extras import require
from ..errors import AttnscopeError, CorruptResultError, InputError
from ..probes.site import Site
from ..probes.tokens import TokenInfo
from ..probes.trace import AttentionTrace
from ..viz.images import GridMap, attention_map, image_overlay
from ..viz.pattern import trace_pattern
from .data import TraceHeader, load_site, load_table, trace_header
from .files import IMAGE_TYPES, PathRefused, ResultsRoot
from .target import resolve_target, site_of, target_heads

MAX_SIDE = 512  # pixels of the longer side sent to the browser
MAX_IMAGE_BYTES = 32 * 2**20
MAX_IMAGE_PIXELS = 40_000_000
MAP_COLUMNS = ("word", "y", "x")


def _square(n: int) -> bool:
    side = int(round(max(n, 0) ** 0.5))
    return side > 0 and side * side == n


def map_capable(header: TraceHeader, tower: str, kind: str) -> bool:
    """Whether a site of the trace has image structure that ``attention_map`` can lay out (see module doc)."""
    entries = [e for e in header.entries if Site.from_dict(e["site"]).tower == tower
               and Site.from_dict(e["site"]).kind == kind]
    if not entries:
        return False
    meta, n_key = entries[0].get("meta") or {}, int(entries[0]["n_key"])
    grid = meta.get("grid") or header.tokens.grid
    if kind == "cross":
        return bool(grid) and grid[0] * grid[1] == int(entries[0]["n_query"])
    if grid or "image" in (meta.get("blocks") or {}):
        return True
    if tower == "text":
        image = header.tokens.positions("image")
        return _square(len(image)) and image[-1] < n_key
    return _square(n_key - 1)


def map_choices(root: ResultsRoot, trace: str | None, site_value: str | None,
                item: Any) -> tuple[bool, str, list[dict], list[int]]:
    """(map mode available, what the token picker chooses, its options, the site's steps) for the pickers.

    Cross-attention picks a key (text) token; other sites pick a query token (image positions left out); latent
    self-attention and vision towers have nothing to pick (mean received / [CLS] row).
    """
    if not trace:
        return False, "", [], []
    try:
        header = trace_header(root.resolve(trace, ("trace",)))
        tower, kind = site_of(site_value, header)
    except AttnscopeError:
        return False, "", [], []
    if not map_capable(header, tower, kind):
        return False, "", [], []
    steps = sorted({int(e["step"]) for e in header.entries if Site.from_dict(e["site"]).tower == tower
                    and Site.from_dict(e["site"]).kind == kind})
    strings = header.tokens.strings or []
    try:
        row = strings[int(item or 0)] if strings else []
    except (IndexError, TypeError, ValueError):
        row = []
    if kind == "cross":
        return True, "key token (default: most attended)", _token_options(row, set()), steps
    if tower != "text" or not row:
        return True, "", [], steps
    image = set(header.tokens.positions("image")) | set(header.tokens.positions("latent"))
    return True, "query token (default: last)", _token_options(row, image), steps


def _token_options(row: list[str], skip: set[int]) -> list[dict]:
    return [{"label": f"{i}: {tok}", "value": i} for i, tok in enumerate(row) if i not in skip][:2000]


def find_image(root: ResultsRoot, relative: str, item: int = 0, n_items: int = 1) -> Path | None:
    """The image next to ``relative`` (a trace or table path) for batch item ``item`` (see module doc), or None.

    Every candidate goes through ``root.resolve`` (kind ``image``): a symlink leaving the root is never used.
    """
    pure = PurePosixPath(relative.replace("\\", "/"))
    names = []
    for suffix in IMAGE_TYPES:
        names += [f"{pure.stem}_{item}{suffix}", f"image_{item}{suffix}"]
    if item == 0 or n_items == 1:
        names += [f"{stem}{suffix}" for stem in (pure.stem, "image") for suffix in IMAGE_TYPES]
    for name in names:
        candidate = (pure.parent / name).as_posix()
        try:
            return root.resolve(candidate, ("image",))
        except PathRefused:
            continue
    return None


def read_image(path: Path, max_side: int = MAX_SIDE) -> np.ndarray:
    """``[height, width, 3]`` uint8 pixels of an image file, shrunk to at most ``max_side`` (checked first)."""
    require("PIL", "dashboard")
    from PIL import Image, UnidentifiedImageError

    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise CorruptResultError("image file too large to show", expected=f"<= {MAX_IMAGE_BYTES} bytes",
                                 got=path.name)
    try:
        with Image.open(path) as image:
            if image.size[0] * image.size[1] > MAX_IMAGE_PIXELS:
                raise CorruptResultError("image too large to show", expected=f"<= {MAX_IMAGE_PIXELS} pixels",
                                         got=f"{path.name}: {image.size}")
            image = image.convert("RGB")
            image.thumbnail((max_side, max_side))
            return np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise CorruptResultError("not a readable image", expected="a PNG or JPEG file",
                                 got=f"{path.name} ({type(exc).__name__})") from None


def _png_uri(pixels: np.ndarray) -> str:
    require("PIL", "dashboard")
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def overlay_figure(grid: GridMap, image: np.ndarray | None, title: str, quantity: str = "attention") -> go.Figure:
    """``viz.images.image_overlay`` of ``grid`` over ``image``; the image travels as one PNG, not a pixel list.
    A two-line ``title`` (``<br>``) gets the top margin it needs, clear of the mode bar."""
    fig = image_overlay(grid, image=image, title=title)
    if image is not None:
        fig.data[0].update(z=None, source=_png_uri(image))
    fig.data[-1].update(colorbar=dict(title=dict(text=quantity)))
    if "<br>" in title:
        fig.update_layout(margin=dict(t=84), title=dict(font=dict(size=14)))
    return fig


def _as_int(value: Any, what: str) -> int | None:
    """A picker value as an int (None/"" = the default); forged values raise InputError, not ValueError."""
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number", expected="an integer", got=repr(value)[:80]) from None


def fit_strings(trace: AttentionTrace) -> AttentionTrace:
    """``trace`` (one record) without token strings when its queries are not those tokens (latent pixels of
    diffusion self/joint attention), so that no pixel is labelled with a text token; else ``trace`` itself."""
    record = next(iter(trace.records.values()))
    strings = trace.tokens.strings
    if not strings or record.site.kind == "cross" or all(len(row) >= record.n_query for row in strings):
        return trace
    tokens = TokenInfo(ids=None, strings=None, spans=list(trace.tokens.spans), grid=trace.tokens.grid)
    return AttentionTrace([record], tokens, trace.provenance)


def map_view(root: ResultsRoot, trace: str, site_value: str | None, item: Any, spec: str | None,
             click: tuple[int, int] | None, token: Any = None, step: Any = None) -> tuple[go.Figure, GridMap]:
    """The map of the clicked head (or ``spec``) of one site and step, over the run's image when there is one.

    ``token``: the key position (cross-attention) or query position (otherwise); None = the default.
    """
    t = resolve_target(root, trace, site_value, item, spec, click)
    site = Site(t.tower, t.layer, t.kind)
    if not map_capable(t.header, t.tower, t.kind):
        raise InputError("this site has no image structure", expected="a latent grid, image tokens or a vision "
                         "tower", got=str(site), fix="use the pooled or top-k mode")
    steps = t.header.steps(site)
    step = _as_int(step, "step")
    step = step if step in steps else steps[0]
    one = fit_strings(load_site(t.path, site, step, t.batch))
    heads = target_heads(t, one.get(site, step).heads())
    position = _as_int(token, "token position")
    if t.kind == "cross" and position is None:  # the default, named in the title: the most attended key
        matrix = trace_pattern(one, t.layer, heads, tower=t.tower, kind=t.kind, step=step, trim_padding=False)
        position = int(np.argmax(matrix.matrix.mean(0)))
    options: dict[str, Any] = {"key": position} if t.kind == "cross" else {"query": position}
    grid = attention_map(one, t.layer, heads, tower=t.tower, kind=t.kind, step=step, **options)
    path = find_image(root, trace, t.batch, t.header.batch)
    image = read_image(path) if path is not None else None
    where = [f"site {t.tower}.L{t.layer}.{t.kind}", f"step {step}" if len(steps) > 1 else "", f"item {t.batch}",
             f"key position {position}" if t.kind == "cross" else "", f"over {path.name}" if path else ""]
    title = grid.description + "<br>" + " · ".join(w for w in where if w)
    return overlay_figure(grid, image, title), grid


def is_map_table(df: pd.DataFrame) -> bool:
    """Whether a table holds heat maps (``word``, ``y``, ``x`` columns) rather than per-head values."""
    return all(c in df.columns for c in MAP_COLUMNS)


def map_words(df: pd.DataFrame) -> tuple[list[str], list[int]]:
    """(words in table order, batch items) of a heat-map table."""
    items = sorted({int(b) for b in df["batch"]}) if "batch" in df.columns else [0]
    return list(dict.fromkeys(df["word"].astype(str))), items


def _map_metric(df: pd.DataFrame) -> str:
    return "heat" if "heat" in set(df["metric"]) else str(df["metric"].iloc[0])


def table_grid(df: pd.DataFrame, word: str, item: int = 0) -> Float[np.ndarray, "height width"]:
    """The ``[height, width]`` map of ``word`` and batch item ``item`` (first metric; NaN where no row)."""
    metric = _map_metric(df)
    rows = df[(df["metric"] == metric) & (df["word"].astype(str) == str(word))]
    if "batch" in df.columns:
        rows = rows[rows["batch"] == int(item)]
    if rows.empty:
        words, items = map_words(df)
        raise InputError("no map for this word and item", expected=f"words {words[:12]}, items {items}",
                         got=f"{word!r}, item {item}")
    height, width = int(df["y"].max()) + 1, int(df["x"].max()) + 1
    grid = np.full((height, width), np.nan, dtype=np.float64)
    grid[rows["y"].to_numpy(int), rows["x"].to_numpy(int)] = rows["value"].to_numpy(float)
    return grid


def maps_view(root: ResultsRoot, table: str, word: str | None, item: Any = 0) -> go.Figure:
    """The Maps card's figure: the map of ``word`` (default: the first) for batch item ``item``."""
    path = root.resolve(table, ("table",))
    df = load_table(path).df
    if not is_map_table(df):
        raise InputError("not a heat-map table", expected=f"columns {', '.join(MAP_COLUMNS)}", got=table)
    words, items = map_words(df)
    word = word if word is not None else words[0]
    item = _as_int(item, "batch item") or 0
    grid = table_grid(df, word, item)
    image_path = find_image(root, table, item, len(items))
    image = read_image(image_path) if image_path is not None else None
    analysis = str(df["analysis"].iloc[0]) if "analysis" in df.columns and len(df) else "map"
    title = f"{analysis} · {word!r} · item {item}" + ("" if image is None else f" · over {image_path.name}")
    return overlay_figure(GridMap(grid, title), image, title, quantity=_map_metric(df))


__all__ = ["find_image", "fit_strings", "is_map_table", "map_capable", "map_choices", "map_view", "map_words", "maps_view",
           "overlay_figure", "read_image", "table_grid"]
