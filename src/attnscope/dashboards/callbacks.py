"""The dashboard's callbacks. Every path that arrives from the browser goes through ``ResultsRoot.resolve`` first:
component values can be forged by any client, so a listed option is never trusted.

The view functions (``grid_view``, ``pattern_view``, ``diff_view``, ``deep_link``, and ``maps.map_view`` /
``maps.maps_view`` for images) are plain functions of the root and the request values, tested without a browser.
"""

import json
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import parse_qs, quote

import plotly.graph_objects as go

from ..errors import AttnscopeError, InputError
from ..probes.site import Site
from ..viz._common import base_layout, new_figure
from ..viz.attribution import attribution_by_layer, token_attribution
from ..viz.heads import head_grid, head_grid_diff
from ..viz.pattern import attention_pattern, top_attended, trace_pattern
from .ablation import run_ablation
from .data import load_site, load_table, read_json, trace_header
from .sweep_cells import sweep_cell
from .estimates import estimate_grid, has_estimate_flags, split_rows
from .files import PathRefused, ResultsRoot
from .layout import MAP_MODE, PATTERN_MODES
from .maps import fit_strings, is_map_table, map_choices, map_view, map_words, maps_view
from .target import resolve_target, target_heads
from .url_state import is_attribution_table, metric_choice, read_view, register_url_callbacks, site_choice

MAP_TABLE_NOTE = ("this table holds heat maps (word × y × x), not per-head values:<br>"
                  "see the Maps card below the pattern view")
ALL_LAYERS = "all"  # the attribution layer picker's value for the layers x tokens heat map


def message_figure(text: str, height: int = 300, color: str = "#8a1c12") -> go.Figure:
    """An empty figure showing ``text`` (for errors and empty states)."""
    fig = new_figure()
    fig.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=13, color=color))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return base_layout(fig, None, height=height)


def deep_link(root: ResultsRoot, search: str | None) -> tuple[str | None, dict[str, str], list[str]]:
    """(run folder or None, valid ``table``/``trace`` values, error messages) of a ``?table=..&trace=..`` query."""
    query = parse_qs((search or "").lstrip("?"))
    picked: dict[str, str] = {}
    errors: list[str] = []
    run = None
    for key, kinds in (("table", ("table",)), ("trace", ("trace",)), ("file", ("table", "trace", "json"))):
        for value in query.get(key, [])[:1]:
            try:
                root.resolve(value, kinds)
            except PathRefused as exc:
                errors.append(f"{key}: {exc}")
                continue
            picked[key] = value
            parent = PurePosixPath(value.replace("\\", "/")).parent.as_posix()
            run = run if run is not None else ("" if parent == "." else parent)
    return run, picked, errors


