"""``attnscope score ANALYSIS --model M --suite S [suite options] [--heads] --out results.parquet``.

ANALYSIS is any registered analysis (``attnscope score list``): retrieval, sinks, induction, prev-token,
duplicate, streaming-llm, pattern, and whatever other modules register. Suites by name: induction, needle,
needle-text, recall, ioi, agreement, sentences, bigram (Bigram-Backcopy), or a path to a suite JSON file; a zoo
organism's card supplies the suite parameters it was trained with. Prints the top heads of the analysis' main
metric and writes the ResultTable. Analyses that accept ``partial`` (retrieval) save per-sample rows
to ``OUT.partial.parquet`` as they go; rerunning the same command resumes from it (``--restart`` discards it).
"""

import argparse

from ..errors import InputError
from ..tasks.references import SUITE_NAMES, ModelRef, SuiteRef
from .parsing import int_list, parse_concepts, parse_options, suite_params


def request_of(args: argparse.Namespace) -> "ScoreRequest":  # noqa: F821 (imported when the command runs)
    """The ``ScoreRequest`` of the command line (every string parsed here, at the edge)."""
    from ..tasks.scoring import ScoreRequest

    if not args.model or not args.suite or not args.out:
        raise InputError("score needs --model, --suite and --out", expected="all three",
                         got={"model": args.model, "suite": args.suite, "out": args.out})
    offered = {"heads": args.heads, "batch_size": args.batch_size, "progress": not args.no_progress,
               "threshold": args.threshold, "template": args.template, "window": args.window,
               "n_sinks": int_list(args.n_sinks), "mode": args.mode, "max_new_tokens": args.max_new_tokens,
               "concept_words": parse_concepts(args.concepts), "num_inference_steps": args.steps}
    options, params = parse_options(args.option), suite_params(args)
    model, suite = ModelRef.parse(args.model), SuiteRef.parse(args.suite)
    return ScoreRequest(args.analysis, model, suite, out=args.out, options=options, offered=offered,
                        n_items=args.n_items, seed=args.seed, suite_params=params, restart=args.restart)


def _score(args: argparse.Namespace) -> int:
    from ..tasks import list_analyses, score, summary_text

    if args.analysis == "list":
        for a in list_analyses():
            print(f"{a.name:22s} {a.description}")
        return 0
    request = request_of(args)
    table = score(request)
    print(summary_text(table, args.analysis, args.top), end="")
    print(f"wrote {request.out} ({len(table)} rows)")
    return 0


REFERENCE_DEFAULTS = """defaults and the papers' reference code (change them with --option KEY=VALUE):
  retrieval  span=answer: copies / length of the answer span, the reference's real_needle
             (nightdessert/Retrieval_Head); span=needle divides by the whole needle sentence.
             Decoding runs up to 50 tokens and stops only after a newline (never at EOS).
  induction, prev-token, duplicate
             normalise=rows: sum(A*P)/sum(A) over the rows the template covers;
             normalise=tl: over every row, exactly TransformerLens' detect_head (pattern's default).
  importance variant=abs_per_example (Michel et al.'s formula); abs_per_token is their repository's.
  hrv        the reference protocol of SNU-DRL/HRV (one seeded generator for all prompts, words re-sampled
             at every cross-attention call); see attnscope.circuits.hrv for the named alternatives.

examples:
  attnscope score list                                        # the analyses
  attnscope score sinks --model minilm --suite sentences --out sinks.parquet
  attnscope score induction --model zoo:induction-2l --suite induction --n-items 32 --out ind.parquet
  attnscope score retrieval --model zoo:recall-llama --suite recall --option span=needle --out r.parquet
  attnscope score visual-heads --model zoo:shapes-vlm --suite shapes --out vh.parquet
"""

USAGE = """attnscope score ANALYSIS --model MODEL --suite SUITE --out OUT [options]
       attnscope score list"""


def register(sub) -> None:
    p = sub.add_parser("score", help="score heads over a prompt suite (retrieval, sinks, induction, ...)",
                       epilog=REFERENCE_DEFAULTS, usage=USAGE,
                       description="Run an analysis over a prompt suite, print its top heads and write a "
                       "ResultTable.\n--model, --suite and --out are required (except for `attnscope score list`).")
    p.add_argument("analysis", help="a registered analysis (sinks, induction, prev-token, duplicate, retrieval, "
                   "pattern, streaming-llm, hrv, visual-heads, ...), or 'list' to list them all")
    p.add_argument("--model", help="minilm, zoo:NAME, a model folder or a hub name (required)")
    p.add_argument("--suite", help=f"{', '.join(SUITE_NAMES)}, or a suite .json file (required)")
    p.add_argument("--out", help="results .parquet, checked before any work; resumes from OUT.partial.parquet "
                   "(required)")
    g = p.add_argument_group("suite options")
    g.add_argument("--n-items", type=int, default=16, help="items in the suite (needle-text: per grid cell)")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per item (needle-text: context length)")
    g.add_argument("--vocab-size", type=int, default=None, help="vocabulary of a token suite (default: the model's "
                   "vocabulary)")
    g.add_argument("--seed", type=int, default=0, help="suite seed")
    g.add_argument("--context-lengths", help="needle-text: comma-separated token counts, e.g. 200,400")
    g.add_argument("--depths", help="needle-text: comma-separated depth fractions, e.g. 0.1,0.5,0.9")
    g.add_argument("--needle-len", type=int, default=4, help="needle: needle tokens")
    g = p.add_argument_group("analysis options")
    g.add_argument("--heads", help="restrict to heads, e.g. L1H*,L2H3 (default: all)")
    g.add_argument("--batch-size", type=int, default=None, help="items per forward pass (default: the "
                   "analysis' own)")
    g.add_argument("--threshold", type=float, default=None, help="retrieval 0.1, sinks 0.3 by default")
    g.add_argument("--max-new-tokens", type=int, default=None, help="retrieval: decode length")
    g.add_argument("--template", help="pattern: a .npy [query, key] template")
    g.add_argument("--window", type=int, default=None, help="streaming-llm: recent-token window")
    g.add_argument("--n-sinks", help="streaming-llm: kept initial tokens, e.g. 0,1,4")
    g.add_argument("--mode", choices=("recompute", "cache"), default=None, help="streaming-llm window mode (default: the analysis' own)")
    g.add_argument("--concepts", help="hrv: concepts, 'red,green,circle' or 'colour=red|green;shape=circle|square' "
                   "(default for --suite shapes: each colour and shape)")
    g.add_argument("--steps", type=int, default=None, help="diffusion analyses: denoising steps")
    g.add_argument("--option", action="append", help="any other analysis option, KEY=VALUE (repeatable)")
    g.add_argument("--top", type=int, default=10, help="heads to print")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--restart", action="store_true", help="ignore a partial result from an earlier run")
    p.set_defaults(run=_score)
