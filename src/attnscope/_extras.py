"""Optional dependencies: ``require(module, extra)`` imports one, or raises one clear error naming the extra.

The core install (torch, transformers, safetensors, numpy, pandas, pyarrow, scipy, einops, jaxtyping, tqdm) is
all that ``import attnscope`` and the main capture / score paths need. Everything else is an extra of the
distribution (``pip install 'attnscope[EXTRA]'``; ``[all]`` installs every one). Code that needs an optional
package imports it through ``require`` where it is used, never at the top of a module the core path imports.

Bottom layer: imports nothing of attnscope but ``attnscope.errors``.

Example:
    >>> from attnscope._extras import require
    >>> require("json", "none").__name__
    'json'
    >>> try:
    ...     require("no_such_package_xyz", "dashboard")
    ... except MissingExtraError as exc:
    ...     print(exc.fix)
    pip install 'attnscope[dashboard]'
"""

import importlib
from types import ModuleType

from .errors import MissingExtraError


def missing_extra(module: str, extra: str, cause: BaseException | None = None) -> MissingExtraError:
    """The error for ``module`` missing: names the extra and the command that installs it."""
    got = f"{type(cause).__name__}: {cause}" if cause is not None else "not importable"
    return MissingExtraError(f"{module} is not installed", expected=f"the optional dependencies of attnscope[{extra}]",
                             got=got, fix=f"pip install 'attnscope[{extra}]'")


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` (dotted names too) and return it; if it (or a package it needs) is not installed, raise
    ``MissingExtraError`` naming ``attnscope[extra]``. Errors other than a missing module propagate unchanged."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:  # also the `sys.modules[name] = None` of a blocked package
        raise missing_extra(module, extra, exc) from exc


def available(module: str) -> bool:
    """True when ``module`` imports (without raising ``MissingExtraError``); for optional fast paths."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
