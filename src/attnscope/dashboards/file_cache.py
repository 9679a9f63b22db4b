"""A small thread-safe LRU cache for file contents, keyed by (path, modification time, size): a rewritten file is
read again. Light (standard library only), so modules that ``attnscope --help`` imports can use it.

Example:
    >>> import os, tempfile
    >>> from pathlib import Path
    >>> from attnscope.dashboards.file_cache import LRU, stamp
    >>> path = Path(tempfile.mkdtemp()) / "a.txt"
    >>> _ = path.write_text("x")
    >>> cache = LRU(2)
    >>> cache.get(stamp(path), path.read_text), cache.get(stamp(path), lambda: "not read again")
    ('x', 'x')
"""

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from threading import Lock
from typing import Any


class LRU:
    """A small thread-safe LRU cache keyed by (path, mtime, size, extra)."""

    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict(), Lock()

    def get(self, key: tuple, make: Callable[[], Any]) -> Any:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = make()
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


def stamp(path: Path) -> tuple:
    """(path, modification time in ns, size): the cache key of a file's current contents."""
    stat = path.stat()
    return str(path), stat.st_mtime_ns, stat.st_size


__all__ = ["LRU", "stamp"]
