"""Figures of the live page for image (VLM, vision encoder) and diffusion captures: the image, its attribution /
DAAM map over it, the per-head maps, the text views adapted (image span marked, head view on the question tokens;
a vision encoder's views over its [CLS] and patch tokens), one-line notes for views a diffusion capture has no
data for, and a diffusion ablation's figures (clean vs ablated image, change of the attention to each text key).
Plain functions of a ``LiveCapture``; every figure carries ``layout.meta = {"capture": key}`` like the text views.

Example:
    >>> from attnscope.dashboards.live_media_views import NOTES
    >>> sorted(NOTES)
    ['head view', 'long', 'model view', 'pattern', 'qk']
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from ..viz.head_lines import head_view
from ..viz.head_thumbnails import model_view
from ..viz.images import GridMap, image_overlay
from .live_ablation import LiveAblation
from .live_media import daam_head_maps, daam_map, readout_query, token_mass, vlm_head_maps, vlm_image_map
from .live_state import LiveCapture

SPAN_COLOUR = "#00b3a4"
HEAD_VIEW_LINES = {"layer": (0.1, 3), "head": (0.02, 6)}  # as the text head view
NOTES = {
    "model view": "model view: no token × token attention in a diffusion capture; per-head maps: image card below",
    "pattern": "pattern: diffusion cross-attention is latent pixels x prompt tokens; see the maps in the image card",
    "head view": "head view: no lines between text tokens for a diffusion model (its queries are pixels)",
    "qk": "QK embedding: not applicable to a diffusion capture (queries are latent pixels, keys prompt tokens)",
    "long": "long-sequence view: not applicable to a diffusion capture",
}
MAP_TEXT = {
    "rollout": "attention rollout (Abnar & Zuidema: layers chained, residual added) from the last token to each "
               "image patch: where the answer's evidence flows from",
    "head": "the selected head's attention from the last token to each image patch (one row of its pattern)",
}
VISION_MAP_TEXT = {
    "rollout": "attention rollout (Abnar & Zuidema: layers chained, residual added) from the first token ([CLS]) "
               "to each image patch: what the image embedding reads",
    "head": "the selected head's attention from the first token ([CLS]) to each image patch (one row of its "
            "pattern)",
}


def tag(fig: go.Figure, cap: LiveCapture | None) -> go.Figure:
    """Mark ``fig`` as showing capture ``cap``."""
    fig.update_layout(meta={"capture": cap.key if cap is not None else ""})
    return fig


def note(cap: LiveCapture, view: str, height: int = 160) -> go.Figure:
    """A figure holding one line: why ``view`` shows nothing for this capture."""
    fig = go.Figure()
    fig.add_annotation(text=NOTES.get(view, view), showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=13, color="#555"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=10, b=10), plot_bgcolor="white")
    return tag(fig, cap)


def _span_text(cap: LiveCapture) -> str:
    m = cap.media
    return (f"tokens {m.image_positions[0]}–{m.image_positions[-1]} are the image's {len(m.image_positions)} "
            f"patches ({m.grid[0]}×{m.grid[1]})")


def model_view_figure(cap: LiveCapture, selected: tuple[int, int]) -> go.Figure:
    """VLM: the language model's heads over all tokens (image patches + question); vision encoder: its heads over
    [CLS] + patches; diffusion: a note."""
    if cap.kind == "diffusion":
        return note(cap, "model view", 300)
    return tag(model_view(cap.trace, tower=cap.tower, selected=selected,
                          title=f"model view · {cap.n_layers} layers × {cap.n_heads} heads · {cap.n_tokens} tokens "
                                f"· click a thumbnail<br><sup>{_span_text(cap)}</sup>"), cap)


def mark_image_span(fig: go.Figure, cap: LiveCapture) -> go.Figure:
    """Outline the image tokens' keys (columns) and queries (rows) of a VLM pattern; other captures unchanged."""
    if cap.kind != "vlm":
        return fig
    a, b = cap.media.image_positions[0] - 0.5, cap.media.image_positions[-1] + 0.5
    n = cap.n_tokens
    for x0, x1, y0, y1 in ((a, b, -0.5, n - 0.5), (-0.5, n - 0.5, a, b)):
        fig.add_shape(type="rect", x0=x0, x1=x1, y0=y0, y1=y1, line=dict(color=SPAN_COLOUR, width=2, dash="dot"))
    title = fig.layout.title.text or ""
    fig.update_layout(title_text=f"{title}<br><sup>dotted: the image span ({_span_text(cap)})</sup>")
    return fig


