"""Every single-head ablation of a model in batched forward passes (instead of one pass per head).

For a suite batch of ``B`` items and a chunk of ``n`` heads, the batch is replicated ``n`` times; a forward pre-hook
on each layer's output-projection input applies a per-row head mask, so rows ``[i*B, (i+1)*B)`` run with head
``i`` of the chunk ablated (``zero``: its output set to 0; ``mean``: to its mean over the suite's tokens;
``rescale``: multiplied by ``scale``). The chunk size follows a memory budget; a chunk holds heads of one layer.
Two savings on top of batching: the blocks before the ablated layer, and the ablated layer's attention up to its
head outputs, are identical for every head of the chunk, so they run once per batch (clean, cached) and are
replayed (``share_prefix``); LMs compute logits only at the scored positions (``logits_to_keep``). The metric's
per-item ``(sum, count)`` statistics are summed per head, so the result equals a loop of single ``apply_plan``
ablations (up to float rounding of differently sized matmuls).

Example:
    >>> import transformers
    >>> from attnscope.datasets import induction
    >>> from attnscope.circuits.task_metrics import eval_batches, NextTokenAccuracy
    >>> from attnscope.circuits.head_ablation import single_head_sweep
    >>> cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=32, n_positions=32)
    >>> model = transformers.GPT2LMHeadModel(cfg).eval()
    >>> table = single_head_sweep(model, eval_batches(induction(4, seq_len=16, vocab_size=32)), NextTokenAccuracy())
    >>> len(table), sorted(table.df.columns)[:3]
    (4, ['analysis', 'clean', 'delta'])
"""

import inspect
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..probes.adapter import ModelLike, module_of
from ..probes.head_slices import (OutputProjection, check_heads, edit_head_outputs, head_grid, layers_run,
                                  output_projections)
from ..probes.heads import Head, HeadSet
from ..probes.interventions import InterventionPlan, apply_plan, mean_head_outputs
from ..probes.tower_heads import tower_head_column
from ..results import ResultTable
from .registry import register_analysis
from .task_metrics import IGNORE, EvalBatch, TaskMetric, decoder_reads_input, metric_for, metric_totals, reference_ids

SWEEP_MODES = ("zero", "mean", "rescale")


def row_bytes(model: nn.Module, seq_len: int, logit_positions: int | None = None) -> int:
    """A rough float32 activation footprint of one row: logits (at ``logit_positions``, default every position),
    residual-stream temporaries, attention rows."""
    cfg = model.config
    hidden = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0) or 256)
    heads = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 0) or 8)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = int(out.weight.shape[0]) if out is not None else 0
    positions = seq_len if logit_positions is None else logit_positions
    return 4 * (positions * vocab + seq_len * (16 * hidden + 2 * heads * seq_len))


DEFAULT_PASS_MB = {"cpu": 8.0, "cuda": 1024.0}  # CPU: a pass that stays in cache; GPU: enough rows to fill it


