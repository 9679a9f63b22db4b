"""attnscope.zoo: small trained model organisms with known ground-truth heads, shipped with the package.

Each organism is a tiny HF model (config.json + model.safetensors under ``zoo/checkpoints/<name>/``) trained by
code in this package from a fixed seed, with a ``card.json`` (task, architecture, seed, training steps and time,
held-out accuracy, ground-truth heads with their scores, and the ablation result that confirms them) and a
rendered ``MODEL_CARD.md``.

Example:
    >>> from attnscope import zoo
    >>> [o["name"] for o in zoo.list_organisms()][:4]
    ['induction-2l', 'recall-llama', 'sink-lm', 'agreement-enc']
    >>> zoo.organism_names()[4:]
    ['shapes-classifier', 'shapes-vlm', 'shapes-diffusion']
    >>> zoo.checkpoint_path("induction-2l").name
    'induction-2l'
"""

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from .._extras import require
from ..errors import ModelNotFoundError
from ._card import read_card

# the shipped checkpoints (zoo._common.CHECKPOINTS, without importing torch: `attnscope models` lists them)
CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"

_MODULES = {
    "induction-2l": "induction_2l",
    "recall-llama": "recall_llama",
    "sink-lm": "sink_lm",
    "agreement-enc": "agreement_enc",
    "shapes-classifier": "shapes_classifier",
    "shapes-vlm": "shapes_vlm",
    "shapes-diffusion": "shapes_diffusion",
}
# organisms that need an optional package: name -> (module, extra)
_NEEDS = {"shapes-diffusion": ("diffusers", "diffusion")}

# the shapes organisms' behavioural checks, imported on first use (they need torch; `attnscope models` does not)
_CHECKS = ("concept_scorer", "teacher_forced_daam", "two_object_scenes")

__all__ = ["card_or_none", "checkpoint_path", "concept_scorer", "has_own_loader", "list_organisms", "load_card", "load_model",
           "model_source", "organism_names", "teacher_forced_daam", "train", "train_all", "two_object_scenes"]


def __getattr__(name: str) -> Any:
    if name not in _CHECKS:
        raise AttributeError(f"module 'attnscope.zoo' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.shapes_checks"), name)


def organism_names() -> list[str]:
    """Names of every organism the zoo can train, in a fixed order."""
    return list(_MODULES)


def _check_name(name: str) -> None:
    if name not in _MODULES:
        raise ModelNotFoundError(f"unknown zoo organism {name!r}", expected=" | ".join(_MODULES), got=repr(name),
                                 fix="run `attnscope zoo list` to see the organisms")


def _module(name: str) -> ModuleType:
    """The organism's training module (imports torch, transformers and, for shapes-diffusion, diffusers)."""
    _check_name(name)
    if name in _NEEDS:
        require(*_NEEDS[name])
    return importlib.import_module(f".{_MODULES[name]}", __name__)


def has_own_loader(name: str) -> bool:
    """True when ``name`` is not a plain transformers checkpoint and loads with its module's ``load(path)``."""
    return hasattr(_module(name), "load")


def checkpoint_path(name: str) -> Path:
    """Directory of the shipped checkpoint of ``name`` (config.json + model.safetensors, or a diffusers pipeline's
    model_index.json, + card.json)."""
    _check_name(name)
    path = CHECKPOINTS / name
    weights = (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    if not weights and not (path / "model_index.json").is_file():
        raise ModelNotFoundError(f"zoo checkpoint {name!r} is missing", expected=f"{path}/config.json and "
                                 "model.safetensors", got="no checkpoint files",
                                 fix=f"run `attnscope zoo train {name}` to rebuild it")
    return path


def load_card(name: str) -> dict[str, Any]:
    """The organism's ``card.json`` as a dict."""
    path = checkpoint_path(name) / "card.json"
    if not path.is_file():
        raise ModelNotFoundError(f"zoo card of {name!r} is missing", expected=str(path), got="no card.json",
                                 fix=f"run `attnscope zoo train {name}` to rebuild it")
    return read_card(path)


def load_model(name: str, **kwargs: Any) -> Any:
    """Load the shipped checkpoint with its transformers class (eager attention unless told otherwise), or with
    the organism's own ``load(path)`` when it has one (diffusers pipeline, plain torch module)."""
    import transformers

    if has_own_loader(name):
        return _module(name).load(checkpoint_path(name))
    card = load_card(name)
    cls = getattr(transformers, card["architecture"]["class"])
    kwargs.setdefault("attn_implementation", "eager")
    return cls.from_pretrained(checkpoint_path(name), **kwargs).eval()


def model_source(name: str) -> Any:
    """What ``attnscope.models.load`` takes for ``name``: the checkpoint folder of a transformers organism, or the
    organism built by its own ``load(path)`` (a diffusers pipeline, a plain torch module)."""
    from ..models.loading import quiet_progress_bars  # torch: not at import (`attnscope models` stays quick)

    if not has_own_loader(name):
        return str(checkpoint_path(name))
    with quiet_progress_bars(diffusers=True):
        return _module(name).load(checkpoint_path(name))


def card_or_none(name: str) -> dict[str, Any] | None:
    """``load_card(name)``, or None when the organism has no card yet (not trained)."""
    try:
        return load_card(name)
    except ModelNotFoundError:
        return None


def list_organisms() -> list[dict[str, Any]]:
    """One dict per organism: name, task, architecture, and (when trained) a summary of its card.

    Reads the shipped cards only; an organism's training module (torch, transformers ...) is imported only when
    its card is missing."""
    out = []
    for name in _MODULES:
        try:
            card = load_card(name)
        except ModelNotFoundError:
            spec = _module(name).SPEC
            out.append({"name": name, "task": spec["task"], "architecture": spec["architecture"],
                        "auto_class": spec["auto_class"], "trained": False})
            continue
        entry: dict[str, Any] = {"name": name, "task": card["task"], "architecture": card["architecture"]["class"],
                                 "auto_class": card["auto_class"]}
        entry.update({"trained": True, "path": str(checkpoint_path(name)), "parameters":
                      card["architecture"]["parameters"], "metric": card["evaluation"]["metric"],
                      "accuracy": card["evaluation"]["value"], "ground_truth_heads": card["ground_truth_heads"],
                      "training_time_s": card["training"]["time_s"]})
        out.append(entry)
    return out


def train(name: str, out_dir: str | Path | None = None, seed: int | None = None, steps: int | None = None) -> Path:
    """Train ``name`` from ``seed`` (default: the shipped seed) and write checkpoint + card to ``out_dir``.

    ``out_dir`` defaults to the shipped checkpoint directory (this overwrites it). Returns the directory.
    """
    module = _module(name)
    target = Path(out_dir) if out_dir is not None else CHECKPOINTS / name
    kwargs: dict[str, Any] = {}
    if seed is not None:
        kwargs["seed"] = int(seed)
    if steps is not None:
        kwargs["steps"] = int(steps)
    return module.train(target, **kwargs)


def train_all(out_dir: str | Path | None = None) -> dict[str, Path]:
    """Train every organism from its shipped seed; ``out_dir/<name>`` (default: the shipped directories)."""
    return {name: train(name, None if out_dir is None else Path(out_dir) / name) for name in _MODULES}
