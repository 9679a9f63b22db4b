"""Issue #21: the Results view as a URL query. A view read back from its own URL is the same view; every value a
client can forge (a path outside, a metric the table lacks, a non-integer or out-of-range item, a malformed head
spec, an unknown key) is ignored with a one-line note, never an exception; the URL callbacks answer forged
requests without a 500; the echo of the page's own URL write changes nothing."""

import json

import numpy as np
import pytest
import torch

import attnscope
from attnscope.dashboards import ResultsRoot, create_app
from attnscope.dashboards.callbacks import selection
from attnscope.dashboards.url_state import KEYS, ViewState, encode_view, parse_query, read_view
from attnscope.probes.tokens import TokenInfo
from attnscope.probes.trace import AttentionTrace, SiteRecord


@pytest.fixture
def root(tmp_path):
    """run_a: a table with two metrics, a second table and a 3-item trace with two towers; run_b: one table."""
    res = tmp_path / "results"
    rows = [{"analysis": "s", "layer": l, "head": h, "metric": m, "value": float(l + h + k)}
            for k, m in enumerate(("m1", "m:[CLS] & more")) for l in range(2) for h in range(3)]
    attnscope.ResultTable.from_records(rows).save(res / "run_a" / "scores.parquet")
    attnscope.ResultTable.from_records(rows[:6]).save(res / "run_a" / "second.parquet")
    attnscope.ResultTable.from_records(rows[:6]).save(res / "run_b" / "other.parquet")
    probs = torch.softmax(torch.randn(3, 2, 4, 4), -1)
    recs = [SiteRecord(site=attnscope.Site(tower, l), probs=probs.clone(), n_query=4, n_key=4)
            for tower in ("text", "vision") for l in range(2)]
    AttentionTrace(recs, TokenInfo(strings=[list("abcd")] * 3)).save(res / "run_a" / "trace.safetensors")
    (tmp_path / "outside.parquet").write_bytes((res / "run_b" / "other.parquet").read_bytes())
    return ResultsRoot(res)


def _full_view() -> ViewState:
    """A view where no value is a default."""
    return ViewState(tab="live", run="run_a", table="run_a/second.parquet", metric="m1",
                     compare="run_b/other.parquet", trace="run_a/trace.safetensors", site="vision.L0.self",
                     heads="L1H2", item=2, mode="topk")


def test_round_trip_of_every_key(root):
    view = _full_view()
    search = encode_view(view)
    assert set(parse_query(search)[0]) == set(KEYS) and parse_query(search)[1] == []
    assert read_view(root, search) == (view, [])
    assert view.selected() == [1, 2] and ViewState(heads="L1H*").selected() is None
    # a metric with characters that need quoting comes back as it was
    odd = ViewState(run="run_a", table="run_a/scores.parquet", metric="m:[CLS] & more",
                    trace="run_a/trace.safetensors", site="text.L0.self")
    assert "&more" not in encode_view(odd) and read_view(root, encode_view(odd)) == (odd, [])


def test_defaults_and_the_older_deep_links(root):
    view, notes = read_view(root, "")
    assert notes == [] and (view.run, view.table, view.metric) == ("run_a", "run_a/scores.parquet", "m1")
    assert (view.trace, view.site, view.item, view.heads, view.mode, view.tab) == (
        "run_a/trace.safetensors", "text.L0.self", 0, "", "auto", None)
    view, notes = read_view(root, "?table=run_b/other.parquet")
    assert notes == [] and view.run == "run_b" and view.trace is None and view.metric == "m1"
    view, notes = read_view(root, "?file=run_a/trace.safetensors")
    assert notes == [] and view.run == "run_a" and view.trace == "run_a/trace.safetensors"


@pytest.mark.parametrize("key, forged, default, words", [
    ("table", "../outside.parquet", "run_a/scores.parquet", "path refused"),
    ("table", "/etc/passwd", "run_a/scores.parquet", "path refused"),
    ("table", "run_b/other.parquet", "run_a/scores.parquet", "not in run"),  # the URL names run_a
    ("compare", "../outside.parquet", None, "path refused"),
    ("trace", "run_a/scores.parquet", "run_a/trace.safetensors", "path refused"),
    ("metric", "nope", "m1", "is not a metric"),
    ("site", "text.L7.self", "text.L0.self", "is not a site"),
    ("item", "1.5", 0, "is not an item number"),
    ("item", "-1", 0, "is not an item number"),
    ("item", "3", 0, "is not an item of this trace"),
    ("heads", "L2X9", "", "is not a head spec"),
    ("mode", "<script>", "auto", "is not a view mode"),
    ("tab", "admin", None, "is not a tab"),
])
def test_forged_values_are_ignored_with_a_note(root, key, forged, default, words):
    from urllib.parse import quote

    base = "?run=run_a&" if key != "run" else "?"
    view, notes = read_view(root, f"{base}{key}={quote(forged)}")
    assert getattr(view, key) == default
    assert len(notes) == 1 and notes[0].startswith(f"{key}: ") and words in notes[0], notes
    assert "\n" not in notes[0] and "Traceback" not in notes[0]


def test_forged_run_unknown_key_and_huge_query(root):
    view, notes = read_view(root, "?run=../..&evil=1&" + "&".join(f"k{i}=v" for i in range(200)))
    assert view.run == "run_a" and len(notes) == 2 and notes[1].startswith("run: path refused")
    assert notes[0].startswith("'evil', 'k0', 'k1' and 60 more: not keys of this page")  # 64 fields read
    view, notes = read_view(root, "?heads=" + "L1H1," * 500)
    assert view.heads == "" and notes == []  # longer than any head spec a picker holds: dropped


