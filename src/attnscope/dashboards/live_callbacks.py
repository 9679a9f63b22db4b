"""Callbacks of the live page. The browser holds only the capture's key (``live-key``) and the selected head
(``live-head``); tokens, patterns and queries/keys stay in the app process (``LiveSession``). Every error of a
callback becomes one line in the page (``live-error``, or a message figure in place of a view).

Flow: Capture -> ``live-key`` -> model view, pattern, head view, QK embedding, attribution and long view redraw in
parallel callbacks. Clicking a model-view thumbnail (or typing a head) sets ``live-head``; hovering a token of the
head view redraws it with that token's lines brought out; clicking a QK point outlines that token's row (query) or
column (key) in the pattern; Ablate re-runs the input with heads ablated.

Example:
    >>> import tempfile
    >>> from attnscope.dashboards.app import create_app
    >>> app = create_app(tempfile.mkdtemp())        # the live page offers minilm and the zoo without --model
    >>> sorted(k for k in app.callback_map if "live-long.figure" in k)[0].startswith("..live-long.figure")
    True
"""

import importlib
import threading
from collections import OrderedDict
from typing import Any

import torch

from ..errors import InputError
from ..probes.heads import HeadSet
from ..viz.head_inputs import LayerInputs
from ..viz.head_lines import hovered_token
from ..viz.head_thumbnails import clicked_thumbnail
from ..viz.long_sequence import block_pattern, long_sequence_view
from . import live_views as views
from .files import ResultsRoot
from .live_ablation import LiveAblation, ablate
from .live_analysis_callbacks import register_analysis_callbacks
from .live_media_callbacks import register_media_callbacks
from .live_media_layout import MEDIA_STATES
from .live_messages import error_line, note_figure
from .live_save import save_capture
from .live_state import LiveCapture, LiveSession

PRESS = "press Capture to see this view"


def _head(cap: LiveCapture, head: Any) -> tuple[int, int]:
    """The selected head, or L0 H0 when the selection does not fit this capture's model."""
    try:
        return cap.check_head(int(head[0]), int(head[1]))
    except (InputError, TypeError, ValueError, IndexError):
        return 0, 0


def _parse_one_head(text: str, cap: LiveCapture) -> tuple[int, int]:
    heads = list(HeadSet.parse(text.strip(), n_layers=cap.n_layers, n_heads=cap.n_heads)
                 .validate(cap.n_layers, cap.n_heads))
    if len(heads) != 1:
        raise InputError("select one head", expected="e.g. L2H3", got=text[:40], fix="name a single head")
    return heads[0]


_WARMED: list[threading.Thread] = []


def _start_warm_up() -> None:
    """Run ``_warm_up`` once per process in a thread. Not a daemon: the interpreter waits the second it takes at
    exit instead of tearing torch down under it (which aborts the process)."""
    if not _WARMED:
        _WARMED.append(threading.Thread(target=_warm_up, name="attnscope-warm-up"))
        _WARMED[0].start()


def _warm_up() -> None:
    """Import and run once what the first capture would otherwise wait for: scikit-learn's PCA (about a second)
    and one small long-sequence figure (torch's first kernels, plotly's validators)."""
    try:
        importlib.import_module("sklearn.decomposition")
        qk = torch.randn(1, 64, 8, generator=torch.Generator().manual_seed(0))
        long_sequence_view(block_pattern(LayerInputs(0, qk, qk, None, 1.0, True, None, None, []), 0, max_cells=16))
    except Exception:  # noqa: BLE001 - missing, or the interpreter is exiting: the views report their own errors
        pass


def _view(session: LiveSession, key: str | None, render, height: int = 300) -> Any:
    """``render(cap)`` for capture ``key``; a note without a capture or for a long input; errors as one line."""
    if not key:
        return note_figure(PRESS, height)
    try:
        cap = session.get(key)
        if not cap.dense:
            return views.tag(note_figure(views.too_long_note(cap), min(height, 200)), cap)
        return render(cap)
    except Exception as exc:  # noqa: BLE001 - one line in the page instead of a dead view
        return note_figure(error_line(exc), height)


def register_live_callbacks(app: Any, session: LiveSession, root: ResultsRoot) -> None:
    """Wire the live page's components to ``session`` (models, captures) and ``root`` (where Save writes)."""
    _start_warm_up()
    ablations: dict[str, LiveAblation] = {}
    # ``?tab=live`` (and the tab written back into the URL) is handled with the rest of the URL by url_state
    register_capture_callbacks(app, session)
    register_view_callbacks(app, session)
    register_ablation_callbacks(app, session, ablations)
    register_long_callbacks(app, session)
    register_save_callback(app, session, root, ablations)
    register_analysis_callbacks(app, session, root)
    register_media_callbacks(app, session)  # image (VLM) and diffusion input, the image card


