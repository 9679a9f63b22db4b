"""attnscope.probes: CAPTURE. Model adapters (the model handle), hooks, traces, streaming statistics, interventions
and fidelity checks. Importing it registers the built-in adapters (``attnscope.probes.adapters``).

Example:
    >>> import attnscope
    >>> from attnscope import probes
    >>> trace = probes.capture(attnscope.load("minilm"), "Hello world", stats=("entropy",))
    >>> trace.stat("entropy").shape[0]
    6
"""

from ..errors import ReferenceMismatchError
from . import adapters  # noqa: F401  (registers the built-in adapters)
from .adapter import ModelAdapter, ModelLike, adapter_for, as_adapter, module_of, registered_adapters, tokenizer_of
from .adapters.hf_route import attention_modules, eager_reference, edit_attention
from .adapters.hf_text import hf_sites
from .capturing import Capture, capture
from .fidelity import ValidationReport, validate
from .head_slices import output_projections
from .heads import Head, HeadSet
from .interventions import InterventionPlan, apply_plan, mean_plan, resample_plan
from .site import Site
from .tower_heads import describe_towers, layer_label, resolve_heads
from .trace import AttentionTrace, SiteRecord

__all__ = ["AttentionTrace", "Capture", "Head", "HeadSet", "InterventionPlan", "ModelAdapter", "ModelLike",
           "ReferenceMismatchError", "Site", "SiteRecord", "ValidationReport", "adapter_for", "apply_plan", "as_adapter",
           "attention_modules", "capture", "describe_towers", "eager_reference", "edit_attention", "hf_sites",
           "layer_label", "mean_plan", "module_of", "output_projections", "registered_adapters", "resample_plan",
           "resolve_heads", "tokenizer_of", "validate"]
