"""``attnscope ablate``: the task metric on a suite, then again with an intervention on some heads.

``run_ablation_job`` checks the output paths (before any work), loads the model and the suite, builds the plan
(``tasks.plans.build_plan``; mean and resample draw their reference inputs from the suite drawn with
``reference_seed``, default the suite's seed + 1: ``tasks.task_eval.reference_inputs``), evaluates before and
under the plan, and writes the plan (``save_plan``) and the before / after / delta table (``out``).

Heads are global layer numbers (``L3H1``) or per tower (``encoder.L1H2``, ``vision.L0H*``). On a model with more
than one editable tower the summary also prints the heads per tower with the global numbering used, and the
table gains a ``tower_heads`` column (the same heads, per tower); ``layer`` / ``head`` stay -1 (model-level rows).

Example:
    >>> from attnscope.tasks.ablation_job import AblationRequest, run_ablation_job
    >>> from attnscope.tasks.references import ModelRef
    >>> from attnscope.tasks.task_eval import EvalSpec
    >>> spec = EvalSpec(ModelRef.parse("zoo:induction-2l"), n_items=4)
    >>> result = run_ablation_job(AblationRequest(spec, "L1H*"))
    >>> str(result.heads), result.metric, list(result.table.df.setting)
    ('L1H0,L1H1,L1H2,L1H3', 'next_token_accuracy', ['before', 'after', 'delta'])
    >>> print(result.summary().splitlines()[1])
    heads L1H0,L1H1,L1H2,L1H3 (zero)
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._atomic import atomic_write_text, check_output
from .._progress import stage
from ..circuits.task_metrics import evaluate
from ..probes.heads import HeadSet
from ..probes.interventions import InterventionPlan, apply_plan
from ..probes.tower_heads import describe_towers, editable_sites, is_multi_tower, tower_names
from ..results import ResultTable
from .plans import build_plan
from .task_eval import EvalSpec, Evaluation, prepare_evaluation, reference_inputs


@dataclass(frozen=True)
class AblationRequest:
    """One ``ablate`` run: what is evaluated, the heads (a spec such as ``L1H*``; KV heads with ``select="kv"``),
    the mode (zero, mean, resample, uniform, rescale with ``scale``), and where the table and the plan go."""

    evaluation: EvalSpec
    heads: str
    mode: str = "zero"
    scale: float | None = None
    select: str = "query"
    per_position: bool = False
    reference_seed: int | None = None
    out: "Path | str | None" = None
    save_plan: "Path | str | None" = None


@dataclass
class AblationResult:
    """The metric before and under the plan, the query heads it acted on, and the table (``path``: where it went)."""

    request: AblationRequest
    model: str
    suite: str
    n_items: int
    metric: str
    plan: InterventionPlan
    heads: HeadSet
    before: float
    after: float
    table: ResultTable
    path: Path | None = field(default=None)
    tower_heads: str | None = None  # the heads per tower, on models with several editable towers
    numbering: str | None = None  # the towers' global layer ranges, on those models

    def summary(self) -> str:
        """What ``attnscope ablate`` prints."""
        mode, scale = self.request.mode, self.request.scale
        lines = [f"model {self.model}, suite {self.suite} ({self.n_items} items), metric {self.metric}",
                 f"heads {self.heads} ({mode}{'' if scale is None else f' x{scale}'})"]
        if self.tower_heads is not None:
            lines += [f"per tower: {self.tower_heads} (global layers: {self.numbering})"]
        lines += [f"before: {self.before:.4f}", f"after:  {self.after:.4f}  (delta {self.after - self.before:+.4f})"]
        return "\n".join(lines + ([f"wrote {self.path}"] if self.path is not None else []))


def run_ablation_job(request: AblationRequest) -> AblationResult:
    """Check the outputs, evaluate, intervene, evaluate again; write the plan and the table when asked."""
    options = plan_options(request)
    out = check_output(request.out, suffixes=(".parquet",)) if request.out else None
    plan_path = check_output(request.save_plan) if request.save_plan else None
    evaluation = prepare_evaluation(request.evaluation)
    reference = (reference_inputs(request.evaluation, evaluation, request.reference_seed)
                 if request.mode in ("mean", "resample") else None)
    model, batches, metric = evaluation.model, evaluation.batches, evaluation.metric
    plan = build_plan(request.heads, request.mode, options, model, reference_ids=reference)
    stage(f"evaluating {metric.name} before the intervention")
    before = evaluate(model, batches, metric)
    stage(f"evaluating {metric.name} with {request.heads} {request.mode}-ablated")
    with apply_plan(model, plan) as query:
        after = evaluate(model, batches, metric)
    names = tower_names(query, model) if is_multi_tower(model) else None
    table = ablation_table(request, evaluation, query, before, after, names)
    if plan_path is not None:
        atomic_write_text(plan_path, json.dumps(plan.to_dict(), indent=1))
    path = table.save(out) if out is not None else None
    return AblationResult(request, model.name, evaluation.suite.name, len(evaluation.suite), metric.name, plan,
                          query, before, after, table, path, names,
                          describe_towers(editable_sites(model)) if names is not None else None)


def plan_options(request: AblationRequest) -> dict[str, Any]:
    """The options of ``build_plan`` that the request's mode takes (a plan records no option its mode ignores)."""
    if request.mode == "mean":
        return {"select": request.select, "per_position": request.per_position}
    if request.mode == "resample":
        return {"select": request.select, "seed": request.evaluation.seed or 0}
    return {"select": request.select, "scale": request.scale}


def ablation_table(request: AblationRequest, evaluation: Evaluation, heads: HeadSet, before: float,
                   after: float, tower_heads: str | None = None) -> ResultTable:
    """The metric before and after the intervention (and their difference) as a ResultTable: model-level rows
    (``layer = head = -1``) with a ``setting`` column (before, after, delta); ``heads`` in global numbering, and
    ``tower_heads`` (the same heads per tower) when given (models with several editable towers)."""
    metric = evaluation.metric.name
    common = {"analysis": "ablate", "layer": -1, "head": -1, "metric": metric, "mode": request.mode,
              "heads": str(heads), **({"tower_heads": tower_heads} if tower_heads is not None else {})}
    records = [{**common, "setting": setting, "value": float(value)}
               for setting, value in (("before", before), ("after", after), ("delta", after - before))]
    provenance = {"model": evaluation.model.name, "suite": evaluation.suite.name, "n_items": len(evaluation.suite),
                  "metric": metric, "heads": str(heads), "mode": request.mode, "scale": request.scale,
                  "select": request.select, "per_position": request.per_position, "seed": request.evaluation.seed,
                  "main_metric": metric, **({"tower_heads": tower_heads} if tower_heads is not None else {})}
    return ResultTable.from_records(records, provenance)
