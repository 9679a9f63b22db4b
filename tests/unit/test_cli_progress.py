"""Long commands show what they are doing on a terminal (one redrawn status line on stderr) and nothing in a pipe."""

import os
import pty
import subprocess
import sys


def _run(args, tmp_path, terminal: bool) -> tuple[int, bytes]:
    env = dict(os.environ, ATTNSCOPE_PROGRESS_AFTER="0", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "attnscope.cli", *args]
    if not terminal:
        done = subprocess.run(cmd, capture_output=True, env=env, cwd=tmp_path, timeout=300)
        return done.returncode, done.stderr
    main, child = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=child, env=env, cwd=tmp_path)
    os.close(child)
    seen = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        seen += chunk
    os.close(main)
    return proc.wait(timeout=300), seen


def test_status_line_names_the_stages_on_a_terminal_only(tmp_path):
    args = ["score", "sinks", "--model", "zoo:sink-lm", "--suite", "default", "--n-items", "2", "--out",
            str(tmp_path / "s.parquet"), "--no-progress"]
    rc, shown = _run(args, tmp_path, terminal=True)
    assert rc == 0, shown[-2000:]
    assert b"loading model zoo:sink-lm" in shown and b"running sinks" in shown
    assert shown.endswith(b"\r\x1b[K")  # the status line is cleared when the command ends
    rc, logged = _run(args[:-2] + [str(tmp_path / "t.parquet"), "--no-progress"], tmp_path, terminal=False)
    assert rc == 0 and b"loading model" not in logged and b"\x1b[K" not in logged


def test_an_error_on_a_terminal_is_still_one_clean_line(tmp_path):
    rc, shown = _run(["score", "sinks", "--model", "zoo:sink-lm", "--suite", "nope", "--out",
                      str(tmp_path / "s.parquet")], tmp_path, terminal=True)
    text = shown.decode().split("\r\x1b[K")[-1]  # what stays on screen after the status line is cleared
    assert rc == 2 and text.count("\n") == 1 and text.startswith("attnscope: error: unknown suite")


def test_every_stage_is_drawn_even_a_short_one_and_the_line_is_cleared():
    import io
    import time

    from attnscope._progress import current_stage, heartbeat, stage

    out = io.StringIO()
    with heartbeat(out, after=0.0, every=10.0):  # a long redraw period: only stage changes draw
        stage("first")
        stage("second")
        time.sleep(0.01)
        stage("last, named just before the end")
    shown = out.getvalue()
    assert [s for s in ("first", "second", "last, named just before the end") if f"] {s} ..." not in shown] == []
    assert shown.endswith("\r\x1b[K") and current_stage() == ""
    quiet = io.StringIO()
    with heartbeat(quiet, after=5.0):  # work shorter than `after`: nothing at all
        stage("quick")
    assert quiet.getvalue() == ""
