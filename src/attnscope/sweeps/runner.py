"""``run_sweep``: every cell of a spec as a Ray task, results written as they arrive.

Ray does the scheduling (resource requests per cell, placement on a local instance or a cluster, retries of
cells whose worker died: ``max_retries``); this module submits the cells that are not on disk yet, waits on them
with ``ray.wait``, writes each result atomically the moment it arrives, and shows a progress bar of cells done /
running / failed. A cell that raises is not retried (the error is deterministic) and is recorded in its
``_error.json``; a later run retries it. Interrupting the driver cancels the cells in flight and keeps every cell
already written, so rerunning the same command resumes.
"""

import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from . import store
from .cells import versions
from .spec import Cell, SweepSpec, load_spec, parse_spec

_TASK = None


@dataclass
class SweepReport:
    """What a run did: cells skipped (already on disk), done now, failed (id -> error), and the wall time."""

    out: Path
    total: int
    skipped: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    cell_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed and len(self.skipped) + len(self.done) == self.total

    def table(self):
        return store.load_sweep(self.out)

    def summary(self) -> str:
        return (f"{len(self.done)} cells done, {len(self.skipped)} already on disk, {len(self.failed)} failed "
                f"(of {self.total}) in {self.seconds:.1f} s -> {self.out}")


def _task():
    """The Ray remote function (defined lazily: importing attnscope never imports ray)."""
    global _TASK
    if _TASK is None:
        import ray

        def run_cell_task(cell_data: dict, imports: list[str]) -> dict:
            from attnscope.sweeps.cells import run_cell

            return run_cell(cell_data, imports)

        _TASK = ray.remote(run_cell_task)
    return _TASK


def _coerce(spec: Any) -> SweepSpec:
    if isinstance(spec, SweepSpec):
        return spec
    if isinstance(spec, dict):
        return parse_spec(spec)
    return load_spec(spec)


