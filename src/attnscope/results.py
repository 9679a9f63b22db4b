"""``ResultTable``: a tidy table of analysis results (``analysis, layer, head, metric, value`` + extras), saved as
parquet with its provenance in the file's metadata.

Example:
    >>> import tempfile, os
    >>> from attnscope.results import ResultTable
    >>> t = ResultTable.from_records([{"analysis": "sinks", "layer": 0, "head": 1, "metric": "mass", "value": 0.5}],
    ...                              provenance={"model": "tiny"})
    >>> path = os.path.join(tempfile.mkdtemp(), "r.parquet")
    >>> ResultTable.load(t.save(path)).provenance["model"]
    'tiny'
"""

import json
from pathlib import Path

import pandas as pd

from ._atomic import atomic_write, check_output
from ._display import render
from .errors import CorruptResultError, InputError

REQUIRED_COLUMNS = ("analysis", "layer", "head", "metric", "value")
_META_KEY = b"attnscope"


class ResultTable:
    """A pandas DataFrame with the required columns, plus a provenance dict. ``.df`` is the frame."""

    def __init__(self, df: pd.DataFrame, provenance: dict | None = None):
        missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
        if missing:
            raise CorruptResultError("result table lacks required columns", expected=list(REQUIRED_COLUMNS),
                                     got=list(df.columns), fix=f"add columns {missing}")
        self.df = df.reset_index(drop=True)
        self.provenance: dict = dict(provenance or {})

    @classmethod
    def from_records(cls, records: list[dict], provenance: dict | None = None) -> "ResultTable":
        df = pd.DataFrame.from_records(records, columns=None if records else list(REQUIRED_COLUMNS))
        return cls(df, provenance)

    @classmethod
    def concat(cls, tables: list["ResultTable"]) -> "ResultTable":
        provenance = {}
        for table in tables:
            provenance.update(table.provenance)
        return cls(pd.concat([t.df for t in tables], ignore_index=True), provenance)

    def save(self, path: str | Path) -> Path:
        """Write parquet atomically (a unique temporary file beside it, then ``os.replace``; see ``_atomic``).

        Raises OutputError when ``path`` cannot be written (a directory, under a file, not writable) and
        InputError when the table cannot be stored as parquet; nothing is left behind either way.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq


        path = check_output(path)
        try:
            table = pa.Table.from_pandas(self.df, preserve_index=False)
            meta = dict(table.schema.metadata or {})
            meta[_META_KEY] = json.dumps({"format": "attnscope.results/1", "provenance": self.provenance},
                                         default=str).encode()
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise InputError("result table cannot be stored as parquet", expected="columns of one plain type each",
                             got=f"{type(exc).__name__}: {exc}"[:240],
                             fix="convert object columns to str or numbers before saving") from None
        return atomic_write(path, lambda tmp: pq.write_table(table.replace_schema_metadata(meta), tmp))

    @classmethod
    def load(cls, path: str | Path) -> "ResultTable":
        """Read a parquet file written by ``save``; raises CorruptResultError for anything else."""
        import pyarrow.parquet as pq

        path = Path(path)
        if not path.is_file():
            raise CorruptResultError("result file not found", expected="an existing .parquet file", got=str(path))
        try:
            table = pq.read_table(path)
            meta = json.loads((table.schema.metadata or {}).get(_META_KEY, b"{}"))
            df = table.to_pandas()
        except Exception as exc:
            raise CorruptResultError("not a readable parquet result file", expected="attnscope ResultTable parquet",
                                     got=f"{path.name} ({type(exc).__name__})", fix="re-run the analysis") from None
        return cls(df, meta.get("provenance", {}))

    def top(self, n: int = 10, metric: str | None = None, ascending: bool = False) -> pd.DataFrame:
        """The ``n`` rows with the largest (or smallest) value, optionally of one metric."""
        df = self.df if metric is None else self.df[self.df["metric"] == metric]
        return df.sort_values("value", ascending=ascending).head(n)

    def pivot(self, metric: str | None = None, aggfunc: str = "mean") -> pd.DataFrame:
        """Layers by heads grid of one metric (``aggfunc`` over rows that share a layer and head, e.g. concepts).

        ``metric`` may be left out only when the table holds one metric: averaging different metrics into one grid
        would mean nothing, so that raises InputError naming them."""
        metrics = sorted(self.df["metric"].unique())
        if metric is None and len(metrics) > 1:
            raise InputError("pivot of a table with several metrics", expected=f"pivot(metric=...) with one of "
                             f"{metrics}", got=None, fix=f"e.g. table.pivot({metrics[0]!r})")
        df = self.df if metric is None else self.df[self.df["metric"] == metric]
        if metric is not None and df.empty:
            raise InputError("no rows of this metric", expected=metrics, got=metric)
        return df.pivot_table(index="layer", columns="head", values="value", aggfunc=aggfunc)

    def show(self, view: str | None = None, **options):
        """A plotly figure of this table: head grid, attribution, pruning or profile (the plotting backend's
        ``show_table``, by default ``attnscope.viz.notebook.show_table``; see ``attnscope._display``)."""
        return render("table", self, view, **options)

    def __len__(self) -> int:
        return len(self.df)

    def _repr_html_(self) -> str:
        """Jupyter's view: a header (rows, analyses, metrics, provenance) and the first rows."""
        import html

        metrics = sorted(self.df["metric"].unique()) if len(self.df) else []
        analyses = sorted(self.df["analysis"].unique()) if len(self.df) else []
        provenance = ", ".join(f"{k}={v}" for k, v in list(self.provenance.items())[:8]
                               if isinstance(v, (str, int, float, bool)))
        head = (f"<b>ResultTable</b>: {len(self.df)} rows; analyses {html.escape(', '.join(analyses))}; metrics "
                f"{html.escape(', '.join(metrics[:12]))}<br><small>{html.escape(provenance)}</small>")
        return head + self.df.to_html(max_rows=20, max_cols=12, float_format=lambda v: f"{v:.4g}")

    def __repr__(self) -> str:
        analyses = sorted(self.df["analysis"].unique()) if len(self.df) else []
        return f"ResultTable({len(self.df)} rows, analyses={analyses})"
