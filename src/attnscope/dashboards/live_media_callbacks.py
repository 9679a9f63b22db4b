"""Callbacks of the live page for image (VLM, vision encoder) and diffusion input.

Picking a model shows the input controls of its kind (image picker and upload for a VLM and a vision encoder;
steps and seed for a diffusion pipeline; the text box holds the question or the prompt, and is not read for a
vision encoder). An upload is decoded once (Pillow,
``live_media.decode_upload``) and kept in the app process; the image list then offers it. Capture goes through the
text page's callback, which hands these controls to ``LiveSession.capture`` (``media_capture``, installed here).
After a capture the image card shows the image, the map over it and the per-head maps; every error is one line.

Example:
    >>> import tempfile
    >>> from attnscope.dashboards.app import create_app
    >>> app = create_app(tempfile.mkdtemp())
    >>> any("live-media-map.figure" in k for k in app.callback_map)
    True
"""

from functools import partial
from typing import Any

from ..errors import AttnscopeError
from .live_layout import EXAMPLE_TEXT
from .live_media import Uploads, capture_media, decode_upload, example_images, model_kind, zoo_kind
from .live_media_layout import HIDDEN
from .live_media_views import daam_figure, diffusion_heads_figure, image_figure, note, vlm_heads_figure, vlm_map_figure
from .live_messages import error_line
from .live_state import LiveCapture, LiveSession

EXAMPLES = {"vlm": "what color is the square ?", "diffusion": "red circle left blue square right", "vision": ""}
HINTS = {"vlm": "VLM: the text box holds the question; pick an image (or upload one, resized to the model's input)",
         "vision": "vision encoder: pick an image (or upload one, resized to the model's input); no text is read",
         "diffusion": "diffusion pipeline: the text box holds the prompt; Capture generates the image (CPU) and "
                      "records every step's cross-attention",
         "text": ""}
ABOUT = {"vlm": "left: the input image · middle: a map over the image grid (pick rollout or the selected head) · "
                "right: every head of the selected head's layer, last token → image patches",
         "vision": "left: the input image · middle: a map over the patch grid (pick rollout or the selected head, "
                   "read from [CLS]) · right: every head of the selected head's layer, [CLS] → image patches",
         "diffusion": "left: the generated image · middle: the DAAM map of the chosen word at the chosen step · "
                      "right: the same map per head of the chosen site"}
SHOWN = {"display": "flex", "alignItems": "flex-end"}


def kind_of(session: LiveSession, name: str | None) -> str:
    """``text``, ``vlm``, ``vision`` or ``diffusion`` for a model of the page, without loading a zoo model."""
    name = name or session.default or "minilm"
    if name == session.default:
        return model_kind(session.model(name))
    return zoo_kind(name)


def _media_view(session: LiveSession, key: str | None, render, height: int = 340) -> Any:
    """``render(cap)`` of an image / diffusion capture; a blank note for none or a text capture; errors as one
    line (in place of the figure)."""
    from dash import no_update

    if not key:
        return no_update
    try:
        cap = session.get(key)
        if cap.kind == "text":
            return note(cap, "no image in a text capture", height)
        return render(cap)
    except Exception as exc:  # noqa: BLE001 - one line in the page instead of a dead view
        return note(None, error_line(exc), height)


def _layer_head(cap: LiveCapture, head: Any) -> tuple[int, int]:
    try:
        return cap.check_head(int(head[0]), int(head[1]))
    except (AttnscopeError, TypeError, ValueError, IndexError):
        return 0, 0


def register_media_callbacks(app: Any, session: LiveSession) -> None:
    """Install ``session.media_capture`` and wire the media controls and the image card."""
    uploads = Uploads()
    session.media_capture = partial(capture_media, uploads)
    register_input_callbacks(app, session, uploads)
    register_card_callbacks(app, session)


