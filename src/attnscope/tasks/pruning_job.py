"""``attnscope prune``: Michel et al. iterative head pruning, resumable, with the pruned model saved.

``run_prune_job`` writes into ``out``: ``state.json`` (after every step; a rerun with the same request resumes from
it, ``restart=True`` starts over), ``steps.parquet`` (the pruning steps), ``curve.parquet`` (with ``curve``: metric
vs fraction pruned, importance vs random order), ``model/`` (the masked model, mask baked into the weights; with
``structural`` the smaller model, reloadable with ``attnscope.circuits.structural.load_pruned``) and
``summary.json``. Progress goes to ``log`` (one line a step).

Example:
    >>> import tempfile
    >>> from attnscope.tasks.pruning_job import PruneRequest, run_prune_job
    >>> from attnscope.tasks.references import ModelRef
    >>> from attnscope.tasks.task_eval import EvalSpec
    >>> spec = EvalSpec(ModelRef.parse("zoo:induction-2l"), n_items=4)
    >>> result = run_prune_job(PruneRequest(spec, tempfile.mkdtemp(), keep_metric=0.5, masking_amount=0.25))
    >>> sorted(p.name for p in result.out.iterdir())
    ['model', 'state.json', 'steps.parquet', 'summary.json']
    >>> result.saved["n_pruned"] == len(result.pruning.pruned)
    True
"""

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._atomic import atomic_write_text, check_output, read_text
from ..circuits.pruning import PruningResult, iterative_pruning, pruning_curve
from ..circuits.structural import bake_mask, prune_heads_structurally, save_pruned, speed_comparison
from ..errors import CorruptResultError, InputError
from ..results import ResultTable
from .task_eval import EvalSpec, Evaluation, prepare_evaluation

_RUN_OPTIONS = ("keep_metric", "masking_amount", "variant", "layer_norm", "global_minmax", "one_shot", "granularity",
                "importance")


def _quiet(message: str) -> None:
    """The default ``log``: say nothing."""


@dataclass(frozen=True)
class PruneRequest:
    """One ``prune`` run: what is evaluated, the output folder, and Michel et al.'s options (stop below
    ``keep_metric`` of the original metric, ``masking_amount`` of the heads a step, the importance ``variant`` and
    ``importance`` method, per-layer normalisation, ``one_shot`` ranking, ``granularity`` head or kv)."""

    evaluation: EvalSpec
    out: "Path | str"
    keep_metric: float = 0.9
    masking_amount: float = 0.1
    variant: str = "abs_per_example"
    layer_norm: bool = True
    global_minmax: bool = False
    one_shot: bool = False
    importance: str = "gradient"
    granularity: str = "head"
    structural: bool = False
    curve: bool = False
    random_seeds: int = 3
    restart: bool = False


@dataclass
class PruneResult:
    """The output folder, the metric's name, the pruning result and what ``summary.json`` holds."""

    out: Path
    metric: str
    pruning: PruningResult
    saved: dict[str, Any]

    def summary(self) -> str:
        """What ``attnscope prune`` prints."""
        pruning = self.pruning
        return (f"pruned {len(pruning.pruned)} heads: {self.metric} {pruning.original:.4f} -> {pruning.final:.4f}; "
                f"wrote {self.out}")


def run_key(request: PruneRequest) -> dict[str, Any]:
    """What ``state.json`` records of the run: a rerun resumes only with the same key."""
    spec = request.evaluation
    suite_args = ",".join(f"{k}={v}" for k, v in spec.suite_args.items()) or None
    return {"model": str(spec.model), "suite": None if spec.suite is None else str(spec.suite),
            "suite_args": suite_args, "n": spec.n_items, "seed": spec.seed, "metric": spec.metric,
            **{k: getattr(request, k) for k in _RUN_OPTIONS}}


def run_prune_job(request: PruneRequest, log: Callable[[str], None] = _quiet) -> PruneResult:
    """Check the folder and any state in it (before any work), prune, and write the results into it."""
    key = run_key(request)
    out = check_output(request.out, folder=True)
    resume = load_state(out, key, request.restart)
    evaluation = prepare_evaluation(request.evaluation)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        log(f"resuming from {out / 'state.json'} ({len(resume['steps'])} steps done)")
    result = _prune(request, evaluation, out, key, resume, log)
    metric = evaluation.metric.name
    saved: dict[str, Any] = {"model": str(request.evaluation.model), "suite": evaluation.suite.name,
                             "metric": metric, "original": result.original, "final": result.final,
                             "pruned_heads": str(result.pruned), "n_pruned": len(result.pruned),
                             "steps": len(result.steps)}
    if request.curve and not (out / "curve.parquet").is_file():
        _curve(request, evaluation, log).save(out / "curve.parquet")
    saved.update(save_model(request, evaluation, result, out / "model", log))
    _write_json(out / "summary.json", saved)
    return PruneResult(out, metric, result, saved)