def head_view_figure(cap: LiveCapture, layer: int, head: int, scope: str,
                     highlight: tuple[str, int] | None) -> go.Figure:
    """VLM: lines between the question's tokens only (the image tokens' attention is in the pattern and the image
    maps); vision encoder: lines between all its tokens ([CLS], patches); diffusion: a note."""
    if cap.kind == "vision":
        heads = None if scope == "layer" else [head]
        threshold, top_k = HEAD_VIEW_LINES["layer" if heads is None else "head"]
        return tag(head_view(cap.attn()[layer], layer, heads, tokens=cap.tokens, highlight=highlight,
                             threshold=threshold, top_k=top_k, title=f"head view L{layer} · [CLS] and patches"), cap)
    if cap.kind != "vlm":
        return note(cap, "head view", 300)
    text = [i for i in range(cap.n_tokens) if i not in set(cap.media.image_positions)]
    probs = cap.attn()[layer][:, text][:, :, text]
    heads = None if scope == "layer" else [head]
    threshold, top_k = HEAD_VIEW_LINES["layer" if heads is None else "head"]
    fig = head_view(probs, layer, heads, tokens=[cap.tokens[i] for i in text], highlight=highlight,
                    threshold=threshold, top_k=top_k,
                    title=f"head view L{layer} · question tokens only<br><sup>attention to the image tokens is not "
                          "drawn: see the pattern and the image maps</sup>")
    return tag(fig, cap)


def token_mass_values(cap: LiveCapture) -> tuple[np.ndarray, str]:
    """(values per prompt token, title) of a diffusion capture's token strip."""
    return token_mass(cap), ("mean cross-attention each prompt token receives (over pixels, heads, sites and "
                             f"all {cap.media.steps} steps)")


