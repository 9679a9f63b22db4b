"""Vision towers that pack every image (or window) into one sequence with ``cu_seqlens`` boundaries (Qwen2-VL,
Qwen2.5-VL): one site, one record per forward, ``[1, head, token, token]`` over the packed tokens in the order
the module sees them, block-diagonal (no attention between images, or between windows in windowed blocks).

Under SDPA and eager these modules call the attention function once per image or window; under flash attention
once, with ``cu_seq_lens``. Either way the chunks of one module call are gathered here and recorded as one packed
call whose mask is the block diagonal of the module's ``cu_seqlens``, which is exactly what the model computed.
The eager reference is assembled the same way from the weights of each chunk.

Example:
    >>> import torch
    >>> block_mask(torch.tensor([0, 2, 3]))[0, 0].int().tolist()
    [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
"""

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..site import Site


def packed_modules(model: nn.Module, sites: dict[int, Site]) -> dict[int, nn.Module]:
    """id -> attention module whose forward takes ``cu_seqlens`` (a packed multi-image sequence)."""
    out = {}
    for module in model.modules():
        if id(module) in sites and "cu_seqlens" in inspect.signature(type(module).forward).parameters:
            out[id(module)] = module
    return out


def block_mask(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[1, 1, n, n]`` boolean mask, True inside each ``[cu[i], cu[i+1])`` block."""
    cu = cu_seqlens.long().cpu()
    segment = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])
    return (segment[:, None] == segment[None, :])[None, None]


def _cu_seqlens(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    if "cu_seqlens" in kwargs:
        return kwargs["cu_seqlens"]
    names = list(inspect.signature(type(module).forward).parameters)[1:]
    return args[names.index("cu_seqlens")]


@contextlib.contextmanager
def _boundaries(modules: dict[int, nn.Module], on_start, on_end=None) -> Iterator[None]:
    """Forward hooks: ``on_start(mid, cu_seqlens)`` before each call of a packed module, ``on_end(mid)`` after."""
    handles = []
    try:
        for mid, module in modules.items():
            handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, mid=mid: on_start(mid, _cu_seqlens(m, args, kwargs)), with_kwargs=True))
            if on_end is not None:
                handles.append(module.register_forward_hook(lambda m, args, out, mid=mid: on_end(mid)))
        yield
    finally:
        for handle in handles:
            handle.remove()


class PackedRecorder:
    """Stands in for a ``Recorder``: gathers the chunks of each packed module call, then records them once."""

    def __init__(self, recorder: Any, modules: dict[int, nn.Module], sites: dict[int, Site]):
        self.recorder = recorder
        self.site_of = {mid: sites[mid] for mid in modules}
        self.modules = modules
        self._open: dict[Site, tuple[torch.Tensor, list[tuple]]] = {}

    def __getattr__(self, name: str) -> Any:  # everything but observe_qk is the wrapped recorder's
        if name == "recorder":
            raise AttributeError(name)
        return getattr(self.recorder, name)

    def observe_qk(self, site: Site, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                   **kwargs: Any) -> None:
        if site in self._open and mask is None and kwargs.get("sinks") is None:
            self._open[site][1].append((query, key, kwargs))
            return
        self.recorder.observe_qk(site, query, key, mask, **kwargs)

    def start(self, mid: int, cu_seqlens: torch.Tensor) -> None:
        self._open[self.site_of[mid]] = (cu_seqlens, [])

    def end(self, mid: int) -> None:
        site = self.site_of[mid]
        cu, chunks = self._open.pop(site, (None, []))
        if not chunks:
            return
        query = torch.cat([q for q, _, _ in chunks], dim=-2)
        key = torch.cat([k for _, k, _ in chunks], dim=-2)
        kwargs = dict(chunks[0][2], is_causal=False)
        if int(cu[-1]) != query.shape[-2]:  # not the packed sequence after all: record the chunks as they came
            for q, k, kw in chunks:
                self.recorder.observe_qk(site, q, k, None, **kw)
            return
        self.recorder.observe_qk(site, query, key, block_mask(cu).to(query.device), **kwargs)

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        with _boundaries(self.modules, self.start, self.end):
            yield


@contextlib.contextmanager
def packed_reference(modules: dict[int, nn.Module], sites: dict[int, Site],
                     collected: dict[Site, list[torch.Tensor]]) -> Iterator[None]:
    """While active, note each packed module call's ``cu_seqlens``; on exit replace the per-chunk eager weights
    ``collected`` holds for those sites with one block-diagonal ``[1, head, n, n]`` tensor per call."""
    calls: dict[int, list[torch.Tensor]] = {mid: [] for mid in modules}
    with _boundaries(modules, lambda mid, cu: calls[mid].append(cu.cpu())):
        yield
    for mid, boundaries in calls.items():
        site = sites[mid]
        chunks = list(collected.get(site) or [])
        if not boundaries or len(chunks) != sum(len(cu) - 1 for cu in boundaries):
            continue
        merged = []
        for cu in boundaries:
            parts, chunks = chunks[:len(cu) - 1], chunks[len(cu) - 1:]
            merged.append(_block_diagonal(parts, cu))
        collected[site] = merged


def _block_diagonal(parts: list[torch.Tensor], cu: torch.Tensor) -> torch.Tensor:
    n = int(cu[-1])
    first = parts[0]
    out = first.new_zeros(first.shape[0], first.shape[1], n, n)
    for part, start, end in zip(parts, cu[:-1].tolist(), cu[1:].tolist()):
        out[..., start:end, start:end] = part
    return out
