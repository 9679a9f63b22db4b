"""Save a live capture into the results folder the app was started with: ``live/<model>_<key>_<time>.*``.

- the trace (``AttentionTrace.save``: one safetensors file, written atomically): every layer's full pattern for a
  short input, streaming statistics (entropy, mass on token 0) for a long one;
- ``*_rollout.parquet``: the token attribution the page shows (short inputs; not for diffusion captures);
- ``*_ablation.parquet``: the attention change per head of the last ablation of this capture, if any.

The results tab lists the new run on its next page load. Nothing outside the results folder is written.

Example:
    >>> import tempfile, torch
    >>> from attnscope.probes.site import Site
    >>> from attnscope.probes.trace import AttentionTrace, SiteRecord
    >>> from attnscope.dashboards.files import ResultsRoot
    >>> from attnscope.dashboards.live_save import save_capture
    >>> from attnscope.dashboards.live_state import LiveCapture
    >>> trace = AttentionTrace([SiteRecord(site=Site("text", 0), probs=torch.full((1, 2, 3, 3), 1 / 3), n_query=3,
    ...                                    n_key=3)])
    >>> cap = LiveCapture("c1", "toy", "a b c", ["a", "b", "c"], 1, 2, False, trace, 0.0)
    >>> [p.split(".")[-1] for p in save_capture(None, cap, ResultsRoot(tempfile.mkdtemp()))]
    ['safetensors', 'parquet']
"""

import re
import time
from pathlib import Path
from typing import Any

from ..probes.capturing import capture
from ..results import ResultTable
from .files import ResultsRoot
from .live_ablation import LiveAblation
from .live_analysis import attribution_values
from .live_state import MODEL_LOCK, LiveCapture

FOLDER = "live"


def _stem(cap: LiveCapture) -> str:
    model = re.sub(r"[^A-Za-z0-9_.-]+", "-", cap.model_name).strip("-.")[:40] or "model"
    return f"{model}_{cap.key}_{time.strftime('%Y%m%d-%H%M%S')}"


def _rollout_table(cap: LiveCapture) -> ResultTable:
    values, title = attribution_values(cap)
    records = [{"analysis": "rollout", "layer": cap.n_layers - 1, "head": -1, "metric": "rollout", "value": float(v),
                "token_index": i, "token": t} for i, (t, v) in enumerate(zip(cap.tokens, values))]
    return ResultTable.from_records(records, provenance={"model": cap.model_name, "what": title})


def _ablation_table(cap: LiveCapture, ab: LiveAblation) -> ResultTable:
    metric = "attention change (mean total variation)"
    records = [{"analysis": "live-ablation", "layer": layer, "head": head, "metric": metric,
                "value": float(ab.change[layer, head])}
               for layer in range(ab.change.shape[0]) for head in range(ab.change.shape[1])]
    return ResultTable.from_records(records, provenance={"model": cap.model_name, "ablated": ab.heads,
                                                         "mode": ab.mode, "output": ab.summary})


def save_capture(handle: Any, cap: LiveCapture, root: ResultsRoot, ablation: LiveAblation | None = None) -> list[str]:
    """Write the capture (and its rollout and ablation tables) under ``root/live``; returns relative paths."""
    folder = Path(root.root) / FOLDER
    stem = _stem(cap)
    written = []
    trace = cap.trace
    if trace is None:
        with MODEL_LOCK:
            trace = capture(handle, cap.inputs, stats=("entropy", "mass"))
    written.append(trace.save(folder / f"{stem}.safetensors"))
    if cap.dense and cap.kind != "diffusion":  # a diffusion capture holds cross-attention only: no rollout
        written.append(_rollout_table(cap).save(folder / f"{stem}_rollout.parquet"))
    if ablation is not None and ablation.key == cap.key:
        written.append(_ablation_table(cap, ablation).save(folder / f"{stem}_ablation.parquet"))
    return [Path(p).relative_to(root.root).as_posix() for p in written]


__all__ = ["FOLDER", "save_capture"]
