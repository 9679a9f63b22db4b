"""Attention kernels: a fused Triton forward with per-head interventions and streaming statistics, and its exact
chunked torch reference.

- ``attention_with_interventions``: output (with gate/zero, rescale and uniform-attention heads), log-sum-exp,
  entropy, span mass, top-k, selected rows of probabilities; GQA, bottom-right causal masks, padding masks.
- ``streaming_statistics_cuda``: the statistics alone (no values read), used by capture on CUDA tensors.
- ``attention_reference``: the torch reference (CPU backend, test oracle).
- ``cpu_rows.row_statistics``: the fused C row kernel behind CPU streaming statistics in capture (built at first use).

Triton is imported only when a Triton backend runs. Conventions: ``attnscope.kernels.problem``.
"""

from .dispatch import attention_with_interventions, resolve_backend, row_probabilities, streaming_statistics_cuda
from .problem import head_interventions
from .reference import attention_reference

__all__ = ["attention_reference", "attention_with_interventions", "head_interventions", "resolve_backend",
           "row_probabilities", "streaming_statistics_cuda"]
