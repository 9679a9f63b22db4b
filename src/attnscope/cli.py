"""The ``attnscope`` command line. Bad input prints one line to stderr and exits 2 (``--debug`` for a traceback).

Commands: ``models``, ``info``, ``capture``, ``demo``, ``zoo``.
"""

import argparse
import sys
from collections.abc import Callable, Sequence

from .errors import AttnscopeError, InputError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = fn
        return fn
    return register


def _parse_stats(spec: str | None) -> tuple[tuple[str, ...], list[tuple[int, int]]]:
    """``sink,entropy,topk,mass`` -> statistic names and the key spans ``mass`` refers to (sink = position 0)."""
    if not spec:
        return (), []
    names, spans = [], []
    for raw in spec.split(","):
        name = raw.strip()
        if name == "sink":
            spans.append((0, 1))
            name = "mass"
        if name not in ("mass", "entropy", "topk"):
            raise InputError("unknown statistic", expected="sink, mass, entropy, topk", got=name)
        if name not in names:
            names.append(name)
    return tuple(names), spans


def _parse_spans(spec: str | None) -> list[tuple[int, int]]:
    if not spec:
        return []
    spans = []
    for part in spec.split(","):
        try:
            a, b = part.split(":")
            spans.append((int(a), int(b)))
        except ValueError:
            raise InputError("malformed key span", expected="START:END[,START:END]", got=part) from None
    return spans


@command("models")
def _models(args: argparse.Namespace) -> int:
    from . import zoo
    from .probes.loading import BUILTIN_MODELS

    for name, description in BUILTIN_MODELS.items():
        print(f"{name:20s} {description}")
    for organism in zoo.list_organisms():
        print(f"{'zoo:' + organism['name']:20s} {organism.get('summary', organism.get('task', ''))}")
    return 0


@command("info")
def _info(args: argparse.Namespace) -> int:
    from .probes.loading import load

    info = load(args.model).info()
    print(f"model: {info.name}\nfamily: {info.family} (adapter {info.adapter})\n"
          f"attention implementation: {info.attn_implementation}\nmax positions: {info.max_positions}")
    for tower in info.towers:
        print(f"tower {tower.name}: {tower.n_layers} layers x {tower.n_heads} heads "
              f"({tower.n_kv_heads} KV heads, d_head {tower.d_head}), kinds {','.join(tower.kinds)}")
    print(f"sites ({len(info.sites)}): " + " ".join(str(s) for s in info.sites[:24])
          + (" ..." if len(info.sites) > 24 else ""))
    return 0


@command("capture")
def _capture(args: argparse.Namespace) -> int:
    from .probes.capture import capture
    from .probes.loading import load

    stats, spans = _parse_stats(args.stats)
    spans += _parse_spans(args.mass_spans)
    model = load(args.model)
    trace = capture(model, args.text, heads=args.heads, rows=args.rows, stats=stats,
                    mass_spans=spans or [(0, 1)], topk=args.topk, patterns=True if args.patterns else None,
                    implementation="eager" if args.eager else "auto")
    path = trace.save(args.out)
    kept = "patterns" if any(r.probs is not None for r in trace.records.values()) else "statistics"
    print(f"captured {len(trace.sites)} sites ({kept}; attention path {trace.provenance['attention_path']}) "
          f"-> {path}")
    return 0


@command("demo")
def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, model_name=args.model)
    return 0


@command("zoo")
def _zoo(args: argparse.Namespace) -> int:
    from . import zoo

    if args.zoo_command == "list":
        for organism in zoo.list_organisms():
            print(f"{organism['name']:16s} {organism.get('architecture', '')}  {organism.get('task', '')}")
        return 0
    if not args.all and not args.name:
        raise InputError("zoo train needs a name or --all", expected="NAME or --all", got="nothing")
    paths = zoo.train_all(args.out) if args.all else [zoo.train(args.name, out_dir=args.out, seed=args.seed)]
    for path in paths if isinstance(paths, list) else [paths]:
        print(f"trained -> {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnscope", description="Capture and analyse attention.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list built-in models and zoo organisms")
    p = sub.add_parser("info", help="sites, layers, heads, KV heads, attention implementation")
    p.add_argument("--model", required=True)
    p = sub.add_parser("capture", help="capture attention and save a trace")
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True, action="append", help="input text (repeat for a batch)")
    p.add_argument("--heads", help="e.g. L3H5,L7H*")
    p.add_argument("--rows", help="query rows: last:K, first:K, A:B")
    p.add_argument("--stats", help="streaming statistics: sink,mass,entropy,topk (no full patterns kept)")
    p.add_argument("--mass-spans", help="key spans for mass, e.g. 0:1,5:9")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--patterns", action="store_true", help="keep full patterns also when --stats is given")
    p.add_argument("--eager", action="store_true", help="switch the model to eager attention while capturing")
    p.add_argument("--out", required=True)
    p = sub.add_parser("demo", help="run the main job on the built-in model and write results")
    p.add_argument("--out", default="results/demo")
    p.add_argument("--model", default="minilm")
    p = sub.add_parser("zoo", help="model organisms: list or retrain")
    zsub = p.add_subparsers(dest="zoo_command", required=True)
    zsub.add_parser("list")
    zt = zsub.add_parser("train")
    zt.add_argument("name", nargs="?")
    zt.add_argument("--all", action="store_true")
    zt.add_argument("--out", default=None)
    zt.add_argument("--seed", type=int, default=None)
    return parser


def _quiet_libraries() -> None:
    """Keep library warnings and progress bars off the one-line error contract."""
    import logging

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("huggingface_hub").setLevel(logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:
        _quiet_libraries()
    try:
        return COMMANDS[args.command](args)
    except AttnscopeError as exc:
        if args.debug:
            raise
        print(f"attnscope: error: {exc}".replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnscope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
