"""The dashboard without a browser: the path rule, the download route and forged callback requests (nothing
outside the results directory is read), the reading of traces slice by slice, the views, and run_ablation."""

import json
import os
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from tiny_models import tiny_text_model

import attnscope
from attnscope.dashboards import PathRefused, ResultsRoot, create_app, run_ablation
from attnscope.dashboards.callbacks import clicked_head, deep_link, pattern_view, selection
from attnscope.dashboards.data import load_site, trace_header
from attnscope.probes.adapters.tl_bridge import tiny_word_tokenizer
from attnscope.probes.heads import HeadSet
from attnscope.probes.tokens import TokenInfo
from attnscope.probes.trace import AttentionTrace, SiteRecord

SECRET = "top secret, outside the results"


@contextmanager
def zero_hooks(module, heads):
    """Independent oracle: zero the heads' slices of each output projection's input with forward pre-hooks."""
    from attnscope.probes.head_slices import output_projections

    projections, handles = output_projections(module), []

    def hook_for(head_list, d_head):
        def hook(proj, args):
            x = args[0].clone()
            for h in head_list:
                x[..., h * d_head:(h + 1) * d_head] = 0
            return (x,) + tuple(args[1:])
        return hook
    try:
        for layer in heads.layers:
            p = projections[layer]
            handles.append(p.module.register_forward_pre_hook(hook_for(heads.heads_in_layer(layer), p.d_head)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture
def root(tmp_path):
    """results/{run_a,run_b/deeper} with tables and a trace; outside/ holds a secret; links try to escape."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text(json.dumps({"secret": SECRET}))
    res = tmp_path / "results"
    torch.manual_seed(0)
    for run, scale in (("run_a", 1.0), ("run_b/deeper", 2.0)):
        rows = [{"analysis": "s", "layer": l, "head": h, "metric": "m", "value": scale * (l + h)}
                for l in range(2) for h in range(3)]
        attnscope.ResultTable.from_records(rows).save(res / run / "scores.parquet")
    probs = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    recs = [SiteRecord(site=attnscope.Site("text", l), probs=probs + l, n_query=5, n_key=5) for l in range(2)]
    tokens = TokenInfo(strings=[list("abcde"), list("vwxyz")], padding=[[1] * 5, [1, 1, 1, 0, 0]])
    AttentionTrace(recs, tokens).save(res / "run_a" / "trace.safetensors")
    (res / "run_a" / "meta.json").write_text("{}")
    (res / "run_a" / "notes.txt").write_text("not a result")
    (res / "escape.json").symlink_to(outside / "secret.json")
    (res / "outside_dir").symlink_to(outside)
    (res / "run_a" / "inner.json").symlink_to(res / "run_a" / "meta.json")  # a symlink that stays inside is fine
    return ResultsRoot(res)


@pytest.mark.parametrize("bad", ["../outside/secret.json", "run_a/../../outside/secret.json", "/etc/passwd",
                                 str("/tmp"), "escape.json", "outside_dir/secret.json", "run_a/notes.txt",
                                 "run_a/missing.parquet", "", "run_a\x00.json", "..\\outside\\secret.json",
                                 "~/x.json", None, 3])
def test_resolve_refuses_everything_outside_or_not_a_result(root, bad):
    with pytest.raises(PathRefused):
        root.resolve(bad)


def test_listing_holds_only_result_files_inside(root):
    runs = {r.path: r for r in root.runs()}
    assert sorted(runs) == ["run_a", "run_b/deeper"]  # escape.json (root) is never listed, the root has no files
    assert runs["run_a"].files() == ["run_a/inner.json", "run_a/meta.json", "run_a/scores.parquet",
                                     "run_a/trace.safetensors"]
    assert root.resolve("run_a/inner.json").name == "meta.json"


def test_download_route_refuses_and_serves(root):
    client = create_app(root.root).server.test_client()
    for bad in ("../outside/secret.json", "escape.json", "outside_dir/secret.json", "run_a/notes.txt",
                "%2e%2e/outside/secret.json", "..%2Foutside%2Fsecret.json"):
        response = client.get("/files/" + bad)
        assert response.status_code == 403 and SECRET not in response.get_data(as_text=True), bad
    ok = client.get("/files/run_a/scores.parquet")
    assert ok.status_code == 200 and ok.data[:4] == b"PAR1"


def _post(client, output, outputs, inputs, state=()):
    body = {"output": output, "outputs": outputs, "inputs": inputs, "state": list(state),
            "changedPropIds": [f"{i['id']}.{i['property']}" for i in inputs]}
    return client.post("/_dash-update-component", json=body)


def test_forged_callback_values_are_refused(root):
    """A client can send any value for a dropdown: the grid and pattern callbacks refuse paths outside."""
    client = create_app(root.root).server.test_client()
    client.get("/")  # the layout
    grid = _post(client, "..head-grid.figure...grid-msg.children..",
                 [{"id": "head-grid", "property": "figure"}, {"id": "grid-msg", "property": "children"}],
                 [{"id": "table", "property": "value", "value": "escape.json"},
                  {"id": "metric", "property": "value", "value": None},
                  {"id": "selected", "property": "data", "value": None}])
    text = grid.get_data(as_text=True)
    assert grid.status_code == 200 and "path refused" in text and SECRET not in text
    select = _post(client, "..run.value...table.options...table.value...metric.options...metric.value..."
                   "trace.options...trace.value...site.options...site.value...files.children...alert.children..",
                   [{"id": i, "property": p} for i, p in (("run", "value"), ("table", "options"), ("table", "value"),
                    ("metric", "options"), ("metric", "value"), ("trace", "options"), ("trace", "value"),
                    ("site", "options"), ("site", "value"), ("files", "children"), ("alert", "children"))],
                   [{"id": "url", "property": "search", "value": "?table=../outside/secret.json"},
                    {"id": "run", "property": "value", "value": "../outside"},
                    {"id": "table", "property": "value", "value": None},
                    {"id": "trace", "property": "value", "value": None}],
                   [{"id": "url-own", "property": "data", "value": None}])  # the query the page last wrote
    text = select.get_data(as_text=True)
    assert "path refused" in text and SECRET not in text and "scores.parquet" in text


def test_deep_link_and_selection(root):
    run, picked, errors = deep_link(root, "?table=run_b/deeper/scores.parquet&trace=/etc/passwd")
    assert run == "run_b/deeper" and picked == {"table": "run_b/deeper/scores.parquet"}
    assert len(errors) == 1 and errors[0].startswith("trace: path refused")
    state = selection(root, None, "?trace=run_a/trace.safetensors", None, None, None)
    assert state["run"] == "run_a" and state["trace"] == "run_a/trace.safetensors" and state["metric"] == "m"
    assert state["site"] == "text.L0.self"
    changed = selection(root, "run", "", "run_b/deeper", None, None)
    assert changed["table"] == "run_b/deeper/scores.parquet" and changed["trace"] is None
    forged = selection(root, "run", "", "../outside", None, None)
    assert forged["errors"] and forged["run"] == "run_a"


def test_site_slices_equal_the_full_trace(root):
    path = root.resolve("run_a/trace.safetensors")
    full = AttentionTrace.load(path)
    header = trace_header(path)
    assert header.batch == 2 and header.layers("text", "self") == [0, 1]
    one = load_site(path, attnscope.Site("text", 1), None, batch=1)
    torch.testing.assert_close(one.get(attnscope.Site("text", 1)).probs[0],
                               full.get(attnscope.Site("text", 1)).probs[1])
    assert one.tokens.strings == [list("vwxyz")] and one.tokens.padding == [[1, 1, 1, 0, 0]]


def test_pattern_view_click_spec_and_errors(root):
    fig, top = pattern_view(root, "run_a/trace.safetensors", "text.L0.self", 1, None, (1, 2), "auto")
    full = AttentionTrace.load(root.resolve("run_a/trace.safetensors")).get(attnscope.Site("text", 1)).probs
    np.testing.assert_allclose(np.asarray(fig.data[0].z), full[1, 2, :3, :3].numpy(), rtol=1e-6)
    received = full[1, 2, :3, :3].mean(0)
    assert top[0][0] == int(received.argmax()) and top[0][1] == "vwx"[int(received.argmax())]
    fused, _ = pattern_view(root, "run_a/trace.safetensors", None, 0, "L0H*", None, "auto")
    np.testing.assert_allclose(np.asarray(fused.data[0].z), full[0].mean(0).numpy() - 1, rtol=1e-5, atol=1e-6)
    for spec, click in (("L0H1,L1H1", None), (None, (5, 0)), ("L0H9", None), ("L*H1", None)):
        with pytest.raises(attnscope.AttnscopeError):
            pattern_view(root, "run_a/trace.safetensors", None, 0, spec, click, "auto")
    assert clicked_head({"points": [{"x": 2, "y": 1, "customdata": [1, 2]}]}) == (1, 2)
    assert clicked_head({"points": [{"x": 2, "y": 1}]}) == (1, 2) and clicked_head(None) is None


@pytest.fixture(scope="module")
def gpt2():
    return attnscope.load(tiny_text_model("gpt2"), tokenizer=tiny_word_tokenizer(64))


def test_run_ablation_matches_independent_zero_hooks(gpt2):
    result = run_ablation(gpt2, "L1H0,L1H2", "zero", "w3 w4 w5 w6")
    assert result["path"] == "interventions.apply_plan" and result["heads"] == "L1H0,L1H2"
    prepared = gpt2.prepare(["w3 w4 w5 w6"])
    with torch.no_grad():
        clean = torch.log_softmax(gpt2.module(**prepared.kwargs).logits[0, -1], -1)
        with zero_hooks(gpt2.module, HeadSet([(1, 0), (1, 2)])):
            ablated = torch.log_softmax(gpt2.module(**prepared.kwargs).logits[0, -1], -1)
        again = torch.log_softmax(gpt2.module(**prepared.kwargs).logits[0, -1], -1)
    target = int(clean.argmax())
    assert result["metric_before"] == pytest.approx(float(clean[target]), abs=1e-5)
    assert result["metric_after"] == pytest.approx(float(ablated[target]), abs=1e-5)
    torch.testing.assert_close(again, clean)  # every hook removed
    assert result["output_before"].startswith("next: ")


def test_run_ablation_modes_and_bad_input(gpt2, minilm):
    for mode in ("mean", "resample", "uniform"):
        assert np.isfinite(run_ablation(gpt2, "L0H*", mode, "w3 w4 w5 w6 w7")["metric_after"])
    assert run_ablation(gpt2, "L0H1", "rescale", "w3 w4", scale=1.0)["metric_after"] == \
        pytest.approx(run_ablation(gpt2, "L0H1", "rescale", "w3 w4", scale=1.0)["metric_before"], abs=1e-5)
    answer = run_ablation(gpt2, "L0H1", "zero", "w3 w4", answer=" w5 w6")
    assert answer["metric"] == "log p(answer)" and answer["metric_before"] < 0
    enc = run_ablation(minilm, "L2H*", "zero", "The cat sat on the mat.")
    assert enc["metric_before"] == 1.0 and 0 < enc["metric_after"] < 1.0 and enc["heads"] == "L2H*"
    for kwargs in ({"heads": "L9H0"}, {"mode": "scramble"}, {"text": "  "}, {"mode": "rescale"}):
        args = {"heads": "L0H0", "mode": "zero", "text": "w3"} | kwargs
        with pytest.raises(attnscope.AttnscopeError):
            run_ablation(gpt2, args.pop("heads"), args.pop("mode"), args.pop("text"))


def test_viz_and_dashboard_modules_import_no_dash_until_the_app_is_built():
    import subprocess
    import sys

    code = ("import sys, attnscope.viz, attnscope.dashboards, attnscope.commands.dash, attnscope.cli; "
            "attnscope.cli.build_parser(); sys.exit(1 if 'dash' in sys.modules else 0)")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_json_files_are_shown_through_the_path_rule(root):
    from attnscope.dashboards.callbacks import _file_item

    shown = str(_file_item(root, "run_a/meta.json").to_plotly_json())
    assert "/files/run_a/meta.json" in shown and "{}" in shown
    refused = str(_file_item(root, "escape.json").to_plotly_json())
    assert SECRET not in refused and "path refused" in refused
