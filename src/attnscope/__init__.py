"""attnscope: a workbench for mechanistic interpretability of attention in LLMs, VLMs and diffusion models.

The data path, top-down: ``load`` (a model's handle, ``attnscope.models``) -> ``capture`` (``attnscope.probes``)
-> ``AttentionTrace`` -> analyses (``attnscope.circuits``) -> ``ResultTable`` -> figures (``attnscope.viz``),
the dashboard and the CLI; ``attnscope.tasks`` runs analyses by name for the CLI, sweeps and the dashboard.

The names below are imported on first use, so ``import attnscope`` is quick and has no side effects.

Example:
    >>> import attnscope
    >>> model = attnscope.load("minilm")
    >>> trace = attnscope.capture(model, "Attention is all you need.", stats=("mass", "entropy"))
    >>> trace.stat("mass").shape[0]   # one entry per layer
    6
"""

from ._lazy import lazy_exports
from ._version import __version__

_EXPORTS = {
    "errors": ("AnalysisError", "AttnscopeError", "CaptureError", "CorruptResultError", "HeadSpecError", "InputError",
               "InputTooLongError", "MissingExtraError", "ModelNotFoundError", "OutputError",
               "ReferenceMismatchError", "RemoteError", "SiteError", "UnsupportedAttentionError",
               "UnsupportedModelError"),
    "probes.capturing": ("Capture", "capture"),
    "probes.adapter": ("ModelAdapter",),
    "probes.heads": ("Head", "HeadSet"),
    "probes.site": ("Site",),
    "probes.tokens": ("Span", "TokenInfo"),
    "probes.trace": ("AttentionTrace", "SiteRecord"),
    "models.builtin": ("BUILTIN_MODELS",),
    "results": ("ResultTable",),
}
_RENAMED = {"load": ("tasks.models", "load_model")}  # attnscope.load resolves zoo:NAME too

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _RENAMED)
