"""Atomic writes under concurrency: many writers of one trace or table all succeed and the file is always whole;
two ``attnscope capture --out same.safetensors`` both exit 0 with a loadable output; a failed write leaves the
old file and no temporary behind; ``--out`` problems are found before any work."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import attnscope
from attnscope import AttentionTrace, OutputError, ResultTable, Site, SiteRecord
from attnscope._atomic import atomic_write, atomic_write_text, check_output

WRITERS, ROUNDS = 8, 25  # 200 saves of the same path


def _trace(i: int) -> AttentionTrace:
    probs = torch.full((1, 2, 3, 3), float(i))
    return AttentionTrace([SiteRecord(site=Site("text", 0), probs=probs, n_query=3, n_key=3)],
                          provenance={"writer": i})


def _table(i: int) -> ResultTable:
    return ResultTable.from_records([{"analysis": "a", "layer": 0, "head": h, "metric": "m", "value": float(i)}
                                     for h in range(50)], provenance={"writer": i})


def _save_many(kind: str, path: str, writer: int) -> list[str]:
    failures = []
    for r in range(ROUNDS):
        try:
            (_trace if kind == "trace" else _table)(writer * 1000 + r).save(path)
        except Exception as exc:  # noqa: BLE001 - counted, reported by the test
            failures.append(f"{type(exc).__name__}: {exc}")
    return failures


@pytest.mark.parametrize("kind", ["trace", "table"])
def test_200_concurrent_saves_of_one_path_all_succeed(kind, tmp_path):
    """Threads, not forked processes: safetensors and pyarrow write with the GIL released, so the writes interleave
    as they would across processes (a fixed ``NAME.part`` failed here), and no fork can deadlock the test."""
    path = tmp_path / ("t.safetensors" if kind == "trace" else "t.parquet")
    with ThreadPoolExecutor(WRITERS) as pool:
        failures = [f for fs in pool.map(lambda w: _save_many(kind, str(path), w), range(WRITERS)) for f in fs]
    assert not failures, failures[:5]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left
    loaded = AttentionTrace.load(path) if kind == "trace" else ResultTable.load(path)
    writer = loaded.provenance["writer"]  # whole: one writer's file, not a mix
    if kind == "trace":
        assert torch.equal(loaded[Site("text", 0)].probs, _trace(writer)[Site("text", 0)].probs)
    else:
        assert (loaded.df["value"] == float(writer)).all()


def test_two_concurrent_cli_captures_of_one_out_both_keep_a_file(tmp_path):
    """Two real ``attnscope capture`` processes with the same ``--out``: both exit 0 and the file is whole."""
    out = tmp_path / "same.safetensors"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "attnscope.cli", "capture", "--model", "minilm", "--text",
               "Paris is the capital of France.", "--out", str(out)]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-1000:] for r in results]
    assert all(str(out) in stdout for stdout, _ in results)
    assert len(AttentionTrace.load(out).sites) == 6  # a whole file, whoever wrote last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.safetensors"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import safetensors.torch

    path = _trace(1).save(tmp_path / "t.safetensors")
    old = path.read_bytes()

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OutputError) as caught:
        _trace(2).save(path)
    assert "No space left" in str(caught.value) and isinstance(caught.value, OSError)
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]
    with pytest.raises(KeyboardInterrupt):  # an interrupted write cleans up too
        atomic_write(tmp_path / "x.json", _interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


def _interrupt(tmp: Path) -> None:
    tmp.write_text("partial")
    raise KeyboardInterrupt


def test_written_files_have_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    path = atomic_write_text(tmp_path / "a.json", "{}")
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_out_is_checked_before_the_capture_runs(tmp_path, monkeypatch, capsys):
    from attnscope.cli import main

    ran = []
    monkeypatch.setattr(attnscope.probes.capturing.Capture, "run", lambda self, inputs: ran.append(1))
    (tmp_path / "adir").mkdir()
    assert main(["capture", "--model", "minilm", "--text", "hi", "--out", str(tmp_path / "adir")]) == 2
    assert not ran and "output path is a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"] and not list((tmp_path / "adir").iterdir())


@pytest.mark.parametrize("bad,needle", [("", "empty"), ("adir", "is a directory"), ("afile/x", "under a file"),
                                        ("sub/", "names a folder")])
def test_check_output(tmp_path, bad, needle):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match=needle):
        check_output(str(tmp_path / bad) + ("/" if bad.endswith("/") else "") if bad else "")
    assert check_output(tmp_path / "new" / "deeper" / "x.parquet") == tmp_path / "new" / "deeper" / "x.parquet"
    assert not (tmp_path / "new").exists()  # checking creates nothing