def _heads_per_pass(model: nn.Module, batch: EvalBatch, memory_mb: float | None, n_heads: int) -> int:
    if memory_mb is None:
        memory_mb = DEFAULT_PASS_MB.get(batch.device.type, DEFAULT_PASS_MB["cpu"])
    kept = int((batch.targets != IGNORE).any(0).sum())
    takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    per_row = row_bytes(model, batch.seq_len, kept if takes_keep and kept else None)
    return max(1, min(n_heads, int(memory_mb * 2**20 // max(per_row * len(batch), 1))))


def _mean_tables(model: nn.Module, heads: list[tuple[int, int]], batches: Sequence[EvalBatch],
                 mean_values: "dict[Head, Any] | None") -> dict[tuple[int, int], Tensor]:
    if mean_values is None:
        mean_values = mean_head_outputs(model, HeadSet(heads), reference_ids(batches))
    tables = {}
    for layer, head in heads:
        value = mean_values.get(Head(layer, head))
        if value is None:
            raise InputError("mean value missing", expected=f"mean_values[{Head(layer, head)}]", got=None)
        t = torch.as_tensor(value, dtype=torch.float32)
        tables[(layer, head)] = t[None] if t.ndim == 1 else t  # [P or 1, d]
    return tables


def _row_editor(proj: OutputProjection, chunk: list[tuple[int, int]], rows: int, mode: str, scale: float,
                means: dict[tuple[int, int], Tensor]):
    """Editor of one layer for a replicated batch: block ``i`` of ``rows`` rows ablates ``chunk[i]``."""
    n = len(chunk)
    factors = torch.ones(n, proj.n_heads, dtype=torch.float64)
    entries = [(i, h) for i, (layer, h) in enumerate(chunk) if layer == proj.layer]
    for i, h in entries:
        factors[i, h] = 0.0 if mode in ("zero", "mean") else scale
    factors = factors.repeat_interleave(rows, 0)  # [n*rows, H]

    def edit(x: Tensor) -> Tensor:
        out = x * factors.to(device=x.device, dtype=x.dtype)[:, None, :, None]
        if mode != "mean":
            return out
        seq = x.shape[1]
        for i, h in entries:
            table = means[(proj.layer, h)].to(device=x.device, dtype=x.dtype)
            value = table if table.shape[0] == 1 else _fit(table, seq)
            out[i * rows:(i + 1) * rows, :, h] += value
        return out
    return edit


def _fit(table: Tensor, seq: int) -> Tensor:
    if table.shape[0] >= seq:
        return table[:seq]
    return torch.cat([table, table.mean(0, keepdim=True).expand(seq - table.shape[0], -1)])


def layer_blocks(module: nn.Module, projections: list[OutputProjection]) -> list[nn.Module] | None:
    """The transformer block (the ``ModuleList`` entry) holding each layer's attention, or None if not found."""
    for _, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) == len(projections):
            if all(any(m is p.block for m in block.modules()) for block, p in zip(child, projections)):
                return list(child)
    return None


def _replicate(value: Any, n: int) -> Any:
    if torch.is_tensor(value):
        return value.repeat(n, *([1] * (value.ndim - 1))) if value.ndim else value
    if isinstance(value, tuple):
        return tuple(_replicate(v, n) for v in value)
    return value


@contextmanager
def replay_blocks(blocks: list[nn.Module], outputs: list[Any], n: int) -> Iterator[None]:
    """Blocks return their cached clean outputs, replicated ``n`` times, instead of computing (prefix sharing)."""
    saved = [(block, block.__dict__.get("forward")) for block in blocks]  # e.g. accelerate's wrapped forward
    try:
        for block, out in zip(blocks, outputs):
            replicated = _replicate(out, n)
            block.forward = lambda *args, _out=replicated, **kwargs: _out
        yield
    finally:
        for block, old in saved:
            _restore_forward(block, old)


def _restore_forward(module: nn.Module, old: Any) -> None:
    if old is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = old


def _run(module: nn.Module, batch: EvalBatch) -> tuple[Any, EvalBatch]:
    """Forward without a KV cache, logits only at scored positions when the model allows; the matching batch."""
    params = inspect.signature(module.forward).parameters
    kwargs: dict[str, Any] = decoder_reads_input(module, dict(batch.inputs))
    if "use_cache" in params:
        kwargs["use_cache"] = False
    keep = (batch.targets != IGNORE).any(0).nonzero().flatten()
    if "logits_to_keep" in params and 0 < len(keep) < batch.targets.shape[1]:
        kwargs["logits_to_keep"] = keep
        batch = batch.keep_positions(keep)
    return module(**kwargs), batch


@contextmanager
def replay_attention(proj: OutputProjection, z: Tensor, n: int) -> Iterator[None]:
    """The layer's attention returns its cached clean head outputs ``z`` (replicated ``n`` times) through the output
    projection instead of recomputing q/k/v and attention; the projection's pre-hooks (the ablation) still run."""
    replicated = _replicate(z, n)
    module = proj.attention
    old = module.__dict__.get("forward")
    if module is proj.block:  # GPT-2, Llama class: the attention module applies the projection itself
        module.forward = lambda *args, **kwargs: (proj.module(replicated), None)
    else:  # BERT class: BertSelfAttention returns the head outputs, BertSelfOutput projects them
        module.forward = lambda *args, **kwargs: (replicated, None)
    try:
        yield
    finally:
        _restore_forward(module, old)


@contextmanager
def prefix_cache(blocks: list[nn.Module] | None,
                 projections: list[OutputProjection]) -> Iterator[tuple[list[Any], list[Tensor]]]:
    """Collect, during one forward, every block's output and every projection's input (the head outputs ``z``):
    what ``replay_blocks`` / ``replay_attention`` replay. Nothing is collected without ``blocks``."""
    outputs: list[Any] = []
    z: list[Tensor] = []
    handles = [b.register_forward_hook(lambda m, a, o: outputs.append(o)) for b in blocks or []]
    if blocks:
        handles += [p.module.register_forward_pre_hook(lambda m, a: z.append(a[0])) for p in projections]
    try:
        yield outputs, z
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _clean_pass(module: nn.Module, blocks: list[nn.Module] | None, projections: list[OutputProjection],
                batch: EvalBatch, metric: TaskMetric) -> tuple[Tensor, list[Any], list[Tensor]]:
    """Clean per-item stats of one batch and (with ``blocks``) every block's output and head outputs ``z``."""
    with prefix_cache(blocks, projections) as (outputs, z):
        out, scored = _run(module, batch)
    return metric.item_stats(out, scored).sum(0).cpu(), outputs, z


@torch.no_grad()
def single_head_sweep(model: ModelLike, batches: Sequence[EvalBatch], metric: TaskMetric, *, mode: str = "zero",
                      heads: HeadSet | None = None, mean_values: "dict[Head, Any] | None" = None,
                      scale: float | None = None, memory_mb: float | None = None, heads_per_pass: int | None = None,
                      share_prefix: bool = True, progress: bool = False) -> ResultTable:
    """The metric with each head of ``heads`` (default: every head of the layers the first batch runs: a VLM's
    vision tower is left out on text-only prompts) ablated alone, in batched passes.

    mode: ``zero``, ``mean`` (token mean over the batches' inputs unless ``mean_values`` is given, see
    ``mean_head_outputs``) or ``rescale`` (``scale``). memory_mb: activation budget of one pass (sets how many
    heads of a layer share a pass; ``heads_per_pass`` overrides it); default ``DEFAULT_PASS_MB`` for the device. On
    CPU a pass that stays in cache is fastest: 8 MB gives one head per pass on a 64-prompt suite (measured best on
    the induction organism and a 6x8 GPT-2) and several heads per pass on small suites. share_prefix: the blocks
    before the ablated layer, and the ablated layer's own q/k/v and attention, are computed once per batch (clean)
    and replayed instead of recomputed. Logits are computed only at scored positions where the model takes
    ``logits_to_keep``. Returns one row per head: ``value`` (ablated
    metric), ``clean``, ``delta = value - clean``.
    """
    module = module_of(model)
    if mode not in SWEEP_MODES:
        raise InputError("mode not supported by the batched sweep", expected=", ".join(SWEEP_MODES), got=mode,
                         fix="loop apply_plan for resample / uniform")
    if mode == "rescale" and scale is None:
        raise InputError("rescale needs a scale", expected="scale=<float>", got=None)
    projections = output_projections(module)
    order = list(check_heads(heads, projections)) if heads is not None else None
    # prefix sharing replays cached projection inputs: only where the projection is known (not route-only families)
    replayable = share_prefix and all(p.module is not None for p in projections)
    blocks = layer_blocks(module, projections) if replayable else None
    device = next(module.parameters()).device
    clean_totals = torch.zeros(2, dtype=torch.float64)
    passes, ran = 0, set()
    for index_of_batch, batch in enumerate(batches):
        batch = batch.to(device)
        with layers_run(projections) as ran_now:
            clean, cached, z = _clean_pass(module, blocks, projections, batch, metric)
        ran |= ran_now
        if order is None:  # every head of the layers the inputs reach (a VLM's text-only prompt: not its vision)
            order = [(layer, head) for layer, head in head_grid(projections) if layer in ran_now]
        if index_of_batch == 0:
            means = _mean_tables(module, order, batches, mean_values) if mode == "mean" else {}
            totals = torch.zeros(len(order), 2, dtype=torch.float64)
            bar = _bar(progress, len(batches) * len(order))
        clean_totals += clean
        per = heads_per_pass or _heads_per_pass(module, batch, memory_mb, len(order))
        for layer in sorted({layer for layer, _ in order}):
            index = [i for i, (l, _) in enumerate(order) if l == layer]
            for start in range(0, len(index), per):
                rows = index[start:start + per]
                chunk = [order[i] for i in rows]
                big = batch.replicate(len(chunk))
                editor = _row_editor(projections[layer], chunk, len(batch), mode, float(scale or 0.0), means)
                with ExitStack() as stack:
                    stack.enter_context(edit_head_outputs(module, {layer: editor}, projections))
                    if blocks:
                        stack.enter_context(replay_blocks(blocks[:layer], cached, len(chunk)))
                        stack.enter_context(replay_attention(projections[layer], z[layer], len(chunk)))
                    out, scored = _run(module, big)
                stats = metric.item_stats(out, scored).reshape(len(chunk), len(batch), -1).sum(1).cpu()
                totals[rows] += stats
                passes += 1
                if bar is not None:
                    bar.update(len(chunk))
    if bar is not None:
        bar.close()
    clean = metric.reduce(clean_totals)
    records = []
    for (layer, head), total in zip(order, totals):
        value = metric.reduce(total)
        records.append({"analysis": "ablation_sweep", "layer": layer, "head": head, "metric": metric.name,
                        "value": value, "clean": clean, "delta": value - clean, "mode": mode})
    return ResultTable.from_records(records, provenance={
        "analysis": "ablation_sweep", "mode": mode, "metric": metric.name, "forward_passes": passes,
        "clean_passes": len(batches), "heads": len(order), "scale": scale, "share_prefix": blocks is not None,
        "layers_run": sorted(ran),
        "model": getattr(model, "name", type(module).__name__)})


def _bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="single-head ablations", mininterval=1.0)


def ablation_loop(model: ModelLike, batches: Sequence[EvalBatch], metric: TaskMetric, *, mode: str = "zero",
                  heads: HeadSet | None = None, mean_values: "dict[Head, Any] | None" = None,
                  scale: float | None = None) -> dict[tuple[int, int], float]:
    """The reference: one ``apply_plan`` per head, one forward per batch (``head -> metric``)."""
    module = module_of(model)
    projections = output_projections(module)
    order = list(check_heads(heads, projections) if heads is not None else head_grid(projections))
    if mode == "mean" and mean_values is None:
        mean_values = mean_head_outputs(module, HeadSet(order), reference_ids(batches))
    out = {}
    for layer, head in order:
        plan = InterventionPlan(HeadSet([(layer, head)]), mode, scale=scale,
                                mean_values={Head(layer, head): mean_values[Head(layer, head)]}
                                if mode == "mean" else None)
        with apply_plan(module, plan):
            out[(layer, head)] = metric.reduce(metric_totals(module, batches, metric))
    return out


@register_analysis("ablation-sweep", takes="model",
                   description="metric with each single head ablated (zero / mean / rescale), batched")
def ablation_sweep(model: ModelLike, suite: Any, *, mode: str = "zero", metric: str | None = None, batch_size: int = 16,
                   memory_mb: float | None = None, scale: float | None = None, heads: str | HeadSet | None = None,
                   progress: bool = False, **_: Any) -> ResultTable:
    """Analysis entry point: ``model`` a model handle (``attnscope.load``), ``suite`` a PromptSuite, ``heads`` e.g. ``L1H*``."""
    if isinstance(heads, str):
        projections = output_projections(module_of(model))
        heads = HeadSet.parse(heads, n_layers=len(projections), n_heads=max(p.n_heads for p in projections))
    batches, task_metric = metric_for(model, suite, metric, batch_size)
    table = single_head_sweep(model, batches, task_metric, mode=mode, memory_mb=memory_mb, scale=scale,
                              heads=heads, progress=progress)
    table.provenance["suite"] = suite.name
    tower_head_column(table.df, model)
    return table