def register_capture_callbacks(app: Any, session: LiveSession) -> None:
    """Capture (text box -> ``live-key``) and head selection (thumbnail click or typed head -> ``live-head``)."""
    from dash import Input, Output, State, ctx, no_update

    @app.callback(Output("live-key", "data"), Output("live-status", "children"), Output("live-error", "children"),
                  Input("live-capture", "n_clicks"), State("live-model", "value"), State("live-text", "value"),
                  State("live-mode", "value"), *[State(i, "value") for i in MEDIA_STATES],
                  prevent_initial_call=True,
                  running=[(Output("live-capture", "disabled"), True, False)])
    def _capture(_n, model, text, mode, *media):
        try:
            cap = session.capture(model, text, mode, media)
        except Exception as exc:  # noqa: BLE001
            return no_update, no_update, error_line(exc)
        dense = "" if cap.dense else f" · {views.too_long_note(cap)}"
        return cap.key, (f"capture {cap.key} · {cap.model_name} · {cap.n_tokens} tokens · "
                         f"{cap.seconds * 1000:.0f} ms{dense}"), ""

    @app.callback(Output("live-head", "data"), Output("live-head-msg", "children"), Output("live-abl-heads", "value"),
                  Input("live-model-view", "clickData"), Input("live-head-input", "n_submit"),
                  State("live-head-input", "value"), State("live-key", "data"), prevent_initial_call=True)
    def _select(click, _submit, typed, key):
        try:
            cap = session.get(key)
            if ctx.triggered_id == "live-model-view":
                picked = clicked_thumbnail(click)
                layer, head = cap.check_head(*picked) if picked else (0, 0)
            else:
                layer, head = _parse_one_head(typed or "", cap)
        except Exception as exc:  # noqa: BLE001
            return no_update, error_line(exc), no_update
        return [layer, head], "", f"L{layer}H{head}"


def register_view_callbacks(app: Any, session: LiveSession) -> None:
    """Model view, head view (with token hover), pattern + QK embedding (with point click), attribution."""
    from dash import Input, Output, ctx

    @app.callback(Output("live-model-view", "figure"), Output("live-head-input", "value"),
                  Input("live-key", "data"), Input("live-head", "data"))
    def _model_view(key, head):
        selected = "L0H0"

        def render(cap):
            nonlocal selected
            layer, h = _head(cap, head)
            selected = f"L{layer}H{h}"
            return views.model_view_figure(cap, (layer, h))
        return _view(session, key, render), selected

    @app.callback(Output("live-head-view", "figure"), Input("live-key", "data"), Input("live-head", "data"),
                  Input("live-head-scope", "value"), Input("live-head-view", "hoverData"))
    def _head_view(key, head, scope, hover):
        focus = hovered_token(hover) if ctx.triggered_id == "live-head-view" else None
        return _view(session, key, lambda cap: views.head_view_figure(cap, *_head(cap, head), scope, focus))

    @app.callback(Output("live-pattern", "figure"), Output("live-qk", "figure"), Input("live-key", "data"),
                  Input("live-head", "data"), Input("live-qk", "clickData"))
    def _pattern_and_qk(key, head, click):
        focus = views.qk_focus(click) if ctx.triggered_id == "live-qk" else None
        return (_view(session, key, lambda cap: views.pattern_figure(cap, *_head(cap, head), focus)),
                _view(session, key, lambda cap: views.qk_figure(cap, *_head(cap, head), focus)))

    @app.callback(Output("live-attribution", "figure"), Input("live-key", "data"))
    def _attribution(key):
        return _view(session, key, views.attribution_figure, 160)


def register_save_callback(app: Any, session: LiveSession, root: ResultsRoot,
                           ablations: dict[str, LiveAblation]) -> None:
    from dash import Input, Output, State

    @app.callback(Output("live-saved", "children"), Input("live-save", "n_clicks"), State("live-key", "data"),
                  prevent_initial_call=True)
    def _save(_n, key):
        try:
            cap = session.get(key)
            paths = save_capture(session.model(cap.model_name), cap, root, ablations.get(key))
        except Exception as exc:  # noqa: BLE001
            return error_line(exc)
        return "saved: " + ", ".join(paths) + " (the results tab lists them after a reload)"


