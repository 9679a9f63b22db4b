"""attnscope.models: load a model and get its handle (the family's ``ModelAdapter``), built-in model names, and
the pruned-checkpoint format. Layer: above ``probes`` (the adapters), below ``datasets`` and ``circuits``.
Exports are imported on first use.

Example:
    >>> from attnscope.models import load
    >>> load("minilm").family
    'hf-text'
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "builtin": ("BUILTIN_MODELS",),
    "loading": ("PLACEMENT_KWARGS", "load", "quiet_progress_bars"),
    "pruned_checkpoint": ("LayerPlan", "apply_layer_plans", "load_pruned", "save_pruned"),
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, None)
