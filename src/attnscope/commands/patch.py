"""``attnscope patch --model M --suite ioi [--method exact] [--verify-top K] --out t.parquet`` (methods: ``METHODS``).

Activation patching of every head between clean and corrupted inputs (exact, batched), or its attribution-patching
estimates (AtP, AtP*), optionally with the top ``K`` estimates re-checked exactly (``--verify-top``).
"""

import argparse
import json
from pathlib import Path
from typing import Any

from .._atomic import check_output
from ..errors import InputError

METHODS = ("exact", "atp", "atp*", "atp-qk")
PAIR_SUITES = ("ioi", "induction", "recall")

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


def load_pairs(path: str) -> Any:
    """``PatchPairs`` from a JSON list of ``{"clean", "corrupt", "answers", "wrong"?, "positions"?}`` objects."""
    from ..circuits.patch_pairs import PatchPairs

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError("cannot read the pairs file", expected="a JSON list of pair objects",
                         got=f"{path} ({type(exc).__name__})") from None
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
        raise InputError("malformed pairs file", expected='[{"clean": [...], "corrupt": [...], "answers": [...]}]',
                         got=type(data).__name__)
    missing = [i for i, d in enumerate(data) if not {"clean", "corrupt", "answers"} <= set(d)]
    if missing:
        raise InputError("pair without clean, corrupt or answers", expected="all three keys", got=f"pair {missing[0]}")
    wrong = [d["wrong"] for d in data] if all("wrong" in d for d in data) else None
    positions = [d.get("positions", [len(d["clean"]) - 1]) for d in data]
    return PatchPairs.from_ids([d["clean"] for d in data], [d["corrupt"] for d in data],
                               answers=[d["answers"] for d in data], wrong=wrong, positions=positions,
                               name=Path(path).name)


def _label(row: dict) -> str:
    pos = int(row.get("position", -1))
    kind = "KV" if row.get("unit") == "kv_head" else "H"
    return f"L{int(row['layer'])}{kind}{int(row['head'])}" + (f"@{pos}" if pos >= 0 else "")


def _print(table: Any, top: int) -> None:
    df = table.df[table.df["head"] >= 0]
    prov = table.provenance
    print(f"{prov.get('analysis')}: {prov.get('metric')} ({prov.get('direction')}), model {prov.get('model')}, "
          f"pairs {prov.get('suite')}")
    if "role" in df:  # verified top-k: estimate and exact side by side, by rank of the estimate
        rows = df[df["method"] != "exact"].sort_values("rank").head(top)
        for row in rows.to_dict("records"):
            exact = f"exact {row['exact']:+.4g}" if row["verified"] else "not verified"
            print(f"  {_label(row):12s} {row['method']} estimate {row['value']:+.4g}   {exact}  ({row['role']})")
        print(f"unverified heads above |effect| {prov['threshold']:.3g}: fraction <= "
              f"{prov['false_negative_rate_upper']:.3f} ({prov['confidence']:.0%} Clopper-Pearson upper bound from "
              f"{prov['n_random']} random controls)")
        return
    shown = df.assign(size=df["value"].abs()).sort_values("size", ascending=False).head(top)
    for row in shown.to_dict("records"):
        kind = "estimate" if row["is_estimate"] else "exact"
        print(f"  {_label(row):12s} {row['value']:+.4g}  [{row['method']}, {kind}]")


def _patch(args: argparse.Namespace) -> int:
    from ..circuits.verified_patching import patching_analysis
    from ..probes.loading import load
    from .score import build_suite

    out = check_output(args.out)
    if not args.suite and not args.pairs:
        raise InputError("patch needs pairs", expected="--suite ioi|induction|recall|FILE.json or --pairs FILE.json",
                         got=None)
    if args.suite and args.suite not in PAIR_SUITES and not args.suite.endswith(".json"):
        raise InputError("no clean/corrupted pairs for this suite", expected=list(PAIR_SUITES) + ["FILE.json"],
                         got=args.suite, fix="use --pairs FILE.json for your own pairs")
    model = load(args.model)
    pairs = load_pairs(args.pairs) if args.pairs else None
    suite = build_suite(args.suite, model, args) if args.suite else None
    table = patching_analysis(model, suite, method=args.method, direction=args.direction, metric=args.metric,
                              granularity=args.granularity, normalize=args.normalize, verify_top=args.verify_top,
                              n_random=args.random_controls, batch_size=args.batch_size, seed=args.seed,
                              heads=args.heads, progress=not args.no_progress, pairs=pairs)
    table.provenance["model"] = args.model
    _print(table, args.top)
    table.save(out)
    print(f"wrote {out} ({len(table)} rows)")
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
