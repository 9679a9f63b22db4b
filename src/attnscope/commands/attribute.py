"""``attnscope attribute --model M --text ... --method rollout --out table.parquet`` (methods: ``METHODS``).

The flags become an ``AttributionRequest``; the work is ``attnscope.tasks.attribution_job``.
"""

import argparse

from ..tasks.references import ModelRef
from .parsing import check_text

METHODS = ("rollout", "flow", "relevance", "attention")  # attnscope.tasks.attribution_job.METHODS (kept light here)


def request_of(args: argparse.Namespace) -> "AttributionRequest":  # noqa: F821 (imported when the command runs)
    """The ``AttributionRequest`` of the command line."""
    from ..tasks.attribution_job import AttributionRequest

    text = check_text(args.text, "--text")
    return AttributionRequest(ModelRef.parse(args.model), text, args.out, method=args.method, layer=args.layer,
                              position=args.position, target=args.target, head_fusion=args.head_fusion,
                              residual_weight=args.residual_weight)


def _attribute(args: argparse.Namespace) -> int:
    from ..tasks.attribution_job import run_attribution_job

    request = request_of(args)
    result = run_attribution_job(request)
    print(result.summary())
    return 0


EXAMPLES = """examples:
  attnscope attribute --model minilm --text "Paris is the capital of France." --out rollout.parquet
  attnscope attribute --model minilm --text "Paris is the capital of France." --method flow --layer -1 \\
      --out flow.parquet
  attnscope attribute --model minilm --text "Paris is the capital of France." --method relevance \\
      --out relevance.parquet
methods: rollout (Abnar & Zuidema: joint attention through the layers), flow (exact max-flow), relevance
(Chefer et al.: gradient-weighted relevance), attention (raw attention, heads fused like rollout).
"""


def register(sub) -> None:
    from .parsing import one_of

    p = sub.add_parser("attribute", help="token attribution: rollout, flow, relevance or raw attention",
                       epilog=EXAMPLES, description="How much each input token contributes to one output token; "
                       "prints the top tokens and writes a ResultTable.")
    p.add_argument("--model", required=True, help="minilm, zoo:NAME, a model folder or a hub name (needs a "
                   "tokenizer)")
    p.add_argument("--text", required=True, help="the input text")
    p.add_argument("--method", default="rollout", choices=METHODS, type=one_of(METHODS, "attribution method"),
                   help="attribution method")
    p.add_argument("--layer", type=int, default=None, help="only this layer's joint attention, negative counts "
                   "from the end (default: all; not for relevance)")
    p.add_argument("--position", type=int, default=None, help="output token (default: [CLS]=0 or last token)")
    p.add_argument("--target", type=int, default=None, help="relevance: class or token id (default: argmax)")
    p.add_argument("--head-fusion", default="mean", choices=["mean", "max", "min"],
                   help="how heads are fused per layer (rollout, flow, attention)")
    p.add_argument("--residual-weight", type=float, default=0.5,
                   help="weight of the identity (the residual stream) in each layer's matrix, rollout and flow; "
                   "0.5 is the paper's (A + I) / 2")
    p.add_argument("--out", required=True, help="results .parquet (checked before any work)")
    p.set_defaults(run=_attribute)