def _prune(request: PruneRequest, evaluation: Evaluation, out: Path, key: dict[str, Any],
           resume: dict[str, Any] | None, log: Callable[[str], None]) -> PruningResult:
    """The pruning steps, ``state.json`` written after each, then ``steps.parquet``."""
    metric = evaluation.metric

    def on_step(record: dict, state: dict) -> None:
        _write_json(out / "state.json", {"run": key, "pruning": state})
        log(f"step {record['step']}: {record['fraction']:.0%} of heads masked -> {metric.name} "
            f"{record['metric']:.4f} ({'kept' if record['accepted'] else 'below threshold, stop'})")

    result = iterative_pruning(evaluation.model, evaluation.batches, metric, masking_amount=request.masking_amount,
                               threshold=request.keep_metric, variant=request.variant,
                               normalize_layers=request.layer_norm, global_minmax=request.global_minmax,
                               reestimate=not request.one_shot, granularity=request.granularity,
                               importance_method=request.importance, resume=resume, on_step=on_step)
    _write_json(out / "state.json", {"run": key, "pruning": result.options["state"]})
    result.table().save(out / "steps.parquet")
    log(f"{metric.name}: original {result.original:.4f}, pruned {result.final:.4f} with {len(result.pruned)} "
        f"heads masked ({result.pruned})")
    return result


def _curve(request: PruneRequest, evaluation: Evaluation, log: Callable[[str], None]) -> ResultTable:
    log("pruning curves (importance vs random order) ...")
    orders = ("importance", "random") + (("ablation",) if request.importance == "ablation" else ())
    return pruning_curve(evaluation.model, evaluation.batches, evaluation.metric, n_random=request.random_seeds,
                         variant=request.variant, granularity=request.granularity, orders=orders, progress=log)


def save_model(request: PruneRequest, evaluation: Evaluation, result: PruningResult, target: Path,
               log: Callable[[str], None] = _quiet) -> dict[str, Any]:
    """Save the pruned model into ``target``: the mask baked into the weights, or (``structural``) the heads
    removed, timed against the original; returns what ``summary.json`` records of it."""
    model = evaluation.model
    if not len(result.pruned):
        save_pruned(model, target)
        return {"saved": str(target), "structural": False}
    if not request.structural:
        bake_mask(model, result.pruned)
        save_pruned(model, target)
        return {"saved": str(target), "structural": False, "note": "mask baked into the output projections"}
    original = copy.deepcopy(model.module)
    report = prune_heads_structurally(model, result.pruned)
    save_pruned(model, target)
    speed = speed_comparison(original, model.module, evaluation.batches[0].inputs)
    for note in report.notes:
        log(note)
    log(f"structural: {report.params_before:,} -> {report.params_after:,} parameters, forward "
        f"{speed['original_s'] * 1e3:.1f} ms -> {speed['pruned_s'] * 1e3:.1f} ms (x{speed['speedup']:.2f})")
    return {"saved": str(target), "structural": True, "report": report.to_dict(), "speed": speed}


def load_state(out: Path, key: dict[str, Any], restart: bool) -> dict[str, Any] | None:
    """The pruning state to resume from ``out/state.json`` (None: start afresh); refuses a malformed state or one
    of a run with another key."""
    path = out / "state.json"
    if restart or not path.is_file():
        return None
    fix = f"delete {path}, or pass --restart to start over"
    try:
        saved = json.loads(read_text(path, "pruning state", "state.json written by attnscope prune",
                                     error=CorruptResultError))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CorruptResultError("pruning state is not valid JSON", expected="state.json written by attnscope prune",
                                 got=f"{path} ({exc})"[:240], fix=fix) from None
    pruning = saved.get("pruning") if isinstance(saved, dict) else None
    if not isinstance(pruning, dict) or not isinstance(pruning.get("steps"), list) or \
            (pruning["steps"] and not {"mask", "accepted_mask", "original"} <= set(pruning)) or \
            not isinstance(pruning.get("original", 0.0), (int, float)):
        raise CorruptResultError("malformed pruning state", expected="{'run': {...}, 'pruning': {'steps': [...]}}",
                                 got=f"{path} ({type(saved).__name__})", fix=fix)
    if saved.get("run") != key:
        raise InputError("the output folder holds a pruning run with other options", expected=key,
                         got=saved.get("run"), fix="use another --out, or --restart to start over")
    return pruning if "mask" in pruning else None  # no step recorded yet: nothing to resume


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))
