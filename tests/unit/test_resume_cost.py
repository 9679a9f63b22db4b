"""Resuming an interrupted ``score retrieval`` costs the remaining samples, not a rescan of every finished row per
sample: the done-set of the partial log is built once and kept up to date (counted, not timed)."""

import pandas as pd
from tiny_models import tiny_text_model

from attnscope.circuits import detectors, retrieval_heads as retrieval
from attnscope.datasets import needle_tokens
from attnscope.results import ResultTable


def test_resume_builds_the_done_set_once_and_skips_finished_samples(tmp_path, monkeypatch):
    suite = needle_tokens(6, seq_len=20, vocab_size=64, needle_len=4, depth=0.5, seed=0)
    model = tiny_text_model("llama")
    partial = tmp_path / "r.partial.parquet"
    full = retrieval.retrieval_scores(model, suite, partial=partial, progress=False)
    saved = ResultTable.load(partial)
    interrupted = saved.df[saved.df["sample"] < 3].reset_index(drop=True)  # as if killed after 3 samples
    ResultTable(interrupted, saved.provenance).save(partial)

    checks, decoded = [], []
    real_notna, real_decode = detectors.pd.notna, retrieval.decode_top_positions
    monkeypatch.setattr(detectors.pd, "notna", lambda value: checks.append(1) or real_notna(value))
    monkeypatch.setattr(retrieval, "decode_top_positions", lambda *a, **k: decoded.append(1) or real_decode(*a, **k))
    resumed = retrieval.retrieval_scores(model, suite, partial=partial, progress=False)

    assert len(decoded) == 3  # only the samples that were not finished
    rows_per_sample = len(interrupted) // 3
    # every row is looked at once (loaded + added); the old done-set rescanned all rows for each of the 6 samples
    assert len(checks) <= len(interrupted) + 3 * rows_per_sample < 6 * len(interrupted)
    pd.testing.assert_series_equal(resumed.table.df["value"], full.table.df["value"])


def test_partial_log_done_follows_added_rows(tmp_path):
    log = detectors.PartialLog(tmp_path / "p.parquet", "fp")
    assert log.done == set()
    log.add([{"analysis": "a", "layer": 0, "head": 0, "metric": "m", "value": 1.0, "sample": 4}])
    assert log.done == {4}
    log.flush()
    assert detectors.PartialLog(tmp_path / "p.parquet", "fp").done == {4}
