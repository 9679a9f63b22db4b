"""Token attribution tables (``attnscope attribute``) in the dashboard's Results tab (issue #21): the grid card
shows the attribution as coloured tokens, per layer, instead of the "no per-head rows" error; per-head tables keep
the head grid. The reference is the parquet file read back with pandas, not the figure builder."""

import numpy as np
import pandas as pd
import pytest

import attnscope
from attnscope.dashboards import ResultsRoot, create_app
from attnscope.dashboards.callbacks import ALL_LAYERS, grid_click, grid_view, layer_choice, selection

TEXT = "The cat sat on the mat."


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """results/run/attr.parquet written by the real CLI (rollout on MiniLM) next to a per-head table."""
    from attnscope.cli import main

    res = tmp_path_factory.mktemp("results")
    assert main(["attribute", "--model", "minilm", "--text", TEXT, "--method", "rollout",
                 "--out", str(res / "run" / "attr.parquet")]) in (0, None)
    rows = [{"analysis": "s", "layer": l, "head": h, "metric": "m", "value": float(l + h)}
            for l in range(2) for h in range(3)]
    attnscope.ResultTable.from_records(rows).save(res / "run" / "scores.parquet")
    return ResultsRoot(res)


def _reference(root, layer):
    """(tokens, values) of one layer, straight from the parquet file, in token order."""
    df = pd.read_parquet(root.root / "run" / "attr.parquet")
    one = df[df["layer"] == layer].sort_values("token_index")
    return one["token"].astype(str).tolist(), one["value"].to_numpy(dtype=np.float64)


def _shown(fig):
    """(tokens, values) a token_attribution figure draws, in reading order, padding cells dropped."""
    text = np.asarray(fig.data[0].text, dtype=object).reshape(-1)
    z = np.asarray(fig.data[0].z, dtype=np.float64).reshape(-1)
    positions = np.asarray(fig.data[0].customdata).reshape(-1)
    keep = positions >= 0
    assert (positions[keep] == np.arange(keep.sum())).all()
    return [str(t) for t in text[keep]], z[keep]


def test_attribution_table_shows_tokens_of_the_last_layer_by_default(root):
    df = pd.read_parquet(root.root / "run" / "attr.parquet")
    last = int(df["layer"].max())
    assert last == 5 and {"[CLS]", "cat", "mat", "[SEP]"} <= set(df["token"])
    fig = grid_view(root, "run/attr.parquet", None)
    tokens, values = _shown(fig)
    want_tokens, want_values = _reference(root, last)
    assert tokens == want_tokens
    np.testing.assert_allclose(values, want_values, rtol=1e-6)
    assert f"layer {last}" in fig.layout.title.text and "no per-head rows" not in fig.to_json()


def test_layer_picker_picks_one_layer_or_all(root):
    options, value, shown = layer_choice(root, "run/attr.parquet")
    assert shown and value == 5 and [o["value"] for o in options] == [0, 1, 2, 3, 4, 5, ALL_LAYERS]
    tokens, values = _shown(grid_view(root, "run/attr.parquet", "rollout", None, 0))
    want_tokens, want_values = _reference(root, 0)
    assert tokens == want_tokens
    np.testing.assert_allclose(values, want_values, rtol=1e-6)
    heat = grid_view(root, "run/attr.parquet", "rollout", None, ALL_LAYERS)
    df = pd.read_parquet(root.root / "run" / "attr.parquet")
    grid = df.pivot(index="layer", columns="token_index", values="value").sort_index()
    np.testing.assert_allclose(np.asarray(heat.data[0].z, dtype=np.float64), grid.to_numpy(), rtol=1e-6)
    for forged in (99, "abc", "1; drop", True):
        with pytest.raises(attnscope.AttnscopeError, match="layer not in table"):
            grid_view(root, "run/attr.parquet", "rollout", None, forged)
    assert layer_choice(root, "run/scores.parquet") == ([], None, False)
    assert layer_choice(root, "../etc/passwd") == ([], None, False)


def test_metric_choice_and_clicks_on_an_attribution_table(root):
    state = selection(root, "table", "", "run", "run/attr.parquet", None)
    assert state["metric_options"] == ["rollout"] and state["metric"] == "rollout"
    fig = grid_view(root, "run/attr.parquet", None)
    position = int(np.asarray(fig.data[0].customdata)[0][2])
    click = {"points": [{"x": 2, "y": 0, "customdata": position}]}  # a token cell, as plotly reports it: not a head
    assert grid_click(click) is None and grid_click(None) is None
    head = {"points": [{"x": 2, "y": 1, "customdata": [1, 2]}]}
    assert grid_click(head) == (1, 2)


def test_per_head_tables_keep_the_head_grid(root):
    fig = grid_view(root, "run/scores.parquet", "m", None)
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=np.float64), [[0, 1, 2], [1, 2, 3]])


def _decoded(value):
    """A plotly JSON array: a list, or a typed array ``{"dtype", "bdata" (base64), "shape"}``."""
    import base64

    if not isinstance(value, dict):
        return value
    flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
    shape = [int(n) for n in str(value.get("shape", len(flat))).split(",")]
    return flat.reshape(shape)


def test_grid_callback_over_http_draws_the_attribution(root):
    """The real Dash grid callback (as the browser calls it on picking the table) returns the token figure of the
    last layer, not an error line."""
    import json

    client = create_app(root.root).server.test_client()
    client.get("/")
    inputs = [{"id": "table", "property": "value", "value": "run/attr.parquet"},
              {"id": "metric", "property": "value", "value": "rollout"},
              {"id": "selected", "property": "data", "value": None}]
    body = {"output": "..head-grid.figure...grid-msg.children..",
            "outputs": [{"id": "head-grid", "property": "figure"}, {"id": "grid-msg", "property": "children"}],
            "inputs": inputs, "state": [], "changedPropIds": ["table.value"]}
    response = client.post("/_dash-update-component", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    out = json.loads(response.get_data(as_text=True))["response"]
    assert out["grid-msg"]["children"] == ""
    trace = out["head-grid"]["figure"]["data"][0]
    text, z = np.asarray(_decoded(trace["text"]), dtype=object), np.asarray(_decoded(trace["z"]), dtype=np.float64)
    cells = [(t, v) for t, v in zip(text.reshape(-1), z.reshape(-1)) if t != ""]
    want_tokens, want_values = _reference(root, 5)  # the last layer: what the layer picker starts on
    assert [t for t, _ in cells] == want_tokens
    np.testing.assert_allclose([z for _, z in cells], want_values, rtol=1e-6)