def start_ray(address: str | None, workers: int | None, verbose: bool = False,
              runtime_env: dict | None = None) -> bool:
    """Join ``address`` or start a local instance with ``workers`` CPUs; True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": verbose,
                              "logging_level": logging.INFO if verbose else logging.WARNING}
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    if address:
        _probe(address)
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:
            raise InputError("cannot join the Ray cluster", expected="a running cluster at --address "
                             "(ray start --head, or ray://HOST:10001)", got=f"{address}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}"[:240],
                             fix="check the address, or leave --address out for a local instance") from None
    else:
        n = int(workers or os.cpu_count() or 1)
        if n < 1:
            raise InputError("bad worker count", expected=">= 1", got=workers)
        ray.init(num_cpus=n, **kwargs)
    return True


def _probe(address: str, timeout: float = 10.0) -> None:
    """Fail fast when a ``HOST:PORT`` / ``ray://HOST:PORT`` address does not accept connections (``ray.init``
    would retry for minutes)."""
    import socket

    target = address.removeprefix("ray://")
    if address == "auto":  # the cluster `ray start` recorded (or RAY_ADDRESS): a stale record would hang ray.init
        try:
            from ray._private.services import canonicalize_bootstrap_address

            target = canonicalize_bootstrap_address("auto") or ""
        except Exception as exc:
            raise InputError("cannot join the Ray cluster", expected="a running cluster for --address auto",
                             got=f"{type(exc).__name__}: {exc}"[:200], fix="start one with `ray start --head`, "
                             "or leave --address out for a local instance") from None
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except OSError as exc:
        where = address if address == target else f"{address} ({target})"
        raise InputError("cannot join the Ray cluster", expected=f"a Ray head accepting connections at {where}",
                         got=f"{type(exc).__name__}: {exc}"[:200], fix="start it with `ray start --head` (port "
                         "6379; ray:// clients use 10001), or leave --address out for a local instance") from None


def _check_feasible(cells: list[Cell], local: bool) -> None:
    import ray

    total = ray.cluster_resources()
    for cell in cells:
        r = cell.model.resources
        short = [(k, need, total.get(key, 0.0)) for k, key, need in
                 (("num_cpus", "CPU", r.num_cpus), ("num_gpus", "GPU", r.num_gpus), ("memory", "memory", r.memory or 0))
                 if need > total.get(key, 0.0)]
        if short:
            k, need, have = short[0]
            message = f"cell {cell.id} ({cell.model.label}) asks for {k}={need:g}, the cluster has {have:g}"
            if local:
                raise InputError("a cell can never be scheduled", expected=f"{k} <= {have:g}", got=message,
                                 fix="lower `resources:` in the spec, raise --workers, or join a bigger cluster "
                                     "with --address")
            logging.getLogger(__name__).warning("%s (waiting for the autoscaler)", message)


def _error_text(exc: BaseException) -> str:
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        head = f"{type(cause).__name__}: {cause}".splitlines()[0]
        return head + "\n" + str(exc)
    return f"{type(exc).__name__}: {exc}"


def _running(n_pending: int, per_cell_cpus: float) -> int:
    import ray

    try:
        total, free = ray.cluster_resources().get("CPU", 0.0), ray.available_resources().get("CPU", 0.0)
    except Exception:
        return n_pending
    if per_cell_cpus <= 0:
        return n_pending
    return max(0, min(n_pending, round((total - free) / per_cell_cpus)))


def run_sweep(spec: Any, out: "str | Path | None" = None, *, address: str | None = None, workers: int | None = None,
              remote: "bool | str | None" = None, progress: bool = True, verbose: bool = False,
              runtime_env: dict | None = None) -> SweepReport:
    """Run every cell of ``spec`` (a ``SweepSpec``, a mapping, or a YAML path) that is not yet in ``out``.

    address: join this Ray cluster (``auto``, ``HOST:6379``, ``ray://HOST:10001``); default: start a local instance
    with ``workers`` CPUs (default: all cores) and stop it at the end. An already initialised Ray is used as is.
    remote: run captures on the nnsight backend (``True``) or its local simulation (``"local"``); overrides the spec.
    runtime_env: passed to ``ray.init`` (e.g. ``{"py_modules": [...]}`` to ship plugin code to a cluster).
    Returns a ``SweepReport``; read the results with ``load_sweep(out)``.
    """
    import ray
    from tqdm.auto import tqdm

    spec = _coerce(spec)
    if remote is not None:
        spec = spec.with_remote(remote)
    out = Path(out or Path("results") / "sweeps" / spec.name)
    out.mkdir(parents=True, exist_ok=True)
    store.clean_temporaries(out)
    cells = spec.cells()
    store.write_manifest(out, spec.raw, cells, spec.name)
    started = time.perf_counter()
    report = SweepReport(out=out, total=len(cells))
    todo = []
    for cell in cells:
        if store.is_done(out, cell.id):
            report.skipped.append(cell.id)
        else:
            todo.append(cell)
    sweep_info = {"name": spec.name, "spec": spec.raw, "driver_versions": versions(), "remote": spec.remote}
    if not todo:
        report.seconds = time.perf_counter() - started
        return report
    owned = start_ray(address, workers, verbose, runtime_env)
    bar = tqdm(total=len(cells), initial=len(report.skipped), desc=f"sweep {spec.name}", unit="cell",
               disable=not progress, mininterval=0.5)
    pending: dict[Any, Cell] = {}
    try:
        _check_feasible(todo, local=owned and not address)
        task = _task()
        for cell in todo:
            options = {**cell.model.resources.ray_options(), "max_retries": spec.max_retries,
                       "retry_exceptions": False, "name": f"attnscope-cell-{cell.id}"}
            pending[task.options(**options).remote(cell.to_dict(), spec.imports)] = cell
        per_cell = sum(c.model.resources.num_cpus for c in todo) / len(todo)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                _collect(ref, pending.pop(ref), out, sweep_info, report)
                bar.update(1)
            bar.set_postfix(running=_running(len(pending), per_cell), failed=len(report.failed), refresh=False)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
        if owned:
            ray.shutdown()
        report.seconds = time.perf_counter() - started
    return report


def _collect(ref: Any, cell: Cell, out: Path, sweep_info: dict, report: SweepReport) -> None:
    import ray

    try:
        result = ray.get(ref)
    except ray.exceptions.RayError as exc:
        text = _error_text(exc)
        store.write_failure(out, cell, text)
        report.failed[cell.id] = text.splitlines()[0][:300]
        return
    try:
        store.write_cell(out, cell, result, sweep_info)
    except Exception as exc:  # e.g. a table pyarrow cannot store: a failure of this cell, not of the sweep
        store.write_failure(out, cell, f"writing the result failed: {type(exc).__name__}: {exc}\n"
                            + traceback.format_exc())
        report.failed[cell.id] = f"writing the result failed: {type(exc).__name__}: {exc}"[:300]
        return
    report.done.append(cell.id)
    report.cell_seconds[cell.id] = float(result.get("seconds") or 0.0)


__all__ = ["SweepReport", "run_sweep", "start_ray"]