def register_ablation_callbacks(app: Any, session: LiveSession, ablations: dict[str, LiveAblation]) -> None:
    from dash import Input, Output, State, no_update

    @app.callback(Output("live-ablation", "data"), Output("live-abl-summary", "children"),
                  Output("live-abl-box", "style"), Input("live-ablate", "n_clicks"), State("live-key", "data"),
                  State("live-abl-heads", "value"), State("live-abl-mode", "value"), prevent_initial_call=True)
    def _ablate(n, key, heads, mode):
        try:
            cap = session.get(key)
            result = ablate(session.model(cap.model_name), cap, heads, mode)
        except Exception as exc:  # noqa: BLE001
            return no_update, error_line(exc), {"display": "none"}
        ablations.clear()  # one ablation kept: the last
        ablations[key] = result
        text = (f"ablated {result.heads} ({result.mode}) on capture {key} in {result.seconds * 1000:.0f} ms\n"
                f"{result.summary}\nlargest attention change: {_largest(result)}")
        return {"key": key, "n": n}, text, {"display": "block"}

    @app.callback(Output("live-abl-grid", "figure"), Output("live-abl-pattern", "figure"),
                  Output("live-abl-tokens", "figure"), Input("live-ablation", "data"), Input("live-head", "data"),
                  prevent_initial_call=True)
    def _ablation_views(data, head):
        key = (data or {}).get("key")
        result = ablations.get(key)
        if result is None:
            return no_update, no_update, no_update
        if result.image_after is not None:  # diffusion: clean vs ablated image, change per text key
            return (_view(session, key, lambda cap: views.change_grid(cap, result)),
                    _view(session, key, lambda cap: views.media.ablated_image_figure(cap, result)),
                    _view(session, key, lambda cap: views.media.text_key_change_figure(cap, result), 260))
        return (_view(session, key, lambda cap: views.change_grid(cap, result)),
                _view(session, key, lambda cap: views.pattern_change_figure(cap, result, *_head(cap, head))),
                _view(session, key, lambda cap: views.token_change_figure(cap, result), 160))


def _largest(result: LiveAblation) -> str:
    flat = result.change.reshape(-1)
    order = flat.argsort()[::-1][:3]
    n_heads = result.change.shape[1]
    return ", ".join(f"L{i // n_heads}H{i % n_heads} {float(flat[i]):.3f}" for i in order)


def register_long_callbacks(app: Any, session: LiveSession) -> None:
    """The long-sequence view: redrawn for a new capture, head or aggregate, and for a box zoom (finer blocks).

    ``live-long-state`` holds what the figure shows (capture, head, aggregate): a resize event of the same figure
    recomputes nothing, while an event that overtakes a newer capture's response (Dash keeps only the last reply of
    a callback) still draws it. The figure itself is never sent back to the server.
    """
    from dash import Input, Output, State, ctx, no_update

    lock, recent = threading.Lock(), OrderedDict()

    def cached(request: tuple, compute):
        """One computation per request: a duplicate (an event that overtook the first reply) waits for it."""
        with lock:
            if request not in recent:
                recent[request] = compute()
                while len(recent) > 4:
                    recent.popitem(last=False)
            return recent[request]

    @app.callback(Output("live-long", "figure"), Output("live-long-msg", "children"),
                  Output("live-long-state", "data"), Input("live-key", "data"), Input("live-head", "data"),
                  Input("live-long-how", "value"), Input("live-long", "relayoutData"),
                  Input("live-long-reset", "n_clicks"), State("live-long-state", "data"),
                  running=[(Output("live-long-busy", "children"), "computing the block pattern …", "")])
    def _long(key, head, how, relayout, _reset, shown):
        if not key:
            return note_figure(PRESS), "", None
        try:
            cap = session.get(key)
            layer, h = _head(cap, head)
            state = {"capture": key, "view": f"L{layer}H{h}:{how}"}
            ranges = None
            if ctx.triggered_id == "live-long":
                ranges = views.zoom_ranges(relayout, cap.n_tokens)
                reset = isinstance(relayout, dict) and relayout.get("xaxis.autorange")
                if ranges is None and not reset and shown == state:
                    return no_update, no_update, no_update  # a resize, a zoom of the arc panel
            fig = cached((key, state["view"], ranges),
                         lambda: views.long_figure(cap, session.layer_inputs(cap, layer), h, how or "mean", ranges))
            return fig, "", state
        except Exception as exc:  # noqa: BLE001
            return (no_update if shown else note_figure(error_line(exc))), error_line(exc), no_update


__all__ = ["register_live_callbacks"]
