"""Layers that share one attention module (ALBERT): each application within a forward is its own layer.

ALBERT runs ``num_hidden_layers`` layer groups' worth of applications (times ``inner_group_num``) through only
``num_hidden_groups * inner_group_num`` modules. attnscope numbers the applications in call order within one
forward: the k-th attention call is layer ``text.Lk`` for capture (sites), references (eager weights per call) and
edits (``OutputProjection.application``: an edit of layer k acts on the k-th call only). ``numbered`` counts the
calls: a pre-hook on the module that runs every layer resets the count at each forward.

Example:
    >>> import transformers
    >>> from attnscope.probes.shared_layers import shared_layers
    >>> cfg = transformers.AlbertConfig(vocab_size=20, embedding_size=8, hidden_size=16, num_hidden_layers=3,
    ...                                 num_attention_heads=2, intermediate_size=16)
    >>> layout = shared_layers(transformers.AlbertModel(cfg))
    >>> layout.n_layers, len(layout.modules)
    (3, 1)
"""

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters.hf_route import attention_modules
from .site import Site


@dataclass
class SharedLayers:
    """The module whose forward runs every application, the shared attention modules, applications per forward."""

    owner: nn.Module
    modules: list[nn.Module]
    n_layers: int


def shared_layers(model: Any) -> "SharedLayers | None":
    """The shared-layer layout of ``model`` (ALBERT's ``albert_layer_groups``), None when no module is shared."""
    if not isinstance(model, nn.Module):
        return None
    owner = next((m for m in model.modules() if hasattr(m, "albert_layer_groups")), None)
    config = getattr(owner, "config", None)
    if owner is None or config is None:
        return None
    n_layers = int(config.num_hidden_layers) * int(getattr(config, "inner_group_num", 1) or 1)
    modules = [m for _, m in attention_modules(owner)]
    if not modules or len(modules) >= n_layers:
        return None
    return SharedLayers(owner, modules, n_layers)


class Counter:
    """The current application (layer) of the shared modules in the running forward; -1 before the first."""

    def __init__(self, layout: SharedLayers):
        self.layout, self.call = layout, -1
        self.ids = {id(m) for m in layout.modules}

    def layer(self) -> int:
        return self.call

    def site(self, site: Site, module_id: "int | None" = None) -> Site:
        """``site`` of a shared module renamed to the current application's layer."""
        if module_id is not None and module_id not in self.ids:
            return site
        return Site(tower=site.tower, layer=self.call, kind=site.kind)


@contextlib.contextmanager
def numbered(layout: "SharedLayers | None") -> Iterator["Counter | None"]:
    """Count the applications of ``layout``'s shared modules inside the block (None: nothing to count)."""
    if layout is None:
        yield None
        return
    counter = Counter(layout)

    def reset(module: nn.Module, args: Any) -> None:
        counter.call = -1

    def advance(module: nn.Module, args: Any) -> None:
        counter.call += 1

    handles = [layout.owner.register_forward_pre_hook(reset)]
    handles += [m.register_forward_pre_hook(advance) for m in layout.modules]
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()


def call_modules(layout: SharedLayers) -> list[nn.Module]:
    """The module that runs each application, in call order (ALBERT: layer ``i`` runs group
    ``i // (num_hidden_layers / num_hidden_groups)``, whose ``inner_group_num`` modules run in turn)."""
    config = layout.owner.config
    inner = int(getattr(config, "inner_group_num", 1) or 1)
    per_group = int(config.num_hidden_layers) // int(getattr(config, "num_hidden_groups", 1) or 1)
    return [layout.modules[(k // inner // per_group) * inner + k % inner] for k in range(layout.n_layers)]


def per_application(counter: Counter, editors: dict[int, Callable[..., torch.Tensor]]) -> Callable[..., torch.Tensor]:
    """An attention-route editor of a shared module that runs ``editors[k]`` on its k-th application only."""
    def edit(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, *,
             output: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        editor = editors.get(counter.layer())
        return output if editor is None else editor(module, query, key, value, mask, output=output, **kwargs)
    edit.accepts_sinks = all(getattr(e, "accepts_sinks", False) for e in editors.values())  # type: ignore[attr-defined]
    return edit


def expand_sites(model: Any, sites: list[Site]) -> list[Site]:
    """The sites of ``model`` with a shared module's site replaced by one site per application."""
    layout = shared_layers(model)
    if layout is None:
        return sites
    shared = [s for s in sites if s.kind == "self"]
    if not shared:
        return sites
    tower = shared[0].tower
    others = [s for s in sites if not (s.tower == tower and s.kind == "self")]
    return sorted(others + [Site(tower=tower, layer=k, kind="self")
                            for k in range(layout.n_layers)])


def split_calls(model: Any, collected: dict[Site, list[torch.Tensor]]) -> dict[Site, list[torch.Tensor]]:
    """Per-module reference weights (one per call) split into per-application sites: call ``j`` of a forward with
    ``n`` applications is layer ``j % n``, step ``j // n``."""
    layout = shared_layers(model)
    if layout is None or len(layout.modules) != 1:
        return collected
    out: dict[Site, list[torch.Tensor]] = {}
    for site, calls in collected.items():
        if site.kind != "self":
            out[site] = calls
            continue
        for j, weights in enumerate(calls):
            renamed = Site(tower=site.tower, layer=j % layout.n_layers, kind=site.kind)
            out.setdefault(renamed, []).append(weights)
    return out


RenameSite = Callable[[Site], Site]
__all__ = ["Counter", "RenameSite", "SharedLayers", "call_modules", "expand_sites", "numbered", "per_application",
           "shared_layers", "split_calls"]
