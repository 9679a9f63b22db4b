"""A bad file in a run is shown as a bad file and the rest of the dashboard keeps working: non-UTF-8 and deeply
nested JSON, a trace whose metadata lacks ``records``, a table with a string ``layer`` column. The download route
refuses hidden files and answers 400 (not 500) for a path too long for the file system."""

import json

import pytest
import torch
from safetensors.torch import save_file

import attnscope
from attnscope.dashboards import create_app
from attnscope.dashboards.callbacks import grid_view, pattern_view, selection
from attnscope.dashboards.files import ResultsRoot
from attnscope.probes.trace import FORMAT, AttentionTrace, SiteRecord

SELECT_OUTPUTS = [("run", "value"), ("table", "options"), ("table", "value"), ("metric", "options"),
                  ("metric", "value"), ("trace", "options"), ("trace", "value"), ("site", "options"),
                  ("site", "value"), ("files", "children"), ("alert", "children")]


def _post(client, outputs, inputs, state=()):
    output = "...".join(f"{i}.{p}" for i, p in outputs)
    body = {"output": f"..{output}..", "outputs": [{"id": i, "property": p} for i, p in outputs],
            "inputs": inputs, "state": list(state), "changedPropIds": [f"{i['id']}.{i['property']}" for i in inputs]}
    return client.post("/_dash-update-component", json=body)


def _page_load(client, search=""):
    return _post(client, SELECT_OUTPUTS, [{"id": "url", "property": "search", "value": search},
                                          {"id": "run", "property": "value", "value": None},
                                          {"id": "table", "property": "value", "value": None},
                                          {"id": "trace", "property": "value", "value": None}],
                 [{"id": "url-own", "property": "data", "value": None}])  # the query the page last wrote


@pytest.fixture
def results(tmp_path):
    """run/ holds good files and one bad file of every kind; good/ holds only good files."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"analysis": "a", "layer": l, "head": h, "metric": "m", "value": float(h)} for l in range(2)
            for h in range(3)]
    attnscope.ResultTable.from_records(rows).save(run / "a_good.parquet")
    attnscope.ResultTable.from_records([dict(r, layer=f"L{r['layer']}") for r in rows]).save(run / "b_strlayer.parquet")
    rec = SiteRecord(site=attnscope.Site("text", 0), probs=torch.softmax(torch.randn(1, 3, 4, 4), -1), n_query=4,
                     n_key=4)
    AttentionTrace([rec]).save(run / "a_good.safetensors")
    save_file({"r0.probs": torch.rand(1, 3, 4, 4)}, str(run / "b_norecords.safetensors"),
              metadata={"attnscope": json.dumps({"format": FORMAT, "tokens": {}})})
    (run / "ok.json").write_text(json.dumps({"fine": True}))
    (run / "nonutf8.json").write_bytes(b'{"a": "\xff\xfe"}')
    (run / "deep.json").write_text("[" * 50_000 + "]" * 50_000)
    (run / "deepish.json").write_text("[" * 900 + "]" * 900)  # parses, too deep to pretty-print in Python
    (tmp_path / ".hidden.json").write_text(json.dumps({"secret": "hidden"}))
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.json").write_text("{}")
    good = tmp_path / "good"
    good.mkdir()
    attnscope.ResultTable.from_records(rows).save(good / "t.parquet")
    return tmp_path


def test_page_load_survives_bad_json_files(results):
    client = create_app(results).server.test_client()
    assert client.get("/").status_code == 200
    response = _page_load(client, "?file=run/ok.json")
    assert response.status_code == 200, response.get_data(as_text=True)[-500:]
    text = json.dumps(response.get_json())
    for name in ("ok.json", "nonutf8.json", "deep.json", "deepish.json", "a_good.parquet"):
        assert f"run/{name}" in text
    assert "not UTF-8" in text and "nested too deeply" in text and "fine" in text


def test_trace_without_records_is_a_bad_file(results):
    root = ResultsRoot(results)
    state = selection(root, "trace", None, "run", "run/a_good.parquet", "run/b_norecords.safetensors")
    assert state["site_options"] == [] and state["site"] is None
    with pytest.raises(attnscope.CorruptResultError, match="not a readable attnscope trace"):
        pattern_view(root, "run/b_norecords.safetensors", "text.L0.self", 0, None, None, "auto")
    client = create_app(results).server.test_client()
    response = _post(client, [("pattern", "figure"), ("top-tokens", "children"), ("pattern-msg", "children")],
                     [{"id": i, "property": p, "value": v} for i, p, v in (
                         ("head-grid", "clickData", None), ("heads", "n_submit", None),
                         ("trace", "value", "run/b_norecords.safetensors"), ("site", "value", "text.L0.self"),
                         ("item", "value", 0), ("mode", "value", "auto"), ("map-token", "value", None),
                         ("map-step", "value", None))], [{"id": "heads", "property": "value", "value": None}])
    assert response.status_code == 200 and "not a readable attnscope trace" in response.get_data(as_text=True)
    fig, _ = pattern_view(root, "run/a_good.safetensors", "text.L0.self", 0, None, (0, 1), "auto")  # the rest works
    assert fig.data


def test_table_with_string_layers_is_a_bad_file(results):
    root = ResultsRoot(results)
    state = selection(root, "table", None, "run", "run/b_strlayer.parquet", None)
    assert state["metric_options"] == [] and state["metric"] is None
    with pytest.raises(attnscope.CorruptResultError, match="non-numeric column"):
        grid_view(root, "run/b_strlayer.parquet", "m")
    client = create_app(results).server.test_client()
    response = _post(client, [("head-grid", "figure"), ("grid-msg", "children")],
                     [{"id": "table", "property": "value", "value": "run/b_strlayer.parquet"},
                      {"id": "metric", "property": "value", "value": "m"},
                      {"id": "selected", "property": "data", "value": None}])
    assert response.status_code == 200 and "non-numeric column" in response.get_data(as_text=True)
    assert grid_view(root, "run/a_good.parquet", "m").data


def test_download_route_refuses_hidden_and_long_paths(results):
    client = create_app(results).server.test_client()
    for hidden in (".hidden.json", ".cache/x.json", "run/../.hidden.json"):
        response = client.get("/files/" + hidden)
        assert response.status_code == 403 and "secret" not in response.get_data(as_text=True), hidden
    for long in ("x" * 6000 + ".json", "a/" * 3000 + "x.json", "x" * 300 + ".json"):
        assert client.get("/files/" + long).status_code in (400, 404), long[:20]
    assert client.get("/files/run/missing.json").status_code == 404
    assert client.get("/files/run/ok.json").status_code == 200
    listed = [f for run in ResultsRoot(results).runs() for f in run.files()]
    assert not [f for f in listed if "hidden" in f or ".cache" in f]
