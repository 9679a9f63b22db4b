"""Attribution patching of attention heads: AtP (Nanda 2023; Syed et al. 2023) and AtP* (Kramar et al. 2024,
arXiv 2403.00745). Every number here is a first-order *estimate* of the exact patching effect (``patching``).

Notation as in ``patching``: the base run (``noise``: clean, ``denoise``: corrupted) receives the source run's head
outputs; ``z`` = a head's output ``Att_h(x)`` (``[seq, d_head]``), ``g = dM/dz`` at the base run.

- ``atp``: ``c(h) = sum_{pairs, positions} (z_src - z_base) . g``; one forward per side and one backward per
  batch for every head at once.
- ``atp-qk``: AtP with the head seen as its query, key and value nodes (the node set of Kramar et al.):
  ``sum dq.dM/dq + dk.dM/dk + dv.dM/dv``. It linearises the head's own softmax, so a saturated head whose
  attention jumps between two positions scores ~0 (the paper's first failure mode). Columns ``q_part``,
  ``k_part``, ``v_part``.
- ``atp*``: (a) QK fix: the attention pattern of the patched queries and keys is recomputed with an exact softmax
  and only the path from the attention output onwards is linearised. For a whole head (or a head at one query
  position) the patched queries and keys are *all* of the head's, so the exact pattern is the source run's and
  the head's patched output is exactly ``z_src``: the fixed estimate is ``atp``'s ``(z_src - z_base) . g``
  (``components=True`` splits it into ``pattern_part = ((A_src - A_base) V_base) . g`` and
  ``value_part = (A_src (V_src - V_base)) . g`` from recomputed softmaxes). (b) GradDrop against cancellation:
  for each layer ``l`` the backward pass is repeated with the gradient through layer ``l``'s residual-stream
  contributions set to 0 (pre-LN blocks: the block's ``output - input``; BERT class: the attention and MLP
  sublayer outputs before residual + LayerNorm), giving ``I_l(h)``, and
  ``AtP*(h) = mean_pairs 1/(L-1) sum_l |I_l(h, pair)|`` (the paper's eq. 11; the term of ``h``'s own layer is 0,
  layers after ``h``'s leave it unchanged). The value is a magnitude; ``signed_estimate`` holds ``atp``. With one
  layer GradDrop is undefined: ``mean_pairs |I(h, pair)|``.

Cost per batch: a forward per side and one backward (``atp``); GradDrop adds, for each layer ``l >= 1``, a backward
through blocks ``l..0`` only, started from ``dM/d(output of block l)`` of the full backward (above block ``l`` the
dropped backward equals the full one): ``sum_l l/L = (L-1)/2`` backward passes, about ``L - 1`` forward-pass
equivalents. No exact GradDrop can cost less: every pair (``l``, ``k < l``) needs its own vector through block ``k``.

Long inputs: pairs are processed in batches sized to ``memory_mb`` (default ``DEFAULT_GRAD_MB``), down to one pair.

Example:
    >>> import transformers
    >>> from attnscope.circuits.patch_pairs import PatchPairs
    >>> from attnscope.circuits.gradient_patching import attribution_patching
    >>> cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=16, n_positions=8)
    >>> model = transformers.GPT2LMHeadModel(cfg).eval()
    >>> pairs = PatchPairs.from_ids([[1, 2, 3, 4]], [[1, 5, 3, 4]], answers=[[6]], wrong=[[7]])
    >>> t = attribution_patching(model, pairs, "logit_diff", method="atp*")
    >>> len(t), bool(t.df["is_estimate"].all()), bool((t.df["value"] >= 0).all())
    (4, True, True)
"""

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError, UnsupportedModelError
from ..probes import edit_attention
from ..probes.adapter import ModelLike, module_of
from ..probes.head_slices import OutputProjection, edit_head_outputs, output_projections
from ..probes.heads import HeadSet
from ..results import ResultTable
from .head_ablation import layer_blocks, row_bytes
from .importance import frozen_parameters
from .patch_pairs import PatchBatch, PatchMetric, PatchPairs, metric_from, run_model
from .patching import check_choice, head_outputs, patch_units, sides

