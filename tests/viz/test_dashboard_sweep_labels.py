"""Issue #21: the dashboard names sweep cells by their spec labels, not by their ``cell=<id>`` hash."""

import pandas as pd
import pytest

from attnscope.dashboards import ResultsRoot
from attnscope.dashboards.callbacks import diff_view
from attnscope.dashboards.sweep_cells import sweep_cell
from attnscope.sweeps import load_sweep, store
from attnscope.sweeps.spec import parse_spec

SPEC = {"name": "labels", "models": [{"model": "minilm", "label": "mini"}],
        "suites": [{"generator": "induction", "label": "ind", "n_items": 2, "seq_len": 16, "vocab_size": 64}],
        "analyses": [{"name": "head-stats", "label": "stats"}],
        "interventions": ["none", {"heads": "L0H1", "mode": "zero"}, {"heads": "L1H*", "mode": "zero",
                                                                        "label": "no-L1"}]}


def _result(value: float) -> dict:
    df = pd.DataFrame({"analysis": "head-stats", "layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "metric": "entropy",
                       "value": [value, value + 1, value + 2, value + 3]})
    return {"df": df, "provenance": {}, "seconds": 0.0, "worker": {}}


@pytest.fixture()
def sweep(tmp_path):
    """A real sweep folder ``tmp_path/sweeps/labels`` written by the store (no Ray), one cell per intervention."""
    cells = parse_spec(SPEC).cells()
    out = tmp_path / "sweeps" / "labels"
    store.write_manifest(out, SPEC, cells, "labels")
    for i, cell in enumerate(cells):
        store.write_cell(out, cell, _result(float(i)), {"name": "labels"})
    return tmp_path, out, cells


def _spec_label(cell) -> str:
    labels = cell.labels()
    return " · ".join(labels[k] for k in ("model", "suite", "analysis", "intervention"))


def test_run_picker_shows_the_spec_labels(sweep):
    root_dir, out, cells = sweep
    runs = {run.path: run for run in ResultsRoot(root_dir).runs()}
    assert [c.labels()["intervention"] for c in cells] == ["none", "zero:L0H1", "no-L1"]
    for cell in cells:
        run = runs[f"sweeps/labels/cell={cell.id}"]
        assert run.cell.labels == cell.labels() and run.cell.id == cell.id
        assert run.label == f"sweeps/labels › {_spec_label(cell)}" and cell.id not in run.label
        assert run.option() == {"label": run.label, "value": run.path, "title": run.path}  # the hash: a tooltip
    assert runs["sweeps/labels"].label == "sweeps/labels"  # the folder of _sweep.json is an ordinary run
    assert "mini · ind · stats · zero:L0H1" in {r.label.split(" › ")[-1] for r in runs.values()}


def test_sweep_at_the_results_root_and_colliding_labels(sweep, tmp_path_factory):
    _, out, cells = sweep
    runs = {run.path: run for run in ResultsRoot(out).runs()}
    assert runs[f"cell={cells[0].id}"].label == "mini · ind · stats · none"
    # an earlier spec's cell with the same labels (another seed) left in the folder: short ids tell them apart
    other = parse_spec({**SPEC, "seed": 7}).cells()[0]
    store.write_cell(out, other, _result(9.0), {})
    runs = {run.path: run for run in ResultsRoot(out).runs()}
    assert runs[f"cell={other.id}"].label == f"mini · ind · stats · none ({other.id[:8]})"
    assert runs[f"cell={cells[0].id}"].label == f"mini · ind · stats · none ({cells[0].id[:8]})"
    assert runs[f"cell={cells[1].id}"].label == "mini · ind · stats · zero:L0H1"


def test_labels_match_load_sweep_and_diff_names_cells(sweep):
    root_dir, out, cells = sweep
    table = load_sweep(out).df
    for cell in cells:
        rows = table[table.cell == cell.id].iloc[0]
        shown = sweep_cell(out / f"cell={cell.id}" / "part.parquet")
        assert shown.label == " · ".join([rows.cell_model, rows.cell_suite, rows.cell_analysis,
                                          rows.cell_intervention])
        assert shown.seed == cell.seed
    root = ResultsRoot(root_dir)
    a, b = (f"sweeps/labels/cell={c.id}/part.parquet" for c in cells[:2])
    title = diff_view(root, a, b, "entropy").layout.title.text
    assert _spec_label(cells[1]) in title and _spec_label(cells[0]) in title and cells[0].id not in title


def test_unlabelled_or_broken_cells_keep_their_folder_name(tmp_path):
    folder = tmp_path / "cell=abc"
    folder.mkdir()
    _result(0.0)["df"].to_parquet(folder / "part.parquet")  # a parquet file without attnscope metadata
    (run,) = ResultsRoot(tmp_path).runs()
    assert run.cell is None and run.label == "cell=abc"
    assert sweep_cell(folder / "part.parquet") is None and sweep_cell(tmp_path / "nothing.parquet") is None
