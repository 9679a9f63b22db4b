"""Sweeps on a local Ray cluster with 2 workers: results equal a plain loop, a killed worker's cell is retried and
the results equal an undisturbed run, failing cells are recorded and retried on the next run, done cells skipped."""

import logging
from pathlib import Path

import pandas as pd
import pytest
from tiny_models import tiny_text_model
from plugins import word_tokenizer

from attnscope.sweeps import load_sweep, parse_spec, run_sweep
from attnscope.sweeps.cells import run_cell
from attnscope.sweeps.store import LABEL_COLUMNS, PART, cell_dir

import ray
PLUGINS = str(Path(__file__).with_name("plugins.py"))


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for family in ("gpt2", "llama"):
        tiny_text_model(family).save_pretrained(root / family)
        word_tokenizer().save_pretrained(root / family)
    return root


def make_spec(models, analyses, **extra):
    return parse_spec({"name": "t", "imports": [PLUGINS], "resources": {"num_cpus": 1},
                       "models": [{"model": str(models / "gpt2"), "label": "gpt2"},
                                  {"model": str(models / "llama"), "label": "llama"}],
                       "suites": [{"generator": "induction", "n_items": 4, "seq_len": 16, "vocab_size": 64}],
                       "analyses": analyses, "interventions": ["none", {"heads": "L0H1", "mode": "zero"}], **extra})


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["cell", "analysis", "metric", "layer", "head"]).reset_index(drop=True)


def test_sweep_equals_a_plain_loop_and_reruns_skip(models, tmp_path):
    spec = make_spec(models, ["head-stats"])
    report = run_sweep(spec, tmp_path, progress=False)
    assert report.ok and len(report.done) == 4 and not report.skipped
    table = load_sweep(tmp_path)
    assert set(table.df.cell) == {c.id for c in spec.cells()} and not table.provenance["missing"]
    for cell in spec.cells():  # oracle: the same cell run in this process, no Ray
        want = run_cell(cell.to_dict(), spec.imports, cache=False)["df"]
        got = table.df[table.df.cell == cell.id].drop(columns=list(LABEL_COLUMNS)).reset_index(drop=True)
        pd.testing.assert_frame_equal(got, want.reset_index(drop=True), check_exact=True)
    prov = table.provenance["cells"][spec.cells()[1].id]
    assert prov["seed"] == 0 and prov["versions"]["ray"] == ray.__version__
    assert prov["cell"]["labels"]["intervention"] == "zero:L0H1" and prov["plan"]["mode"] == "zero"
    assert table.provenance["sweep"]["spec"]["name"] == "t"
    zero = table.df[(table.df.cell_intervention == "zero:L0H1") & (table.df.cell_model == "gpt2")]
    none = table.df[(table.df.cell_intervention == "none") & (table.df.cell_model == "gpt2")]
    assert not zero.value.reset_index(drop=True).equals(none.value.reset_index(drop=True))
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.glob(f"cell=*/{PART}")}
    again = run_sweep(spec, tmp_path, progress=False)
    assert not again.done and len(again.skipped) == 4
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob(f"cell=*/{PART}")} == mtimes


def test_killed_worker_is_retried_and_results_equal_an_undisturbed_run(models, tmp_path):
    marker = tmp_path / "killed"
    spec = make_spec(models, [{"name": "test-kill-once", "options": {"marker": str(marker)}}], max_retries=2)
    marker.write_text("none")  # present: nobody dies
    calm = run_sweep(spec, tmp_path / "calm", progress=False)
    marker.unlink()  # absent: the first cell to run kills its worker, Ray retries it
    disturbed = run_sweep(spec, tmp_path / "disturbed", progress=False)
    assert calm.ok and disturbed.ok and len(disturbed.done) == 4
    victim = int(marker.read_text())  # the pid of the worker that died
    got = load_sweep(tmp_path / "disturbed")
    assert victim not in {c["worker"]["pid"] for c in got.provenance["cells"].values()}
    pd.testing.assert_frame_equal(_sorted(got.df), _sorted(load_sweep(tmp_path / "calm").df), check_exact=True)


def test_failed_cells_are_recorded_and_retried_next_run(models, tmp_path):
    spec = make_spec(models, ["head-stats", "test-fail"], interventions=["none"])
    report = run_sweep(spec, tmp_path, progress=False)
    failing = {c.id for c in spec.cells() if c.analysis.name == "test-fail"}
    assert set(report.failed) == failing and len(report.done) == 2 and not report.ok
    assert all("planted failure" in e for e in report.failed.values())
    assert all((cell_dir(tmp_path, cid) / "_error.json").is_file() for cid in failing)
    table = load_sweep(tmp_path)
    assert set(table.provenance["failed"]) == failing and set(table.provenance["missing"]) == failing
    again = run_sweep(spec, tmp_path, progress=False)
    assert set(again.failed) == failing and len(again.skipped) == 2 and not again.done


def test_remote_cells_through_the_local_simulation_equal_local_cells(models, tmp_path):
    """`--local-sim`: each head-stats capture (and the zero plan) runs in nnsight's simulation of the remote path."""
    spec = make_spec(models, ["head-stats"])
    local = run_sweep(spec, tmp_path / "local", progress=False)
    simulated = run_sweep(spec, tmp_path / "sim", remote="local", progress=False)
    assert local.ok and simulated.ok and not set(local.done) & set(simulated.done)  # remote mode is in the cell id
    a, b = load_sweep(tmp_path / "local").df, load_sweep(tmp_path / "sim").df
    keys = ["cell_model", "cell_intervention", "metric", "layer", "head"]
    merged = a.merge(b, on=keys, suffixes=("_local", "_sim"))
    assert len(merged) == len(a) == len(b)
    assert (merged.value_local == merged.value_sim).all()
    cell = load_sweep(tmp_path / "sim").provenance["cells"][simulated.done[0]]
    assert cell["analysis"]["remote"]["mode"] == "local"
