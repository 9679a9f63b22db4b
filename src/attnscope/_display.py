"""The plotting backend behind ``AttentionTrace.show`` and ``ResultTable.show``, found by module name.

The data classes live low in the package (probes, results) and the figures high (viz), so ``show`` does not
import viz: like pandas' ``plotting.backend`` option, it imports the backend module named in ``BACKEND`` when
called and asks it for ``show_trace`` / ``show_table``. Set ``BACKEND`` to your own module to draw differently.
The default backend needs the ``[viz]`` extra (plotly).

Example:
    >>> from attnscope import _display
    >>> _display.BACKEND
    'attnscope.viz.notebook'
"""

import importlib
from typing import Any

from .errors import InputError

BACKEND = "attnscope.viz.notebook"


def render(kind: str, obj: Any, view: str | None = None, **options: Any) -> Any:
    """``show_<kind>(obj, view, **options)`` of the backend module (``kind``: ``trace`` or ``table``)."""
    module = importlib.import_module(BACKEND)
    draw = getattr(module, f"show_{kind}", None)
    if draw is None:
        raise InputError(f"the plotting backend cannot show a {kind}", expected=f"{BACKEND}.show_{kind}",
                         got=f"no show_{kind} in {BACKEND}", fix="set attnscope._display.BACKEND to a module that "
                         "defines show_trace and show_table")
    return draw(obj, view, **options)
