"""attnscope: a workbench for mechanistic interpretability of attention in LLMs, VLMs and diffusion models.

Example:
    >>> import attnscope
    >>> model = attnscope.load("minilm")
    >>> trace = attnscope.capture(model, "Attention is all you need.", stats=("mass", "entropy"))
    >>> trace.stat("mass").shape[0]   # one entry per layer
    6
"""

from .probes import tl_guard as _tl_guard  # noqa: E402

_tl_guard.install()  # never let TransformerLens pip-install torchvision (it replaces the CPU torch)

from .errors import (AnalysisError, AttnscopeError, CaptureError, CorruptResultError, HeadSpecError, InputError,
                     InputTooLongError, ModelNotFoundError, OutputError, RemoteError, SiteError,
                     UnsupportedAttentionError, UnsupportedModelError)
from .probes.capture import Capture, capture
from .probes.heads import HeadSet
from .probes.loading import BUILTIN_MODELS, LoadedModel, load
from .probes.site import Site
from .probes.tokens import Span, TokenInfo
from .probes.trace import AttentionTrace, SiteRecord
from .results import ResultTable

__version__ = "0.1.0"

__all__ = [
    "AnalysisError", "AttentionTrace", "AttnscopeError", "BUILTIN_MODELS", "Capture", "CaptureError",
    "CorruptResultError", "HeadSet", "HeadSpecError", "InputError", "InputTooLongError", "LoadedModel",
    "ModelNotFoundError", "OutputError", "RemoteError", "ResultTable", "Site", "SiteError", "SiteRecord", "Span", "TokenInfo",
    "UnsupportedAttentionError", "UnsupportedModelError", "capture", "load",
]
