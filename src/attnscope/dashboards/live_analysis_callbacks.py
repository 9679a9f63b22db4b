"""Callbacks of the live page's Analysis card (``live_analysis_layout``): Score, Attribute and Patch run on the
current capture (``live-key``) in the app process; the browser holds only which result to draw
(``live-an-result``). Clicking a cell of the score or patch grid selects that head (``live-head``, shared with the
rest of the page). Save writes every result of the current capture into the results folder (``live/``). Every
error becomes one line (``live-an-error``); the run shows "running …" while it works.

Example:
    >>> import tempfile
    >>> from attnscope.dashboards.app import create_app
    >>> app = create_app(tempfile.mkdtemp())
    >>> any("live-an-grid.figure" in k for k in app.callback_map)
    True
"""

from typing import Any

import numpy as np

from ..errors import InputError
from ..viz.heads import head_grid
from . import live_views as views
from .files import ResultsRoot
from .live_analysis import LiveResult, attribute, patch, save_analysis, score
from .live_messages import error_line, note_figure
from .live_state import LiveCapture, LiveSession

KINDS = ("score", "attribute", "patch")
HIDDEN, SHOWN = {"display": "none"}, {"display": "block"}
PATCH_HINT = ("causal LMs: effect of each head's corrupted output on logit(answer) − logit(foil) at the last token; "
              "answer / foil: a token, or #id")


def _selected(cap: LiveCapture, head: Any) -> tuple[int, int] | None:
    try:
        return cap.check_head(int(head[0]), int(head[1]))
    except (InputError, TypeError, ValueError, IndexError):
        return None


def score_figure(cap: LiveCapture, result: LiveResult, metric: str | None, head: Any = None) -> Any:
    """The score grid (one metric of the analysis' table), the selected head outlined."""
    metric = metric if metric in result.metrics() else result.metrics()[0]
    fig = head_grid(result.table, metric, selected=_selected(cap, head),
                    title=f"{result.name}: {metric} (capture {cap.key}) · click a cell to select its head")
    return views.tag(fig, cap)


def patch_figure(cap: LiveCapture, result: LiveResult, head: Any = None) -> Any:
    """The patching grid: signed effects centred on 0 (exact, atp); atp* magnitudes on a sequential scale."""
    signed = result.name != "atp*"
    fig = head_grid(result.table, "logit_diff", title=result.title, selected=_selected(cap, head),
                    colorscale="RdBu_r" if signed else "Viridis")
    if signed:
        top = float(np.nanmax(np.abs(result.grid()))) or 1e-6
        fig.data[0].update(zmid=0.0, zmin=-top, zmax=top)
    return views.tag(fig, cap)


def grid_cell(click: Any) -> tuple[int, int]:
    """(layer, head) of a click on a head grid: its ``customdata`` when sent, else the cell's y (layer), x (head)."""
    point = click["points"][0]
    data = point.get("customdata")
    return (int(data[0]), int(data[1])) if data is not None else (int(point["y"]), int(point["x"]))


def _run(session: LiveSession, kind: str, key: str, args: dict) -> LiveResult:
    cap = session.get(key)
    handle = session.model(cap.model_name)
    if kind == "score":
        return score(handle, cap, args["analysis"])
    if kind == "attribute":
        return attribute(handle, cap, args["method"])
    return patch(handle, cap, args["corrupt"], args["answer"] or "", args["foil"] or "", args["patch_method"])


def register_analysis_callbacks(app: Any, session: LiveSession, root: ResultsRoot) -> None:
    """Wire the Analysis card to ``session`` (models, captures) and ``root`` (where its Save writes)."""
    results: dict[str, LiveResult] = {}
    register_run_callback(app, session, results)
    register_figure_callbacks(app, session, results)
    register_select_and_save(app, session, root, results)


