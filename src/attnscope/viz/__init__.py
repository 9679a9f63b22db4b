"""attnscope.viz: plotly figures built from ResultTables and traces (never imports dash).

- ``head_grid`` / ``head_grid_diff``: layers x heads heatmaps (``customdata = [layer, head]`` for clicks).
- ``attention_pattern``: one head or fused heads with token labels; pooled or top-k for long inputs.
- ``token_attribution`` / ``attribution_by_layer``: rollout / flow / relevance values as coloured text, per layer.
- ``pruning_curves``, ``context_profile`` (``sink_profile``, ``retrieval_profile``): line views.
- ``collect_queries_keys`` + ``qk_embedding``: the AttentionViz joint query-key embedding.
- ``model_view`` (every layer x head as thumbnails), ``head_view`` (token-to-token lines per head, hover highlight),
  ``block_pattern`` + ``long_sequence_view`` (4k-32k tokens as block aggregates from row chunks, with zoom and arcs);
  ``collect_layer_inputs``: one layer's queries and keys, from which any rows of a pattern are computed.
- ``image_overlay`` / ``attention_map``: attention on patch grids and diffusion latents.
- ``show_trace`` / ``show_table``: pick the figure for a trace or table (``.show()`` in notebooks).

Example:
    >>> from attnscope.results import ResultTable
    >>> from attnscope import viz
    >>> t = ResultTable.from_records([{"analysis": "a", "layer": 0, "head": 0, "metric": "m", "value": 1.0}])
    >>> viz.show_table(t).data[0].type
    'heatmap'
"""

from .._extras import require

require("plotly", "viz")  # every figure is a plotly figure: one clear error naming attnscope[viz]

from .attribution import attribution_by_layer, attribution_values, token_attribution
from .curves import context_profile, pruning_curves, retrieval_profile, sink_profile
from .embedding import QueryKeySample, collect_queries_keys, joint_embedding, normalize_queries_keys, qk_embedding
from .head_inputs import LayerInputs, collect_layer_inputs
from .head_lines import head_view
from .head_thumbnails import model_view
from .heads import head_grid, head_grid_diff, head_values
from .images import GridMap, attention_map, image_overlay
from .long_sequence import BlockPattern, block_pattern, long_sequence_view
from .notebook import figure_size, long_trace_view, show_table, show_trace, trace_head_table
from .pattern import Pattern, attention_pattern, pool_pattern, top_attended, topk_sparsify, trace_pattern

__all__ = [
    "BlockPattern", "GridMap", "LayerInputs", "Pattern", "QueryKeySample", "attention_map", "attention_pattern",
    "attribution_by_layer", "attribution_values", "block_pattern", "collect_layer_inputs", "head_view",
    "long_sequence_view", "long_trace_view", "model_view",
    "collect_queries_keys", "context_profile", "figure_size", "head_grid", "head_grid_diff", "head_values",
    "image_overlay", "joint_embedding", "normalize_queries_keys", "pool_pattern", "pruning_curves", "qk_embedding",
    "retrieval_profile", "show_table", "show_trace", "sink_profile", "token_attribution", "top_attended",
    "topk_sparsify", "trace_head_table", "trace_pattern",
]