def image_figure(cap: LiveCapture) -> go.Figure:
    """The capture's image: the VLM's input, or the generated one."""
    image = cap.media.image
    what = "generated image" if cap.kind == "diffusion" else "input image"
    fig = go.Figure(go.Image(z=image, hoverinfo="skip"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, scaleanchor="x")
    fig.update_layout(title=dict(text=f"{what}<br><sup>{cap.media.label} · {image.shape[1]}×{image.shape[0]} px"
                                      "</sup>", font=dict(size=13)),
                      height=340, margin=dict(l=10, r=10, t=60, b=10))
    return tag(fig, cap)


def vlm_map_figure(cap: LiveCapture, how: str, layer: int, head: int) -> go.Figure:
    """The attribution over the image grid of a VLM or vision encoder (``rollout`` or the selected ``head``)."""
    grid = vlm_image_map(cap, how, layer, head)
    text = (VISION_MAP_TEXT if cap.kind == "vision" else MAP_TEXT)[how]
    fig = image_overlay(grid, image=cap.media.image, title=f"{grid.description}<br><sup>{text}</sup>")
    fig.update_layout(height=380, margin=dict(t=70))
    return tag(fig, cap)


def daam_figure(cap: LiveCapture, word: str, step: Any) -> go.Figure:
    """DAAM heat map of ``word`` at ``step`` over the generated image."""
    values = daam_map(cap, word, step)
    when = f"all {cap.media.steps} steps summed" if step in (None, "all") else f"step {int(step)}"
    fig = image_overlay(GridMap(values, ""), image=cap.media.image,
                        title=f"DAAM map of {word!r} · {when}<br><sup>cross-attention of the pixels to the word, "
                              "upsampled, clamped at 0, mean over every site and head (Tang et al. 2023)</sup>")
    fig.update_layout(height=380, margin=dict(t=70))
    return tag(fig, cap)


def heads_figure(cap: LiveCapture, maps: np.ndarray, titles: Sequence[str], selected: int | None,
                 title: str) -> go.Figure:
    """One heatmap per head (shared colour scale), the selected head's title marked."""
    from plotly.subplots import make_subplots

    n = len(maps)
    names = [f"<b>▶ {t}</b>" if i == selected else t for i, t in enumerate(titles)]
    fig = make_subplots(rows=1, cols=n, subplot_titles=names, horizontal_spacing=0.02)
    top = float(np.max(maps)) or 1e-6
    for i, values in enumerate(maps):
        fig.add_trace(go.Heatmap(z=values.astype(np.float32), zmin=0.0, zmax=top, colorscale="Inferno",
                                 showscale=i == n - 1, colorbar=dict(thickness=10),
                                 hovertemplate=f"{titles[i]} y=%{{y}} x=%{{x}} value=%{{z:.4f}}<extra></extra>"),
                      row=1, col=i + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    for i in range(n):
        fig.update_yaxes(scaleanchor=f"x{i + 1 if i else ''}", row=1, col=i + 1)
    fig.update_layout(title=dict(text=title, font=dict(size=13)), height=300, margin=dict(l=10, r=10, t=80, b=10))
    return tag(fig, cap)


def vlm_heads_figure(cap: LiveCapture, layer: int, head: int) -> go.Figure:
    maps = vlm_head_maps(cap, layer)
    query = "first token [CLS]" if readout_query(cap)[0] == 0 else "last token"
    return heads_figure(cap, maps, [f"L{layer} H{h}" for h in range(len(maps))], head,
                        f"every head of layer {layer}: {query} → image patches<br><sup>each panel is the head's "
                        f"pattern row of the {query} over the image grid; ▶ the selected head</sup>")


def diffusion_heads_figure(cap: LiveCapture, site_index: int, word: str, step: Any) -> go.Figure:
    maps = daam_head_maps(cap, site_index, word, step)
    site = cap.media.sites[int(site_index)]
    when = "all steps" if step in (None, "all") else f"step {int(step)}"
    return heads_figure(cap, maps, [f"H{h}" for h in range(len(maps))], None,
                        f"per head at {site} · {word!r} · {when}<br><sup>DAAM of one site and one head at a time "
                        "(the map above averages all of them)</sup>")


def ablated_image_figure(cap: LiveCapture, ab: LiveAblation) -> go.Figure:
    """A diffusion ablation: the clean and the ablated generated image side by side."""
    from plotly.subplots import make_subplots

    after = np.asarray(ab.image_after, np.float64)
    after = np.clip(np.round(after * (255.0 if after.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)[..., :3]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["clean", f"{ab.heads} {ab.mode}"], horizontal_spacing=0.03)
    fig.add_trace(go.Image(z=cap.media.image, hoverinfo="skip"), row=1, col=1)
    fig.add_trace(go.Image(z=after, hoverinfo="skip"), row=1, col=2)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(title=dict(text=f"generated image, clean vs ablated<br><sup>{ab.summary.splitlines()[0]}"
                                      "</sup>", font=dict(size=13)), height=360, margin=dict(l=10, r=10, t=80, b=10))
    return tag(fig, cap)


def text_key_change_figure(cap: LiveCapture, ab: LiveAblation, top: int = 24) -> go.Figure:
    """A diffusion ablation: the text keys whose attention from the image moved most (bars, ablated − clean)."""
    values = np.asarray(ab.token_change, np.float64)
    keys = np.sort(np.argsort(-np.abs(values))[:top])
    fig = go.Figure(go.Bar(x=[f"key {int(k)}" for k in keys], y=values[keys], marker_color="#c0392b",
                           hovertemplate="%{x}: Δ mass %{y:.3g}<extra></extra>"))
    fig.update_layout(title=dict(text=f"{ab.token_metric}<br><sup>the {len(keys)} text keys that moved most, mean "
                                      "over sites, steps, heads and image queries</sup>", font=dict(size=13)),
                      height=260, margin=dict(l=40, r=10, t=70, b=40))
    return tag(fig, cap)


__all__ = ["HEAD_VIEW_LINES", "MAP_TEXT", "NOTES", "VISION_MAP_TEXT", "ablated_image_figure", "daam_figure",
           "diffusion_heads_figure", "head_view_figure", "heads_figure", "image_figure", "mark_image_span",
           "model_view_figure", "note", "tag", "text_key_change_figure", "token_mass_values", "vlm_heads_figure",
           "vlm_map_figure"]
