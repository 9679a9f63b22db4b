"""The ``ModelAdapter`` protocol and the registry that finds one for a model.

One adapter per model family knows how to turn user inputs into a forward call, which modules are attention
sites, and how to route their attention into a ``Recorder`` (and restore everything afterwards).
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UnsupportedModelError
from .model_info import ModelInfo
from .recorder import Recorder
from .site import Site
from .tokens import TokenInfo


@dataclass
class Prepared:
    """Inputs ready for the forward call, and what the trace should know about their tokens."""

    kwargs: dict[str, Any]
    tokens: TokenInfo


class ModelAdapter:
    """Base class. Subclasses set ``family`` and implement ``matches``, ``info``, ``prepare``, ``instrument``."""

    family = "base"
    priority = 0  # higher is tried first
    runs_on_text_alone = True  # a forward on token ids alone works (reference runs of mean / resample edits)
    card: "dict | None" = None  # a zoo organism's card (set when it is loaded as zoo:NAME): its task and data

    def __init__(self, module: torch.nn.Module, tokenizer: Any = None, name: str = ""):
        self.module, self.tokenizer, self.name = module, tokenizer, name
        self.attention_path = "unknown"  # set by instrument(): how attention was captured

    @classmethod
    def matches(cls, module: Any) -> bool:
        raise NotImplementedError

    def info(self) -> ModelInfo:
        raise NotImplementedError

    def prepare(self, inputs: Any) -> Prepared:
        raise NotImplementedError

    @contextlib.contextmanager
    def instrument(self, recorder: Recorder) -> Iterator[None]:
        raise NotImplementedError
        yield

    def sample_inputs(self) -> Any:
        """A small input of the family's kind, for ``validate`` and ``attnscope info``."""
        raise NotImplementedError

    def reference_patterns(self, prepared: Prepared) -> dict[Site, list[torch.Tensor]]:
        """Probabilities per site (one tensor per call) from an independent path, e.g. eager attention."""
        raise NotImplementedError

    def causal_sites(self) -> set[Site]:
        """Sites whose attention is causally masked."""
        return set()

    def run(self, prepared: Prepared) -> Any:
        with torch.no_grad():
            return self.module(**prepared.kwargs)

    def sites(self) -> list[Site]:
        return self.info().sites

    def provenance(self) -> dict:
        import transformers

        dtype = next(iter(self.module.parameters()), torch.empty(0)).dtype
        return {"model": self.name or type(self.module).__name__, "adapter": type(self).__name__,
                "family": self.family, "attention_path": self.attention_path, "dtype": str(dtype),
                "torch": torch.__version__, "transformers": transformers.__version__}


_REGISTRY: list[type[ModelAdapter]] = []


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make an adapter findable by ``adapter_for``."""
    _REGISTRY.append(cls)
    _REGISTRY.sort(key=lambda c: -c.priority)
    return cls


def registered_adapters() -> list[type[ModelAdapter]]:
    """Every registered adapter, most specific first (``attnscope.probes`` registers the built-in ones on import:
    any import of a probes module runs the package's ``__init__`` first)."""
    return list(_REGISTRY)


def adapter_for(module: Any, tokenizer: Any = None, name: str = "") -> ModelAdapter:
    """The first registered adapter that matches ``module``; UnsupportedModelError if none does."""
    for cls in registered_adapters():
        if cls.matches(module):
            return cls(module, tokenizer=tokenizer, name=name)
    raise UnsupportedModelError(
        "no adapter for this model", expected=f"one of {[c.family for c in _REGISTRY]}", got=_why_unmatched(module),
        fix="pass a supported HF/diffusers/TransformerLens/nnsight model, or register your own adapter: subclass "
            "attnscope.probes.adapter.ModelAdapter (matches, info, prepare, instrument) and decorate it with "
            "@register_adapter")


# What every public function that takes a model accepts: the handle ``attnscope.load`` returns (a ``ModelAdapter``)
# or a model object one of the registered adapters knows (HF, diffusers, TransformerBridge, nnsight).
ModelLike = Any


def as_adapter(model: ModelLike, tokenizer: Any = None, name: str = "") -> ModelAdapter:
    """The model handle: ``model`` itself when it is an adapter, else the registered adapter that matches it.

    Example:
        >>> import attnscope
        >>> from attnscope.probes.adapter import as_adapter
        >>> handle = attnscope.load("minilm")
        >>> as_adapter(handle) is handle, as_adapter(handle.module).family
        (True, 'hf-text')
    """
    if isinstance(model, ModelAdapter):
        return model
    return adapter_for(model, tokenizer=tokenizer, name=name)


def module_of(model: ModelLike) -> Any:
    """The ``torch.nn.Module`` (or pipeline) behind a handle; a model object is returned as it is."""
    return model.module if isinstance(model, ModelAdapter) else model


def tokenizer_of(model: ModelLike) -> Any:
    """The tokenizer or processor of a handle (or of a pipeline that carries one); None when there is none."""
    if isinstance(model, ModelAdapter):
        return model.tokenizer
    return getattr(model, "tokenizer", None)


def _why_unmatched(module: Any) -> str:
    """What the model lacks, for the error: most often attention that bypasses transformers' AttentionInterface."""
    name = type(module).__name__
    if not isinstance(module, torch.nn.Module):
        return f"{name} (not a torch module)"
    attention = sorted({type(m).__name__ for m in module.modules() if type(m).__name__.endswith("Attention")})
    if attention:
        return (f"{name}, whose attention modules ({', '.join(attention[:3])}) compute their scores inline instead of "
                "calling transformers' ALL_ATTENTION_FUNCTIONS, so attnscope cannot observe or edit them (e.g. DeBERTa "
                "v1's disentangled attention, XLNet's relative attention)")
    return f"{name} (no attention module found)"