def clicked_head(click: Any) -> tuple[int, int] | None:
    """(layer, head) of a head-grid ``clickData`` (its ``customdata``, else the cell's y and x), or None."""
    try:
        point = click["points"][0]
        data = point.get("customdata")
        if isinstance(data, (list, tuple)) and len(data) == 2:
            return int(data[0]), int(data[1])
        return int(point["y"]), int(point["x"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def attribution_layers(df: Any) -> list[int]:
    """The sorted layers of an attribution table (one per row group; ``[-1]`` for a single, layer-less one)."""
    return sorted(int(v) for v in df["layer"].unique())


def layer_choice(root: ResultsRoot, table: str | None) -> tuple[list[dict], Any, bool]:
    """(options, value, shown) of the attribution layer picker: each layer plus "all layers", the last layer
    picked; hidden (no options) for other tables and for attribution tables with one layer."""
    if not table:
        return [], None, False
    try:
        df = load_table(root.resolve(table, ("table",))).df
    except AttnscopeError:
        return [], None, False
    if not is_attribution_table(df) or df["layer"].nunique() < 2:
        return [], None, False
    layers = attribution_layers(df)
    options = [{"label": f"layer {layer}", "value": layer} for layer in layers]
    return options + [{"label": "all layers", "value": ALL_LAYERS}], layers[-1], True


def grid_click(click: Any) -> tuple[int, int] | None:
    """``clicked_head`` of a click on the grid card; None for a click on a token of an attribution table (its
    ``customdata`` is the token position, a number, where head-grid cells carry ``[layer, head]``)."""
    try:
        data = click["points"][0].get("customdata")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    return None if isinstance(data, (int, float)) else clicked_head(click)


def selection(root: ResultsRoot, trigger: str | None, search: str | None, run: str | None, table: str | None,
              trace: str | None) -> dict[str, Any]:
    """What the pickers show after ``trigger`` (None or ``url``: page load or a new URL; ``run``, ``table``,
    ``trace``).

    Returns the keys to update (``run``, ``table_options``, ``table``, ``metric_options``, ``metric``,
    ``trace_options``, ``trace``, ``site_options``, ``site``), ``files`` of the run, ``run_changed`` and
    ``errors`` (values of the URL that were ignored, refused paths). Every path is checked by ``root``; forged
    values select nothing. A URL naming the run, table and trace on screen changes nothing here (``unchanged``:
    the echo of the page's own URL write, see ``url_state``).
    """
    out: dict[str, Any] = {"errors": [], "files": [], "run_changed": trigger in (None, "url", "run")}
    if trigger in ("table", "trace"):
        if trigger == "table":
            out["metric_options"], out["metric"] = metric_choice(root, table)
        else:
            out["site_options"], out["site"] = site_choice(root, trace)
        return out
    if trigger in (None, "url"):
        view, out["errors"] = read_view(root, search)
        if trigger == "url" and run is not None and (view.run, view.table, view.trace) == (run, table, trace):
            return {"unchanged": True, "errors": out["errors"], "files": []}
        if view.run is None:
            return out | {"table_options": [], "table": None, "trace_options": [], "trace": None}
        chosen = root.run(view.run)
        table, trace, metric, site = view.table, view.trace, view.metric, view.site
    else:
        try:
            chosen = root.run(run or "")
        except PathRefused as exc:
            runs = root.runs()
            out["errors"].append(f"run: {exc}")
            if not runs:
                return out | {"table_options": [], "table": None, "trace_options": [], "trace": None}
            chosen = runs[0]
        table, trace = (chosen.tables or [None])[0], (chosen.traces or [None])[0]
        metric, site = metric_choice(root, table)[1], site_choice(root, trace)[1]
    out.update(run=chosen.path, table_options=chosen.table_options(), table=table, trace_options=chosen.traces,
               trace=trace, files=chosen.files(), metric=metric, site=site)
    out["metric_options"] = metric_choice(root, table)[0]
    out["site_options"] = site_choice(root, trace)[0]
    return out


def grid_view(root: ResultsRoot, table: str, metric: str | None, selected: Any = None,
              layer: Any = None) -> go.Figure:
    """The head grid of a table; heat-map tables (layer = head = -1) get a note pointing to the Maps card, and
    token attribution tables (``attnscope attribute``) their token view (``attribution_view``)."""
    path = root.resolve(table, ("table",))
    loaded = load_table(path)
    if is_map_table(loaded.df):
        return message_figure(MAP_TABLE_NOTE, color="#555")
    if is_attribution_table(loaded.df):
        return attribution_view(loaded, table, metric, layer)
    sel = tuple(int(v) for v in selected) if selected else None
    name = _table_name(root, table, table)  # a sweep cell by its labels
    if has_estimate_flags(loaded.df):  # a patching table: estimates and exact values drawn apart
        return estimate_grid(loaded, metric, title=f"{metric} · {name}", selected=sel)
    return head_grid(loaded, metric, title=f"{metric} · {name}", selected=sel)


def _picked_layer(layer: Any, layers: list[int]) -> int | None:
    """The layer asked for (``None``: the last); a value from the browser that is not a layer of the table is an
    InputError (component values can be forged)."""
    if layer is None or len(layers) < 2:
        return None
    try:
        picked: int | None = int(str(layer).strip())
    except ValueError:
        picked = None
    if picked not in layers:
        raise InputError("layer not in table", expected=layers, got=str(layer)[:40], fix="pick a listed layer")
    return picked


def attribution_view(loaded: Any, table: str, metric: str | None, layer: Any = None) -> go.Figure:
    """A token attribution table as coloured text, one layer (``layer``; default the last) or, for
    ``layer == "all"``, the layers x tokens heat map (``viz.attribution``)."""
    metrics = list(dict.fromkeys(loaded.df["metric"].astype(str)))
    metric = metric if metric in metrics else (metrics[0] if metrics else None)
    layers = attribution_layers(loaded.df[loaded.df["metric"].astype(str) == metric] if metric else loaded.df)
    if layer == ALL_LAYERS and len(layers) > 1:
        return attribution_by_layer(loaded, metric, title=f"{metric} by layer · {table}")
    picked = _picked_layer(layer, layers)
    shown = picked if picked is not None else layers[-1]
    where = f" · layer {shown}" if shown >= 0 else ""
    return token_attribution(loaded, metric=metric, layer=picked, title=f"{metric}{where} · {table}")


def diff_view(root: ResultsRoot, table: str, other: str, metric: str | None) -> go.Figure:
    """The difference grid ``other − table``; of a patching table only one kind of value is used, and the title
    says which (a verified table's estimates: its exact values cover only some heads)."""
    a, kind_a = _one_kind(load_table(root.resolve(table, ("table",))).df, metric)
    b, kind_b = _one_kind(load_table(root.resolve(other, ("table",))).df, metric)
    label_a = _table_name(root, table, other) + kind_a
    label_b = _table_name(root, other, table) + kind_b
    return head_grid_diff(a, b, metric, labels=(label_a, label_b), title=f"{metric}: {label_b} − {label_a}")


def _one_kind(df: Any, metric: str | None) -> tuple[Any, str]:
    """The rows of one kind of a patching table and its label (`` (estimate: atp*)``, `` (exact)``); other tables
    as they are. A mixed (verified) table gives its estimates, which cover every head."""
    if not has_estimate_flags(df) or df.empty:
        return df, ""
    estimates, exact, _ = split_rows(df, metric if metric in set(df["metric"].astype(str)) else None)
    if estimates.empty:
        return exact, " (exact)"
    methods = ", ".join(str(m) for m in dict.fromkeys(estimates["method"])) if "method" in estimates else ""
    return estimates, f" (estimate: {methods or 'estimate'})"


def _table_name(root: ResultsRoot, path: str, other: str) -> str:
    """A sweep cell's labels (``minilm · sentences · sinks · zero:L1H*``) for a sweep result, else ``_short``."""
    cell = sweep_cell(root.resolve(path, ("table",)))
    return cell.label if cell is not None and cell.label else _short(path, other)


def _short(path: str, other: str) -> str:
    """The run folder of ``path`` when it differs from ``other``'s, else the file name."""
    mine, theirs = PurePosixPath(path), PurePosixPath(other)
    if path == other:
        return path
    return (mine.parent.as_posix() if mine.parent != theirs.parent and mine.parent.as_posix() != "." else mine.name)


def pattern_view(root: ResultsRoot, trace: str, site_value: str | None, item: Any, spec: str | None,
                 click: tuple[int, int] | None, mode: str) -> tuple[go.Figure, list[tuple[int, str, float]]]:
    """The pattern figure and the top attended keys of the clicked head (or of ``spec``, e.g. ``L2H*``)."""
    t = resolve_target(root, trace, site_value, item, spec, click)
    one = fit_strings(load_site(t.path, Site(t.tower, t.layer, t.kind), None, t.batch))
    heads = target_heads(t, one.get(Site(t.tower, t.layer, t.kind)).heads())
    pattern = trace_pattern(one, t.layer, heads, tower=t.tower, kind=t.kind)
    # the one-record trace holds batch item t.batch as its item 0: title it with the item the user picked
    pattern.title = pattern.title.replace(" · item 0 · ", f" · item {t.batch} · ", 1)
    fig = attention_pattern(pattern, mode="topk" if mode == "topk" else "auto")
    return fig, top_attended(pattern, 10)


def _top_table(top: list[tuple[int, str, float]]) -> Any:
    from dash import html

    head = html.Tr([html.Th("key"), html.Th("token"), html.Th("mean attention received")])
    rows = [html.Tr([html.Td(str(p)), html.Td(t), html.Td(f"{v:.4f}")]) for p, t, v in top]
    return html.Table([head] + rows, className="top", id="top-table")


def _file_item(root: ResultsRoot, relative: str) -> Any:
    """A download link; JSON files also show their content (read through the path rule, at most 200 kB)."""
    from dash import html

    link = html.A(relative, href="/files/" + quote(relative), target="_blank")
    if not relative.lower().endswith(".json"):
        return html.Li(link)
    try:
        text = json.dumps(read_json(root.resolve(relative, ("json",))), indent=1)[:20_000]
    except AttnscopeError as exc:
        text = str(exc)
    except (RecursionError, TypeError, ValueError) as exc:  # a bad file is shown as a bad file
        text = f"cannot show this JSON file ({type(exc).__name__}): download it instead"
    return html.Li(html.Details([html.Summary(link), html.Pre(text, className="result")]))


def _provenance(root: ResultsRoot, table: str | None) -> str:
    if not table:
        return ""
    try:
        provenance = load_table(root.resolve(table, ("table",))).provenance
    except AttnscopeError:
        return ""
    return json.dumps(provenance, indent=1, default=str)[:20_000]


def check_same_model(root: ResultsRoot, trace: str | None, model: Any) -> None:
    """InputError when the trace on screen was captured from another model than ``model`` (the panel would
    otherwise report another model's heads under this run)."""
    captured = _captured_model(root, trace)
    running = getattr(model, "name", None)
    if captured and running and str(captured) != str(running):
        raise InputError("the run on screen came from another model", expected=f"a run of {running}",
                         got=f"{trace} captured from {captured}",
                         fix=f"restart the dashboard with --model {captured}, or pick a run of {running}")


def _captured_model(root: ResultsRoot, trace: str | None) -> str | None:
    if not trace:
        return None
    try:
        captured = trace_header(root.resolve(trace, ("trace",))).provenance.get("model")
    except AttnscopeError:
        return None  # the trace view already shows why it cannot be read
    return str(captured) if captured else None


def ablation_model(root: ResultsRoot, trace: str | None, model: Any, offered: Any = None) -> Any:
    """The model the ablation panel runs for the run on screen: the start-up ``model`` when the run came from it
    (or no run is on screen); else the run's own model when the page offers it by name (``offered``: the live
    page's ``LiveSession``: MiniLM and the zoo's organisms, loaded once and kept); else InputError.

    Only names the page offers are ever loaded: a model path written into a result file is never followed."""
    captured = _captured_model(root, trace)
    running = getattr(model, "name", None)
    if captured is None or (running is not None and captured == str(running)):
        if model is None:
            raise InputError("no model to ablate", expected="a run captured from a model this page offers, or "
                             "a dashboard started with --model", got=trace or "no trace on screen",
                             fix="pick a run of minilm or a zoo organism, or start with --model NAME")
        return model
    if offered is not None and captured in offered.choices():
        return offered.model(captured)
    if model is None:
        raise InputError("the run on screen came from a model this page does not offer", expected=
                         f"a run of one of {offered.choices() if offered is not None else []}",
                         got=f"{trace} captured from {captured}", fix=f"start the dashboard with --model {captured}")
    check_same_model(root, trace, model)
    return model


def _ablation_text(result: dict) -> str:
    delta = result["metric_after"] - result["metric_before"]
    return (f"{result['metric']}: {result['metric_before']:.4f} → {result['metric_after']:.4f} ({delta:+.4f})\n"
            f"heads {result['heads']} · mode {result['mode']} · via {result['path']} · {result['seconds']:.2f} s\n"
            f"before: {result['output_before']}\nafter:  {result['output_after']}")


def register_map_callbacks(app: Any, root: ResultsRoot) -> None:
    """Wire the map mode's pickers (offered only for traces with image structure) and the Maps card."""
    from dash import Input, Output, State, no_update

    @app.callback(Output("mode", "options"), Output("mode", "value"), Output("map-token", "options"),
                  Output("map-token", "value"), Output("map-token", "placeholder"), Output("map-step", "options"),
                  Output("map-step", "value"), Input("trace", "value"), Input("site", "value"),
                  Input("item", "value"), State("mode", "value"))
    def _map_pickers(trace, site, item, mode):
        able, what, tokens, steps = map_choices(root, trace, site, item)
        options = PATTERN_MODES + [MAP_MODE] if able else PATTERN_MODES
        value = "auto" if mode == "map" and not able else no_update
        return options, value, tokens, None, what or "nothing to pick", steps, steps[0] if steps else None

    @app.callback(Output("map-controls", "style"), Input("mode", "value"))
    def _map_controls(mode):
        return {"display": "flex"} if mode == "map" else {"display": "none"}

    @app.callback(Output("maps-card", "style"), Output("maps-word", "options"), Output("maps-word", "value"),
                  Output("maps-item", "options"), Output("maps-item", "value"), Input("table", "value"),
                  State("maps-word", "value"), State("maps-item", "value"))
    def _maps_pickers(table, word, item):
        hidden = {"display": "none", "marginTop": "14px"}
        try:
            df = load_table(root.resolve(table, ("table",))).df if table else None
        except AttnscopeError:
            df = None
        if df is None or not is_map_table(df):
            return hidden, [], None, [], None
        words, items = map_words(df)
        # the table can be set again (URL sync) after the user picked: keep a pick that is still valid
        word = word if word in words else (words[0] if words else None)
        return hidden | {"display": "block"}, words, word, items, item if item in items else items[0]

    @app.callback(Output("maps-fig", "figure"), Output("maps-msg", "children"), Input("maps-word", "value"),
                  Input("maps-item", "value"), Input("table", "value"))
    def _maps_figure(word, item, table):
        if not table or word is None:
            return no_update, ""
        try:
            return maps_view(root, table, word, item), ""
        except AttnscopeError as exc:
            return message_figure(str(exc)[:160]), str(exc)


def register_callbacks(app: Any, root: ResultsRoot, model: Any = None, offered: Any = None) -> None:
    """Wire the page of ``layout.build_layout`` to the views (``offered``: the models the ablation panel may load
    for a run of another model, ``ablation_model``)."""
    from dash import Input, Output, State, ctx, html, no_update

    register_map_callbacks(app, root)
    register_url_callbacks(app, root)

    selection_outputs = [Output("run", "value"), Output("table", "options"), Output("table", "value"),
                         Output("metric", "options"), Output("metric", "value"), Output("trace", "options"),
                         Output("trace", "value"), Output("site", "options"), Output("site", "value"),
                         Output("files", "children"), Output("alert", "children")]

    @app.callback(*selection_outputs, Input("url", "search"), Input("run", "value"), Input("table", "value"),
                  Input("trace", "value"), State("url-own", "data"))
    def _select(search, run, table, trace, own):
        # one callback (inputs that are also outputs are allowed within one callback), so the grid and the pattern
        # wait for one round trip after the page loads, not a chain of four
        echo = ctx.triggered_id == "url" and own is not None and search == own  # the page's own URL write
        state = {"unchanged": True} if echo else selection(root, ctx.triggered_id, search, run, table, trace)
        if state.get("unchanged"):
            return (no_update,) * 11
        files = [_file_item(root, f) for f in state.pop("files")]
        errors = state.pop("errors")
        alert = html.Div([html.B("Ignored: "), "; ".join(errors)], className="alert", id="refused") if errors else None
        values = [state.get(key, no_update) for key in ("run", "table_options", "table", "metric_options", "metric",
                                                        "trace_options", "trace", "site_options", "site")]
        return *values, files if state.get("run_changed") else no_update, alert

    @app.callback(Output("attr-layer", "options"), Output("attr-layer", "value"), Output("attr-layer-box", "style"),
                  Input("table", "value"), Input("metric", "value"))
    def _attr_layer(table, _metric):
        # a new table or metric: back to the last layer, the layer _grid draws
        options, value, shown = layer_choice(root, table)
        return options, value, {"display": "flex" if shown else "none"}

    @app.callback(Output("head-grid", "figure"), Output("grid-msg", "children"), Input("table", "value"),
                  Input("metric", "value"), Input("selected", "data"))
    def _grid(table, metric, selected):
        if not table:
            return message_figure("no result table in this run"), ""
        try:
            return grid_view(root, table, metric, selected), ""
        except AttnscopeError as exc:
            return message_figure(str(exc)[:160]), str(exc)

    @app.callback(Output("head-grid", "figure", allow_duplicate=True),
                  Output("grid-msg", "children", allow_duplicate=True), Input("attr-layer", "value"),
                  State("table", "value"), State("metric", "value"), prevent_initial_call=True)
    def _grid_layer(layer, table, metric):
        # the attribution layer picker redraws the grid card (a separate callback: _grid's inputs are unchanged)
        if not table or layer is None:
            return no_update, no_update
        try:
            return grid_view(root, table, metric, None, layer), ""
        except AttnscopeError as exc:
            return message_figure(str(exc)[:160]), str(exc)

    @app.callback(Output("provenance", "children"), Input("table", "value"))
    def _table_provenance(table):
        return _provenance(root, table)

    @app.callback(Output("selected", "data"), Output("heads", "value"), Output("abl-heads", "value"),
                  Input("head-grid", "clickData"), prevent_initial_call=True)
    def _click(click):
        data = grid_click(click)
        if data is None:
            return no_update, no_update, no_update
        label = f"L{int(data[0])}H{int(data[1])}"
        return [int(data[0]), int(data[1])], label, label

    @app.callback(Output("pattern", "figure"), Output("top-tokens", "children"), Output("pattern-msg", "children"),
                  Input("head-grid", "clickData"), Input("heads", "n_submit"), Input("trace", "value"),
                  Input("site", "value"), Input("item", "value"), Input("mode", "value"), Input("map-token", "value"),
                  Input("map-step", "value"), State("heads", "value"))
    def _pattern(click, _submit, trace, site, item, mode, token, step, spec):
        if not trace:
            return message_figure("no trace (.safetensors) in this run: patterns need one"), None, ""
        point = grid_click(click)
        if ctx.triggered_id == "head-grid" and point is None and clicked_head(click) is not None:
            return no_update, no_update, no_update  # a token of an attribution table, not a head
        use_click = point if ctx.triggered_id == "head-grid" or not spec else None
        try:
            if mode == "map":
                return map_view(root, trace, site, item, spec, use_click, token, step)[0], None, ""
            fig, top = pattern_view(root, trace, site, item, spec, use_click, mode)
        except AttnscopeError as exc:
            return message_figure(str(exc)[:160]), None, str(exc)
        return fig, _top_table(top), ""

    @app.callback(Output("diff-grid", "figure"), Output("diff-box", "style"), Input("compare", "value"),
                  Input("table", "value"), Input("metric", "value"))
    def _diff(other, table, metric):
        if not other or not table:
            return no_update, {"display": "none"}
        try:
            return diff_view(root, table, other, metric), {"display": "block"}
        except AttnscopeError as exc:
            return message_figure(str(exc)[:160]), {"display": "block"}

    @app.callback(Output("abl-result", "children"), Input("abl-run", "n_clicks"), State("abl-heads", "value"),
                  State("abl-mode", "value"), State("abl-scale", "value"), State("abl-text", "value"),
                  State("abl-answer", "value"), State("trace", "value"), prevent_initial_call=True)
    def _ablate(_n, heads, mode, scale, text, answer, trace):
        try:
            handle = ablation_model(root, trace, model, offered)
            result = run_ablation(handle, heads or "", mode, text or "", scale=scale, answer=answer or None)
        except AttnscopeError as exc:
            return f"error: {exc}"
        return html.Span(f"model {getattr(handle, 'name', None) or 'model'} · " + _ablation_text(result), id="abl-done")


__all__ = ["ALL_LAYERS", "MAP_TABLE_NOTE", "ablation_model", "attribution_view", "clicked_head", "deep_link", "diff_view", "grid_click",
           "grid_view", "is_attribution_table", "layer_choice", "message_figure", "pattern_view", "register_callbacks",
           "register_map_callbacks", "selection"]
