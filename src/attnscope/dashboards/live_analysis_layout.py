"""The live page's Analysis card: score (a registered head analysis), attribute (rollout, flow, relevance) and
patch (clean vs a corrupted input, causal LMs) on the current capture, and Save of the results.

Component ids (all ``live-an-*``) are the contract between this module, ``live_analysis_callbacks`` and the
browser tests.

Example:
    >>> from attnscope.dashboards.live_analysis_layout import analysis_card
    >>> card = str(analysis_card())
    >>> all(i in card for i in ("live-an-score", "live-an-attribute", "live-an-patch", "live-an-save"))
    True
"""

from typing import Any

from .live_analysis import ATTRIBUTION_METHODS, PATCH_METHODS, SCORE_ANALYSES

GRAPH = {"displaylogo": False, "modeBarButtonsToRemove": ["lasso2d", "select2d"]}
ROW = {"alignItems": "flex-end", "marginTop": "6px"}
HIDDEN = {"display": "none"}


def _control(label: str, component: Any, extra: str = "small") -> Any:
    from dash import html

    return html.Div([html.Label(label), component], className=f"control {extra}".strip())


def _graph(graph_id: str, extra: str = "") -> Any:
    """A graph in a box the callbacks show once there is a result (``{graph_id}-box``)."""
    from dash import dcc, html

    return html.Div(dcc.Graph(id=graph_id, config=GRAPH), id=f"{graph_id}-box", style=HIDDEN, className=extra)


def _score_row() -> Any:
    from dash import dcc, html

    return html.Div([
        html.B("score", style={"width": "70px"}),
        _control("analysis", dcc.Dropdown(id="live-an-analysis", options=list(SCORE_ANALYSES), value="head-stats",
                                          clearable=False)),
        html.Button("Score", id="live-an-score", className="run", n_clicks=0),
        _control("metric shown", dcc.Dropdown(id="live-an-metric", options=[], value=None, clearable=False)),
        html.Span("one input: the captured tokens; causal LMs score the text's own next tokens", className="hint"),
    ], className="row", style=ROW)


def _attribute_row() -> Any:
    from dash import dcc, html

    return html.Div([
        html.B("attribute", style={"width": "70px"}),
        _control("method", dcc.RadioItems(id="live-an-method", options=list(ATTRIBUTION_METHODS), value="flow",
                                          labelStyle={"display": "inline-block", "marginRight": "10px"})),
        html.Button("Attribute", id="live-an-attribute", className="run", n_clicks=0),
    ], className="row", style=ROW)


def _patch_row() -> Any:
    from dash import dcc, html

    return html.Div([
        html.Div([
            html.B("patch", style={"width": "70px"}),
            _control("corrupted text (same number of tokens)",
                     dcc.Textarea(id="live-an-corrupt", value="", placeholder="the captured text with a few "
                                  "tokens changed", style={"height": "40px", "width": "100%"}), ""),
            _control("answer", dcc.Input(id="live-an-answer", type="text", value="", placeholder="top next token",
                                         debounce=True)),
            _control("foil", dcc.Input(id="live-an-foil", type="text", value="",
                                       placeholder="top next on corrupted", debounce=True)),
            _control("method", dcc.Dropdown(id="live-an-patch-method", options=list(PATCH_METHODS), value="exact",
                                            clearable=False)),
            html.Button("Patch", id="live-an-patch", className="run", n_clicks=0),
        ], className="row", style=ROW),
        html.Div(id="live-an-patch-note", className="hint",
                 children="causal LMs: effect of each head's corrupted output on logit(answer) − logit(foil) at the "
                          "last token; answer / foil: a token, or #id"),
    ])


def analysis_card() -> Any:
    """The Analysis card (placed by ``live_layout.live_page``)."""
    from dash import dcc, html

    return html.Div([
        dcc.Store(id="live-an-result"),
        html.Div([html.B("Analysis "), html.Span("run an analysis on this capture; click a grid cell to select its "
                                                 "head; Save writes the results into the results folder",
                                                 className="hint")]),
        _score_row(),
        _attribute_row(),
        _patch_row(),
        html.Div(id="live-an-busy", className="hint"),
        html.Div(id="live-an-error", className="msg"),
        html.Div(id="live-an-summary", className="result", style={"whiteSpace": "pre-line"}),
        html.Div([_graph("live-an-grid", "grow"), _graph("live-an-patch-grid", "grow")], className="row"),
        _graph("live-an-attr"),
        html.Div([html.Button("Save analysis results to the results folder", id="live-an-save", n_clicks=0),
                  html.Div(id="live-an-saved", className="result")]),
    ], className="card", style={"marginTop": "14px"})


__all__ = ["analysis_card"]
