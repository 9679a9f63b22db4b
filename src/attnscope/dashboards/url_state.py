"""The Results view as a URL query, so a view can be shared: ``?tab=..&run=..&table=..&metric=..&compare=..&trace=..
&site=..&item=..&heads=..&mode=..``.

``encode_view`` writes a ``ViewState``; ``read_view`` reads a query back against a results directory. Every value
from the URL is checked the way a picker would offer it (paths through ``ResultsRoot.resolve`` and inside the run,
a metric of the table, a site of the trace, an item of its batch, a well-formed head spec, a known mode or tab); a
value that fails is dropped for the default with a one-line note, never an exception. The older deep links
``?table=..&trace=..`` and ``?file=..`` still work (the run is the file's folder).

How the page keeps the URL and the view in step without a loop (``register_url_callbacks``): two
``dcc.Location`` components. ``url-write`` is only written: ``_write`` turns the controls into its ``search`` (none
when nothing changed) and stores the same string in ``url-own``. Its ``refresh="callback-nav"`` pushes a browser
history entry and tells ``url``, which is only read, as it is on page load and back / forward. The readers (the
pickers' ``_select`` in ``callbacks`` and ``_restore`` here) drop a ``search`` equal to ``url-own``: that is the
echo of the page's own write, and acting on it could set back a control the user changed since. Any other URL is
applied (``_restore`` then clears ``url-own``, so forward navigation to a written URL applies too), and only
controls whose value differs are set. No callback reads and writes the same property, so Dash's callback graph
has no cycle: URL -> controls -> ``url-write``, and the echo stops at the readers.

Example:
    >>> import tempfile, pathlib, attnscope
    >>> from attnscope.dashboards.files import ResultsRoot
    >>> from attnscope.dashboards.url_state import ViewState, encode_view, read_view
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> rows = [{"analysis": "a", "layer": 0, "head": h, "metric": "m", "value": 1.0} for h in range(2)]
    >>> _ = attnscope.ResultTable.from_records(rows).save(d / "run" / "t.parquet")
    >>> search = encode_view(ViewState(run="run", table="run/t.parquet", metric="m", heads="L0H1"))
    >>> search
    '?run=run&table=run/t.parquet&metric=m&heads=L0H1&item=0&mode=auto'
    >>> view, notes = read_view(ResultsRoot(d), search)
    >>> view == ViewState(run="run", table="run/t.parquet", metric="m", heads="L0H1"), view.selected(), notes
    (True, [0, 1], [])
    >>> view, notes = read_view(ResultsRoot(d), "?table=../../etc/passwd&metric=nope&item=x")
    >>> view.table, view.metric, view.item, [n.split(":")[0] for n in notes]
    ('run/t.parquet', 'm', 0, ['table', 'metric', 'item'])
"""

from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import parse_qs, quote

from ..errors import AttnscopeError, HeadSpecError
from ..probes.heads import HeadSet
from .data import load_table, trace_header
from .files import PathRefused, ResultsRoot, Run
from .target import site_of, site_value

TABS = ("results", "live")
MODES = ("auto", "topk", "map")
MAX_FIELDS = 64  # fields of a query that are read
MAX_VALUE_CHARS = 200  # a metric, site or head spec longer than this is not one the pickers offer
KEYS = ("tab", "run", "table", "metric", "compare", "trace", "site", "heads", "item", "mode")
LEGACY_KEYS = ("file",)


@dataclass
class ViewState:
    """What the Results tab shows: the pickers' values (``None``: not named; the page's default)."""

    tab: str | None = None
    run: str | None = None
    table: str | None = None
    metric: str | None = None
    compare: str | None = None
    trace: str | None = None
    site: str | None = None
    heads: str = ""
    item: int = 0
    mode: str = "auto"

    def selected(self) -> list[int] | None:
        """``[layer, head]`` when ``heads`` names one head (the grid outlines it), else None."""
        try:
            heads = list(HeadSet.parse(self.heads)) if self.heads and "*" not in self.heads else []
        except HeadSpecError:
            return None
        return [int(heads[0].layer), int(heads[0].head)] if len(heads) == 1 else None


def encode_view(view: ViewState) -> str:
    """The URL query of ``view`` (``?key=value&...`` in ``KEYS`` order; unnamed values left out)."""
    values = asdict(view)
    parts = [f"{key}={quote(str(values[key]), safe='/*,=:')}" for key in KEYS
             if values[key] is not None and values[key] != ""]
    return "?" + "&".join(parts) if parts else ""


def is_attribution_table(df: Any) -> bool:
    """True for a token attribution table (``token`` and ``token_index`` columns, as ``attnscope attribute``
    writes); the same rule as ``viz.notebook.show_table``."""
    return {"token", "token_index"} <= set(df.columns)


