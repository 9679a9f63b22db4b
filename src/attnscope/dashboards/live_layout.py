"""The live page: type a sentence (or token ids), capture, and see every view of it at once; ablate a head and
see the change; save the capture into the results folder.

Component ids (all ``live-*``) are the contract between this module, ``live_callbacks`` and the browser tests.

Example:
    >>> from attnscope.dashboards.live_layout import live_page
    >>> page = live_page(["minilm"], "minilm")
    >>> "live-capture" in str(page) and "live-long" in str(page)
    True
"""

from typing import Any

from .live_ablation import LIVE_MODES
from .live_analysis_layout import analysis_card
from .live_media_layout import media_card, media_inputs
from .live_state import INPUT_MODES

EXAMPLE_TEXT = "The cat sat on the mat because it was warm, and the dog watched it from the door."
GRAPH = {"displaylogo": False, "modeBarButtonsToRemove": ["lasso2d", "select2d"]}
CARD = {"marginTop": "14px"}


def _control(label: str, component: Any, extra: str = "") -> Any:
    from dash import html

    return html.Div([html.Label(label), component], className=f"control {extra}".strip())


def _graph(graph_id: str, height: str | None = None) -> Any:
    from dash import dcc

    style = {"height": height} if height else {}
    return dcc.Graph(id=graph_id, config=GRAPH, style=style)


def _input_card(choices: list[str], default: str | None) -> Any:
    from dash import dcc, html

    return html.Div([
        html.Div([
            _control("model", dcc.Dropdown(id="live-model", options=choices, value=default or choices[0],
                                           clearable=False), "small"),
            _control("input", dcc.RadioItems(id="live-mode", options=list(INPUT_MODES), value="text",
                                              labelStyle={"display": "inline-block", "marginRight": "10px"}),
                     "small"),
            _control("text (or token ids)", dcc.Textarea(id="live-text", value=EXAMPLE_TEXT,
                                                         style={"height": "44px", "width": "100%"})),
            html.Button("Capture", id="live-capture", className="run", n_clicks=0),
            _control("selected head (Enter)", dcc.Input(id="live-head-input", type="text", value="L0H0",
                                                        debounce=True), "small"),
        ], className="row", style={"alignItems": "flex-end"}),
        media_inputs(),  # image picker / upload (VLM), steps / seed (diffusion): shown for those models
        html.Div(id="live-status", className="hint"),
        html.Div(id="live-head-msg", className="msg"),
        html.Div(id="live-error", className="msg"),
    ], className="card")


def _views() -> Any:
    from dash import dcc, html

    head_scope = dcc.RadioItems(id="live-head-scope", inline=True, value="layer",
                                options=[{"label": " all heads of the layer", "value": "layer"},
                                         {"label": " selected head", "value": "head"}])
    return html.Div([
        html.Div([_graph("live-model-view"), html.Div(id="live-selected", className="hint")],
                 className="card grow"),
        html.Div([_graph("live-pattern")], className="card grow"),
        html.Div([html.Div([html.Span("head view: hover a token ", className="hint"), head_scope]),
                  _graph("live-head-view")], className="card grow"),
        html.Div([_graph("live-qk")], className="card grow"),
    ], className="row", style=CARD)


def _ablation_card() -> Any:
    from dash import dcc, html

    return html.Div([
        html.Div([html.B("Ablate "), html.Span("re-run this input with heads ablated and see what moved; mean / "
                                               "resample draw from what `attnscope ablate` uses: 64 inputs of the "
                                               "model's default suite (zoo: its own task, else sentences), seed + 1; "
                                               "vision encoder: 64 shapes scenes; diffusion: the same prompt, steps "
                                               "and seed rerun, zero / uniform only", className="hint")]),
        html.Div([
            _control("heads", dcc.Input(id="live-abl-heads", type="text", value="", placeholder="L2H3 or L2H*"),
                     "small"),
            _control("mode", dcc.Dropdown(id="live-abl-mode", options=list(LIVE_MODES), value="zero",
                                          clearable=False), "small"),
            html.Button("Ablate", id="live-ablate", className="run", n_clicks=0),
        ], className="row", style={"alignItems": "flex-end"}),
        html.Div(id="live-abl-summary", className="result"),
        html.Div(id="live-abl-box", style={"display": "none"}, children=[html.Div([
            html.Div([_graph("live-abl-grid")], className="grow"),
            html.Div([_graph("live-abl-pattern")], className="grow"),
        ], className="row"), _graph("live-abl-tokens")]),
    ], className="card", style=CARD)


def _long_card() -> Any:
    from dash import dcc, html

    return html.Div([
        html.Div([html.B("Long-sequence view "),
                  html.Span("block aggregates of the selected head (drag a box to zoom in: the blocks get finer)",
                            className="hint")]),
        html.Div([
            _control("blocks", dcc.RadioItems(id="live-long-how", options=["mean", "max"], value="mean",
                                              labelStyle={"display": "inline-block", "marginRight": "10px"}),
                     "small"),
            html.Button("Reset zoom", id="live-long-reset", n_clicks=0),
            html.Span(id="live-long-busy", className="hint"),
        ], className="row", style={"alignItems": "flex-end"}),
        _graph("live-long"),
        html.Div(id="live-long-msg", className="msg"),
    ], className="card", style=CARD)


def live_page(choices: list[str], default: str | None) -> Any:
    """The whole live tab."""
    from dash import dcc, html

    return html.Div([
        dcc.Store(id="live-key"),
        dcc.Store(id="live-head", data=[0, 0]),
        dcc.Store(id="live-ablation"),
        dcc.Store(id="live-long-state"),
        _input_card(choices, default),
        _views(),
        media_card(),
        html.Div([_graph("live-attribution")], className="card", style=CARD),
        _ablation_card(),
        analysis_card(),
        _long_card(),
        html.Div([
            html.Button("Save capture to the results folder", id="live-save", n_clicks=0),
            html.Div(id="live-saved", className="result"),
        ], className="card", style=CARD),
    ], className="page")


__all__ = ["EXAMPLE_TEXT", "live_page"]
