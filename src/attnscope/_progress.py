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

_state = {"stage": ""}


def stage(text: str) -> None:
    """Name what the process does from now on (shown by a running ``heartbeat``)."""
    _state["stage"] = str(text)


def current_stage() -> str:
    return _state["stage"]


@contextmanager
def heartbeat(stream: TextIO, after: float | None = None, every: float = 0.5) -> Iterator[None]:
    """While the block runs longer than ``after`` seconds, keep one line on ``stream``: ``[12 s] STAGE ...``."""
    after = float(os.environ.get("ATTNSCOPE_PROGRESS_AFTER", 2.0)) if after is None else after
    start, done, drawn = time.monotonic(), threading.Event(), threading.Event()

    def draw() -> None:
        if done.wait(after):
            return
        while not done.is_set():
            stream.write(f"\r\x1b[K[{time.monotonic() - start:.0f} s] {_state['stage'] or 'working'} ...")
            stream.flush()
            drawn.set()
            done.wait(every)

    thread = threading.Thread(target=draw, name="attnscope-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        if drawn.is_set():
            stream.write("\r\x1b[K")
            stream.flush()
        _state["stage"] = ""
