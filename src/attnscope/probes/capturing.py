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

import torch

from ..errors import CaptureError, HeadSpecError, InputError, SiteError
from .adapter import ModelAdapter, ModelLike, as_adapter
from .heads import HeadSet
from .recorder import Recorder
from .request import CaptureRequest, RowSelection
from .shared_layers import numbered, shared_layers
from .site import Site
from .trace import AttentionTrace


class Capture:
    """Context manager form of ``capture``: instruments the model on enter, builds ``self.trace`` on exit."""

    def __init__(self, model: ModelLike, request: CaptureRequest, implementation: str = "auto"):
        self.adapter = as_adapter(model)
        self.request, self.implementation = request, implementation
        self.recorder = Recorder(request)
        self.trace: AttentionTrace | None = None
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> "Capture":
        self._stack = contextlib.ExitStack()
        try:
            self._stack.enter_context(self.adapter.instrument(self.recorder, implementation=self.implementation))
            counter = self._stack.enter_context(numbered(shared_layers(self.adapter.module)))
            if counter is not None:  # ALBERT: each application of the shared module is its own layer
                self.recorder.rename = counter.site
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
        check_inputs(self.adapter, inputs)
        prepared = self.adapter.prepare(inputs)
        with self:
            output = self.adapter.run(prepared)
        trace: AttentionTrace = self.trace  # set by __exit__
        if trace.records:  # selections that only some sites (towers) can satisfy are fine; none at all is not
            records = list(trace.records.values())
            self.request.check_spans(max(r.n_key for r in records))
            self.request.check_rows(max(r.n_query for r in records),
                                    sum(len(r.query_index) if r.query_index is not None else r.n_query
                                        for r in records))
        else:
            raise CaptureError("the capture selected nothing", expected="at least one site, head, row and step",
                               got=_describe(self.request), fix="widen sites=, towers=, heads=, rows= or steps= "
                               "(`attnscope info --model M` lists the sites)")
        trace.tokens = prepared.tokens
        trace.output = output
        return trace


def vocab_size_of(module: Any) -> int | None:
    """Rows of the input embedding of a transformers model; None for models without one."""
    try:
        embeddings = module.get_input_embeddings()
    except Exception:  # noqa: BLE001 - not a transformers model (diffusers, wrappers): nothing to check
        return None
    return int(embeddings.num_embeddings) if isinstance(embeddings, torch.nn.Embedding) else None


def check_ids(ids: Any, vocab: int | None, what: str = "token ids") -> None:
    """InputError unless ``ids`` is a non-empty integer tensor ``[seq]`` or ``[batch, seq]`` inside ``[0, vocab)``."""
    if not torch.is_tensor(ids):
        return
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise InputError(f"{what} must be integers", expected="an integer (long) tensor", got=str(ids.dtype),
                         fix="convert with ids.long(), or pass text")
    if ids.ndim not in (1, 2):
        raise InputError(f"{what} of the wrong shape", expected="[seq] or [batch, seq]", got=list(ids.shape),
                         fix="pass one sequence or a batch of equally long sequences")
    if ids.numel() == 0:
        raise InputError(f"empty {what}", expected="at least one token", got=list(ids.shape),
                         fix="pass a non-empty sequence")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        bad = low if low < 0 else high
        raise InputError(f"{what} outside the vocabulary", expected=f"0 <= id < {vocab if vocab else 'vocab size'}",
                         got=bad, fix="use ids the model's tokenizer produces (`attnscope info` shows the model)")


