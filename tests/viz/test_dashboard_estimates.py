"""Issue #18 / #21: the head grid of an ``attnscope patch`` table says which values are estimates and which are
exact (tables written by the real patch job on the zoo induction organism), and the sweep folders' table menus
name cells by their spec labels (a sweep written by the sweep store)."""

import numpy as np
import pandas as pd
import pytest

from attnscope.dashboards import ResultsRoot
from attnscope.dashboards.callbacks import diff_view, grid_view
from attnscope.dashboards.estimates import EXACT_MARKER, exact_heads
from attnscope.dashboards.layout import build_layout
from attnscope.sweeps import store
from attnscope.sweeps.spec import parse_spec


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    """exact.parquet (activation patching), atp.parquet (AtP*), verified.parquet (AtP* + exact top-3 and 2 random
    controls), each written by ``tasks.patch_job`` on zoo:induction-2l."""
    from attnscope.tasks.patch_job import PatchRequest, run_patch_job
    from attnscope.tasks.references import ModelRef, SuiteRef

    root = tmp_path_factory.mktemp("patch")
    for name, options in (("exact", {}), ("atp", {"method": "atp*"}),
                          ("verified", {"method": "atp*", "verify_top": 3, "random_controls": 2})):
        run_patch_job(PatchRequest(ModelRef.parse("zoo:induction-2l"), root / "run" / f"{name}.parquet",
                                   SuiteRef.parse("induction"), n_items=4, progress=False, **options))
    return ResultsRoot(root)


def _rows(root, name):
    """The per-head rows of a table read with pandas alone (the reference)."""
    df = pd.read_parquet(root.root / "run" / f"{name}.parquet")
    return df[(df["layer"] >= 0) & (df["head"] >= 0)]


def _drawn(fig, name):
    (trace,) = [t for t in fig.data if t.name == name]
    return np.array(trace.z, dtype=float), np.array(trace.text, dtype=object)


def _reference(rows, shape):
    z = np.full(shape, np.nan)
    for r in rows.itertuples():
        z[int(r.layer), int(r.head)] = float(r.value)
    return z


def test_verified_table_draws_estimates_and_exact_apart(patched):
    rows = _rows(patched, "verified")
    fig = grid_view(patched, "run/verified.parquet", "logit")
    est_rows, exact_rows = rows[rows["is_estimate"]], rows[~rows["is_estimate"]]
    assert len(est_rows) == 8 and len(exact_rows) == 5  # 2 layers x 4 heads; top-3 + 2 controls re-checked
    est, est_text = _drawn(fig, "estimate (atp*)")
    exact, exact_text = _drawn(fig, "exact")
    np.testing.assert_allclose(est, _reference(est_rows, (2, 4)), rtol=1e-6)
    np.testing.assert_allclose(exact, _reference(exact_rows, (2, 4)), rtol=1e-6)  # NaN where not re-checked
    assert exact_heads(fig) == sorted((int(r.layer), int(r.head)) for r in exact_rows.itertuples())
    for layer in range(2):
        for head in range(4):
            assert est_text[layer, head].split("<br>")[1].startswith("estimate (atp*) = ")
            first = exact_text[layer, head].split("<br>")[1]
            assert first.startswith("exact = ") if np.isfinite(exact[layer, head]) else first == "exact: none"
    assert "estimate" in fig.layout.annotations[0].text and "exact" in fig.layout.annotations[1].text


def test_exact_and_estimate_tables(patched):
    exact_rows, est_rows = _rows(patched, "exact"), _rows(patched, "atp")
    fig = grid_view(patched, "run/exact.parquet", "logit", selected=[1, 2])
    z, text = _drawn(fig, "exact")
    np.testing.assert_allclose(z, _reference(exact_rows, (2, 4)), rtol=1e-6)
    assert exact_heads(fig) == sorted((int(r.layer), int(r.head)) for r in exact_rows.itertuples())
    assert all("estimate" not in t for t in text.ravel()) and len(fig.layout.shapes) == 1
    fig = grid_view(patched, "run/atp.parquet", "logit")
    z, text = _drawn(fig, "estimate (atp*)")
    np.testing.assert_allclose(z, _reference(est_rows, (2, 4)), rtol=1e-6)
    assert exact_heads(fig) == [] and not [t for t in fig.data if t.name == EXACT_MARKER]
    assert all("exact" not in t for t in text.ravel())  # nothing approximate is labelled exact
    assert "none exact" in fig.layout.title.text


def test_difference_grid_never_mixes_estimates_and_exact(patched):
    fig = diff_view(patched, "run/verified.parquet", "run/exact.parquet", "logit")
    verified, exact = _rows(patched, "verified"), _rows(patched, "exact")
    want = _reference(exact, (2, 4)) - _reference(verified[verified["is_estimate"]], (2, 4))
    np.testing.assert_allclose(np.array(fig.data[0].z, dtype=float), want, rtol=1e-5, atol=1e-6)
    assert "(exact)" in fig.layout.title.text and "(estimate: atp*)" in fig.layout.title.text


SPEC = {"name": "labels", "models": [{"model": "minilm", "label": "mini"}],
        "suites": [{"generator": "induction", "label": "ind", "n_items": 2, "seq_len": 16, "vocab_size": 64}],
        "analyses": [{"name": "head-stats", "label": "stats"}],
        "interventions": ["none", {"heads": "L1H*", "mode": "zero", "label": "no-L1"}]}


def test_sweep_table_menus_show_cell_labels(tmp_path):
    cells = parse_spec(SPEC).cells()
    out = tmp_path / "sweeps" / "labels"
    store.write_manifest(out, SPEC, cells, "labels")
    for i, cell in enumerate(cells):
        df = pd.DataFrame({"analysis": "head-stats", "layer": [0, 1], "head": [0, 0], "metric": "entropy",
                           "value": [float(i), i + 1.0]})
        store.write_cell(out, cell, {"df": df, "provenance": {}, "seconds": 0.0, "worker": {}}, {"name": "labels"})
    root = ResultsRoot(tmp_path)
    want = {f"sweeps/labels/cell={c.id}/part.parquet": "sweeps/labels › " + " · ".join(
        c.labels()[k] for k in ("model", "suite", "analysis", "intervention")) for c in cells}
    for run in root.runs():
        for option in run.table_options():
            assert option["value"] == option["title"] and option["label"] == want.get(option["value"],
                                                                                      option["value"])
    page = build_layout(root, None)
    compare = _find(page, "compare").options
    assert {o["value"]: o["label"] for o in compare} == want and all("cell=" not in o["label"] for o in compare)
    runs = {o["value"]: o for o in _find(page, "run").options}
    for table, label in want.items():  # the run picker: the same labels, the folder (with its hash) on hover
        folder = table.rsplit("/", 1)[0]
        assert runs[folder]["label"] == label and runs[folder]["title"] == folder


def _find(component, ident):
    """The component with id ``ident`` in a Dash layout tree."""
    if getattr(component, "id", None) == ident:
        return component
    children = getattr(component, "children", None)
    for child in children if isinstance(children, list) else [children] if children is not None else []:
        if hasattr(child, "to_plotly_json"):
            found = _find(child, ident)
            if found is not None:
                return found
    return None
