"""Whether a class's method source mentions a name: how adapters tell which modules they can route.

Example:
    >>> from attnscope.probes.adapters.source_check import method_mentions
    >>> class A:
    ...     def forward(self):
    ...         return "ALL_ATTENTION_FUNCTIONS"
    >>> method_mentions(A, "forward", ("ALL_ATTENTION_FUNCTIONS",))
    True
"""

import functools
import inspect


@functools.lru_cache(maxsize=None)
def method_mentions(cls: type, method: str, names: tuple[str, ...]) -> bool:
    """True when the source of ``cls.<method>`` contains any of ``names`` (False if the source is unavailable)."""
    try:
        source = inspect.getsource(getattr(cls, method))
    except (OSError, TypeError, AttributeError):
        return False
    return any(name in source for name in names)
