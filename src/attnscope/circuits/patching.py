"""Exact activation patching of attention heads between clean and corrupted inputs, batched.

For every unit (a head; a head at one position; or, under GQA, a KV head = all query heads reading it) the model is
run on the *base* input with the unit's head outputs ``Att_h(x)`` (the head's slice of the output-projection input,
``edit_head_outputs``, the route every head edit takes) replaced by those of the *source* input:

- ``direction="noise"`` (default, as in attribution patching): base = clean, source = corrupted;
- ``direction="denoise"``: base = corrupted, source = clean.

``effect = M(patched) - M(base)``; with ``normalize=True`` the value is ``effect / (M(clean) - M(corrupt))``
(denoising: 1 = the patch alone restores the clean metric; noising: -1 = the patch alone gives the corrupted one).
``M`` is the metric over all pairs (``patch_pairs``). Like ``ablation_sweep``: a batch of ``B`` pairs is
replicated ``n`` times, block ``i`` patches unit ``i``; a chunk holds units of one layer and follows a memory
budget; blocks before the patched layer (and its own attention) replay the cached base run (``share_prefix``);
LMs compute logits only at scored positions. Per-position units take absolute positions; a pair shorter than the
position contributes no effect (``n_pairs`` counts the pairs that have it).

Example:
    >>> import transformers
    >>> from attnscope.circuits.patch_pairs import PatchPairs
    >>> from attnscope.circuits.patching import activation_patching
    >>> cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=16, n_positions=8)
    >>> model = transformers.GPT2LMHeadModel(cfg).eval()
    >>> pairs = PatchPairs.from_ids([[1, 2, 3, 4]], [[1, 5, 3, 4]], answers=[[6]], wrong=[[7]])
    >>> table = activation_patching(model, pairs, "logit_diff")
    >>> len(table), bool(table.df["is_estimate"].any()), table.df["method"].iloc[0]
    (4, False, 'exact')
"""

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..probes.adapter import ModelLike, module_of
from ..probes.head_slices import (OutputProjection, check_heads, edit_head_outputs, head_grid, output_projections,
                                  query_heads_of, record_head_outputs)
from ..probes.heads import HeadSet
from ..results import ResultTable
from .head_ablation import DEFAULT_PASS_MB, layer_blocks, prefix_cache, replay_attention, replay_blocks, row_bytes
from .patch_pairs import PatchBatch, PatchMetric, PatchPairs, metric_from, run_model

DIRECTIONS = ("noise", "denoise")
GRANULARITIES = ("head", "head_position", "kv_head")


@dataclass(frozen=True)
class Unit:
    """What one patched run replaces: query ``heads`` of ``layer`` at ``position`` (None: every position);
    ``index`` is the head (or KV head) it is reported as."""

    layer: int
    index: int
    heads: tuple[int, ...]
    position: int | None = None


