"""What the process is doing now, for a status line on long commands.

Library code names its stage (``stage("loading model zoo:induction-2l")``); ``heartbeat`` (used by the CLI when
stderr is a terminal) redraws one status line with the elapsed time and the current stage once the work has run
for ``after`` seconds (``ATTNSCOPE_PROGRESS_AFTER``, default 2), and clears it when the work ends. Nothing is
printed to a pipe or a file, so logs and the one-line error contract are unchanged.

Example:
    >>> import io
    >>> from attnscope._progress import current_stage, heartbeat, stage
    >>> stage("loading model minilm"); current_stage()
    'loading model minilm'
    >>> out = io.StringIO()
    >>> with heartbeat(out, after=0.0, every=0.01):
    ...     stage("scoring"); __import__("time").sleep(0.05)
    >>> "scoring" in out.getvalue() and out.getvalue().endswith("\\r\\x1b[K")
    True
"""

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

_state: dict = {"stage": "", "pending": [], "changed": threading.Event(), "listening": False}


def stage(text: str) -> None:
    """Name what the process does from now on (a running ``heartbeat`` shows every stage, however short)."""
    _state["stage"] = str(text)
    if _state["listening"]:  # kept only while a heartbeat draws them
        _state["pending"].append(str(text))
        _state["changed"].set()


def current_stage() -> str:
    return _state["stage"]


@contextmanager
def heartbeat(stream: TextIO, after: float | None = None, every: float = 0.5) -> Iterator[None]:
    """While the block runs longer than ``after`` seconds, keep one line on ``stream``: ``[12 s] STAGE ...``."""
    after = float(os.environ.get("ATTNSCOPE_PROGRESS_AFTER", 2.0)) if after is None else after
    start, done, drawn = time.monotonic(), threading.Event(), threading.Event()
    pending, changed = _state["pending"], _state["changed"]
    pending.clear()
    _state["listening"] = True

    def line(text: str) -> None:
        stream.write(f"\r\x1b[K[{time.monotonic() - start:.0f} s] {text} ...")
        stream.flush()
        drawn.set()

    def draw() -> None:
        if done.wait(after):
            return
        while True:
            changed.clear()
            while pending:  # every stage named since the last drawing, in order (also those of the last moment)
                line(pending.pop(0))
            if done.is_set():
                return
            line(_state["stage"] or "working")
            changed.wait(every)

    thread = threading.Thread(target=draw, name="attnscope-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        changed.set()
        thread.join()
        if drawn.is_set():
            stream.write("\r\x1b[K")
            stream.flush()
        _state["stage"], _state["listening"] = "", False
        pending.clear()