def metric_choice(root: ResultsRoot, table: str | None) -> tuple[list[str], str | None]:
    """(metrics the metric picker offers for ``table``, the default one): its per-head metrics."""
    if not table:
        return [], None
    try:
        df = load_table(root.resolve(table, ("table",))).df
    except AttnscopeError:
        return [], None
    per_head = df if is_attribution_table(df) else df[(df["layer"] >= 0) & (df["head"] >= 0)]
    metrics = list(dict.fromkeys(per_head["metric"].astype(str)))
    return metrics, metrics[0] if metrics else None


def site_choice(root: ResultsRoot, trace: str | None) -> tuple[list[dict], str | None]:
    """(site picker options of ``trace``, the default site value)."""
    if not trace:
        return [], None
    try:
        header = trace_header(root.resolve(trace, ("trace",)))
    except AttnscopeError:
        return [], None
    tower, kind = site_of(None, header)
    return ([{"label": f"{t} · {k}", "value": site_value(header, t, k)} for t, k in header.towers_kinds()],
            site_value(header, tower, kind))


def parse_query(search: str | None) -> tuple[dict[str, str], list[str]]:
    """The first value of each known key of a query string, and a note per unknown key."""
    parts = (search or "").lstrip("?").split("&")[:MAX_FIELDS]  # a longer query is cut, never refused
    query = parse_qs("&".join(parts), keep_blank_values=False)
    unknown = [key[:40] for key in query if key not in KEYS + LEGACY_KEYS]
    more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
    notes = [f"{', '.join(map(repr, unknown[:3]))}{more}: not keys of this page (known: {', '.join(KEYS)})"
             ] if unknown else []
    return {key: values[0] for key, values in query.items() if key in KEYS + LEGACY_KEYS}, notes


def _folder(path: str) -> str:
    parent = PurePosixPath(path.replace("\\", "/")).parent.as_posix()
    return "" if parent == "." else parent


def _paths(root: ResultsRoot, raw: dict[str, str], notes: list[str]) -> dict[str, str]:
    """The file paths of the query that pass the path rule (a note for each refused one)."""
    kinds = {"table": ("table",), "compare": ("table",), "trace": ("trace",), "file": ("table", "trace", "json")}
    ok: dict[str, str] = {}
    for key, allowed in kinds.items():
        if key in raw:
            try:
                root.resolve(raw[key], allowed)
                ok[key] = raw[key]
            except PathRefused as exc:
                notes.append(f"{key}: {exc}")
    return ok


def _run(root: ResultsRoot, raw: dict[str, str], paths: dict[str, str], notes: list[str]) -> Run | None:
    """The run the query names (``run``, else the folder of its table, trace or file), else the first run."""
    runs = root.runs()
    if "run" in raw:
        try:
            return root.run(raw["run"])
        except PathRefused as exc:
            notes.append(f"run: {exc}")
    for key in ("table", "trace", "file"):
        if key in paths:
            folder = _folder(paths[key])
            match = [r for r in runs if r.path == folder]
            if match:
                return match[0]
    return runs[0] if runs else None


def _pick(raw: dict[str, str], key: str, allowed: list, default: Any, notes: list[str], what: str) -> Any:
    """``raw[key]`` when it is one of ``allowed``, else ``default`` (a note when the URL named something else)."""
    if key not in raw or raw[key] in allowed:
        return raw.get(key, default)
    notes.append(f"{key}: {raw[key][:MAX_VALUE_CHARS]!r} is not {what}")
    return default


def _item(root: ResultsRoot, raw: dict[str, str], trace: str | None, notes: list[str]) -> int:
    text = raw.get("item")
    if text is None:
        return 0
    if not text.strip().isdigit():
        notes.append(f"item: {text[:40]!r} is not an item number (an integer >= 0)")
        return 0
    item = int(text.strip())
    if trace:
        try:
            batch = trace_header(root.resolve(trace, ("trace",))).batch
        except AttnscopeError:
            batch = None
        if batch is not None and item >= batch:
            notes.append(f"item: {item} is not an item of this trace (0..{batch - 1})")
            return 0
    return item


def _heads(raw: dict[str, str], notes: list[str]) -> str:
    spec = raw.get("heads", "")
    try:
        return HeadSet.check_spec(spec) if spec and len(spec) <= MAX_VALUE_CHARS else ""
    except HeadSpecError:
        notes.append(f"heads: {spec[:40]!r} is not a head spec (e.g. L2H7 or L2H*)")
        return ""


