"""attnscope.dashboards: the Dash app (``attnscope dash --results DIR [--model M]``). Dash is imported lazily.

- ``create_app(results_dir, model=None)`` -> ``dash.Dash``; ``serve(...)`` runs it on 127.0.0.1 by default.
- ``ResultsRoot``: the path rule (result files inside the results directory only), shared by every callback and
  the ``/files/`` download route.
- ``run_ablation(model, heads, mode, text)``: the ablation panel's computation.
"""

from .files import PathRefused, ResultsRoot


def create_app(*args, **kwargs):
    """See ``attnscope.dashboards.app.create_app``."""
    from .app import create_app as _create

    return _create(*args, **kwargs)


def serve(*args, **kwargs):
    """See ``attnscope.dashboards.app.serve``."""
    from .app import serve as _serve

    return _serve(*args, **kwargs)


def run_ablation(*args, **kwargs):
    """See ``attnscope.dashboards.ablation.run_ablation``."""
    from .ablation import run_ablation as _run

    return _run(*args, **kwargs)


__all__ = ["PathRefused", "ResultsRoot", "create_app", "run_ablation", "serve"]