def check_choice(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise InputError(f"unknown {what}", expected=", ".join(allowed), got=value)
    return value


def patch_units(projections: list[OutputProjection], granularity: str, heads: HeadSet | None = None,
                seq_len: int = 0) -> list[Unit]:
    """The units of a granularity (``heads``: query heads, or KV heads for ``kv_head``; default all)."""
    check_choice(granularity, GRANULARITIES, "patching granularity")
    if granularity == "kv_head":
        chosen = check_heads(heads, projections, kind="kv") if heads is not None else \
            HeadSet((p.layer, kv) for p in projections for kv in range(p.n_kv_heads))
        return [Unit(layer, kv, tuple(query_heads_of(kv, projections[layer].n_heads, projections[layer].n_kv_heads)))
                for layer, kv in chosen]
    chosen = check_heads(heads, projections) if heads is not None else head_grid(projections)
    if granularity == "head":
        return [Unit(layer, h, (h,)) for layer, h in chosen]
    return [Unit(layer, h, (h,), t) for layer, h in chosen for t in range(seq_len)]


def sides(direction: str) -> tuple[str, str]:
    """``(base, source)``: which input runs and which one the patched activations come from."""
    return ("clean", "corrupt") if check_choice(direction, DIRECTIONS, "patching direction") == "noise" \
        else ("corrupt", "clean")


def _units_per_pass(module: nn.Module, batch: PatchBatch, memory_mb: float | None, n_units: int) -> int:
    if memory_mb is None:
        memory_mb = DEFAULT_PASS_MB.get(batch.clean_ids.device.type, DEFAULT_PASS_MB["cpu"])
    kept = len(torch.unique(batch.positions[batch.positions >= 0]))
    per_row = row_bytes(module, batch.clean_ids.shape[1], kept or None)
    return max(1, min(n_units, int(memory_mb * 2**20 // max(per_row * len(batch), 1))))


@torch.no_grad()
def _base_pass(module: nn.Module, blocks: list[nn.Module] | None, projections: list[OutputProjection],
               batch: PatchBatch, which: str, metric: PatchMetric) -> tuple[Tensor, list[Any], list[Tensor]]:
    """Per-pair stats of the base input and (with ``blocks``) every block's output and projection input."""
    with prefix_cache(blocks, projections) as (outputs, z):
        stats = run_model(module, batch.ids(which), batch.attention_mask, batch, metric)
    return stats.double(), outputs, z


@torch.no_grad()
def head_outputs(module: nn.Module, projections: list[OutputProjection], batch: PatchBatch, which: str,
                 metric: PatchMetric) -> tuple[Tensor, dict[int, Tensor]]:
    """Per-pair stats and every layer's head outputs ``[batch, seq, head, d_head]`` of one side of the pairs."""
    layers = [p.layer for p in projections]
    with record_head_outputs(module, layers, projections) as seen:
        stats = run_model(module, batch.ids(which), batch.attention_mask, batch, metric)
    return stats.double(), {layer: seen[layer][-1] for layer in layers}


def _patch_editor(proj: OutputProjection, chunk: list[Unit], rows: int, source: Tensor):
    """Editor of one layer for a replicated batch: block ``i`` of ``rows`` rows takes ``chunk[i]`` from ``source``."""
    seq = source.shape[1]
    select = torch.zeros(len(chunk), seq, proj.n_heads, dtype=torch.bool)
    for i, unit in enumerate(chunk):
        where = slice(None) if unit.position is None else unit.position
        select[i, where, list(unit.heads)] = True
    select = select.repeat_interleave(rows, 0)[..., None]  # [n*rows, seq, head, 1]
    replicated = source.repeat(len(chunk), 1, 1, 1)

    def edit(x: Tensor) -> Tensor:
        return torch.where(select.to(x.device), replicated.to(device=x.device, dtype=x.dtype), x)
    return edit


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, mininterval=1.0)


@torch.no_grad()
def activation_patching(model: ModelLike, pairs: PatchPairs, metric: Any = "logit_diff", *, direction: str = "noise",
                        granularity: str = "head", heads: HeadSet | None = None, normalize: bool = False,
                        batch_size: int = 16, memory_mb: float | None = None, units_per_pass: int | None = None,
                        share_prefix: bool = True, progress: bool = False) -> ResultTable:
    """Exact patching effect of every unit (see the module docstring); one row per unit.

    metric: ``logit_diff``, ``logit``, ``prob``, ``loss``, a ``PatchMetric`` or ``fn(output, batch) -> [batch]``.
    granularity: ``head``, ``head_position`` (positions up to the longest pair) or ``kv_head`` (``heads`` then
    names KV heads). Columns: ``value`` (effect, or normalised with ``normalize``), ``effect``,
    ``normalized_effect``, ``patched``, ``baseline``, ``clean``, ``corrupt``, ``position`` (-1: all), ``unit``,
    ``method="exact"``, ``is_estimate=False``, ``direction``, ``n_pairs``.
    """
    module = module_of(model)
    task = metric_from(metric)
    base_side, source_side = sides(direction)
    projections = output_projections(module)
    seq_len = max(len(c) for c in pairs.clean)
    units = patch_units(projections, granularity, heads, seq_len)
    replayable = share_prefix and all(p.module is not None for p in projections)
    blocks = layer_blocks(module, projections) if replayable else None
    device = next(module.parameters()).device
    totals = {"clean": torch.zeros(2, dtype=torch.float64), "corrupt": torch.zeros(2, dtype=torch.float64)}
    unit_totals = torch.zeros(len(units), 2, dtype=torch.float64)
    present = torch.zeros(len(units), dtype=torch.long)
    passes, bar = 0, _bar(progress, len(units) * ((len(pairs) + batch_size - 1) // batch_size), "patched units")
    for batch in pairs.batches(batch_size):
        batch = batch.to(device)
        base_stats, cached, z = _base_pass(module, blocks, projections, batch, base_side, task)
        source_stats, source = head_outputs(module, projections, batch, source_side, task)
        totals[base_side] += base_stats.sum(0).cpu()
        totals[source_side] += source_stats.sum(0).cpu()
        lengths = batch.attention_mask.sum(1).cpu()
        per = units_per_pass or _units_per_pass(module, batch, memory_mb, len(units))
        for layer in sorted({u.layer for u in units}):
            index = [i for i, u in enumerate(units) if u.layer == layer and
                     (u.position is None or u.position < batch.clean_ids.shape[1])]
            for start in range(0, len(index), per):
                rows = index[start:start + per]
                chunk = [units[i] for i in rows]
                editor = _patch_editor(projections[layer], chunk, len(batch), source[layer])
                with ExitStack() as stack:
                    stack.enter_context(edit_head_outputs(module, {layer: editor}, projections))
                    if blocks:
                        stack.enter_context(replay_blocks(blocks[:layer], cached, len(chunk)))
                        stack.enter_context(replay_attention(projections[layer], z[layer], len(chunk)))
                    stats = run_model(module, batch.ids(base_side).repeat(len(chunk), 1),
                                      batch.attention_mask.repeat(len(chunk), 1), batch.replicate(len(chunk)), task)
                unit_totals[rows] += stats.double().reshape(len(chunk), len(batch), 2).sum(1).cpu()
                passes += 1
                if bar is not None:
                    bar.update(len(chunk))
            done = set(index)
            skipped = [i for i, u in enumerate(units) if u.layer == layer and i not in done]
            unit_totals[skipped] += base_stats.sum(0).cpu()  # positions past every pair: nothing patched
        for i, u in enumerate(units):
            present[i] += len(batch) if u.position is None else int((lengths > u.position).sum())
    if bar is not None:
        bar.close()
    values = {side: task.reduce(t) for side, t in totals.items()}
    baseline = values[base_side]
    span = values["clean"] - values["corrupt"]
    records = []
    for unit, total, n in zip(units, unit_totals, present):
        patched = task.reduce(total)
        effect = patched - baseline
        normalized = effect / span if span != 0 else float("nan")
        records.append({"analysis": "activation_patching", "layer": unit.layer, "head": unit.index,
                        "metric": task.name, "value": normalized if normalize else effect, "effect": effect,
                        "normalized_effect": normalized, "patched": patched, "baseline": baseline,
                        "clean": values["clean"], "corrupt": values["corrupt"],
                        "position": -1 if unit.position is None else unit.position,
                        "unit": "kv_head" if granularity == "kv_head" else "head", "method": "exact",
                        "is_estimate": False, "direction": direction, "n_pairs": int(n)})
    return ResultTable.from_records(records, provenance={
        "analysis": "activation_patching", "method": "exact", "direction": direction, "granularity": granularity,
        "metric": task.name, "normalize": normalize, "pairs": len(pairs), "pairs_dropped": pairs.dropped,
        "suite": pairs.name, "forward_passes": passes, "share_prefix": blocks is not None,
        "clean_metric": values["clean"], "corrupt_metric": values["corrupt"],
        "model": getattr(model, "name", type(module).__name__)})


__all__ = ["DIRECTIONS", "GRANULARITIES", "Unit", "activation_patching", "head_outputs", "patch_units", "sides"]
