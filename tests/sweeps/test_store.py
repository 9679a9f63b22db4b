"""The sweep store (no Ray): atomic cell writes, a reader that never sees a partial file, temporaries ignored."""

import multiprocessing as mp
import time

import pandas as pd
import pytest

from attnscope.results import ResultTable
from attnscope.sweeps import store
from attnscope.sweeps.spec import parse_spec

SPEC = {"models": ["minilm"], "suites": [{"generator": "induction", "n_items": 2, "seq_len": 16, "vocab_size": 64}],
        "analyses": ["head-stats"], "interventions": ["none", {"heads": "L0H1", "mode": "zero"}]}


def _cells():
    return parse_spec(SPEC).cells()


def _result(n: int, value: float = 0.5) -> dict:
    df = pd.DataFrame({"analysis": "a", "layer": [i % 6 for i in range(n)], "head": [i % 12 for i in range(n)],
                       "metric": "m", "value": [value] * n})
    return {"df": df, "provenance": {"versions": {"x": "1"}}, "seconds": 0.1, "worker": {"pid": 1}}


def test_write_and_read_back(tmp_path):
    a, b = _cells()
    store.write_manifest(tmp_path, SPEC, [a, b], "t")
    path = store.write_cell(tmp_path, a, _result(5), {"name": "t"})
    assert path == tmp_path / f"cell={a.id}" / "part.parquet" and store.is_done(tmp_path, a.id)
    one = ResultTable.load(path)  # a cell file is an ordinary ResultTable file
    assert one.provenance["cell"]["id"] == a.id and one.provenance["seed"] == 0 and len(one) == 5
    table = store.load_sweep(tmp_path)
    assert set(table.df.cell) == {a.id} and table.provenance["missing"] == [b.id]
    assert list(table.df.columns[:6]) == list(store.LABEL_COLUMNS)
    assert table.df.cell_intervention.iloc[0] == "none"
    store.write_manifest(tmp_path, SPEC, [b], "another spec")  # a later run with another grid
    assert len(store.load_sweep(tmp_path)) == 0 and len(store.load_sweep(tmp_path, all_cells=True)) == 5


def test_crash_during_write_leaves_no_result(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    cell = _cells()[0]

    def half_then_crash(table, where, **kwargs):
        with open(where, "wb") as handle:
            handle.write(b"PAR1" + b"\0" * 1000)  # a partial file ...
        raise OSError("disk full")  # ... and the writer dies

    monkeypatch.setattr(pq, "write_table", half_then_crash)
    with pytest.raises(OSError):
        store.write_cell(tmp_path, cell, _result(3), {})
    folder = store.cell_dir(tmp_path, cell.id)
    assert not (folder / "part.parquet").exists() and not list(folder.glob(".*.tmp"))
    assert not store.is_done(tmp_path, cell.id)


def test_stray_temporaries_are_never_read(tmp_path):
    import pyarrow.dataset as ds

    a, b = _cells()
    store.write_cell(tmp_path, a, _result(4), {})
    stray = store.cell_dir(tmp_path, b.id) / ".part.parquet.dead.tmp"  # a writer killed with SIGKILL
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"PAR1 half a file")
    assert not store.is_done(tmp_path, b.id)
    assert set(store.load_sweep(tmp_path).df.cell) == {a.id}
    assert ds.dataset(tmp_path, format="parquet", partitioning="hive").count_rows() == 4
    assert store.clean_temporaries(tmp_path) == 1 and not stray.exists()


def test_unreadable_result_is_moved_aside_and_recomputed(tmp_path):
    cell = _cells()[0]
    path = store.write_cell(tmp_path, cell, _result(4), {})
    path.write_bytes(path.read_bytes()[:50])  # truncated by something that did not write atomically
    assert not store.is_done(tmp_path, cell.id)
    assert not path.exists() and list(path.parent.glob("part.parquet.corrupt-*"))


def _rewrite(out: str, n_rows: int, seconds: float) -> None:
    cell = _cells()[0]
    end, i = time.time() + seconds, 0
    while time.time() < end:
        store.write_cell(out, cell, _result(n_rows, value=float(i)), {})
        i += 1


def test_concurrent_reader_never_sees_a_partial_file(tmp_path):
    """A writer process rewrites a big cell over and over; every read of part.parquet is whole and consistent."""
    import pyarrow.parquet as pq

    cell, n_rows = _cells()[0], 200_000
    store.write_cell(tmp_path, cell, _result(n_rows), {})
    writer = mp.get_context("fork").Process(target=_rewrite, args=(str(tmp_path), n_rows, 3.0))
    writer.start()
    part, reads, versions = store.cell_dir(tmp_path, cell.id) / "part.parquet", 0, set()
    try:
        while writer.is_alive():
            table = pq.read_table(part).to_pandas()  # raises on a partial file
            assert len(table) == n_rows and table.value.nunique() == 1
            versions.add(float(table.value.iloc[0]))
            reads += 1
    finally:
        writer.join(30)
    assert writer.exitcode == 0 and reads > 5 and len(versions) > 1, (reads, versions)
    assert not list(part.parent.glob(".*.tmp"))


def test_every_column_of_every_cell_is_read(tmp_path):
    """Issue #21: cells with different columns; ``pd.read_parquet`` takes one file's schema unless given
    ``sweep_schema``, ``load_sweep`` keeps them all."""
    a, b = _cells()
    store.write_manifest(tmp_path, SPEC, [a, b], "t")
    store.write_cell(tmp_path, a, _result(3), {})
    wide = _result(2)
    wide["df"] = wide["df"].assign(extra=1.5, note="x", n=2)
    store.write_cell(tmp_path, b, wide, {})
    expected = set(store.LABEL_COLUMNS) | {"analysis", "layer", "head", "metric", "value", "extra", "note", "n"}
    assert len(expected) == 14
    table = store.load_sweep(tmp_path)
    assert set(table.df.columns) == expected and len(table) == 5
    assert table.df.set_index("cell").loc[b.id, "note"].tolist() == ["x", "x"]
    schema = store.sweep_schema(tmp_path)
    assert set(schema.names) == expected and not schema.metadata
    read = pd.read_parquet(tmp_path, schema=schema)
    assert set(read.columns) == expected and len(read) == 5
    assert sorted(read.loc[read.cell == b.id, "extra"].tolist()) == [1.5, 1.5]
    assert read.loc[read.cell == a.id, "extra"].isna().all()


def test_sweep_schema_of_incompatible_cells_is_a_corrupt_result(tmp_path):
    from attnscope.errors import CorruptResultError

    a, b = _cells()
    store.write_cell(tmp_path, a, _result(2), {})
    bad = _result(2)
    bad["df"] = bad["df"].assign(value=["high", "low"])
    store.write_cell(tmp_path, b, bad, {})
    with pytest.raises(CorruptResultError):
        store.sweep_schema(tmp_path)
    assert len(store.load_sweep(tmp_path, all_cells=True)) == 4
