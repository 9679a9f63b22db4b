"""The package version (one place; ``attnscope.__version__`` and the CLI read it) and the versions of the libraries
a result depends on (its provenance).

Example:
    >>> from attnscope._version import __version__, library_versions
    >>> versions = library_versions()
    >>> versions["attnscope"] == __version__, "python" in versions
    (True, True)
"""

import importlib.metadata
import platform

__version__ = "0.1.0"
PROVENANCE_LIBRARIES = ("torch", "transformers", "ray", "nnsight", "accelerate")


def library_versions() -> dict[str, str]:
    """attnscope's, Python's and every installed one of ``PROVENANCE_LIBRARIES``' versions (no imports)."""
    out = {"attnscope": __version__, "python": platform.python_version()}
    for name in PROVENANCE_LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
