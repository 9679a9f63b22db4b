"""``attnscope ablate`` (one intervention, metric before/after) and ``attnscope prune`` (Michel et al. pruning).

``prune`` writes into ``--out``: ``state.json`` (after every step; a rerun with the same options resumes from
it), ``steps.parquet`` (the pruning steps), ``curve.parquet`` (with ``--curve``: metric vs fraction pruned,
importance vs random order), ``model/`` (the masked model, mask baked into the weights; with ``--structural``
the smaller model, reloadable with ``attnscope.circuits.structural.load_pruned``) and ``summary.json``.
"""

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError

_STATE_KEYS = ("model", "suite", "suite_args", "n", "seed", "metric", "keep_metric", "masking_amount", "variant",
               "layer_norm", "global_minmax", "one_shot", "granularity", "importance")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _suite_args(args: argparse.Namespace) -> dict[str, Any]:
    """``--suite-args seq_len=32,vocab_size=64`` -> generator keyword arguments (ints, floats or strings)."""
    out: dict[str, Any] = {}
    for part in filter(None, (args.suite_args or "").split(",")):
        if "=" not in part:
            raise InputError("malformed suite argument", expected="KEY=VALUE[,KEY=VALUE]", got=part)
        k, v = part.split("=", 1)
        for cast in (int, float):
            try:
                out[k.strip()] = cast(v)
                break
            except ValueError:
                continue
        else:
            out[k.strip()] = None if v.strip().lower() == "none" else v.strip()
    return out


def _setup(args: argparse.Namespace) -> tuple[Any, Any, list, Any]:
    from ..circuits.task_metrics import metric_for, suite_from_name
    from ..probes.loading import load

    model = load(args.model)
    suite_name = args.suite or ("default" if str(args.model).startswith("zoo:") else "sentences")
    suite = suite_from_name(suite_name, model=model, n_items=args.n, seed=args.seed, **_suite_args(args))
    batches, metric = metric_for(model, suite, args.metric, args.batch_size)
    return model, suite, batches, metric


def _reference(args: argparse.Namespace, model: Any, suite: Any) -> list[list[int]]:
    from ..circuits.task_metrics import eval_batches, reference_ids, suite_from_name

    name = args.suite or ("default" if str(args.model).startswith("zoo:") else "sentences")
    if name.endswith(".json"):
        ref = suite
    else:
        seed = args.reference_seed if args.reference_seed is not None else (suite.seed or 0) + 1
        ref = suite_from_name(name, model=model, n_items=args.n, seed=seed, **_suite_args(args))
    return reference_ids(eval_batches(ref, getattr(model, "tokenizer", None), args.batch_size))


def _ablate(args: argparse.Namespace) -> int:
    from ..circuits.task_metrics import evaluate
    from ..probes.heads import HeadSet
    from ..probes.interventions import InterventionPlan, apply_plan, mean_plan, resample_plan

    from .._atomic import check_output

    out = check_output(args.out, suffixes=(".parquet",)) if args.out else None  # before any work
    if args.save_plan:
        check_output(args.save_plan)
    model, suite, batches, metric = _setup(args)
    tower = model.info().tower()
    limit = tower.n_kv_heads if args.select == "kv" else tower.n_heads
    heads = HeadSet.parse(args.heads, n_layers=tower.n_layers, n_heads=limit)
    if args.mode == "mean":
        plan = mean_plan(model, heads, _reference(args, model, suite), per_position=args.per_position,
                         select=args.select)
    elif args.mode == "resample":
        plan = resample_plan(heads, _reference(args, model, suite), seed=args.seed or 0, select=args.select)
    else:
        plan = InterventionPlan(heads, args.mode, scale=args.scale, select=args.select)
    before = evaluate(model, batches, metric)
    with apply_plan(model, plan) as query:
        after = evaluate(model, batches, metric)
    if args.save_plan:
        _write_json(Path(args.save_plan), plan.to_dict())
    print(f"model {model.name}, suite {suite.name} ({len(suite)} items), metric {metric.name}")
    print(f"heads {query} ({args.mode}{'' if args.scale is None else f' x{args.scale}'})")
    print(f"before: {before:.4f}")
    print(f"after:  {after:.4f}  (delta {after - before:+.4f})")
    if out is not None:
        path = _ablation_table(args, model, suite, metric, query, before, after).save(out)
        print(f"wrote {path}")
    return 0