def test_selection_follows_the_url_and_ignores_the_echo_of_its_own_write(root):
    state = selection(root, "url", encode_view(_full_view()), None, None, None)
    assert (state["run"], state["table"], state["metric"], state["site"]) == (
        "run_a", "run_a/second.parquet", "m1", "vision.L0.self")
    assert state["errors"] == [] and {o["value"] for o in state["table_options"]} == {
        "run_a/scores.parquet", "run_a/second.parquet"}
    echo = selection(root, "url", encode_view(_full_view()), "run_a", "run_a/second.parquet",
                     "run_a/trace.safetensors")
    assert echo.get("unchanged") is True
    moved = selection(root, "url", "?run=run_b", "run_a", "run_a/second.parquet", "run_a/trace.safetensors")
    assert moved["run"] == "run_b" and moved["table"] == "run_b/other.parquet" and moved["trace"] is None


def _post(client, outputs, inputs, state):
    """A callback request as the browser sends it (``outputs``: the callback's output ids as registered; an output
    shared with another callback carries Dash's ``@hash`` suffix)."""
    output = "...".join(f"{i}.{p}" for i, p in outputs)
    specs = [{"id": i, "property": p} for i, p in outputs]
    body = {"output": f"..{output}.." if len(outputs) > 1 else output, "outputs": specs if len(specs) > 1 else specs[0],
            "inputs": inputs, "state": state, "changedPropIds": [f"{inputs[0]['id']}.{inputs[0]['property']}"]}
    return client.post("/_dash-update-component", json=body)


def _props(pairs):
    return [{"id": i, "property": p, "value": v} for i, p, v in pairs]


def test_url_callbacks_write_the_view_and_answer_forged_urls(root):
    app = create_app(root.root)
    client = app.server.test_client()
    assert client.get("/").status_code == 200
    view = _full_view()
    writer = _post(client, [("url-write", "search"), ("url-own", "data")], _props([
        ("page-tab", "value", view.tab), ("run", "value", view.run), ("table", "value", view.table),
        ("metric", "value", view.metric), ("compare", "value", view.compare), ("trace", "value", view.trace),
        ("site", "value", view.site), ("heads", "value", view.heads), ("item", "value", view.item),
        ("mode", "value", view.mode)]), _props([("url-write", "search", "")]))
    assert writer.status_code == 200
    written = writer.get_json()["response"]
    assert written["url-write"]["search"] == encode_view(view) == written["url-own"]["data"]
    key = next(k for k in app.callback_map if k.startswith("..compare.value..."))
    restore_out = [tuple(part.split(".", 1)) for part in key.strip(".").split("...")]
    assert [o[0] for o in restore_out] == ["compare", "item", "heads", "heads", "selected", "head-grid", "mode",
                                           "metric", "site", "page-tab", "url-own"]
    state = _props([("url-own", "data", None), ("compare", "value", None), ("item", "value", 0), ("heads", "value", ""),
                    ("heads", "n_submit", None), ("mode", "value", "auto"), ("table", "value", view.table),
                    ("metric", "value", "m:[CLS] & more"), ("trace", "value", view.trace),
                    ("site", "value", "text.L0.self"), ("page-tab", "value", "results")])
    restored = _post(client, restore_out, _props([("url", "search", encode_view(view))]), state)
    out = {i: {p.split("@")[0]: v for p, v in props.items()} for i, props in restored.get_json()["response"].items()}
    assert out["compare"]["value"] == view.compare and out["item"]["value"] == 2 and out["heads"] == {
        "value": "L1H2", "n_submit": 1}
    assert out["selected"]["data"] == [1, 2] and out["metric"]["value"] == "m1" and out["page-tab"]["value"] == "live"
    assert out["url-own"]["data"] is None  # a URL the page did not write: the next echo check starts afresh
    forged = _post(client, restore_out, _props([("url", "search", "?item=x&table=../../etc/passwd&heads=%00&mode=1")]),
                   state)
    assert forged.status_code in (200, 204), forged.get_data(as_text=True)[:300]
    text = forged.get_data(as_text=True)
    assert "Traceback" not in text and "root:" not in text
    # the page's own write comes back through the URL while the controls already moved on: nothing is set back
    echo = _post(client, restore_out, _props([("url", "search", encode_view(view))]),
                 [dict(state[0], value=encode_view(view))] + state[1:])
    assert echo.status_code == 204  # PreventUpdate: nothing to update
    same = _post(client, restore_out, _props([("url", "search", encode_view(view))]), _props([
        ("url-own", "data", None), ("compare", "value", view.compare), ("item", "value", 2),
        ("heads", "value", "L1H2"), ("heads", "n_submit", 1), ("mode", "value", "topk"),
        ("table", "value", view.table), ("metric", "value", "m1"), ("trace", "value", view.trace),
        ("site", "value", view.site), ("page-tab", "value", "live")]))
    out = same.get_json()["response"]
    assert same.status_code == 200 and list(out) == ["url-own"]  # a URL naming what is shown: only the marker


def test_values_survive_json_and_numpy_items(root):
    """What a browser sends back: the item as a float from a number input, heads with spaces."""
    view = ViewState(run="run_a", table="run_a/scores.parquet", metric="m1", trace="run_a/trace.safetensors",
                     site="text.L0.self", item=int(np.int64(1)), heads="L0H1")
    assert json.loads(json.dumps(encode_view(view))) == encode_view(view)
    assert read_view(root, encode_view(view))[0] == view
