"""``head-stats``: a cheap per-head analysis built on streaming capture statistics, local or remote.

Per layer and head, over the suite's non-padding queries: ``sink_mass`` (mean attention mass on key position 0)
and ``entropy`` (mean attention entropy, nats). No pattern is ever held whole. With ``remote=True`` / ``"local"``
each batch is captured in an nnsight trace on the backend (``attnscope.probes.remote``), with ``plan`` applied in
the trace; the numbers equal the local capture.

Example:
    >>> import transformers
    >>> from attnscope.datasets import induction
    >>> from attnscope.circuits.streaming_head_stats import head_stats
    >>> cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=32, n_positions=32)
    >>> table = head_stats(transformers.GPT2LMHeadModel(cfg).eval(), induction(3, seq_len=12, vocab_size=32))
    >>> sorted(table.df.metric.unique()), len(table)
    (['entropy', 'sink_mass'], 8)
"""

from typing import Any

import torch

from ..datasets.input_suite import InputSuite
from ..datasets.suite import PromptSuite
from ..probes.adapter import ModelLike, as_adapter
from ..probes.capturing import capture
from ..probes.remote import remote_adapter
from ..results import ResultTable
from .detectors import attention_sites
from .registry import register_analysis
from .task_metrics import require_suite_fits


def _stat(trace: Any, name: str, tower: str | None) -> torch.Tensor:
    """``[layer, batch, head, query, ...]`` over ``detectors.attention_sites`` (a tower's self-attention, or every
    joint-attention site of an MMDiT such as Flux)."""
    return torch.stack([trace.get(site).stats[name] for _, site in attention_sites(trace, tower)])


@register_analysis("head-stats", description="per head: mean attention mass on position 0 (sink) and mean "
                   "entropy over a suite, from streaming statistics (runs locally or on an nnsight backend)")
def head_stats(model: ModelLike, suite: "PromptSuite | InputSuite", *, batch_size: int = 8,
               remote: "bool | str" = False,
               plan: Any = None, tower: str | None = None, **_: Any) -> ResultTable:
    """Per-head sink mass and entropy, averaged over every non-padding query of the suite. ``tower``: which
    tower's self-attention (default ``text``; e.g. ``encoder`` of an encoder-decoder)."""
    require_suite_fits(model, suite, "head-stats")
    target = remote_adapter(model, remote=remote, plan=plan) if remote else model
    tokenizer = as_adapter(model).tokenizer
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros(())
    provenance: dict = {}
    for batch in suite.batches(batch_size, tokenizer=tokenizer):
        trace = capture(target, batch.inputs, stats=("mass", "entropy"), mass_spans=[(0, 1)])
        stats = (("sink_mass", _stat(trace, "mass", tower)[..., 0]), ("entropy", _stat(trace, "entropy", tower)))
        mask = batch.attention_mask  # None: images / latents, every query is real
        valid = (torch.ones(stats[1][1].shape[1], stats[1][1].shape[-1]) if mask is None else mask)
        valid = valid.to(torch.float64)[None, :, None, :]  # [1, batch, 1, query]
        for name, value in stats:
            weighted = (value.to(torch.float64) * valid).sum((1, 3))  # [layer, head]
            sums[name] = sums[name] + weighted if name in sums else weighted
        count = count + valid.sum()
        provenance = dict(trace.provenance)
    records = [{"analysis": "head_stats", "layer": layer, "head": head, "metric": name,
                "value": float(total[layer, head] / count.clamp_min(1))}
               for name, total in sorted(sums.items()) for layer in range(total.shape[0])
               for head in range(total.shape[1])]
    provenance.update(analysis="head_stats", suite=suite.name, n_queries=int(count))
    return ResultTable.from_records(records, provenance=provenance)
