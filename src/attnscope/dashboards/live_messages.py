"""How the live page's callbacks report: an error as one line, a note in place of a figure.

Example:
    >>> from attnscope.dashboards.live_messages import error_line
    >>> from attnscope.errors import InputError
    >>> error_line(InputError("bad head", expected="L2H3", got="L9H9\\nmore", fix="pick a head"))
    'error: bad head: expected L2H3, got L9H9 more. Fix: pick a head'
"""

from typing import Any

from ..errors import AttnscopeError
from .callbacks import message_figure


def error_line(exc: BaseException) -> str:
    """``error: ...`` for bad input, ``internal error: ...`` (cut at 400 characters) for anything else; always
    one line."""
    text = f"error: {exc}" if isinstance(exc, AttnscopeError) else f"internal error: {type(exc).__name__}: {exc}"[:400]
    return " ".join(text.split())


def note_figure(text: str, height: int = 300) -> Any:
    """A grey one-line note drawn where a figure would be."""
    return message_figure(text, height=height, color="#555")


__all__ = ["error_line", "note_figure"]
