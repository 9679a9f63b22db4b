import json

import pandas as pd
import pytest
import torch

from attnscope import AttentionTrace, CorruptResultError, ResultTable, Site, SiteRecord, Span, TokenInfo
from attnscope.errors import SiteError


def _trace() -> AttentionTrace:
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 4, 5, generator=g), -1)
    rec1 = SiteRecord(site=Site("text", 0, "self"), probs=probs, n_query=4, n_key=5, meta={"causal": True})
    rec2 = SiteRecord(site=Site("unet", 1, "cross"), step=3, probs=None, query_index=torch.tensor([2, 3]),
                      head_index=torch.tensor([0, 2]), n_query=4, n_key=5, mass_spans=[(0, 1), (2, 4)],
                      stats={"entropy": torch.rand(2, 2, 2, generator=g), "mass": torch.rand(2, 2, 2, 2, generator=g),
                             "topk_index": torch.randint(0, 5, (2, 2, 2, 3), generator=g, dtype=torch.int32)},
                      meta={"grid": [2, 2]})
    tokens = TokenInfo(ids=[[1, 2, 3, 4, 5]] * 2, strings=[list("abcde")] * 2,
                       spans=[Span("special", 0, 1, "[CLS]"), Span("image", 1, 4)], grid=(2, 2), padding=[[1] * 5] * 2)
    return AttentionTrace([rec1, rec2], tokens, {"model": "unit", "dtype": "torch.float32"})


def test_trace_round_trip_is_exact(tmp_path):
    trace = _trace()
    loaded = AttentionTrace.load(trace.save(tmp_path / "t.safetensors"))
    assert loaded.tokens == trace.tokens and loaded.provenance == trace.provenance
    assert set(loaded.records) == set(trace.records)
    for key, rec in trace.records.items():
        other = loaded.records[key]
        for name in ("probs", "query_index", "head_index"):
            a, b = getattr(rec, name), getattr(other, name)
            assert (a is None and b is None) or (torch.equal(a, b) and a.dtype == b.dtype)
        assert rec.stats.keys() == other.stats.keys()
        assert all(torch.equal(rec.stats[k], other.stats[k]) for k in rec.stats)
        assert (rec.mass_spans, rec.meta, rec.n_query, rec.n_key) == (
            [tuple(s) for s in other.mass_spans], other.meta, other.n_query, other.n_key)


def test_trace_lookup_and_stack():
    trace = _trace()
    assert trace.stack("text").shape == (1, 2, 3, 4, 5)
    assert trace.get(Site("unet", 1, "cross"), step=3).heads() == [0, 2]
    assert trace.get(Site("unet", 1, "cross")).rows() == [2, 3]
    cross = trace.get(Site("unet", 1, "cross"))
    assert torch.equal(trace.stat("entropy", "unet", "cross")[0], cross.stats["entropy"])


def test_stat_and_stack_name_the_towers_there_are():
    trace = _trace()
    with pytest.raises(SiteError, match="no sites of this tower") as error:
        trace.stat("entropy", Site("text", 0, "self"))  # a site where the tower name belongs
    assert "text/self" in str(error.value) and "unet/cross" in str(error.value)
    with pytest.raises(SiteError, match="statistic not captured"):
        trace.stat("entropy", "text")
    with pytest.raises(SiteError, match="no full patterns"):
        trace.stack("unet", "cross")


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "])
def test_corrupt_trace_raises_named_error(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CorruptResultError, match="not a readable attnscope trace"):
        AttentionTrace.load(path)


def test_truncated_trace_raises(tmp_path):
    data = _trace().save(tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptResultError):
        AttentionTrace.load(tmp_path / "cut.safetensors")
    with pytest.raises(CorruptResultError, match="not found"):
        AttentionTrace.load(tmp_path / "missing.safetensors")


def test_safetensors_without_attnscope_header_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CorruptResultError):
        AttentionTrace.load(tmp_path / "foreign.safetensors")


def test_result_table_round_trip(tmp_path):
    table = ResultTable.from_records(
        [{"analysis": "a", "layer": l, "head": h, "metric": "m", "value": l + h / 10, "token": "x"}
         for l in range(2) for h in range(3)], provenance={"model": "unit", "seed": 3})
    loaded = ResultTable.load(table.save(tmp_path / "r.parquet"))
    pd.testing.assert_frame_equal(loaded.df, table.df)
    assert loaded.provenance == {"model": "unit", "seed": 3}
    assert loaded.pivot("m").shape == (2, 3)
    assert list(loaded.top(1)["value"]) == [1.2]


def test_result_table_rejects_bad_input(tmp_path):
    with pytest.raises(CorruptResultError, match="required columns"):
        ResultTable(pd.DataFrame({"layer": [0]}))
    (tmp_path / "bad.parquet").write_text(json.dumps({"no": "parquet"}))
    with pytest.raises(CorruptResultError):
        ResultTable.load(tmp_path / "bad.parquet")


def test_pivot_refuses_to_average_different_metrics_and_tables_render_in_jupyter():
    from attnscope.errors import InputError
    from attnscope.results import ResultTable

    rows = [{"analysis": "a", "layer": layer, "head": head, "metric": metric, "value": float(layer * 10 + head)}
            for layer in range(2) for head in range(3) for metric in ("m", "n")]
    table = ResultTable(pd.DataFrame(rows).assign(value=lambda d: d.value + (d.metric == "n") * 100),
                        {"model": "tiny<b>"})
    with pytest.raises(InputError, match="several metrics"):
        table.pivot()
    assert table.pivot("n").loc[1, 2] == 112.0 and table.pivot("m").loc[1, 2] == 12.0
    html = table._repr_html_()
    assert "12 rows" in html and "metrics m, n" in html and "tiny&lt;b&gt;" in html and "<table" in html
