"""Keep TransformerLens from running ``pip install torchvision`` behind our back.

When TransformerLens boots a multimodal bridge and cannot load its ``AutoProcessor`` (e.g. offline), it calls
``transformer_lens.model_bridge.sources.transformers.helpers._ensure_torchvision``, which runs
``pip install torchvision`` (or ``uv pip install torchvision``). On a CPU-only machine that replaces the CPU torch
with a multi-GB CUDA build. ``install()`` replaces that function, now or whenever TransformerLens' helpers are
imported later, with one that raises ``UnsupportedModelError`` when torchvision is missing instead of installing it.

The guard is not applied by ``import attnscope``: the TransformerLens adapter installs it when it is first used (it
matches a bridge, or ``boot_bridge`` boots one). ``uninstall()`` removes it completely (TransformerLens' own function
is restored, the import finder removed); ``guarded()`` applies it for one block only.

Example:
    >>> from attnscope.probes.adapters import tl_guard
    >>> before = tl_guard.is_installed()
    >>> with tl_guard.guarded():
    ...     tl_guard.is_installed()
    True
    >>> tl_guard.is_installed() == before   # removed again unless it was installed before the block
    True
"""

import contextlib
import importlib.abc
import importlib.util
import sys
import threading
from collections.abc import Iterator
from typing import Any

from ...errors import UnsupportedModelError

HELPERS = "transformer_lens.model_bridge.sources.transformers.helpers"
INSTALLER = "_ensure_torchvision"
_MARK = "__attnscope_guard__"
_ABSENT = object()  # the helpers module had no installer of its own to restore
_lock = threading.RLock()
_finder: "PatchOnImport | None" = None
_originals: dict[int, tuple[Any, Any]] = {}  # id(helpers module) -> (module, its own installer or _ABSENT)


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


def _is_ours(fn: Any) -> bool:
    return bool(getattr(fn, _MARK, False))


def _patch(module: Any) -> None:
    with _lock:
        current = getattr(module, INSTALLER, _ABSENT)
        if _is_ours(current):
            return
        _originals[id(module)] = (module, current)
        setattr(module, INSTALLER, refuse_torchvision_install)


def _unpatch(module: Any) -> None:
    with _lock:
        saved = _originals.pop(id(module), None)
        if saved is None or not _is_ours(getattr(module, INSTALLER, None)):
            return  # not patched by us, or someone replaced our stand-in since: leave theirs
        original = saved[1]
        if original is _ABSENT:
            delattr(module, INSTALLER)
        else:
            setattr(module, INSTALLER, original)


class PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds TransformerLens' helpers module through the other finders and patches it once it has executed."""

    def __init__(self) -> None:
        self._busy = False
        self._inner: Any = None

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
        if _finder is self:  # not uninstalled meanwhile
            _patch(module)


def install() -> None:
    """Apply the guard (idempotent): patch TransformerLens' installer now if its helpers are imported, and add an
    import finder that patches them when they are imported later. ``uninstall()`` undoes both."""
    global _finder
    with _lock:
        module = sys.modules.get(HELPERS)
        if module is not None:
            _patch(module)
        if _finder is None or _finder not in sys.meta_path:
            _finder = PatchOnImport()
            sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    """Remove the guard: TransformerLens' own installer is restored and the import finder removed (idempotent)."""
    global _finder
    with _lock:
        if _finder is not None and _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
        _finder = None
        for module, _ in list(_originals.values()):
            _unpatch(module)


def is_installed() -> bool:
    """True when TransformerLens' installer is (or, once imported, will be) replaced by the guard."""
    with _lock:
        if _finder is None or _finder not in sys.meta_path:
            return False
        module = sys.modules.get(HELPERS)
        return module is None or _is_ours(getattr(module, INSTALLER, None))


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """The guard for one block: installed on entry, removed on exit unless it was installed before."""
    with _lock:
        was = is_installed()
        install()
    try:
        yield
    finally:
        if not was:
            uninstall()


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
