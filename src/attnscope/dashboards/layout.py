"""The dashboard's page: run and table pickers, head grid, pattern view (pooled, top-k or image map), top tokens,
Maps card (heat-map tables), comparison, ablation panel.

Component ids are the contract between this module, ``callbacks``, ``url_state`` and the browser tests.
"""

from typing import Any

from .files import ResultsRoot

INDEX_CSS = """
body { font-family: Inter, Helvetica, Arial, sans-serif; margin: 0; background: #f5f6f8; color: #1f2430; }
.topbar { background: #1f2430; color: #fff; padding: 10px 20px; display: flex; align-items: baseline; gap: 16px; }
.topbar h1 { font-size: 18px; margin: 0; font-weight: 600; }
.topbar .dir { font-family: monospace; font-size: 12px; opacity: .75; }
.page { padding: 12px 20px; }
.row { display: flex; gap: 14px; flex-wrap: wrap; align-items: flex-start; }
.card { background: #fff; border-radius: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.08); padding: 10px 14px; }
.grow { flex: 1 1 520px; min-width: 420px; }
.control { display: flex; flex-direction: column; min-width: 180px; flex: 1 1 200px; font-size: 12px; }
.control label { font-weight: 600; margin-bottom: 3px; color: #555; }
.small { max-width: 110px; min-width: 90px; flex: 0 0 110px; }
.alert { background: #fdecea; color: #8a1c12; border: 1px solid #f5c2bd; border-radius: 6px; padding: 8px 12px;
         margin-bottom: 10px; font-size: 13px; }
.msg { color: #8a1c12; font-size: 12px; min-height: 16px; }
.hint { color: #777; font-size: 12px; }
table.top { border-collapse: collapse; font-size: 12px; width: 100%; }
table.top td, table.top th { border-bottom: 1px solid #eee; padding: 3px 6px; text-align: left; }
.files a { font-family: monospace; font-size: 12px; }
.result { font-size: 13px; white-space: pre-wrap; font-family: monospace; background: #f8f8fa; padding: 8px;
          border-radius: 6px; min-height: 24px; }
button.run { background: #2563eb; color: white; border: 0; border-radius: 6px; padding: 7px 16px; cursor: pointer; }
"""

INDEX_STRING = """<!DOCTYPE html>
<html>
  <head>
    {%metas%}
    <title>{%title%}</title>
    {%favicon%}
    {%css%}
    <style>""" + INDEX_CSS + """</style>
  </head>
  <body>
    {%app_entry%}
    <footer>{%config%}{%scripts%}{%renderer%}</footer>
  </body>
</html>"""

PATTERN_MODES = [{"label": " pooled", "value": "auto"}, {"label": " top-k", "value": "topk"}]
MAP_MODE = {"label": " map (image)", "value": "map"}  # offered when the trace site has image structure
GRAPH_CONFIG = {"displaylogo": False, "modeBarButtonsToRemove": ["lasso2d", "select2d"]}


def _control(label: str, component: Any, extra: str = "") -> Any:
    from dash import html

    return html.Div([html.Label(label), component], className=f"control {extra}".strip())


def _pickers(root: ResultsRoot) -> Any:
    from dash import dcc, html

    runs = root.runs()
    run_options = [r.option() for r in runs]  # a sweep cell by its spec labels; its folder (hash) on hover
    tables = [option for r in runs for option in r.table_options()]
    return html.Div([
        _control("run", dcc.Dropdown(id="run", options=run_options, value=runs[0].path if runs else None,
                                     clearable=False, placeholder="no result files found")),
        _control("result table", dcc.Dropdown(id="table", clearable=False)),
        _control("metric", dcc.Dropdown(id="metric", clearable=False)),
        _control("compare with (difference grid)", dcc.Dropdown(id="compare", options=tables,
                                                                placeholder="another table")),
    ], className="row card")


def _grid_panel() -> Any:
    from dash import dcc, html

    return html.Div([
        html.Div("Head grid — click a head to see its pattern", className="hint"),
        html.Div(_control("attribution layer", dcc.Dropdown(id="attr-layer", clearable=False), "small"),
                 id="attr-layer-box", className="row", style={"display": "none"}),
        dcc.Graph(id="head-grid", config=GRAPH_CONFIG),
        html.Div(id="grid-msg", className="msg"),
        html.Details([html.Summary("provenance of this table", className="hint"),
                      html.Pre(id="provenance", className="result")]),
        html.Div(id="diff-box", style={"display": "none"}, children=[
            dcc.Graph(id="diff-grid", config=GRAPH_CONFIG, responsive=True, style={"height": "380px"})]),
    ], className="card grow")


