"""``attnscope attribute --model M --text ... --method rollout --out table.parquet`` (methods: ``METHODS``)."""

import argparse

import torch

from ..errors import InputError

METHODS = ("rollout", "flow", "relevance", "attention")


def _token_values(args: argparse.Namespace, model) -> tuple:
    """Per-layer attribution rows ``[layer, key]`` for one text, and its token strings."""
    from ..circuits.attribution_table import attribution_table  # noqa: F401  (import check)
    from ..probes.capture import capture

    trace = capture(model, [args.text])
    attn = trace.stack()[:, 0]  # [layer, head, query, key]
    position = args.position if args.position is not None else (0 if model.info().family == "encoder" else -1)
    n = attn.shape[-2]
    if not -n <= position < n:
        raise InputError("--position out of range", expected=f"-{n} <= position < {n}", got=position,
                         fix=f"the text has {n} tokens: pick one of them (negative counts from the end)")
    options = {"head_fusion": args.head_fusion, "residual_weight": args.residual_weight}
    if args.method == "rollout":
        from ..circuits.rollout import rollout

        joint = rollout(attn, **options)
    elif args.method == "flow":
        from ..circuits.flow import attention_flow

        joint = attention_flow(attn, **options)
    else:  # raw attention, heads fused the same way
        fuse = {"mean": attn.mean(1), "max": attn.amax(1), "min": attn.amin(1)}[args.head_fusion]
        joint = fuse
    joint = torch.as_tensor(joint)
    return joint[:, position, :], trace.tokens.strings[0], position


def _attribute(args: argparse.Namespace) -> int:
    from ..circuits.attribution_table import attribution_table
    from ..circuits.relevance import relevance_table
    from ..probes.loading import load

    from .._atomic import check_output
    from .parsing import check_text

    if args.method not in METHODS:
        raise InputError("unknown attribution method", expected=list(METHODS), got=args.method,
                         fix="pass --method " + "|".join(METHODS))
    out = check_output(args.out)
    check_text(args.text, "--text")
    model = load(args.model)
    if args.method == "relevance":
        table = relevance_table(model, [args.text], target=args.target, position=args.position)
    else:
        values, tokens, position = _token_values(args, model)
        n_layers = values.shape[0]
        if args.layer is not None and not -n_layers <= args.layer < n_layers:
            raise InputError("layer out of range", expected=f"-{n_layers} <= layer < {n_layers}", got=args.layer)
        layers = [args.layer % n_layers] if args.layer is not None else list(range(n_layers))
        table = attribution_table(values[layers], tokens=tokens, method=args.method, layer_index=layers)
        table.provenance.update({"model": model.name, "text": args.text, "position": position})
    path = table.save(out)
    last = table.df[table.df["layer"] == table.df["layer"].max()]
    top = last.sort_values("value", ascending=False).head(8)
    print(f"{args.method} attribution ({model.name}), top tokens"
          + (f" at layer {int(last['layer'].iloc[0])}" if args.method != "relevance" else "") + ":")
    for row in top.itertuples():
        print(f"  {row.token_index:4d} {str(row.token):>15s} {row.value:.4f}")
    print(f"wrote {path}")
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
