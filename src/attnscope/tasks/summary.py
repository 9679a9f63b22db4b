"""What ``attnscope score`` prints: a table's main metric's top heads (per concept for per-concept analyses), or
its rows for model-level analyses, then the summary rows (retrieval heads, layer sink means, sink fractions).

Example:
    >>> from attnscope.results import ResultTable
    >>> from attnscope.tasks.summary import summary_text
    >>> table = ResultTable.from_records([{"analysis": "x", "layer": 1, "head": 2, "metric": "score", "value": 0.9},
    ...                                  {"analysis": "x", "layer": 0, "head": 0, "metric": "score", "value": 0.1}])
    >>> print(summary_text(table, "x", top=1))
    x: score (, model ?)
     rank head  score
        1 L1H2    0.9
    <BLANKLINE>
"""

import io
from typing import Any

import pandas as pd

from ..results import ResultTable


def _head_label(row: Any) -> str:
    """``L3H5``, prefixed by the tower when it is not the text model's (``unet.up.1.L0H2``)."""
    tower = row.get("tower") if hasattr(row, "get") else None
    prefix = f"{tower}." if isinstance(tower, str) and tower and tower != "text" else ""
    return f"{prefix}L{int(row['layer'])}H{int(row['head'])}"


def summary_text(table: ResultTable, analysis: str, top: int = 10) -> str:
    """The main metric's top heads (or, for model-level analyses, its rows), then summary rows."""
    out = io.StringIO()
    df = table.df
    metric = table.provenance.get("main_metric") or (df["metric"].iloc[0] if len(df) else "")
    rows = df[df["metric"] == metric]
    heads = rows[rows["head"] >= 0].sort_values("value", ascending=False).head(top)
    print(f"{analysis}: {metric} ({table.provenance.get('suite', '')}, model "
          f"{table.provenance.get('model', '?')})", file=out)
    if "concept" in rows and len(heads):  # per-concept analyses (hrv): each concept's top heads
        for concept, group in rows[rows["head"] >= 0].groupby("concept", sort=False):
            best = group.sort_values("value", ascending=False).head(3)
            print(f"  {concept:>10s}: " + ", ".join(f"{_head_label(r)} {r['value']:.3g}" for _, r in best.iterrows()),
                  file=out)
    elif len(heads):
        view = pd.DataFrame({"rank": range(1, len(heads) + 1),
                             "head": [_head_label(r) for _, r in heads.iterrows()],
                             metric: heads["value"].round(4).to_numpy()})
        print(view.to_string(index=False), file=out)
    else:
        cols = [c for c in ("setting", "n_sink", "window", "mode", "metric", "value", "n_targets") if c in df]
        print(df[cols].to_string(index=False), file=out)
    if "retrieval_heads" in table.provenance:
        print(f"retrieval heads (score > {table.provenance.get('threshold')}): "
              f"{table.provenance['retrieval_heads'] or 'none'} "
              f"[{table.provenance.get('n_counted')} of {table.provenance.get('n_samples')} samples counted]",
              file=out)
    means = df[(df["head"] == -1) & (df["layer"] >= 0) & df["metric"].str.startswith("layer_mean:")]
    if len(means):
        grid = means.pivot_table(index="layer", columns="metric", values="value").round(3)
        grid.columns = [c.split(":", 1)[1] for c in grid.columns]
        sinks = [c for c in grid.columns if c != "other"]
        grid["dominant"] = grid[sinks].idxmax(axis=1)
        print("mean sink score of each layer's heads:\n" + grid.to_string(), file=out)
    fractions = df[(df["layer"] == -1) & (df["head"] == -1) & df["metric"].str.startswith("sink_fraction")]
    for _, r in fractions.iterrows():
        print(f"{r['metric']} (> {r.get('threshold')}): {r['value']:.3f}", file=out)
    return out.getvalue()
