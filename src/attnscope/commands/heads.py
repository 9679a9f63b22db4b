"""``attnscope ablate`` (one intervention, metric before/after) and ``attnscope prune`` (Michel et al. pruning).

The flags become an ``AblationRequest`` / ``PruneRequest``; the work is ``attnscope.tasks.ablation_job`` and
``attnscope.tasks.pruning_job``. ``prune`` writes into ``--out``: ``state.json`` (after every step; a rerun with the
same options resumes from it), ``steps.parquet`` (the pruning steps), ``curve.parquet`` (with ``--curve``: metric vs
fraction pruned, importance vs random order), ``model/`` (the masked model, mask baked into the weights; with
``--structural`` the smaller model, reloadable with ``attnscope.circuits.structural.load_pruned``) and
``summary.json``.
"""

import argparse
import sys

from ..tasks.references import ModelRef, SuiteRef
from .parsing import parse_suite_args


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def eval_spec_of(args: argparse.Namespace) -> "EvalSpec":  # noqa: F821 (imported when the command runs)
    """The model, suite and metric flags both commands share, as an ``EvalSpec``."""
    from ..tasks.task_eval import EvalSpec

    suite_args = parse_suite_args(args.suite_args)
    model, suite = ModelRef.parse(args.model), SuiteRef.parse(args.suite) if args.suite else None
    return EvalSpec(model, suite, n_items=args.n, seed=args.seed, suite_args=suite_args, metric=args.metric,
                    batch_size=args.batch_size)


def ablation_request_of(args: argparse.Namespace) -> "AblationRequest":  # noqa: F821
    """The ``AblationRequest`` of ``attnscope ablate``'s flags."""
    from ..tasks.ablation_job import AblationRequest

    return AblationRequest(eval_spec_of(args), args.heads, mode=args.mode, scale=args.scale, select=args.select,
                           per_position=args.per_position, reference_seed=args.reference_seed, out=args.out,
                           save_plan=args.save_plan)


def prune_request_of(args: argparse.Namespace) -> "PruneRequest":  # noqa: F821
    """The ``PruneRequest`` of ``attnscope prune``'s flags."""
    from ..tasks.pruning_job import PruneRequest

    return PruneRequest(eval_spec_of(args), args.out, keep_metric=args.keep_metric,
                        masking_amount=args.masking_amount, variant=args.variant, layer_norm=args.layer_norm,
                        global_minmax=args.global_minmax, one_shot=args.one_shot, importance=args.importance,
                        granularity=args.granularity, structural=args.structural, curve=args.curve,
                        random_seeds=args.random_seeds, restart=args.restart)


def _ablate(args: argparse.Namespace) -> int:
    from ..tasks.ablation_job import run_ablation_job

    request = ablation_request_of(args)
    result = run_ablation_job(request)
    print(result.summary())
    return 0


def _prune(args: argparse.Namespace) -> int:
    from ..tasks.pruning_job import run_prune_job

    request = prune_request_of(args)
    result = run_prune_job(request, log=_log)
    print(result.summary())
    return 0


SUITE_HELP = ("suite name (induction, recall, needle_tokens, agreement, ioi, sentences, images = shapes scenes for a "
              "vision encoder, latents = noisy latents for a Flux / SD3 denoiser, default = the zoo organism's task) "
              "or a suite JSON file (default: default for zoo:NAME models, images / latents for vision encoders / "
              "denoisers, else sentences)")

ABLATE_EXAMPLES = """examples:
  attnscope ablate --model zoo:induction-2l --heads "L1H*" --suite induction
  attnscope ablate --model zoo:induction-2l --heads L1H0,L1H1 --mode mean --n 32 --out ablate.parquet
  attnscope ablate --model zoo:recall-llama --heads L1H0 --select kv --mode resample --save-plan plan.json
  attnscope ablate --model ./t5-small --suite sentences --heads encoder.L0H1,decoder.L1H*
heads: L<layer>H<head> numbers the editable self-attention layers globally in forward order (encoder-decoders: the
encoder's, then the decoder's; LLaVA-class VLMs: the language model's, then the vision tower's);
TOWER[.KIND].L<layer>H<head> numbers them per tower (vision.L0H3, text.L2H*, encoder.L1H2, decoder.L0H*,
text.cross.L0H1 on Mllama). On models with several towers the output also names the
heads per tower (a tower_heads column in --out).
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
    p.add_argument("--metric", choices=["accuracy", "loss", "embedding_cosine", "classification_accuracy",
                                        "denoising_loss"],
                   help="task metric (default: picked from the model and suite)")
    p.add_argument("--batch-size", type=int, default=16, help="items per forward pass")


def register(sub) -> None:
    p = sub.add_parser("ablate", help="intervene on heads and print the task metric before and after",
                       epilog=ABLATE_EXAMPLES, description="Evaluate the task metric on a suite, intervene on "
                       "the given heads, evaluate again; print both (and write them with --out).")
    _common(p)
    p.add_argument("--heads", required=True, help="heads to intervene on, e.g. L1H0,L1H3 or L2H* (global layers), "
                   "or per tower: encoder.L1H2, vision.L0H*, decoder.L0H3")
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