def register_input_callbacks(app: Any, session: LiveSession, uploads: Uploads) -> None:
    """Model kind -> which controls show (and an example question / prompt); upload -> image list."""
    from dash import Input, Output, State, ctx, no_update

    @app.callback(Output("live-vlm-inputs", "style"), Output("live-diff-inputs", "style"),
                  Output("live-media-hint", "children"), Output("live-text", "value"),
                  Input("live-model", "value"))
    def _kind(model):
        try:
            kind = kind_of(session, model)
        except Exception as exc:  # noqa: BLE001
            return HIDDEN, HIDDEN, error_line(exc), no_update
        picked = ctx.triggered_id == "live-model"
        text = EXAMPLES.get(kind, EXAMPLE_TEXT if picked else no_update)
        return (SHOWN if kind in ("vlm", "vision") else HIDDEN, SHOWN if kind == "diffusion" else HIDDEN, HINTS[kind],
                text if (picked or kind != "text") else no_update)

    @app.callback(Output("live-image", "options"), Output("live-image", "value"),
                  Output("live-upload-msg", "children"), Input("live-upload", "contents"),
                  State("live-upload", "filename"), State("live-image", "options"), prevent_initial_call=True)
    def _upload(contents, filename, options):
        try:
            image = decode_upload(contents, filename)
        except Exception as exc:  # noqa: BLE001
            return no_update, no_update, error_line(exc)
        key = uploads.add(image, str(filename or "upload")[:60])
        option = {"label": f"upload: {filename} ({image.shape[1]}×{image.shape[0]})", "value": key}
        kept = [o for o in (options or example_images()) if not str(o.get("value", "")).startswith("upload:")]
        return kept + [option], key, f"uploaded {filename}: {image.shape[1]}×{image.shape[0]} px"


def register_card_callbacks(app: Any, session: LiveSession) -> None:
    """Capture -> card controls; (capture, head, map kind, word, step, site) -> the card's three figures."""
    from dash import Input, Output, no_update

    @app.callback(Output("live-media-card", "style"), Output("live-vlm-controls", "style"),
                  Output("live-diff-controls", "style"), Output("live-media-about", "children"),
                  Output("live-media-word", "options"), Output("live-media-word", "value"),
                  Output("live-media-step", "options"), Output("live-media-step", "value"),
                  Output("live-media-site", "options"), Output("live-media-site", "value"),
                  Output("live-media-image", "figure"), Input("live-key", "data"), prevent_initial_call=True)
    def _controls(key):
        try:
            cap = session.get(key)
        except Exception:  # noqa: BLE001 - the capture callback already reported it
            return (no_update,) * 11
        if cap.kind == "text":
            return ({**HIDDEN, "marginTop": "14px"},) + (no_update,) * 10
        words = list(cap.media.words)
        steps = [{"label": "all (summed)", "value": "all"}] + [{"label": f"step {i}", "value": i}
                                                               for i in range(cap.media.steps)]
        sites = [{"label": str(s), "value": i} for i, s in enumerate(cap.media.sites)]
        diffusion = cap.kind == "diffusion"
        return ({"display": "block", "marginTop": "14px"}, HIDDEN if diffusion else SHOWN,
                SHOWN if diffusion else HIDDEN, ABOUT[cap.kind], words, words[0] if words else None,
                steps, "all", sites, 0, _media_view(session, key, image_figure))

    @app.callback(Output("live-media-map", "figure"), Input("live-key", "data"), Input("live-head", "data"),
                  Input("live-media-map-kind", "value"), Input("live-media-word", "value"),
                  Input("live-media-step", "value"), prevent_initial_call=True)
    def _map(key, head, how, word, step):
        def render(cap):
            if cap.kind != "diffusion":
                return vlm_map_figure(cap, how or "rollout", *_layer_head(cap, head))
            return daam_figure(cap, *_word_step(cap, word, step))
        return _media_view(session, key, render, 380)

    @app.callback(Output("live-media-heads", "figure"), Input("live-key", "data"), Input("live-head", "data"),
                  Input("live-media-word", "value"), Input("live-media-step", "value"),
                  Input("live-media-site", "value"), prevent_initial_call=True)
    def _heads(key, head, word, step, site):
        def render(cap):
            if cap.kind != "diffusion":
                return vlm_heads_figure(cap, *_layer_head(cap, head))
            site_index = site if isinstance(site, int) and 0 <= site < len(cap.media.sites) else 0
            return diffusion_heads_figure(cap, site_index, *_word_step(cap, word, step))
        return _media_view(session, key, render, 300)


def _word_step(cap: LiveCapture, word: Any, step: Any) -> tuple[str, Any]:
    """The picked word and step, or the first word / all steps while the card's options catch up with a new
    capture (the figures and the options update in parallel)."""
    words = list(cap.media.words)
    word = word if word in cap.media.words else words[0]
    step = step if isinstance(step, int) and 0 <= step < cap.media.steps else "all"
    return word, step


__all__ = ["kind_of", "register_media_callbacks"]
