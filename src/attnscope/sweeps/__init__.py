"""attnscope.sweeps: grids of models x suites x analyses x interventions run as Ray tasks, stored as a partitioned
parquet dataset (one folder per cell), resumable.

Example (not run here: it starts Ray):
    >>> from attnscope.sweeps import run_sweep, load_sweep          # doctest: +SKIP
    >>> report = run_sweep("sweep.yaml", out="results/sweep", workers=2)  # doctest: +SKIP
    >>> load_sweep("results/sweep").df.groupby("cell_model").value.mean()  # doctest: +SKIP

``load_sweep(dir) -> ResultTable`` is the reader the dashboard uses.
"""

from .runner import SweepReport, run_sweep
from .spec import Cell, SweepSpec, load_spec, parse_spec
from .store import load_sweep, sweep_schema

__all__ = ["Cell", "SweepReport", "SweepSpec", "load_spec", "load_sweep", "parse_spec", "run_sweep", "sweep_schema"]