def read_view(root: ResultsRoot, search: str | None) -> tuple[ViewState, list[str]]:
    """The view a URL query names, checked against ``root`` (module docstring), and a note per ignored value."""
    raw, notes = parse_query(search)
    paths = _paths(root, raw, notes)
    run = _run(root, raw, paths, notes)
    view = ViewState(tab=_pick(raw, "tab", list(TABS), None, notes, "a tab (results, live)"))
    view.mode = _pick(raw, "mode", list(MODES), "auto", notes, "a view mode (auto, topk, map)")
    view.heads = _heads(raw, notes)
    view.compare = paths.get("compare")
    if run is None:
        return view, notes
    view.run = run.path
    named = {"table": paths.get("table") or (paths.get("file") if paths.get("file") in run.tables else None),
             "trace": paths.get("trace") or (paths.get("file") if paths.get("file") in run.traces else None)}
    for key, listed in (("table", run.tables), ("trace", run.traces)):
        value = named[key]
        if value is not None and value not in listed:
            notes.append(f"{key}: {value!r} is not in run {run.label!r}")
        setattr(view, key, value if value in listed else (listed or [None])[0])
    metrics, default = metric_choice(root, view.table)
    view.metric = _pick(raw, "metric", metrics, default, notes, "a metric of this table")
    sites, default = site_choice(root, view.trace)
    view.site = _pick(raw, "site", [s["value"] for s in sites], default, notes, "a site of this trace")
    view.item = _item(root, raw, view.trace, notes)
    return view, notes




def _changed(new: Any, old: Any) -> Any:
    from dash import no_update

    return no_update if new == old else new


def register_url_callbacks(app: Any, root: ResultsRoot) -> None:
    """Wire the URL (module docstring): controls -> ``url-write``; ``url`` -> the controls ``callbacks.selection``
    does not set (compare, item, heads, mode, tab; metric and site when the table and trace stay)."""
    from dash import Input, Output, State, no_update
    from dash.exceptions import PreventUpdate

    @app.callback(Output("url-write", "search"), Output("url-own", "data"), Input("page-tab", "value"),
                  Input("run", "value"),
                  Input("table", "value"), Input("metric", "value"), Input("compare", "value"),
                  Input("trace", "value"), Input("site", "value"), Input("heads", "value"), Input("item", "value"),
                  Input("mode", "value"), State("url-write", "search"), prevent_initial_call=True)
    def _write(tab, run, table, metric, compare, trace, site, heads, item, mode, current):
        item = int(item) if isinstance(item, (int, float)) and float(item).is_integer() else None
        search = encode_view(ViewState(tab, run, table, metric, compare, trace, site, heads or "", item, mode))
        return (no_update, no_update) if search == (current or "") else (search, search)

    @app.callback(Output("compare", "value"), Output("item", "value"), Output("heads", "value", allow_duplicate=True),
                  Output("heads", "n_submit"), Output("selected", "data", allow_duplicate=True),
                  Output("head-grid", "clickData"), Output("mode", "value", allow_duplicate=True),
                  Output("metric", "value", allow_duplicate=True), Output("site", "value", allow_duplicate=True),
                  Output("page-tab", "value"), Output("url-own", "data", allow_duplicate=True),
                  Input("url", "search"), State("url-own", "data"), State("compare", "value"),
                  State("item", "value"), State("heads", "value"), State("heads", "n_submit"), State("mode", "value"),
                  State("table", "value"), State("metric", "value"), State("trace", "value"), State("site", "value"),
                  State("page-tab", "value"), prevent_initial_call="initial_duplicate")
    def _restore(search, own, compare, item, heads, n_submit, mode, table, metric, trace, site, tab):
        # the pickers' callback sets run, table, trace (and metric, site with them); this sets the rest, and
        # nothing that already shows the URL's value
        if own is not None and search == own:
            raise PreventUpdate  # the echo of _write: the URL names what is on screen (or an older view)
        view, _ = read_view(root, search)
        new_heads = view.heads != (heads or "")
        return (_changed(view.compare, compare), _changed(view.item, item), view.heads if new_heads else no_update,
                (n_submit or 0) + 1 if new_heads else no_update, view.selected() if new_heads else no_update,
                None if new_heads else no_update, _changed(view.mode, mode),
                _changed(view.metric, metric) if view.table == table else no_update,
                _changed(view.site, site) if view.trace == trace else no_update,
                _changed(view.tab, tab) if view.tab else no_update, None)


__all__ = ["KEYS", "MODES", "TABS", "ViewState", "encode_view", "is_attribution_table", "metric_choice",
           "parse_query", "read_view", "register_url_callbacks", "site_choice"]