METHODS = ("atp", "atp*", "atp-qk")
DEFAULT_GRAD_MB = {"cpu": 1024.0, "cuda": 8192.0}


# ---- GradDrop: gates on each layer's residual-stream contributions --------------------------------------------------

class _Gate:
    """A layer's gate: ``scale`` multiplies the gradient into its residual-stream contributions; ``output`` is the
    block's output of the last forward (where a dropped-layer backward starts)."""

    scale = 1.0
    output: Tensor | None = None


class _ResidualGate(torch.autograd.Function):
    """``out = y`` (a pre-LN block's output, ``y = x + f(x)``); backward sends ``s*g`` through ``y`` and
    ``(1-s)*g`` to ``x``: the skip path keeps ``g``, the block's contribution gets ``s*g``."""

    @staticmethod
    def forward(ctx, y, x, gate):  # type: ignore[override]
        ctx.gate = gate
        return y.clone()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        s = ctx.gate.scale
        return g * s, g * (1.0 - s), None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, gate):  # type: ignore[override]
        ctx.gate = gate
        return y.clone()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g * ctx.gate.scale, None


def _block_hooks(block: nn.Module, gate: _Gate) -> list:
    seen: dict[str, Tensor] = {}

    def pre(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    def post(module, args, kwargs, out):
        y = out if torch.is_tensor(out) else out[0]
        new = _ResidualGate.apply(y, seen.pop("x"), gate)
        gate.output = new
        return new if torch.is_tensor(out) else (new,) + tuple(out[1:])
    return [block.register_forward_pre_hook(pre, with_kwargs=True),
            block.register_forward_hook(post, with_kwargs=True)]


@contextmanager
def grad_drop_gates(module: nn.Module, projections: list[OutputProjection]) -> Iterator[list[_Gate]]:
    """One gate per layer on its residual-stream contributions (scale 1 = normal backward, 0 = dropped)."""
    blocks = layer_blocks(module, projections)
    if blocks is None:
        raise UnsupportedModelError("GradDrop needs the model's transformer blocks", expected="a ModuleList of "
                                    "blocks, one per attention layer", got=type(module).__name__,
                                    fix="use method='atp'")
    gates = [_Gate() for _ in blocks]
    handles = []
    try:
        for proj, block, gate in zip(projections, blocks, gates):
            mlp_out = getattr(getattr(block, "output", None), "dense", None)
            if proj.family == "bert" and mlp_out is not None:  # post-LN: gate the two sublayer outputs
                for sub in (proj.module, mlp_out):
                    handles.append(sub.register_forward_hook(
                        lambda m, a, out, _g=gate: _ScaleGrad.apply(out, _g)))
                handles.append(block.register_forward_hook(
                    lambda m, a, out, _g=gate: setattr(_g, "output", out if torch.is_tensor(out) else out[0])))
            else:
                handles += _block_hooks(block, gate)
        yield gates
    finally:
        for h in handles:
            h.remove()


# ---- recomputed attention (atp-qk, components) ----------------------------------------------------------------------

@contextmanager
def record_qkv(module: nn.Module, projections: list[OutputProjection]) -> Iterator[dict[int, dict]]:
    """Every layer's queries, keys, values ``[batch, (kv_)head, seq, d]`` and score terms, from the attention route."""
    store: dict[int, dict] = {}

    def recorder(layer: int):
        def edit(mod, query, key, value, mask, *, scaling, is_causal, softcap, output):
            store[layer] = {"q": query.detach(), "k": key.detach(), "v": value.detach(), "mask": mask,
                            "scaling": scaling, "is_causal": is_causal, "softcap": softcap}
            return output
        return edit

    with edit_attention(module, {id(p.attention): recorder(p.layer) for p in projections}):
        yield store


def _expand(t: Tensor, n_heads: int) -> Tensor:
    return t.repeat_interleave(n_heads // t.shape[1], dim=1) if t.shape[1] != n_heads else t


def attention_probs(q: Tensor, k: Tensor, mask: Tensor | None, *, scaling: float, is_causal: bool,
                    softcap: float | None = None) -> Tensor:
    """Eager softmax attention ``[batch, head, query, key]`` (float32, differentiable) from the routed terms."""
    k = _expand(k, q.shape[1])
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    n_q, n_k = logits.shape[-2:]
    if mask is not None:
        if mask.ndim == 2:
            mask = mask[:, None, None, :].bool()
        mask = mask[..., -n_k:]
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
    if is_causal:
        causal = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
        logits = logits.masked_fill(~causal, float("-inf"))
    return torch.softmax(logits, -1).nan_to_num(0.0)


def _qk_parts(base: dict, source: dict, g: Tensor) -> Tensor:
    """``[3, batch, head]``: the q, k and v terms of AtP linearised through the softmax (``atp-qk``)."""
    n_heads = base["q"].shape[1]
    leaves = [t.detach().float().requires_grad_() for t in
              (base["q"], _expand(base["k"], n_heads), _expand(base["v"], n_heads))]
    with torch.enable_grad():
        probs = attention_probs(leaves[0], leaves[1], base["mask"], scaling=base["scaling"],
                                is_causal=base["is_causal"], softcap=base["softcap"])
        z = torch.matmul(probs, leaves[2])
        grads = torch.autograd.grad(z, leaves, grad_outputs=g.transpose(1, 2).float())
    deltas = [source["q"].float() - leaves[0].detach(),
              _expand(source["k"], n_heads).float() - leaves[1].detach(),
              _expand(source["v"], n_heads).float() - leaves[2].detach()]
    return torch.stack([(d * gr).sum((-1, -2)) for d, gr in zip(deltas, grads)]).double()


def _components(base: dict, source: dict, g: Tensor) -> Tensor:
    """``[2, batch, head]``: ``pattern_part`` and ``value_part`` of the exact head-output change, times ``g``."""
    terms = {k: base[k] for k in ("scaling", "is_causal", "softcap")}
    a_base = attention_probs(base["q"], base["k"], base["mask"], **terms)
    a_src = attention_probs(source["q"], source["k"], source["mask"], **terms)
    n_heads = base["q"].shape[1]
    v_base, v_src = _expand(base["v"], n_heads).float(), _expand(source["v"], n_heads).float()
    g = g.transpose(1, 2).float()  # [batch, head, seq, d]
    pattern = (torch.matmul(a_src - a_base, v_base) * g).sum((-1, -2))
    value = (torch.matmul(a_src, v_src - v_base) * g).sum((-1, -2))
    return torch.stack([pattern, value]).double()


# ---- the estimates -------------------------------------------------------------------------------------------------

def _pairs_per_batch(module: nn.Module, pairs: PatchPairs, memory_mb: float | None, device: torch.device) -> int:
    if memory_mb is None:
        memory_mb = DEFAULT_GRAD_MB.get(device.type, DEFAULT_GRAD_MB["cpu"])
    seq = max(len(c) for c in pairs.clean)
    n_layers = len(output_projections(module))
    per_pair = 3 * n_layers * row_bytes(module, seq, 1)  # activations kept for the backward, roughly
    return max(1, min(len(pairs), int(memory_mb * 2**20 // max(per_pair, 1))))


def _gradients(module: nn.Module, projections: list[OutputProjection], batch: PatchBatch, which: str,
               metric: PatchMetric, graddrop: bool) -> tuple[Tensor, dict[int, Tensor], dict[int, Tensor],
                                                             list[dict[int, Tensor]]]:
    """Base stats, head outputs, ``dM/dz`` per layer, and (``graddrop``) per dropped layer ``l`` the gradients of
    the layers before ``l``."""
    device = batch.clean_ids.device
    seq = batch.clean_ids.shape[1]
    leaves = {p.layer: torch.zeros(len(batch), seq, p.n_heads, p.d_head, device=device, requires_grad=True)
              for p in projections}
    outputs: dict[int, Tensor] = {}

    def editor(layer: int):
        def edit(x: Tensor) -> Tensor:
            outputs[layer] = x.detach()
            return x + leaves[layer].to(x.dtype)
        return edit

    dropped: list[dict[int, Tensor]] = []
    with frozen_parameters(module), torch.enable_grad(), ExitStack() as stack:
        gates = stack.enter_context(grad_drop_gates(module, projections)) if graddrop else []
        stack.enter_context(edit_head_outputs(module, {p.layer: editor(p.layer) for p in projections}, projections))
        stats = run_model(module, batch.ids(which), batch.attention_mask, batch, metric)
        total = stats[:, 0].sum()
        order = [p.layer for p in projections]
        ends = [g.output for g in gates[1:]]  # GradDrop starts layer l's backward at block l's output
        found = torch.autograd.grad(total, [leaves[k] for k in order] + ends, retain_graph=graddrop,
                                    allow_unused=True)
        grads = dict(zip(order, found[:len(order)]))
        dropped.extend([{}] if gates else [])
        for l, (gate, end, g_end) in enumerate(zip(gates[1:], ends, found[len(order):]), start=1):
            # Above block l the dropped backward equals the full one, so it starts from dM/d(block l's output)
            # and runs through layers l..0 only: sum_l l/L backward passes instead of L.
            gate.scale = 0.0
            got = torch.autograd.grad(end, [leaves[k] for k in order[:l]], grad_outputs=torch.zeros_like(end)
                                      if g_end is None else g_end, retain_graph=l < len(gates) - 1,
                                      allow_unused=True)
            gate.scale = 1.0
            dropped.append(dict(zip(order[:l], got)))
    zero = {k: torch.zeros_like(leaves[k]) for k in leaves}
    grads = {k: (v if v is not None else zero[k]).detach() for k, v in grads.items()}
    dropped = [{k: (v if v is not None else zero[k]).detach() for k, v in d.items()} for d in dropped]
    return stats.detach().double(), outputs, grads, dropped


def _per_unit(contrib: Tensor, granularity: str, group: int) -> Tensor:
    """``[batch, seq, head]`` per-position contributions -> per-row unit values (``[batch, head]``,
    ``[batch, seq, head]`` or ``[batch, kv_head]``)."""
    if granularity == "head_position":
        return contrib
    per_head = contrib.sum(1)
    if granularity == "kv_head":
        return per_head.reshape(per_head.shape[0], -1, group).sum(-1)
    return per_head


def attribution_patching(model: ModelLike, pairs: PatchPairs, metric: Any = "logit_diff", *, method: str = "atp*",
                         direction: str = "noise", granularity: str = "head", heads: HeadSet | None = None,
                         batch_size: int | None = None, memory_mb: float | None = None, components: bool = False
                         ) -> ResultTable:
    """AtP / AtP* / AtP-through-q/k/v estimates of every head's patching effect (module docstring).

    Returns one row per unit with ``value`` (the estimate; ``atp*``: a magnitude), ``signed_estimate`` (``atp``),
    ``method``, ``is_estimate=True``, ``direction``, ``position`` (-1: all), ``unit``; ``atp-qk``: ``q_part``,
    ``k_part``, ``v_part``; ``components``: ``pattern_part`` and ``value_part``.
    """
    check_choice(method, METHODS, "attribution method")
    if method == "atp-qk" and granularity == "head_position":
        raise InputError("atp-qk has no per-position units", expected="granularity head or kv_head",
                         got=granularity, fix="use method 'atp' or 'atp*' per position")
    module = module_of(model)
    task = metric_from(metric)
    base_side, source_side = sides(direction)
    projections = output_projections(module)
    seq_len = max(len(c) for c in pairs.clean)
    units = patch_units(projections, granularity, heads, seq_len)
    device = next(module.parameters()).device
    per = batch_size or _pairs_per_batch(module, pairs, memory_mb, device)
    n_layers, started = len(projections), time.perf_counter()
    graddrop = method == "atp*" and n_layers > 1
    want_qkv = method == "atp-qk" or (components and granularity != "head_position")
    sums: dict[str, dict[int, Tensor]] = {}
    count = torch.zeros((), dtype=torch.float64)
    for batch in pairs.batches(per):
        batch = batch.to(device)
        stats, z_base, grads, dropped = _gradients(module, projections, batch, base_side, task, graddrop)
        _, z_src = head_outputs(module, projections, batch, source_side, task)
        count += stats[:, 1].sum().cpu()
        qkv = {}
        if want_qkv:
            for side in (base_side, source_side):
                with torch.no_grad(), record_qkv(module, projections) as store:
                    run_model(module, batch.ids(side), batch.attention_mask, batch, task)
                qkv[side] = dict(store)
        for p in projections:
            layer, group = p.layer, p.n_heads // max(p.n_kv_heads, 1)
            delta = (z_src[layer] - z_base[layer]).double()
            contrib = (delta * grads[layer].double()).sum(-1)  # [batch, seq, head]
            rows = {"atp": _per_unit(contrib, granularity, group)}
            if method == "atp*":
                terms = []
                for l in range(n_layers):
                    if l == layer:
                        continue
                    if l < layer or not graddrop:
                        terms.append(rows["atp"])
                    else:
                        c = (delta * dropped[l][layer].double()).sum(-1)
                        terms.append(_per_unit(c, granularity, group))
                rows["atp*"] = torch.stack(terms).abs().mean(0) if terms else rows["atp"].abs()
            if method == "atp-qk":
                q, k, v = _qk_parts(qkv[base_side][layer], qkv[source_side][layer], grads[layer])
                for name, part in (("q_part", q), ("k_part", k), ("v_part", v)):
                    rows[name] = _per_unit(part[:, None], granularity, group)
                rows["atp-qk"] = rows["q_part"] + rows["k_part"] + rows["v_part"]
            if components and granularity != "head_position":
                pattern, value = _components(qkv[base_side][layer], qkv[source_side][layer], grads[layer])
                rows["pattern_part"] = _per_unit(pattern[:, None], granularity, group)
                rows["value_part"] = _per_unit(value[:, None], granularity, group)
            for name, r in rows.items():
                acc = sums.setdefault(name, {})
                acc[layer] = acc.get(layer, 0) + r.sum(0).cpu()
    records = []
    extra = [n for n in sums if n not in ("atp", method)]
    for unit in units:
        def pick(name: str) -> float:
            grid = sums[name][unit.layer]
            cell = grid[unit.position, unit.index] if unit.position is not None else grid[unit.index]
            return float(cell / count) if float(count) > 0 else float("nan")
        row = {"analysis": "attribution_patching", "layer": unit.layer, "head": unit.index, "metric": task.name,
               "value": pick(method), "signed_estimate": pick("atp"), "method": method, "is_estimate": True,
               "direction": direction, "position": -1 if unit.position is None else unit.position,
               "unit": "kv_head" if granularity == "kv_head" else "head"}
        row.update({name: pick(name) for name in extra})
        records.append(row)
    return ResultTable.from_records(records, provenance={
        "analysis": "attribution_patching", "method": method, "direction": direction, "granularity": granularity,
        "metric": task.name, "pairs": len(pairs), "pairs_per_batch": per, "graddrop": graddrop,
        "graddrop_rule": "mean_pairs 1/(L-1) sum_l |I_l|" if graddrop else None, "estimate": True,
        "seconds": time.perf_counter() - started, "suite": pairs.name,
        "model": getattr(model, "name", type(module).__name__)})


__all__ = ["DEFAULT_GRAD_MB", "METHODS", "attention_probs", "attribution_patching", "grad_drop_gates", "record_qkv"]
