"""``create_app(results_dir, model=None)``: the Dash app over one results directory; ``serve`` runs it.

Besides Dash's own routes, the app has one Flask route, ``/files/<relative path>``, for downloading result files.
It applies the same rule as every callback (``ResultsRoot.resolve``): a path outside the directory (``..``,
absolute, a symlink leaving it) or of another type is refused with 403 and nothing is read.

Example:
    >>> import tempfile
    >>> from attnscope.dashboards.app import create_app
    >>> app = create_app(tempfile.mkdtemp())
    >>> app.server.test_client().get("/files/../../etc/passwd").status_code
    403
"""

import mimetypes
import socket
from pathlib import Path
from typing import Any

from .._extras import require
from ..errors import InputError
from .files import PathRefused, ResultsRoot

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8050


def _download_route(server: Any, root: ResultsRoot) -> None:
    from flask import Response, send_file

    def download(relpath: str):
        try:
            path = root.resolve(relpath)
        except PathRefused as exc:
            return Response(f"refused: {exc}\n", status=exc.status, mimetype="text/plain")
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return send_file(path, mimetype=mime, as_attachment=True, download_name=path.name)

    server.add_url_rule("/files/<path:relpath>", "attnscope_download", download, methods=["GET"])


def create_app(results_dir: "str | Path", model: Any = None, model_name: str | None = None) -> Any:
    """A Dash app showing the result files of ``results_dir`` (Results tab) and the live page (Live tab: type,
    capture and see every view, with ``model`` or a model picked there). The ablation panel runs ``model``, or the
    run's own model when the page offers it by name (MiniLM, the zoo's organisms)."""
    dash = require("dash", "dashboard")

    from .callbacks import register_callbacks
    from .layout import INDEX_STRING, build_layout
    from .live_callbacks import register_live_callbacks
    from .live_state import LiveSession

    root = ResultsRoot(results_dir)
    app = dash.Dash(__name__, title="attnscope", update_title=None, assets_folder=str(Path(__file__).parent /
                    "_no_assets"), serve_locally=True)
    app.index_string = INDEX_STRING
    name = model_name or (getattr(model, "name", None) if model is not None else None)
    live = LiveSession(model, name)
    app.layout = lambda: build_layout(root, name if model is not None else None, (live.choices(), live.default))
    register_callbacks(app, root, model, live)
    register_live_callbacks(app, live, root)
    _download_route(app.server, root)
    return app


def check_bind(host: str, port: int) -> None:
    """InputError unless ``host:port`` is a valid local address that is free to bind (checked before the model
    loads and before the dashboard says it is serving)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InputError("port out of range", expected="1 <= port <= 65535", got=port, fix="e.g. --port 8050")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise InputError("unknown host", expected="an address of this machine, e.g. 127.0.0.1",
                         got=f"{host} ({exc})"[:200], fix="pass --host 127.0.0.1 (this machine only)") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as exc:
            in_use = exc.errno in (98, 48, 10048)  # EADDRINUSE on Linux, macOS, Windows
            raise InputError("port in use" if in_use else "cannot listen on this address",
                             expected="a free port on an address of this machine", got=f"{host}:{port} "
                             f"({exc.strerror or exc})", fix="pick another --port" if in_use else
                             "pass --host 127.0.0.1 (this machine only) or one of its addresses") from None


def serve(results_dir: "str | Path", model: Any = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Load ``model`` (a name for ``attnscope.load``, a loaded model, or None) and serve the app (blocking).

    Debug mode stays off: its interactive debugger would run code for anyone who can reach the port.
    """
    ResultsRoot(results_dir)
    check_bind(host, port)
    require("dash", "dashboard")  # a missing extra fails before the model loads
    if isinstance(model, str):
        from ..tasks import load_model

        model = load_model(model)
    app = create_app(results_dir, model)
    print(f"attnscope dash: serving {ResultsRoot(results_dir).root} on http://{host}:{port}/ (Ctrl+C stops)",
          flush=True)
    app.run(host=host, port=int(port), debug=False)


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "check_bind", "create_app", "serve"]
