"""``attnscope patch --model M --suite ioi [--method exact] [--verify-top K] --out t.parquet`` (methods: ``METHODS``).

Activation patching of every head between clean and corrupted inputs (exact, batched), or its attribution-patching
estimates (AtP, AtP*), optionally with the top ``K`` estimates re-checked exactly (``--verify-top``). The flags
become a ``PatchRequest``; the work is ``attnscope.tasks.patch_job``.
"""

import argparse

from ..tasks.references import ModelRef, SuiteRef
from .parsing import suite_params

METHODS = ("exact", "atp", "atp*", "atp-qk")  # attnscope.tasks.patch_job.METHODS (kept light here)

EXAMPLES = """what runs:
  exact   one patched forward per head and pair (batched: the pairs replicated once per head in a pass)
  atp     gradient x activation difference of each head's output: 2 forwards + 1 backward per batch (estimate)
  atp*    AtP* (Kramar et al. 2024): atp with GradDrop (L extra backwards); a magnitude (estimate)
  atp-qk  AtP through each head's queries, keys and values (misses saturated attention; estimate)
direction: noise (default) runs the clean input with the corrupted head output patched in;
           denoise runs the corrupted input with the clean head output patched in.
effect = metric(patched) - metric(baseline run); --normalize divides by metric(clean) - metric(corrupt).

examples:
  attnscope patch --model zoo:induction-2l --suite induction --out exact.parquet
  attnscope patch --model zoo:induction-2l --suite induction --method 'atp*' --verify-top 4 --out v.parquet
  attnscope patch --model zoo:recall-llama --suite recall --granularity kv_head --out kv.parquet
  attnscope patch --model zoo:induction-2l --suite induction --n-items 32 --direction denoise --normalize \\
      --out denoise.parquet
  attnscope patch --model zoo:induction-2l --pairs pairs.json --metric prob --granularity head_position \\
      --out p.parquet
  attnscope patch --model ./my-gpt2 --suite ioi --out ioi.parquet      # ioi needs a model with a tokenizer
pairs.json: [{"clean": [ids], "corrupt": [ids, same length], "answers": [id], "wrong": [id],
              "positions": [scored position]}, ...] (positions default to the last; wrong optional)
"""


def request_of(args: argparse.Namespace) -> "PatchRequest":  # noqa: F821 (imported when the command runs)
    """The ``PatchRequest`` of the command line."""
    from ..tasks.patch_job import PatchRequest

    params = suite_params(args) if args.suite else {}
    suite = SuiteRef.parse(args.suite) if args.suite else None
    return PatchRequest(ModelRef.parse(args.model), args.out, suite, pairs=args.pairs, method=args.method,
                        direction=args.direction, metric=args.metric, granularity=args.granularity,
                        normalize=args.normalize, verify_top=args.verify_top, random_controls=args.random_controls,
                        heads=args.heads, n_items=args.n_items, seed=args.seed, suite_params=params,
                        batch_size=args.batch_size, progress=not args.no_progress)


def _patch(args: argparse.Namespace) -> int:
    from ..tasks.patch_job import run_patch_job

    request = request_of(args)
    result = run_patch_job(request)
    print(result.summary(args.top))
    return 0


def register(sub) -> None:
    p = sub.add_parser("patch", help="activation patching / AtP / AtP* of every head (clean vs corrupted pairs)",
                       epilog=EXAMPLES, description="Causal effect of every attention head between clean and "
                       "corrupted inputs.\nGive the pairs with --suite or --pairs (one of them is required).")
    p.add_argument("--model", required=True, help="zoo:NAME, a model folder, minilm ...")
    p.add_argument("--suite", help="ioi (needs a tokenizer), induction, recall, or a suite .json with corrupt_ids "
                   "(this or --pairs is required)")
    p.add_argument("--pairs", help="a JSON file of your own equal-length clean/corrupted token-id pairs (this or "
                   "--suite is required)")
    p.add_argument("--method", choices=METHODS, default="exact", help="exact patching or an estimate (see below; "
                   "quote 'atp*' in a shell)")
    p.add_argument("--direction", choices=("noise", "denoise"), default="noise",
                   help="noise: corrupt the clean run; denoise: restore the corrupted run (see below)")
    p.add_argument("--metric", choices=("logit_diff", "logit", "prob", "loss"), default=None,
                   help="default: logit_diff when the pairs have wrong answers (ioi), else logit")
    p.add_argument("--granularity", choices=("head", "head_position", "kv_head"), default="head",
                   help="patch units: heads, heads at each position, or KV heads (GQA groups)")
    p.add_argument("--normalize", action="store_true", help="effect / (metric(clean) - metric(corrupt))")
    p.add_argument("--verify-top", type=int, default=0, metavar="K",
                   help="re-check the top K estimates (and --random-controls others) by exact patching")
    p.add_argument("--random-controls", type=int, default=10, help="random heads verified with --verify-top")
    p.add_argument("--heads", help="restrict to heads, e.g. L1H*,L0H3 (kv_head: KV-head indices)")
    p.add_argument("--out", required=True, help="results .parquet (checked before any work)")
    g = p.add_argument_group("suite options")
    g.add_argument("--n-items", type=int, default=16, help="pairs in the suite")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per item (default: the suite's, or the zoo "
                   "card's)")
    g.add_argument("--vocab-size", type=int, default=None, help="vocabulary of a token suite (default: the "
                   "model's vocabulary)")
    g.add_argument("--seed", type=int, default=0, help="suite seed (also of the random controls)")
    g.add_argument("--batch-size", type=int, default=16, help="pairs per forward pass")
    g.add_argument("--top", type=int, default=10, help="heads to print")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_patch)
