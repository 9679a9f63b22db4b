"""Package exports imported on first use (PEP 562), so importing a package stays quick and has no side effects.

Example:
    >>> from attnscope._lazy import lazy_exports
    >>> names, getattr_, dir_ = lazy_exports("attnscope.models", {"builtin": ("BUILTIN_MODELS",)})
    >>> names, sorted(getattr_("BUILTIN_MODELS"))
    (['BUILTIN_MODELS'], ['minilm'])
"""

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, tuple[str, ...]],
                 renamed: Mapping[str, tuple[str, str]] | None = None
                 ) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``(__all__, __getattr__, __dir__)`` for ``package``: ``exports`` maps a submodule to the names it exports;
    ``renamed`` maps an exported name to ``(submodule, name there)``. A name is imported on first access and kept
    in the package's namespace."""
    where = {name: (module, name) for module, names in exports.items() for name in names} | dict(renamed or {})

    def getattr_(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attr = where[name]
        value = getattr(importlib.import_module(f"{package}.{module}"), attr)
        setattr(sys.modules[package], name, value)
        return value

    def dir_() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return sorted(where), getattr_, dir_
