"""Keep TransformerLens from running ``pip install torchvision`` behind our back.

When TransformerLens boots a multimodal bridge and cannot load its ``AutoProcessor`` (e.g. offline), it calls
``transformer_lens.model_bridge.sources.transformers.helpers._ensure_torchvision``, which runs
``pip install torchvision`` (or ``uv pip install torchvision``). On a CPU-only machine that replaces the CPU torch
with a multi-GB CUDA build. ``install()`` replaces that function, now or whenever TransformerLens is imported
later, with one that raises ``UnsupportedModelError`` when torchvision is missing instead of installing it. As a
backstop it also adds an audit hook that refuses any subprocess running ``pip install`` of a torch package.

Example:
    >>> from attnscope.probes import tl_guard
    >>> tl_guard.install()
    >>> tl_guard.pip_install_refused(["python", "-m", "pip", "install", "torchvision"])
    True
    >>> tl_guard.pip_install_refused(["git", "status"])
    False
"""

import importlib.abc
import importlib.util
import os
import sys
import threading
from typing import Any

from ..errors import UnsupportedModelError

HELPERS = "transformer_lens.model_bridge.sources.transformers.helpers"
INSTALLER = "_ensure_torchvision"
TORCH_PACKAGES = ("torch", "torchvision", "torchaudio", "torchtext")
_MARK = "__attnscope_guard__"
_lock = threading.Lock()
_state = {"finder": False, "audit": False}


def _torchvision_importable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def refuse_torchvision_install() -> bool:
    """Stand-in for TransformerLens' installer: True when torchvision imports, otherwise raise (never pip)."""
    if _torchvision_importable():
        return True
    raise UnsupportedModelError(
        "TransformerLens tried to `pip install torchvision` while booting a multimodal bridge",
        expected="a text-only TransformerBridge (or torchvision already installed, matching your torch)",
        got="torchvision missing; installing it from PyPI would replace the CPU torch with a CUDA build",
        fix="boot a text-only model, or install a torchvision wheel that matches your torch yourself")


setattr(refuse_torchvision_install, _MARK, True)


def _patch(module: Any) -> None:
    if not getattr(getattr(module, INSTALLER, None), _MARK, False):
        setattr(module, INSTALLER, refuse_torchvision_install)


class _PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds TransformerLens' helpers module through the other finders and patches it once it has executed."""

    def __init__(self) -> None:
        self._busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != HELPERS or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return None
        self._inner = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _patch(module)


def pip_install_refused(argv: Any) -> bool:
    """True for a command line that would ``pip install`` a torch package (``pip``, ``python -m pip``, ``uv pip``)."""
    if isinstance(argv, (str, bytes)):
        argv = argv.split() if isinstance(argv, str) else argv.decode(errors="ignore").split()
    try:
        words = [os.path.basename(str(a)).lower() for a in argv]
    except TypeError:
        return False
    if "install" not in words or not any(w.startswith("pip") for w in words):
        return False
    names = {w.split("==")[0].split(">=")[0].split("[")[0] for w in words}
    return bool(names & set(TORCH_PACKAGES))


def _audit(event: str, args: tuple) -> None:
    if event == "subprocess.Popen":
        argv = args[1] if len(args) > 1 else None
    elif event == "os.system":
        argv = args[0] if args else None
    elif event in ("os.posix_spawn", "os.exec"):
        argv = args[1] if len(args) > 1 else None
    elif event == "os.spawn":
        argv = args[2] if len(args) > 2 else None
    else:
        return
    if argv is not None and pip_install_refused(argv):
        raise UnsupportedModelError("refused to run `pip install` of a torch package from inside attnscope",
                                    expected="no package installs at run time", got=str(argv)[:200],
                                    fix="install packages yourself, pinning torch to the version you have")


def install() -> None:
    """Install the guard (idempotent): patch TransformerLens' installer now or when it is imported; add the hook."""
    with _lock:
        module = sys.modules.get(HELPERS)
        if module is not None:
            _patch(module)
        if not _state["finder"]:
            sys.meta_path.insert(0, _PatchOnImport())
            _state["finder"] = True
        if not _state["audit"]:
            sys.addaudithook(_audit)
            _state["audit"] = True


def guarded() -> bool:
    """True when TransformerLens' installer is (or, once imported, will be) replaced by the guard."""
    module = sys.modules.get(HELPERS)
    if module is not None:
        return bool(getattr(getattr(module, INSTALLER, None), _MARK, False))
    return _state["finder"] and any(isinstance(f, _PatchOnImport) for f in sys.meta_path)


def is_multimodal(obj: Any) -> bool:
    """True for a TransformerBridge config/bridge or HF config of a multimodal, vision or audio model."""
    cfg = getattr(obj, "cfg", obj)
    if any(getattr(cfg, flag, False) for flag in ("is_multimodal", "is_visual_model", "is_audio_model")):
        return True
    return any(hasattr(cfg, attr) for attr in ("vision_config", "audio_config"))


def refuse_multimodal(obj: Any, what: str = "TransformerBridge") -> None:
    """Raise UnsupportedModelError for multimodal models: only text-only bridges are supported."""
    if is_multimodal(obj):
        cfg = getattr(obj, "cfg", obj)
        arch = getattr(cfg, "architecture", None) or (getattr(cfg, "architectures", None) or ["?"])[0]
        raise UnsupportedModelError(
            f"multimodal {what} not supported", expected="a text-only model", got=str(arch),
            fix="capture the HF model directly (e.g. attnscope.load(LlavaForConditionalGeneration...)); booting a "
                "multimodal bridge offline makes TransformerLens pip-install torchvision")
