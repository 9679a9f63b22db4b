"""``capture(model, inputs, ...)``: run a model and return an ``AttentionTrace`` of what was asked.

Also a context manager: ``with capture(model, stats=("entropy",)) as cap: model(...)`` fills ``cap.trace``.

Example:
    >>> import torch, transformers, attnscope
    >>> cfg = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    >>> model = transformers.GPT2LMHeadModel(cfg).eval()
    >>> trace = attnscope.capture(model, torch.tensor([[1, 2, 3, 4]]), stats=("entropy",))
    >>> trace.stat("entropy").shape   # [layer, batch, head, query]
    torch.Size([2, 1, 4, 4])
"""

import contextlib
from collections.abc import Callable, Sequence
from typing import Any


from .adapter import ModelAdapter, adapter_for
from .heads import HeadSet
from .loading import LoadedModel
from .recorder import Recorder
from .request import CaptureRequest, RowSelection
from .site import Site
from .trace import AttentionTrace


def resolve_adapter(model: Any) -> ModelAdapter:
    """The adapter for a LoadedModel, an adapter, or a raw model object."""
    if isinstance(model, LoadedModel):
        return model.adapter
    if isinstance(model, ModelAdapter):
        return model
    return adapter_for(model)


class Capture:
    """Context manager form of ``capture``: instruments the model on enter, builds ``self.trace`` on exit."""

    def __init__(self, model: Any, request: CaptureRequest, implementation: str = "auto"):
        self.adapter = resolve_adapter(model)
        self.request, self.implementation = request, implementation
        self.recorder = Recorder(request)
        self.trace: AttentionTrace | None = None
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> "Capture":
        self._stack = contextlib.ExitStack()
        try:
            self._stack.enter_context(self.adapter.instrument(self.recorder, implementation=self.implementation))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        self.trace = AttentionTrace(self.recorder.records, provenance=self.adapter.provenance())
        self.trace.provenance["request"] = _describe(self.request)
        if self.request.stats:  # which CPU path computed streaming statistics (CUDA tensors use Triton)
            from ..kernels.cpu_rows import native_available
            self.trace.provenance["cpu_statistics_kernel"] = "fused-c" if native_available() else "torch"
        return False

    def run(self, inputs: Any) -> AttentionTrace:
        prepared = self.adapter.prepare(inputs)
        with self:
            output = self.adapter.run(prepared)
        trace: AttentionTrace = self.trace  # set by __exit__
        trace.tokens = prepared.tokens
        trace.output = output
        return trace


def _describe(request: CaptureRequest) -> dict:
    return {"patterns": request.patterns, "stats": list(request.stats), "rows": request.rows.mode,
            "heads": str(request.heads) if request.heads is not None else "all",
            "mass_spans": [list(s) for s in request.mass_spans], "topk": request.topk}


def capture(model: Any, inputs: Any = None, *,
            sites: "Sequence[Site] | Callable[[Site], bool] | None" = None, towers: Sequence[str] | None = None,
            heads: "HeadSet | str | None" = None, rows: "str | Sequence[int] | RowSelection | None" = None,
            patterns: bool | None = None, stats: Sequence[str] = (), mass_spans: Sequence[tuple[int, int]] = ((0, 1),),
            topk: int = 5, steps: Sequence[int] | None = None, budget_mb: float = 64.0,
            implementation: str = "auto") -> "AttentionTrace | Capture":
    """Capture attention of ``model`` on ``inputs``; without inputs, return a context manager.

    model: ``attnscope.load(...)`` result, or any supported model object. inputs: text, list of texts, token ids,
    a dict of forward kwargs, or what the model family takes (images, diffusion inputs).
    heads: ``HeadSet`` or ``"L3H5,L7H*"``. rows: ``"last:8"``, ``"first:4"``, ``"2:10"`` or positions.
    patterns: keep full probabilities (default: True unless ``stats`` are given). stats: ``mass`` (on
    ``mass_spans``), ``entropy``, ``topk``. implementation: ``auto`` keeps the model's attention kernel; ``eager``
    switches to eager attention for the capture (recorded in the trace's provenance).
    """
    adapter = resolve_adapter(model)
    if isinstance(heads, str):
        tower = adapter.info().tower()
        heads = HeadSet.parse(heads, n_layers=tower.n_layers, n_heads=tower.n_heads)
    request = CaptureRequest(sites=sites, towers=towers, heads=heads, rows=RowSelection.parse(rows),
                             patterns=patterns, stats=tuple(stats), mass_spans=tuple(mass_spans), topk=topk,
                             budget_mb=budget_mb, steps=steps)
    cap = Capture(adapter, request, implementation)
    return cap if inputs is None else cap.run(inputs)

