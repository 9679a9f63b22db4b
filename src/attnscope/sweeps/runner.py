"""``run_sweep``: every cell of a spec as a Ray task, results written as they arrive.

Ray does the scheduling (resource requests per cell, placement on a local instance or a cluster, retries of
cells whose worker died: ``max_retries``); this module submits the cells that are not on disk yet, waits on them
with ``ray.wait``, writes each result atomically the moment it arrives, and shows a progress bar of cells done /
running / failed. A cell that raises is not retried (the error is deterministic) and is recorded in its
``_error.json``; a later run retries it. Interrupting the driver cancels the cells in flight and keeps every cell
already written, so rerunning the same command resumes.

A driver runs a cell only while it holds the cell's lock (``store.claim``) and claims only as many cells as its
Ray instance runs at once, so two drivers on one folder share the cells and none runs twice; a cell the other
driver finished (or failed) meanwhile is counted as skipped (or failed). A local instance listens on 127.0.0.1
only (``_loopback_only``); joining a cluster with ``address`` is the user's choice.
"""

import contextlib
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._atomic import check_output
from .._extras import require
from .._version import library_versions
from ..errors import InputError, OutputError
from . import store
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
    ray = require("ray", "sweeps")

    if ray.is_initialized():
        return False
    check_workers(workers)
    # ERROR, not WARNING, unless verbose: Ray's start-up warnings (e.g. its token-authentication notice) must not
    # add lines to the one-line error contract of the CLI
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": verbose,
                              "logging_level": logging.INFO if verbose else logging.ERROR}
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
        n = int(workers if workers is not None else os.cpu_count() or 1)
        with _loopback_only():
            ray.init(num_cpus=n, _node_ip_address="127.0.0.1", **kwargs)
    return True


def check_workers(workers: Any) -> None:
    """InputError unless ``workers`` is None (all cores) or a positive integer."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InputError("bad worker count", expected="an integer >= 1 (leave --workers out for all cores)",
                         got=workers, fix="e.g. --workers 2")


@contextlib.contextmanager
def _loopback_only():
    """A local Ray instance whose GCS, raylet, object manager and workers listen on 127.0.0.1 only.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone is turned back into the machine's network address
    (``resolve_ip_for_localhost``) and the servers then listen on every interface. Ray's single-machine mode
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, its default on macOS and Windows) keeps the node address on the
    loopback, and its servers bind that address only. Set for this process while Ray starts (the processes it
    starts inherit it), then restored. Joining a cluster with ``address`` is not affected.
    """
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    before_env, before_flag = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_flag
        if before_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before_env


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
    if out is not None:
        out = check_output(out, folder=True)  # before any work
    ray = require("ray", "sweeps")
    from tqdm.auto import tqdm

    spec = _coerce(spec)
    if remote is not None:
        spec = spec.with_remote(remote)
    check_workers(workers)
    out = Path(out or Path("results") / "sweeps" / spec.name)
    _make_folder(out)
    cells = spec.cells()
    store.write_manifest(out, spec.raw, cells, spec.name)
    started, since = time.perf_counter(), time.time()
    report = SweepReport(out=out, total=len(cells))
    waiting = []  # cells without a result: run by this driver once it holds their claim
    for cell in cells:
        if store.is_done(out, cell.id):
            report.skipped.append(cell.id)
        else:
            waiting.append(cell)
    sweep_info = {"name": spec.name, "spec": spec.raw, "driver_versions": library_versions(), "remote": spec.remote}
    if not waiting:
        report.seconds = time.perf_counter() - started
        return report
    bar = tqdm(total=len(cells), initial=len(report.skipped), desc=f"sweep {spec.name}", unit="cell",
               disable=not progress, mininterval=0.5)
    pending: dict[Any, Cell] = {}
    claims: dict[str, store.CellClaim] = {}
    owned, ray_up, slots = False, False, 1
    per_cell = sum(c.model.resources.num_cpus for c in waiting) / len(waiting)
    try:
        while waiting or pending:
            # claim only what can run now: a second driver on the same folder takes the rest
            mine, waiting = _claim_cells(out, waiting, claims, since, report, bar, slots - len(pending))
            if mine and not ray_up:
                owned, ray_up = start_ray(address, workers, verbose, runtime_env), True
                _check_feasible(waiting + mine, local=owned and not address)
                slots = _slots(per_cell)
            for cell in mine:
                options = {**cell.model.resources.ray_options(), "max_retries": spec.max_retries,
                           "retry_exceptions": False, "name": f"attnscope-cell-{cell.id}"}
                pending[_task().options(**options).remote(cell.to_dict(), spec.imports)] = cell
            if mine and waiting and len(pending) < slots:
                continue  # Ray just started: fill the free slots before waiting
            if not pending:
                time.sleep(0.5)  # every cell left is running in another driver: wait for it (or for its lock)
                continue
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                cell = pending.pop(ref)
                try:
                    _collect(ref, cell, out, sweep_info, report)
                finally:
                    claims.pop(cell.id).release()
                bar.update(1)
            bar.set_postfix(running=_running(len(pending), per_cell), failed=len(report.failed), refresh=False)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        for held in claims.values():
            held.release()
        bar.close()
        if owned:
            ray.shutdown()
        report.seconds = time.perf_counter() - started
    return report


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError("cannot create the results folder", expected="a writable folder path",
                          got=f"{out} ({type(exc).__name__}: {exc.strerror or exc})",
                          fix="pass --out a folder you can write to") from None


def _slots(per_cell_cpus: float) -> int:
    """Cells the cluster runs at once (at least 1)."""
    import ray

    try:
        cpus = ray.cluster_resources().get("CPU", 1.0)
    except Exception:  # noqa: BLE001 - an autoscaling cluster may report nothing yet
        return 1
    return max(1, int(cpus // per_cell_cpus) if per_cell_cpus > 0 else int(cpus))


def _claim_cells(out: Path, waiting: list[Cell], claims: dict, since: float, report: SweepReport,
                 bar: Any, limit: int) -> tuple[list[Cell], list[Cell]]:
    """(up to ``limit`` cells this driver now holds and must run, the cells still waiting). A cell another driver
    finished (or recorded a failure for) since this run started is counted as skipped (or failed), not rerun."""
    mine, busy = [], []
    for i, cell in enumerate(waiting):
        if len(mine) >= limit:
            busy.extend(waiting[i:])
            break
        held = store.claim(out, cell.id)
        if held is None:
            busy.append(cell)
            continue
        if store.is_done(out, cell.id):
            held.release()
            report.skipped.append(cell.id)
            bar.update(1)
            continue
        error = store.failed_since(out, cell.id, since)
        if error is not None:
            held.release()
            report.failed[cell.id] = f"(in another driver) {error.splitlines()[0]}"[:300]
            bar.update(1)
            continue
        store.clean_temporaries(out, cell.id)  # ours now: no other driver is writing them
        claims[cell.id] = held
        mine.append(cell)
    return mine, busy


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