def register_run_callback(app: Any, session: LiveSession, results: dict[str, LiveResult]) -> None:
    """Score / Attribute / Patch buttons -> a result kept server-side, its summary, and the metric choices."""
    from dash import Input, Output, State, ctx, no_update

    buttons = [Output(f"live-an-{b}", "disabled") for b in ("score", "attribute", "patch")]

    @app.callback(Output("live-an-result", "data"), Output("live-an-error", "children"),
                  Output("live-an-summary", "children"), Output("live-an-metric", "options"),
                  Output("live-an-metric", "value"), Input("live-an-score", "n_clicks"),
                  Input("live-an-attribute", "n_clicks"), Input("live-an-patch", "n_clicks"),
                  State("live-key", "data"), State("live-an-analysis", "value"), State("live-an-method", "value"),
                  State("live-an-corrupt", "value"), State("live-an-answer", "value"),
                  State("live-an-foil", "value"), State("live-an-patch-method", "value"), prevent_initial_call=True,
                  running=[(Output("live-an-busy", "children"), "running the analysis …", "")]
                  + [(b, True, False) for b in buttons])
    def _analyse(n_score, n_attr, n_patch, key, analysis, method, corrupt, answer, foil, patch_method):
        kind = {"live-an-score": "score", "live-an-attribute": "attribute", "live-an-patch": "patch"}.get(
            ctx.triggered_id)
        try:
            if not key:
                raise InputError("nothing captured yet", expected="a capture", got=None, fix="press Capture first")
            result = _run(session, kind, key, {"analysis": analysis, "method": method, "corrupt": corrupt,
                                               "answer": answer, "foil": foil, "patch_method": patch_method})
        except Exception as exc:  # noqa: BLE001 - one line in the page
            return no_update, error_line(exc), no_update, no_update, no_update
        results[kind] = result
        data = {"kind": kind, "key": key, "n": (n_score or 0) + (n_attr or 0) + (n_patch or 0)}
        if kind != "score":
            return data, "", result.summary, no_update, no_update
        metrics = result.metrics()
        return data, "", result.summary, metrics, metrics[0]


def register_figure_callbacks(app: Any, session: LiveSession, results: dict[str, LiveResult]) -> None:
    """The score grid, the patch grid and the attribution figure of the current capture (hidden otherwise)."""
    from dash import Input, Output

    def draw(kind: str, key: str | None, render) -> tuple[Any, dict]:
        result = results.get(kind)
        if not key or result is None or result.key != key:
            return note_figure("", 200), HIDDEN
        try:
            return render(session.get(key), result), SHOWN
        except Exception as exc:  # noqa: BLE001
            return note_figure(error_line(exc), 200), SHOWN

    @app.callback(Output("live-an-grid", "figure"), Output("live-an-grid-box", "style"),
                  Input("live-an-result", "data"), Input("live-an-metric", "value"), Input("live-head", "data"),
                  Input("live-key", "data"))
    def _score_grid(_data, metric, head, key):
        return draw("score", key, lambda cap, r: score_figure(cap, r, metric, head))

    @app.callback(Output("live-an-patch-grid", "figure"), Output("live-an-patch-grid-box", "style"),
                  Input("live-an-result", "data"), Input("live-head", "data"), Input("live-key", "data"))
    def _patch_grid(_data, head, key):
        return draw("patch", key, lambda cap, r: patch_figure(cap, r, head))

    @app.callback(Output("live-an-attr", "figure"), Output("live-an-attr-box", "style"),
                  Input("live-an-result", "data"), Input("live-key", "data"))
    def _attribution(_data, key):
        return draw("attribute", key, lambda cap, r: views.attribution_figure(cap, computed=(r.values, r.title)))

    @app.callback(Output("live-an-patch-note", "children"), Input("live-key", "data"))
    def _patch_note(key):
        try:
            cap = session.get(key) if key else None
        except InputError:
            cap = None
        if cap is not None and not cap.causal:
            return f"patching needs a causal LM: {cap.model_name} is an encoder (pick e.g. zoo:induction-2l)"
        return PATCH_HINT


def register_select_and_save(app: Any, session: LiveSession, root: ResultsRoot,
                             results: dict[str, LiveResult]) -> None:
    """A click on a grid cell selects its head; Save writes the current capture's results."""
    from dash import Input, Output, State, no_update

    @app.callback(Output("live-head", "data", allow_duplicate=True),
                  Output("live-abl-heads", "value", allow_duplicate=True), Input("live-an-grid", "clickData"),
                  Input("live-an-patch-grid", "clickData"), State("live-key", "data"), prevent_initial_call=True)
    def _select(click_score, click_patch, key):
        from dash import ctx

        click = click_score if ctx.triggered_id == "live-an-grid" else click_patch
        try:
            layer, head = session.get(key).check_head(*grid_cell(click))
        except (InputError, TypeError, KeyError, IndexError, ValueError):
            return no_update, no_update
        return [layer, head], f"L{layer}H{head}"

    @app.callback(Output("live-an-saved", "children"), Input("live-an-save", "n_clicks"), State("live-key", "data"),
                  prevent_initial_call=True)
    def _save(_n, key):
        try:
            cap = session.get(key)
            mine = [results[k] for k in KINDS if k in results and results[k].key == key]
            if not mine:
                raise InputError("nothing to save", expected="a result of this capture", got="none",
                                 fix="press Score, Attribute or Patch first")
            paths = [save_analysis(result, cap, root) for result in mine]
        except Exception as exc:  # noqa: BLE001
            return error_line(exc)
        return "saved: " + ", ".join(paths) + " (the results tab lists them after a reload)"


__all__ = ["grid_cell", "patch_figure", "register_analysis_callbacks", "score_figure"]
