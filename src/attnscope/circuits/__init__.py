"""attnscope.circuits: ANALYSES. Every analysis is a plain function returning a ``ResultTable`` (or an array for
rollout / flow); the registered ones (``list_analyses()``) are what ``attnscope score``, sweeps and the dashboard
run by name. Importing the package registers them all.

Example:
    >>> import attnscope
    >>> from attnscope import circuits
    >>> "induction" in [a.name for a in circuits.list_analyses()]
    True
    >>> trace = attnscope.capture(attnscope.load("minilm"), "Attention is all you need.")
    >>> circuits.rollout(trace).shape[0]    # one joint-attention matrix per layer
    6
"""

from .attention_rollout import rollout
from .attention_sinks import sink_scores, sinks
from .cls_token_pruning import cls_patch_scores, visual_token_pruning
from .concept_maps import concept_overlap, concept_retention
from .daam import daam_from_trace, daam_maps, daam_table
from .daam_segmentation import best_aggregation, daam_iou, daam_iou_table
from .detectors import duplicate_token_scores, induction_scores, pattern_scores, previous_token_scores
from .encoder_decoder_relevance import enc_dec_relevance, enc_dec_relevance_table
from .flow import attention_flow
from .gradient_patching import attribution_patching
from .head_ablation import ablation_sweep, single_head_sweep
from .hrv import head_relevance, hrv_table
from .hrv_weakening import ordered_weakening
from .importance import head_importance, importance_analysis
from .patch_pairs import PatchPairs, induction_pairs, metric_from, recall_pairs
from .patching import activation_patching, head_outputs
from .pruning import iterative_pruning, pruning_curve
from .registry import Analysis, get_analysis, list_analyses, register_analysis
from .relevance_propagation import relevance, relevance_table
from .retrieval_heads import retrieval, retrieval_scores
from .sink_window_perplexity import streaming_llm, streaming_perplexity
from .streaming_head_stats import head_stats
from .structural import bake_mask, prune_heads_structurally
from .task_metrics import default_metric, eval_batches, evaluate, metric_for
from .token_attribution import attribution_table
from .token_mass import special_token_mass
from .var_intervention import visual_attention_redistribution
from .verified_patching import patching_analysis, verified_top_k
from .vision_head_divergence import vision_divergence
from .visual_head_scores import top_visual_heads, visual_heads
from .visual_sink_tokens import visual_sinks

__all__ = [
    "Analysis", "PatchPairs", "ablation_sweep", "activation_patching", "attention_flow", "attribution_patching",
    "attribution_table", "bake_mask", "best_aggregation", "cls_patch_scores", "concept_overlap", "concept_retention", "daam_from_trace",
    "daam_iou", "daam_iou_table", "daam_maps", "daam_table", "default_metric", "duplicate_token_scores",
    "enc_dec_relevance", "enc_dec_relevance_table",
    "eval_batches", "evaluate", "get_analysis", "head_importance", "head_outputs", "head_relevance", "head_stats",
    "hrv_table", "importance_analysis", "induction_pairs", "induction_scores", "iterative_pruning",
    "list_analyses", "metric_for", "metric_from", "ordered_weakening", "patching_analysis", "pattern_scores",
    "previous_token_scores", "prune_heads_structurally", "pruning_curve", "recall_pairs", "register_analysis",
    "relevance", "relevance_table", "retrieval", "retrieval_scores", "rollout", "single_head_sweep",
    "sink_scores", "sinks", "special_token_mass", "streaming_llm", "streaming_perplexity", "top_visual_heads",
    "verified_top_k", "vision_divergence", "visual_attention_redistribution", "visual_heads", "visual_sinks",
    "visual_token_pruning",
]