def _ablation_table(args: argparse.Namespace, model: Any, suite: Any, metric: Any, heads: Any, before: float,
                    after: float) -> Any:
    """The metric before and after the intervention (and their difference) as a ResultTable: model-level rows
    (``layer = head = -1``) with a ``setting`` column (before, after, delta)."""
    from ..results import ResultTable

    common = {"analysis": "ablate", "layer": -1, "head": -1, "metric": metric.name, "mode": args.mode,
              "heads": str(heads)}
    records = [{**common, "setting": setting, "value": float(value)}
               for setting, value in (("before", before), ("after", after), ("delta", after - before))]
    provenance = {"model": model.name, "suite": suite.name, "n_items": len(suite), "metric": metric.name,
                  "heads": str(heads), "mode": args.mode, "scale": args.scale, "select": args.select,
                  "per_position": args.per_position, "seed": args.seed, "main_metric": metric.name}
    return ResultTable.from_records(records, provenance)


def _write_json(path: Path, data: dict) -> None:
    from .._atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1))


def _run_key(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in _STATE_KEYS}


def _load_state(out: Path, key: dict[str, Any], restart: bool) -> dict[str, Any] | None:
    from .._atomic import read_text
    from ..errors import CorruptResultError

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


def _prune(args: argparse.Namespace) -> int:
    from ..circuits.pruning import iterative_pruning, pruning_curve

    from .._atomic import check_output

    out = check_output(args.out, folder=True)
    key = _run_key(args)
    resume = _load_state(out, key, args.restart)
    model, suite, batches, metric = _setup(args)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        _log(f"resuming from {out / 'state.json'} ({len(resume['steps'])} steps done)")

    def on_step(record: dict, state: dict) -> None:
        _write_json(out / "state.json", {"run": key, "pruning": state})
        _log(f"step {record['step']}: {record['fraction']:.0%} of heads masked -> {metric.name} "
             f"{record['metric']:.4f} ({'kept' if record['accepted'] else 'below threshold, stop'})")

    result = iterative_pruning(model, batches, metric, masking_amount=args.masking_amount,
                               threshold=args.keep_metric, variant=args.variant, normalize_layers=args.layer_norm,
                               global_minmax=args.global_minmax, reestimate=not args.one_shot,
                               granularity=args.granularity, importance_method=args.importance, resume=resume,
                               on_step=on_step)
    _write_json(out / "state.json", {"run": key, "pruning": result.options["state"]})
    result.table().save(out / "steps.parquet")
    _log(f"{metric.name}: original {result.original:.4f}, pruned {result.final:.4f} with {len(result.pruned)} "
         f"heads masked ({result.pruned})")
    summary: dict[str, Any] = {"model": args.model, "suite": suite.name, "metric": metric.name,
                               "original": result.original, "final": result.final, "pruned_heads": str(result.pruned),
                               "n_pruned": len(result.pruned), "steps": len(result.steps)}
    if args.curve and not (out / "curve.parquet").is_file():
        _log("pruning curves (importance vs random order) ...")
        orders = ("importance", "random") + (("ablation",) if args.importance == "ablation" else ())
        curve = pruning_curve(model, batches, metric, n_random=args.random_seeds, variant=args.variant,
                              granularity=args.granularity, orders=orders, progress=_log)
        curve.save(out / "curve.parquet")
    summary.update(_save_model(args, model, result, batches, out / "model"))
    _write_json(out / "summary.json", summary)
    print(f"pruned {len(result.pruned)} heads: {metric.name} {result.original:.4f} -> {result.final:.4f}; "
          f"wrote {out}")
    return 0


def _save_model(args: argparse.Namespace, model: Any, result: Any, batches: list, target: Path) -> dict[str, Any]:
    from ..circuits.structural import bake_mask, prune_heads_structurally, save_pruned, speed_comparison

    if not len(result.pruned):
        save_pruned(model, target)
        return {"saved": str(target), "structural": False}
    if not args.structural:
        bake_mask(model, result.pruned)
        save_pruned(model, target)
        return {"saved": str(target), "structural": False, "note": "mask baked into the output projections"}
    original = copy.deepcopy(model.module)
    report = prune_heads_structurally(model, result.pruned)
    save_pruned(model, target)
    batch = batches[0]
    speed = speed_comparison(original, model.module, batch.inputs)
    for note in report.notes:
        _log(note)
    _log(f"structural: {report.params_before:,} -> {report.params_after:,} parameters, forward "
         f"{speed['original_s'] * 1e3:.1f} ms -> {speed['pruned_s'] * 1e3:.1f} ms (x{speed['speedup']:.2f})")
    return {"saved": str(target), "structural": True, "report": report.to_dict(), "speed": speed}


SUITE_HELP = ("suite name (induction, recall, needle_tokens, agreement, ioi, sentences, default = the zoo "
              "organism's task) or a suite JSON file (default: default for zoo:NAME models, else sentences)")

