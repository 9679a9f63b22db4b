"""Token attributions (rollout, flow, relevance ...) as a tidy ``ResultTable``.

One row per (layer, input token): ``analysis="attribution"``, ``layer``, ``head=-1`` (heads fused), ``metric`` (the
method), ``value``, ``token_index`` and ``token``, the layout of ``relevance_table``.

Example:
    >>> import torch
    >>> from attnscope.circuits.attention_rollout import rollout
    >>> from attnscope.circuits.token_attribution import attribution_table
    >>> joint = rollout(torch.softmax(torch.randn(2, 4, 3, 3), -1))        # [layer, query, key]
    >>> table = attribution_table(joint, tokens=["[CLS]", "hi", "[SEP]"], readout=0)
    >>> list(table.df.columns), len(table)
    (['analysis', 'layer', 'head', 'metric', 'value', 'token_index', 'token'], 6)
"""

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from ..errors import AnalysisError
from ..probes.tokens import TokenInfo
from ..results import ResultTable
from .attention_rollout import Array, read_rows


def _token_strings(tokens: Sequence[str] | TokenInfo | None, n: int) -> list[str]:
    if tokens is None:
        return [""] * n
    if isinstance(tokens, TokenInfo):
        tokens = tokens.strings[0] if tokens.strings else None
        return [""] * n if tokens is None else _token_strings(tokens, n)
    tokens = [str(t) for t in tokens]
    if len(tokens) != n:
        raise AnalysisError("token count does not match the key axis", expected=n, got=len(tokens),
                            fix="pass one string per key position")
    return tokens


def attribution_table(values: Float[Array, "layer key"] | Float[Array, "layer query key"],
                      tokens: Sequence[str] | TokenInfo | None = None, method: str = "rollout",
                      layer_index: Sequence[int] | None = None, readout: int | str | None = None) -> ResultTable:
    """Tidy table of per-layer token attributions.

    values: ``[layer, key]``, or ``[layer, query, key]`` with ``readout`` (a row index, ``mean`` or ``max``).
    tokens: one string per key (or a ``TokenInfo``, first item); empty strings when omitted.
    method: the ``metric`` column (``rollout``, ``flow`` ...).
    layer_index: the layer numbers of the rows of ``values`` (default 0..), e.g. the ``layers`` given to flow.
    """
    array = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)
    if array.ndim == 3:
        if readout is None:
            raise AnalysisError("[layer, query, key] values need a readout", expected="readout=row index, mean or max",
                                got="readout=None")
        array = read_rows(array, readout)
    if array.ndim != 2:
        raise AnalysisError("attribution values have the wrong shape", expected="[layer, key] or [layer, query, key]",
                            got=f"shape {tuple(array.shape)}")
    n_layers, n_keys = array.shape
    layers = list(range(n_layers)) if layer_index is None else [int(x) for x in layer_index]
    if len(layers) != n_layers:
        raise AnalysisError("layer_index does not match the layer axis", expected=n_layers, got=len(layers))
    df = pd.DataFrame({
        "analysis": "attribution", "layer": np.repeat(layers, n_keys), "head": -1, "metric": method,
        "value": array.ravel(), "token_index": np.tile(np.arange(n_keys), n_layers),
        "token": np.tile(np.array(_token_strings(tokens, n_keys), dtype=object), n_layers),
    })
    return ResultTable(df, provenance={"method": method, "readout": readout})
