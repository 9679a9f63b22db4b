"""Interrupt the sweep driver (SIGINT to `attnscope sweep`) part-way, rerun: finished cells are skipped (their
files untouched, their analysis not executed again), the rest run, and the result is the full sweep."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest  # noqa: F401
import yaml
from tiny_models import tiny_text_model

from attnscope.sweeps import load_sweep, load_spec, run_sweep
from attnscope.sweeps.store import PART

import ray  # noqa: F401
PLUGINS = str(Path(__file__).with_name("plugins.py"))
N = 6


def _default_sigint() -> None:
    """In the driver: Ctrl-C raises KeyboardInterrupt even if the test process ignores SIGINT (it is inherited)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def test_interrupted_driver_resumes(tmp_path):
    tiny_text_model("gpt2").save_pretrained(tmp_path / "gpt2")
    log = tmp_path / "executions.log"
    # staggered durations: however many cells the workers run at once, later cells are still running when the
    # second one has finished, so the interrupt always leaves work undone
    analyses = [{"name": "test-slow", "label": f"slow{i}", "options": {"seconds": 0.5 + 1.0 * i, "log": str(log),
                                                                       "tag": f"slow{i}"}} for i in range(N)]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "name": "resume", "imports": [PLUGINS], "models": ["./gpt2"], "analyses": analyses,
        "suites": [{"generator": "induction", "n_items": 2, "seq_len": 16, "vocab_size": 64}]}))
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    driver = subprocess.Popen([sys.executable, "-m", "attnscope.cli", "sweep", str(tmp_path / "spec.yaml"),
                               "--out", str(out), "--workers", "2", "--quiet"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=_default_sigint)
    deadline = time.time() + 100
    while len(list(out.glob(f"cell=*/{PART}"))) < 2 and time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)
    # a Ctrl-C that lands while Ray is busy is occasionally swallowed (seen in CI): press it again, as a user would
    for _ in range(12):
        driver.send_signal(signal.SIGINT)
        try:
            _, err = driver.communicate(timeout=5.0)
            break
        except subprocess.TimeoutExpired:
            continue
    else:
        _, err = driver.communicate(timeout=60)
    assert driver.returncode == 130, err[-2000:]
    before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob(f"cell=*/{PART}")}
    assert 2 <= len(before) < N, "interrupt came too late to leave work undone"
    assert not list(out.glob("cell=*/.*.tmp"))
    executed = [line.split()[0] for line in log.read_text().splitlines()]  # tags of analyses run so far

    report = run_sweep(load_spec(tmp_path / "spec.yaml"), out, workers=2, progress=False)
    assert report.ok and len(report.skipped) == len(before) and len(report.done) == N - len(before)
    assert {f"cell={c}" for c in report.skipped} == set(before)
    assert {p.parent.name: p.stat().st_mtime_ns for p in out.glob(f"cell=*/{PART}") if p.parent.name in before} \
        == before  # skipped cells were not rewritten ...
    runs = [line.split()[0] for line in log.read_text().splitlines()]
    labels = load_sweep(out).df.drop_duplicates("cell").set_index("cell").cell_analysis
    for cell in before:  # ... nor executed again
        tag = labels[cell.removeprefix("cell=")]
        assert executed.count(tag) == runs.count(tag) == 1, tag
    assert sorted(set(runs)) == [f"slow{i}" for i in range(N)] and len(load_sweep(out).df.cell.unique()) == N