ABLATE_EXAMPLES = """examples:
  attnscope ablate --model zoo:induction-2l --heads "L1H*" --suite induction
  attnscope ablate --model zoo:induction-2l --heads L1H0,L1H1 --mode mean --n 32 --out ablate.parquet
  attnscope ablate --model zoo:recall-llama --heads L1H0 --select kv --mode resample --save-plan plan.json
modes: zero (head output set to 0), mean (its mean over a reference suite), resample (from another item of the
reference suite), uniform (uniform attention), rescale (output times --scale).
"""

PRUNE_EXAMPLES = """examples:
  attnscope prune --model zoo:induction-2l --n 32 --out pruned-induction/
  attnscope prune --model zoo:recall-llama --granularity kv --keep-metric 0.8 --out pruned-recall/
  attnscope prune --model minilm --suite sentences --curve --out pruned-minilm/
Rerun the same command to resume from OUT/state.json (--restart starts over). Writes state.json, steps.parquet,
curve.parquet (with --curve), model/ and summary.json into --out.
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="zoo:NAME, minilm, a model folder or a hub name")
    p.add_argument("--suite", help=SUITE_HELP)
    p.add_argument("--n", type=int, default=64, help="items in the suite")
    p.add_argument("--suite-args", help="generator arguments, e.g. seq_len=32,vocab_size=64")
    p.add_argument("--seed", type=int, default=None, help="suite seed (default: held-out seed of zoo cards, or 0)")
    p.add_argument("--metric", choices=["accuracy", "loss", "embedding_cosine", "classification_accuracy"],
                   help="task metric (default: picked from the model and suite)")
    p.add_argument("--batch-size", type=int, default=16, help="items per forward pass")


def register(sub) -> None:
    p = sub.add_parser("ablate", help="intervene on heads and print the task metric before and after",
                       epilog=ABLATE_EXAMPLES, description="Evaluate the task metric on a suite, intervene on "
                       "the given heads, evaluate again; print both (and write them with --out).")
    _common(p)
    p.add_argument("--heads", required=True, help="heads to intervene on, e.g. L1H0,L1H3 or L2H*")
    p.add_argument("--mode", default="zero", choices=["zero", "mean", "resample", "uniform", "rescale"],
                   help="what replaces the heads' output (see below)")
    p.add_argument("--scale", type=float, help="factor of --mode rescale (required there)")
    p.add_argument("--select", default="query", choices=["query", "kv"],
                   help="kv: the head indices are KV heads, expanded to all their query heads (GQA)")
    p.add_argument("--per-position", action="store_true", help="mean mode: per-position means")
    p.add_argument("--reference-seed", type=int, help="seed of the reference suite for mean/resample "
                                                      "(default: suite seed + 1)")
    p.add_argument("--save-plan", help="write the intervention plan as JSON")
    p.add_argument("--out", default=None, help="also write the metric before/after as a results .parquet "
                   "(checked before any work)")
    p.set_defaults(run=_ablate)
    p = sub.add_parser("prune", help="iterative head pruning by importance (Michel et al. 2019)",
                       epilog=PRUNE_EXAMPLES, description="Mask the least important heads step by step while the "
                       "task metric stays above --keep-metric of the original; save the pruned model.")
    _common(p)
    p.add_argument("--keep-metric", type=float, default=0.9, help="stop below this fraction of the original metric")
    p.add_argument("--masking-amount", type=float, default=0.1, help="fraction of all heads masked per step")
    p.add_argument("--variant", default="abs_per_example",
                   choices=["abs_per_example", "abs_per_token", "abs_per_batch", "abs_of_sum"],
                   help="importance estimate: abs_per_example is Michel et al.'s formula, abs_per_token their "
                   "repository's")
    p.add_argument("--no-layer-norm", dest="layer_norm", action="store_false",
                   help="skip the per-layer L2 normalisation of importance")
    p.add_argument("--global-minmax", action="store_true", help="also min-max normalise globally (bertology)")
    p.add_argument("--one-shot", action="store_true", help="rank heads once instead of re-estimating each step")
    p.add_argument("--importance", default="gradient", choices=["gradient", "ablation"],
                   help="gradient: Michel et al. E|dL/dxi|; ablation: measured single-head ablation damage")
    p.add_argument("--granularity", default="head", choices=["head", "kv"],
                   help="kv: prune whole GQA groups (a KV head with all its query heads)")
    p.add_argument("--structural", action="store_true", help="remove the pruned heads from the weights")
    p.add_argument("--curve", action="store_true", help="also write importance- vs random-ordered curves")
    p.add_argument("--random-seeds", type=int, default=3, help="random orders in the curve")
    p.add_argument("--restart", action="store_true", help="ignore a previous run in --out")
    p.add_argument("--out", required=True, help="output folder (state.json, steps.parquet, model/, summary.json)")
    p.set_defaults(run=_prune)
