"""Components of the live page for image (VLM) and diffusion input: the input controls (image picker and upload;
steps and seed) shown in the input card for those models, and the image card (the image, the map over it, the
per-head maps). Component ids (``live-image``, ``live-upload``, ``live-steps``, ``live-seed``, ``live-media-*``)
are the contract with ``live_media_callbacks`` and the browser tests.

Example:
    >>> from attnscope.dashboards.live_media_layout import media_card, media_inputs
    >>> "live-upload" in str(media_inputs()) and "live-media-map" in str(media_card())
    True
"""

from typing import Any

from .live_media import MAP_KINDS, MAX_STEPS, MAX_UPLOAD_BYTES, MAX_UPLOAD_SIDE, example_images

MEDIA_STATES = ("live-image", "live-steps", "live-seed")  # read by the Capture callback, in this order
HIDDEN = {"display": "none"}
GRAPH = {"displaylogo": False, "modeBarButtonsToRemove": ["lasso2d", "select2d"]}
DEFAULT_STEPS = 6


def _control(label: str, component: Any, extra: str = "") -> Any:
    from dash import html

    style = {"flex": "2 1 380px"} if extra == "wide" else {}
    return html.Div([html.Label(label), component], className="control" if extra == "wide" else
                    f"control {extra}".strip(), style=style)


def media_inputs() -> Any:
    """Image picker + upload (VLM), steps + seed (diffusion); both hidden until such a model is picked."""
    from dash import dcc, html

    examples = example_images()
    upload = dcc.Upload(id="live-upload", accept="image/png,image/jpeg", multiple=False, max_size=MAX_UPLOAD_BYTES,
                        children=html.Div(["drop a PNG/JPEG or ", html.A("choose a file")]),
                        style={"border": "1px dashed #999", "borderRadius": "4px", "padding": "6px 10px",
                               "cursor": "pointer"})
    vlm = html.Div([
        _control("image", dcc.Dropdown(id="live-image", options=examples, value=examples[0]["value"],
                                       clearable=False), "wide"),
        _control(f"or upload (≤ {MAX_UPLOAD_BYTES // 2 ** 20} MB, ≤ {MAX_UPLOAD_SIDE} px)", upload),
        html.Div(id="live-upload-msg", className="msg"),
    ], id="live-vlm-inputs", className="row", style=HIDDEN)
    diffusion = html.Div([
        _control(f"steps (1–{MAX_STEPS})", dcc.Input(id="live-steps", type="number", min=1, max=MAX_STEPS, step=1,
                                                     value=DEFAULT_STEPS, style={"width": "70px"}), "small"),
        _control("seed", dcc.Input(id="live-seed", type="number", min=0, step=1, value=0,
                                   style={"width": "90px"}), "small"),
    ], id="live-diff-inputs", className="row", style=HIDDEN)
    return html.Div([html.Div(id="live-media-hint", className="hint"), vlm, diffusion], id="live-media-inputs")


def media_card() -> Any:
    """The image card: controls (map kind for a VLM; word, step, site for diffusion), an explanation, three
    figures. Hidden for text captures."""
    from dash import dcc, html

    radios = {"labelStyle": {"display": "inline-block", "marginRight": "10px"}}
    vlm = html.Div([_control("map over the image", dcc.RadioItems(id="live-media-map-kind", value="rollout",
                                                                  options=list(MAP_KINDS), **radios), "small")],
                   id="live-vlm-controls", className="row", style=HIDDEN)
    diffusion = html.Div([
        _control("word", dcc.Dropdown(id="live-media-word", options=[], clearable=False)),
        _control("step", dcc.Dropdown(id="live-media-step", options=[], value="all", clearable=False)),
        _control("site (per-head view)", dcc.Dropdown(id="live-media-site", options=[], value=0, clearable=False)),
    ], id="live-diff-controls", className="row", style=HIDDEN)
    figures = html.Div([
        html.Div([dcc.Graph(id="live-media-image", config=GRAPH)], style={"flex": "0 0 300px"}),
        html.Div([dcc.Graph(id="live-media-map", config=GRAPH)], className="grow"),
        html.Div([dcc.Graph(id="live-media-heads", config=GRAPH)], className="grow"),
    ], className="row")
    return html.Div([
        html.Div([html.B("Image "), html.Span(id="live-media-about", className="hint")]),
        vlm, diffusion, html.Div(id="live-media-msg", className="msg"), figures,
    ], id="live-media-card", className="card", style={**HIDDEN, "marginTop": "14px"})


__all__ = ["DEFAULT_STEPS", "MEDIA_STATES", "media_card", "media_inputs"]
