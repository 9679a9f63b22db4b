"""CLI command groups. Each module defines ``register(sub)`` adding its subparsers with ``set_defaults(run=fn)``.

``fn(args) -> int`` returns the exit code; bad input raises an ``AttnscopeError`` (the CLI prints one line, exit 2).
Add a module name to ``MODULES`` to add commands.
"""

import importlib

MODULES = ["core", "zoo", "attribute", "heads", "score", "heatmap", "dash", "sweep", "patch"]


def register_all(sub) -> None:
    for name in MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
