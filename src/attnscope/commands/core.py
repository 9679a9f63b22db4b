"""``attnscope models | info | capture | demo``."""

import argparse

from .parsing import capture_job_of


def _models(args: argparse.Namespace) -> int:
    from .. import zoo
    from ..models.builtin import BUILTIN_MODELS

    for name, description in BUILTIN_MODELS.items():
        print(f"{name:22s} {description}")
    for organism in zoo.list_organisms():
        print(f"{'zoo:' + organism['name']:22s} {organism.get('summary', organism.get('task', ''))}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from ..probes.coverage import summary_line
    from ..tasks import load_model

    loaded = load_model(args.model)
    info = loaded.info()
    print(f"model: {info.name}\nfamily: {info.family} (adapter {info.adapter})\n"
          f"attention implementation: {info.attn_implementation}\nmax positions: {info.max_positions}")
    for tower in info.towers:
        print(f"tower {tower.name}: {tower.n_layers} layers x {tower.n_heads} heads "
              f"({tower.n_kv_heads} KV heads, d_head {tower.d_head}), kinds {','.join(tower.kinds)}")
    print(f"sites ({len(info.sites)}): " + " ".join(str(s) for s in info.sites[:24])
          + (" ..." if len(info.sites) > 24 else ""))
    print(summary_line(loaded.module))  # the architecture's row of docs/architectures.md
    return 0


def _capture(args: argparse.Namespace) -> int:
    from ..tasks.capture_job import run_capture_job

    job = capture_job_of(args)
    trace, path = run_capture_job(job)
    kept = "patterns" if any(r.probs is not None for r in trace.records.values()) else "statistics"
    print(f"captured {len(trace.sites)} sites ({kept}; attention path {trace.provenance['attention_path']}) "
          f"-> {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .._atomic import check_output
    from ..tasks.demo import run_demo

    run_demo(check_output(args.out, folder=True), model_name=args.model)
    return 0


MODELS_EXAMPLES = """examples:
  attnscope models                      # names to pass to --model (minilm, zoo:induction-2l, ...)
  attnscope models | grep zoo:          # only the trained model organisms
"""

INFO_EXAMPLES = """examples:
  attnscope info --model minilm
  attnscope info --model zoo:recall-llama      # a GQA model: fewer KV heads than query heads
  attnscope info --model zoo:shapes-vlm
"""

CAPTURE_EXAMPLES = """examples:
  attnscope capture --model minilm --text "Hello world" --out trace.safetensors
  attnscope capture --model minilm --text "Hello world" --heads "L1H*" --rows last:4 \\
      --stats sink,entropy,topk --out stats.safetensors
  attnscope capture --model zoo:induction-2l --ids 5,17,3,9,5,17,3,9 --stats entropy --out ids.safetensors
Heads: L3H5 (one head), L7H* (all heads of layer 7), comma-separated. Rows: last:K, first:K or A:B (query rows).
With --stats only the statistics are kept (no n-by-n patterns) unless --patterns is given.
"""

DEMO_EXAMPLES = """examples:
  attnscope demo                                  # minilm, results in results/demo
  attnscope demo --out results/demo-minilm --model minilm
  attnscope dash --results results/demo           # then browse them
"""


def register(sub) -> None:
    sub.add_parser("models", help="list built-in models and zoo organisms", epilog=MODELS_EXAMPLES,
                   description="List the model names --model takes offline: built-in models and zoo organisms "
                   "(any transformers model folder or hub name works too).").set_defaults(run=_models)
    p = sub.add_parser("info", help="sites, layers, heads, KV heads, attention implementation",
                       epilog=INFO_EXAMPLES, description="Print a model's towers, layers, heads, KV heads and "
                       "attention sites.")
    p.add_argument("--model", required=True, help="minilm, zoo:NAME, a model folder or a hub name "
                   "(`attnscope models` lists the built-in ones)")
    p.set_defaults(run=_info)
    p = sub.add_parser("capture", help="capture attention and save a trace", epilog=CAPTURE_EXAMPLES,
                       description="Run the model on text (or token ids) and save its attention as a "
                       ".safetensors trace.")
    p.add_argument("--model", required=True, help="minilm, zoo:NAME, a model folder or a hub name")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--text", action="append", help="input text (repeat for a batch); this or --ids is "
                       "required")
    given.add_argument("--ids", action="append",
                       help="token ids, e.g. 5,17,3, for models saved without a tokenizer (repeat for a batch); "
                       "this or --text is required")
    p.add_argument("--heads", help="only these heads, e.g. L3H5,L7H* (default: all)")
    p.add_argument("--rows", help="only these query rows: last:K, first:K, A:B (default: all)")
    p.add_argument("--stats", help="streaming statistics: sink,mass,entropy,topk (no full patterns kept)")
    p.add_argument("--mass-spans", help="key spans for mass, e.g. 0:1,5:9 (default with --stats mass: 0:1)")
    p.add_argument("--topk", type=int, default=5, help="k of the topk statistic (largest attention weights kept "
                   "per row)")
    p.add_argument("--patterns", action="store_true", help="keep full patterns also when --stats is given")
    p.add_argument("--eager", action="store_true", help="switch the model to eager attention while capturing")
    p.add_argument("--out", required=True, help="trace file to write (.safetensors; checked before any work)")
    p.set_defaults(run=_capture)
    p = sub.add_parser("demo", help="run the main job on the built-in model and write results", epilog=DEMO_EXAMPLES,
                       description="Capture a few sentences (patterns and entropy), print a per-layer summary and "
                       "write the trace and a special-token-mass table into a folder (what `attnscope dash` "
                       "browses).")
    p.add_argument("--out", default="results/demo", help="results folder")
    p.add_argument("--model", default="minilm", help="a text model with a tokenizer (minilm, a model folder "
                   "or a hub name)")
    p.set_defaults(run=_demo)
