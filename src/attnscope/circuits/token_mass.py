"""Attention mass that each head puts on special tokens ([CLS], [SEP], BOS ...), averaged over real queries.

Example:
    >>> import attnscope
    >>> from attnscope.circuits.token_mass import special_token_mass
    >>> trace = attnscope.capture(attnscope.load("minilm"), ["A short sentence.", "Another one here."])
    >>> table = special_token_mass(trace)
    >>> sorted(table.df["metric"].unique())
    ['mass:[CLS]', 'mass:[SEP]']
"""

import torch

from ..errors import AnalysisError
from ..probes.trace import AttentionTrace
from ..results import ResultTable


def _special_positions(trace: AttentionTrace) -> dict[str, list[list[int]]]:
    """Per special token string, its positions in each batch item."""
    strings = trace.tokens.strings
    if not strings:
        raise AnalysisError("trace has no token strings", expected="a trace captured from text with a tokenizer",
                            got="no strings", fix="capture through attnscope.load(...) with text input")
    specials = {s.label for s in trace.tokens.spans if s.modality == "special" and s.label}
    pad = {"[PAD]", "<pad>", "<|endoftext|>"} if trace.tokens.padding else set()
    return {tok: [[i for i, t in enumerate(row) if t == tok] for row in strings] for tok in sorted(specials - pad)}


def special_token_mass(trace: AttentionTrace, tower: str = "text") -> ResultTable:
    """Per layer and head, mean attention mass on each special token over the non-padding queries."""
    probs = trace.stack(tower=tower)  # [layer, batch, head, query, key]
    n_layers, batch, n_heads, n_query, n_key = probs.shape
    valid = torch.ones(batch, n_query, dtype=torch.bool)
    if trace.tokens.padding:
        valid = torch.tensor(trace.tokens.padding, dtype=torch.bool)[:, :n_query]
    records = []
    for token, rows in _special_positions(trace).items():
        key_mask = torch.zeros(batch, n_key)
        for b, positions in enumerate(rows):
            key_mask[b, positions] = 1.0
        mass = (probs * key_mask[None, :, None, None, :]).sum(-1)  # [layer, batch, head, query]
        weights = valid[None, :, None, :].float()
        mean = (mass * weights).sum((1, 3)) / weights.sum((1, 3)).clamp_min(1)  # [layer, head]
        records += [{"analysis": "special_token_mass", "layer": l, "head": h, "metric": f"mass:{token}",
                     "value": float(mean[l, h])} for l in range(n_layers) for h in range(n_heads)]
    return ResultTable.from_records(records, provenance=dict(trace.provenance))
