"""Every script in ``benchmarks/`` runs end to end in its ``--quick`` mode (tiny sizes, no timing assertions), the way
a user runs it: ``python benchmarks/X.py`` from the repository root, so the script's folder comes first on
``sys.path`` (issue #16: ``benchmarks/kernels.py`` shadowed the Hugging Face ``kernels`` package that transformers
imports, and every benchmark failed). GPU kernels run in Triton's interpreter on CPU (``TRITON_INTERPRET=1``).

A new benchmark is picked up by the glob: without a ``--quick`` flag (and ``--out``) it fails here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = sorted((REPO / "benchmarks").glob("*.py"))
TIMEOUT_S = 300


def test_benchmarks_found():
    assert len(BENCHMARKS) >= 2, BENCHMARKS


def test_no_benchmark_shadows_a_module(tmp_path: Path):
    """A script's folder is first on ``sys.path`` when it runs: no file there may share a name with an importable
    top-level module (a dependency's, or the standard library's), or imports of that name get the script."""
    stems = [path.stem for path in BENCHMARKS]
    code = ("import importlib.util, json, sys; "
            "print(json.dumps({s: getattr(importlib.util.find_spec(s), 'origin', None) for s in sys.argv[1:] "
            "if importlib.util.find_spec(s) is not None}))")
    # started from another folder (benchmarks/ not on sys.path): what the environment itself provides
    proc = subprocess.run([sys.executable, "-c", code, *stems], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    clashes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not clashes, f"benchmark file names shadow importable modules (rename them): {clashes}"


@pytest.mark.slow
@pytest.mark.parametrize("script", BENCHMARKS, ids=[path.stem for path in BENCHMARKS])
def test_quick_run(script: Path, tmp_path: Path):
    out = tmp_path / f"{script.stem}.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(script.relative_to(REPO)), "--quick", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    log = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"{script.name} --quick exited {proc.returncode}\n{log}"
    assert out.is_file(), f"{script.name} --quick wrote no {out.name}\n{log}"
    result = json.loads(out.read_text())
    assert result, f"{script.name} --quick wrote an empty result\n{log}"