def check_inputs(adapter: ModelAdapter, inputs: Any) -> None:
    """Reject inputs the forward would fail on with a foreign error: bad id tensors, ids outside the vocabulary,
    empty or non-UTF-8 text."""
    texts = [inputs] if isinstance(inputs, str) else inputs if isinstance(inputs, list) and inputs and \
        all(isinstance(t, str) for t in inputs) else []
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError("text is not valid UTF-8", expected="UTF-8 text",
                             got=f"undecodable {text[exc.start:exc.end]!r} at character {exc.start}",
                             fix="decode the bytes as UTF-8 (or with errors='replace') first") from None
    if isinstance(inputs, list) and not inputs:
        raise InputError("no inputs", expected="text, a list of texts, or token ids", got="[]",
                         fix="pass at least one input")
    takes_ids = getattr(adapter.module, "main_input_name", "input_ids") == "input_ids"  # not pixels / audio
    ids = inputs if torch.is_tensor(inputs) and takes_ids else inputs.get("input_ids") if isinstance(inputs, dict) \
        else None
    if torch.is_tensor(ids):
        check_ids(ids, vocab_size_of(adapter.module))


def _check_selection(adapter: ModelAdapter, sites: Any, towers: Any, heads: Any, implementation: Any) -> None:
    """Sites, towers and heads the model has, and a known implementation (else an empty or wrong capture)."""
    if implementation not in ("auto", "eager"):
        raise InputError("unknown attention implementation", expected="'auto' or 'eager'", got=repr(implementation),
                         fix="implementation='auto' keeps the model's kernel; 'eager' switches for the capture")
    if sites is None and towers is None and heads is None:
        return
    info = adapter.info()
    known = list(info.sites)
    if towers is not None:
        if isinstance(towers, str):
            towers = [towers]
        if not all(isinstance(t, str) for t in towers):
            raise InputError("towers must be names", expected="e.g. ['text']", got=repr(towers)[:80],
                             fix="pass towers=['text'] (model.info().towers lists them)")
        names = sorted({s.tower for s in known} | {t.name for t in info.towers})
        unknown = [t for t in towers if t not in names]
        if unknown or not towers:
            raise SiteError("unknown tower", expected=names, got=unknown or list(towers),
                            fix="pick towers the model has (`attnscope info --model M`)")
    if sites is not None and not callable(sites):
        if isinstance(sites, Site):
            sites = [sites]
        bad = [s for s in sites if not isinstance(s, Site)]
        if bad:
            raise SiteError("sites must be Site values", expected="attnscope.Site(tower, layer, kind)",
                            got=repr(bad[0])[:100], fix="build them with attnscope.Site('text', 3)")
        missing = [str(s) for s in sites if known and s not in known]
        if missing or not list(sites):
            raise SiteError("site not in the model", expected=[str(s) for s in known][:12], got=missing or [],
                            fix="pick sites from model.info().sites")
    if heads is not None and info.towers:
        n_layers = max(t.n_layers for t in info.towers)
        n_heads = max(t.n_heads for t in info.towers)
        if not len(heads):
            raise HeadSpecError("empty head set", expected="at least one (layer, head)", got=str(heads))
        heads.validate(n_layers, n_heads)


def _describe(request: CaptureRequest) -> dict:
    return {"patterns": request.patterns, "stats": list(request.stats), "rows": request.rows.mode,
            "heads": str(request.heads) if request.heads is not None else "all",
            "mass_spans": [list(s) for s in request.mass_spans], "topk": request.topk}


def capture(model: ModelLike, inputs: Any = None, *,
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
    adapter = as_adapter(model)
    if isinstance(heads, str):
        tower = adapter.info().tower()
        heads = HeadSet.parse(heads, n_layers=tower.n_layers, n_heads=tower.n_heads)
    elif heads is not None and not isinstance(heads, HeadSet):
        try:
            heads = HeadSet(heads)
        except (TypeError, ValueError):
            raise HeadSpecError("heads must be a HeadSet, a spec string or (layer, head) pairs",
                                expected="e.g. 'L3H5,L7H*' or [(3, 5)]", got=repr(heads)[:100],
                                fix="pass heads='L3H5'") from None
    _check_selection(adapter, sites, towers, heads, implementation)
    request = CaptureRequest(sites=sites, towers=towers, heads=heads, rows=RowSelection.parse(rows),
                             patterns=patterns, stats=stats, mass_spans=mass_spans, topk=topk, budget_mb=budget_mb,
                             steps=steps)
    cap = Capture(adapter, request, implementation)
    return cap if inputs is None else cap.run(inputs)