def _pattern_panel() -> Any:
    from dash import dcc, html

    return html.Div([
        html.Div([
            _control("trace", dcc.Dropdown(id="trace", clearable=False, placeholder="no trace in this run")),
            _control("site", dcc.Dropdown(id="site", clearable=False), "small"),
            _control("item", dcc.Input(id="item", type="number", min=0, step=1, value=0), "small"),
            _control("heads (Enter)", dcc.Input(id="heads", type="text", value="", debounce=True,
                                                placeholder="L2H7 or L2H*"), "small"),
            _control("view", dcc.RadioItems(id="mode", value="auto", inline=True, options=PATTERN_MODES)),
        ], className="row"),
        html.Div([
            _control("map token", dcc.Dropdown(id="map-token", placeholder="default")),
            _control("step", dcc.Dropdown(id="map-step", clearable=False), "small"),
        ], id="map-controls", className="row", style={"display": "none"}),
        dcc.Graph(id="pattern", config=GRAPH_CONFIG),
        html.Div(id="pattern-msg", className="msg"),
        html.Div(id="top-tokens"),
    ], className="card grow")


def _maps_panel() -> Any:
    from dash import dcc, html

    return html.Div([
        html.Div([html.B("Maps "), html.Span("heat maps of this table (word × y × x), over the run's image when "
                                             "the folder holds one", className="hint")]),
        html.Div([
            _control("word", dcc.Dropdown(id="maps-word", clearable=False)),
            _control("item", dcc.Dropdown(id="maps-item", clearable=False), "small"),
        ], className="row"),
        dcc.Graph(id="maps-fig", config=GRAPH_CONFIG),
        html.Div(id="maps-msg", className="msg"),
    ], id="maps-card", className="card", style={"display": "none", "marginTop": "14px"})


def _ablation_panel(model_name: str | None) -> Any:
    from dash import dcc, html

    from .ablation import MODES

    note = (f"model: {model_name}; a run of MiniLM or a zoo organism runs its own model" if model_name else
            "runs of MiniLM and zoo organisms run their own model; for others start with `attnscope dash --model NAME`")
    return html.Div([
        html.Div([html.B("Ablation "), html.Span(note, className="hint")]),
        html.Div([
            _control("heads", dcc.Input(id="abl-heads", type="text", value="", placeholder="L2H7,L3H*")),
            _control("mode", dcc.Dropdown(id="abl-mode", options=list(MODES), value="zero", clearable=False),
                     "small"),
            _control("scale (rescale)", dcc.Input(id="abl-scale", type="number", value=0.5), "small"),
            _control("text", dcc.Textarea(id="abl-text", value="The quick brown fox jumps over the lazy dog.",
                                          style={"height": "38px"})),
            _control("answer (LMs, optional)", dcc.Input(id="abl-answer", type="text", value=""), "small"),
            html.Button("Run ablation", id="abl-run", className="run", n_clicks=0,
                        disabled=model_name is None),
        ], className="row", style={"alignItems": "flex-end"}),
        dcc.Loading(html.Div(id="abl-result", className="result"), type="circle"),
    ], className="card", style={"marginTop": "14px"})


def build_layout(root: ResultsRoot, model_name: str | None,
                 live: "tuple[list[str], str | None] | None" = None) -> Any:
    """The whole page (called per page load, so new result files appear on reload).

    ``live``: (model choices, default model) of the live page; with it the page has two tabs, Results and Live
    (``?tab=live`` opens Live; so does an empty results folder).
    """
    from dash import dcc, html

    results = html.Div([
        html.Div(id="alert"),
        _pickers(root),
        html.Div([_grid_panel(), _pattern_panel()], className="row", style={"marginTop": "14px"}),
        _maps_panel(),
        _ablation_panel(model_name),
        html.Div([html.B("Files of this run "), html.Span("(download)", className="hint"),
                  html.Ul(id="files", className="files")], className="card", style={"marginTop": "14px"}),
    ], className="page")
    body = results
    if live is not None:
        from .live_layout import live_page

        body = dcc.Tabs(id="page-tab", value="results" if root.runs() else "live", children=[
            dcc.Tab(label="Results", value="results", children=results),
            dcc.Tab(label="Live: type, capture, see", value="live", children=live_page(*live)),
        ])
    return html.Div([
        dcc.Location(id="url", refresh=False),  # read: page load, back / forward (url_state)
        dcc.Location(id="url-write", refresh="callback-nav"),  # written: the view as a URL query (url_state)
        dcc.Store(id="url-own"),  # the last query the page wrote itself (its echo changes nothing)
        dcc.Store(id="selected"),
        html.Div([html.H1("attnscope"), html.Span(str(root.root), className="dir")], className="topbar"),
        body,
    ])


__all__ = ["GRAPH_CONFIG", "INDEX_STRING", "MAP_MODE", "PATTERN_MODES", "build_layout"]
